"""Shared fixtures: tiny random checkpoints of each SigLIP family, test images, the reference scorer."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no hub here: fail fast instead of retrying
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from checkpoints import FAMILIES, build_checkpoint  # noqa: E402

LABELS = ["dog", "Cat", "golden retriever", "BEACH", "mountain", "red car", "blue sky", "Tree",
          "old house", "person", "city street", "night", "sunset", "food", "pizza", "flower",
          "bird", "boat", "snow", "river", "Bridge", "portrait", "Macro", "wedding"]


@pytest.fixture(autouse=True)
def _logging_as_found():
    """cli.main() sets our logger up for a command line (level, stderr handler); the next test starts clean."""
    import logging

    from visual_buffet_siglip import cli

    ours, root = logging.getLogger("visual_buffet_siglip"), logging.getLogger()
    levels = ours.level, root.level
    yield
    ours.removeHandler(cli._handler)
    root.removeHandler(cli._handler)
    ours.setLevel(levels[0])
    root.setLevel(levels[1])


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory):
    """Label-embedding caches go to a temp folder, never the user's cache directory."""
    os.environ["VISUAL_BUFFET_SIGLIP_CACHE"] = str(tmp_path_factory.mktemp("label-cache"))


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """family -> saved tiny checkpoint directory."""
    root = tmp_path_factory.mktemp("checkpoints")
    return {family: build_checkpoint(family, root / family) for family in FAMILIES}


@pytest.fixture(scope="session")
def model_args(checkpoints, tmp_path_factory) -> list[str]:
    """CLI flags for a quick, quiet, deterministic `tag` run on the tiny SigLIP with six labels."""
    labels = tmp_path_factory.mktemp("labels") / "labels.txt"
    labels.write_text("\n".join(LABELS[:6]), encoding="utf-8")
    return ["--model", str(checkpoints["siglip"]), "--device", "cpu", "--dtype", "float32", "--threshold", "0",
            "--labels-file", str(labels), "--batch-size", "1", "-q"]


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture
def checkpoint(checkpoints, family) -> Path:
    return checkpoints[family]


def make_image(path: Path, size: tuple[int, int], seed: int = 0):
    """A smooth-ish random picture (gradients + blocks), saved losslessly unless the suffix says JPEG."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([(xx * rng.uniform(0.2, 2) + yy * rng.uniform(0.2, 2) + rng.uniform(0, 255)) % 256
                     for _ in range(3)], axis=-1)
    noise = rng.integers(0, 40, size=(h, w, 3))
    Image.fromarray(((base + noise) % 256).astype(np.uint8)).save(path)
    return path


@pytest.fixture(scope="session")
def images(tmp_path_factory) -> list[Path]:
    """Lossless test images of different sizes and aspect ratios."""
    root = tmp_path_factory.mktemp("images")
    sizes = [(64, 48), (37, 120), (200, 90), (33, 33)]
    return [make_image(root / f"img{i}.png", size, seed=i) for i, size in enumerate(sizes)]


def reference_scores(checkpoint: Path, image_paths, labels, **processor_kwargs) -> np.ndarray:
    """transformers itself: sigmoid(model(**processor(...)).logits_per_image), full forward, fp32."""
    import torch
    from PIL import Image
    from transformers import AutoModel, AutoProcessor

    model = AutoModel.from_pretrained(checkpoint, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(checkpoint)
    prompts = [f"This is a photo of {label}.".lower() for label in labels]
    pictures = [Image.open(p) for p in image_paths]
    inputs = processor(text=prompts, images=pictures, padding="max_length", max_length=64,
                       return_tensors="pt", **processor_kwargs)
    with torch.no_grad():
        return torch.sigmoid(model(**inputs).logits_per_image).numpy()


@pytest.fixture
def encoded(monkeypatch) -> list[str]:
    """Every label that goes through the text tower from here on."""
    from visual_buffet_siglip.engine import SiglipTagger

    labels: list[str] = []
    real = SiglipTagger._encode_texts

    def counting(self, batch):
        labels.extend(batch)
        return real(self, batch)

    monkeypatch.setattr(SiglipTagger, "_encode_texts", counting)
    return labels


def make_settings(checkpoint: Path, **overrides):
    from visual_buffet_siglip import Settings

    values = {"model": str(checkpoint), "labels": LABELS, "confidence_threshold": 0.0, "max_tags": 1000,
              "device": "cpu", "dtype": "float32", "text_cache": False,
              "backend": "torch"}  # PyTorch's paths; tests/test_openvino.py asks for OpenVINO itself
    values.update(overrides)
    return Settings.from_mapping(values)
