"""8-bit and 4-bit (bitsandbytes) on CPU: really quantized, head kept whole, close to float32.

Bounds, measured on random "small" checkpoints (width 128, logit scale 10, bias -2; widths
that 4-bit CPU kernels accept) and justified: bitsandbytes int8 keeps ~0.4 % relative
error per weight, nf4 ~5-10 %; random weights have no outlier structure to protect, so
errors add up across layers, and a logit error e moves a sigmoid by at most e/4. Observed
max confidence differences were 0.003-0.010 (8-bit) and 0.08-0.12 (4-bit), with image
embeddings at cosine >= 0.9999 / >= 0.96 of float32. The asserted bounds leave about 2x
margin; on trained checkpoints the gap is far smaller. Needs the quant extra (CI installs it).
"""

from __future__ import annotations

import numpy as np
import pytest
from checkpoints import build_checkpoint
from conftest import make_settings

from visual_buffet_siglip.engine import SiglipTagger

BOUNDS = {"8bit": (0.025, 0.999), "4bit": (0.25, 0.95)}  # max |conf diff|, min embedding cosine
LABELS = ["dog", "cat", "beach", "red car", "sunset", "tree", "snow", "boat"]


@pytest.fixture(scope="module")
def small_checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("small")
    return {family: build_checkpoint(family, root / family, shape="small") for family in ("siglip", "naflex")}


@pytest.mark.parametrize("quantization", ["8bit", "4bit"])
@pytest.mark.parametrize("family", ["siglip", "naflex"])
def test_quantized_confidences_stay_close(small_checkpoints, images, family, quantization):
    import bitsandbytes as bnb

    exact = SiglipTagger(make_settings(small_checkpoints[family]))
    quant = SiglipTagger(make_settings(small_checkpoints[family], quantization=quantization, backend="torch"))
    model = quant.loaded.model
    layer = bnb.nn.Linear8bitLt if quantization == "8bit" else bnb.nn.Linear4bit
    assert sum(isinstance(m, layer) for m in model.modules()) >= 8  # really quantized
    head = model.vision_model.head
    assert not any(isinstance(m, (bnb.nn.Linear8bitLt, bnb.nn.Linear4bit)) for m in head.modules())
    assert not isinstance(model.vision_model.embeddings.patch_embedding, (bnb.nn.Linear8bitLt, bnb.nn.Linear4bit))

    image_exact, image_quant = exact.embed_images(images), quant.embed_images(images)
    cosine = (image_exact * image_quant).sum(axis=1).min()
    diff = np.abs(exact.score(image_exact, exact.embed_texts(LABELS))
                  - quant.score(image_quant, quant.embed_texts(LABELS))).max()
    print(f"{family} {quantization}: max confidence difference {diff:.4f}, min cosine {cosine:.6f}")
    max_diff, min_cosine = BOUNDS[quantization]
    assert np.isfinite(diff) and diff <= max_diff and cosine >= min_cosine
