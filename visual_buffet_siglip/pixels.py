"""Pixel values for fixed-resolution models, computed the way the PIL image processor does, without its overhead.

Why: once the model runs at ~0.03-0.1 s per image (OpenVINO), the processor's
per-call validation, format inference and copies are a visible share of the
time. For an image already resized to the model's input (the engine does that),
the processor only rescales (float64 multiply, then float32), normalises (float32
subtract and divide per channel) and moves channels first. Those operations on
each of a channel's 256 possible values make a lookup table, so the result is
bit-identical at a fraction of the cost (tests/test_openvino.py checks it).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

__all__ = ["fixed_normaliser"]


def fixed_normaliser(processor: Any) -> Callable[[Any], Any] | None:
    """RGB PIL image of the model's size -> [1, 3, H, W] float32 torch tensor; None if unsure for this processor.

    None for processors with steps this does not reproduce (crop, pad, another
    resample backend); the caller then uses the processor itself.
    """
    image_processor = getattr(processor, "image_processor", None)
    if image_processor is None or getattr(image_processor, "do_center_crop", False) \
            or getattr(image_processor, "do_pad", False) or not getattr(image_processor, "do_convert_rgb", True):
        return None
    try:
        levels = np.arange(256, dtype=np.float64)
        values = (levels * float(image_processor.rescale_factor)).astype(np.float32) \
            if image_processor.do_rescale else levels.astype(np.float32)
        table = np.stack([values] * 3)
        if image_processor.do_normalize:
            mean = np.asarray(image_processor.image_mean, dtype=np.float32).reshape(3, 1)
            std = np.asarray(image_processor.image_std, dtype=np.float32).reshape(3, 1)
            table = (table - mean) / std
    except (AttributeError, TypeError, ValueError):
        return None
    # A uint8 pixel has 256 values, so each channel's whole rescale + normalise is a 256-entry table: the same
    # float32 results as computing them, for an index lookup per pixel.
    table = np.ascontiguousarray(table, dtype=np.float32)

    def normalise(image: Any) -> Any:
        import torch

        pixels = np.asarray(image)
        out = np.empty((1, 3, *pixels.shape[:2]), dtype=np.float32)
        for channel in range(3):
            np.take(table[channel], pixels[..., channel], out=out[0, channel])
        return torch.from_numpy(out)

    return normalise
