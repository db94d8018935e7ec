"""A CUDA out-of-memory error halves the batch and retries the same images; none is dropped."""

from __future__ import annotations

import logging

import numpy as np
import torch
from conftest import make_settings

from visual_buffet_siglip.engine import SiglipTagger


def test_out_of_memory_halves_the_batch_and_keeps_every_image(checkpoints, images, caplog):
    images = list(images) * 3  # 12 images
    reference = SiglipTagger(make_settings(checkpoints["siglip"], batch_size=1)).embed_images(images)
    tagger = SiglipTagger(make_settings(checkpoints["siglip"], batch_size=8, backend="torch"))  # CUDA-style OOM
    model = tagger.loaded.model
    real = model.get_image_features
    seen: list[int] = []

    def limited(**inputs):
        seen.append(inputs["pixel_values"].shape[0])
        if inputs["pixel_values"].shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(**inputs)

    model.get_image_features = limited
    with caplog.at_level(logging.WARNING):
        embeddings = tagger.embed_images(images)
    assert not np.isnan(embeddings).any() and embeddings.shape[0] == len(images)
    assert np.abs(embeddings - reference).max() <= 1e-5
    assert tagger.batch_size == 2  # 8 -> 4 -> 2, kept for the rest of the run
    assert max(seen[-3:]) <= 2
    assert "out of memory" in caplog.text
