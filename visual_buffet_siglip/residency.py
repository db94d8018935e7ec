"""Where each tower of a loaded model lives.

Tagging needs the text tower only to encode labels missing from the label
cache, so on an accelerator it lives in RAM: `place` puts the vision tower
(and the logit scale and bias) on the plan's device and keeps the text tower
on the CPU, and `text_tower_on` brings the text tower to `Plan.text_device`
for one round of encoding and sends it back. so400m-384 at float16 then needs
~0.8 GB of weights on the card instead of ~1.7 GB (`memory`, `planner.plan`).
Quantized models are placed by bitsandbytes at load and stay where they are.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from .plan import Plan

HOME = torch.device("cpu")  # where the text tower waits between encodes


def _device_of(module: Any) -> torch.device:
    first = next(module.parameters(), None)
    return HOME if first is None else first.device


def place(model: Any, plan: Plan) -> Any:
    """Move `model` for tagging under `plan`: everything but the text tower to the plan's device."""
    if plan.quantization != "none":  # bitsandbytes placed it (device_map) and forbids .to()
        return model
    text = model.text_model
    model.text_model = None  # nn.Module.to() skips a child set to None, so the text tower never visits
    try:
        model.to(plan.device)
    finally:
        model.text_model = text.to(HOME)
    return model


@contextmanager
def text_tower_on(model: Any, device: str | torch.device) -> Iterator[None]:
    """The text tower on `device` for the duration, then back where it was (its memory freed there)."""
    target = torch.device(device)
    home = _device_of(model.text_model)
    if home == target or (target.index is None and home.type == target.type):
        yield
        return
    model.text_model.to(target)
    try:
        yield
    finally:
        model.text_model.to(home)
        if target.type == "cuda":
            torch.cuda.empty_cache()  # give the text tower's blocks back: batches and other tenants use them


__all__ = ["place", "text_tower_on"]
