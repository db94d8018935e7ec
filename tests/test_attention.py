"""sdpa and eager attention give the same confidences, NaFlex padding masks included."""

from __future__ import annotations

import numpy as np
from conftest import make_settings

from visual_buffet_siglip.engine import SiglipTagger


def test_sdpa_and_eager_agree(checkpoint, images):
    runs = {}
    for attention in ("sdpa", "eager"):
        tagger = SiglipTagger(make_settings(checkpoint, attention=attention))
        assert tagger.plan.attention == attention
        assert tagger.loaded.model.config._attn_implementation == attention
        runs[attention] = tagger.embed_images(images), tagger.embed_texts(["dog", "red car", "sunset"])
        runs[attention] = tagger.score(*runs[attention])
    assert np.abs(runs["sdpa"] - runs["eager"]).max() <= 1e-5


def test_naflex_padding_is_masked_in_both_attentions(checkpoints, images):
    """Garbage in the padded patches must not move the embedding, with sdpa as with eager."""
    import torch
    from PIL import Image

    from visual_buffet_siglip.engine import _pooled

    for attention in ("sdpa", "eager"):
        tagger = SiglipTagger(make_settings(checkpoints["naflex"], attention=attention))
        inputs = tagger.loaded.processor(images=[Image.open(images[1])], return_tensors="pt")
        mask = inputs["pixel_attention_mask"]
        assert (mask == 0).any(), "the test image must leave padding"
        noisy = dict(inputs)
        noisy["pixel_values"] = torch.where(mask[..., None].bool(), inputs["pixel_values"],
                                            torch.randn_like(inputs["pixel_values"]) * 5)
        with torch.inference_mode():
            clean = _pooled(tagger.loaded.model.get_image_features(**inputs))
            dirty = _pooled(tagger.loaded.model.get_image_features(**noisy))
        assert torch.abs(clean - dirty).max() <= 1e-5
