"""`Plan`: how to run one model on one machine, with a reason for every choice.

`planner.plan` makes one; `models`, `quantization`, `residency` and the engine
act on it. It imports nothing from the rest of the package, so all of them can
import it without an import circle.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

HALF = ("float16", "bfloat16")  # the half-precision dtypes the planner and quantization treat alike


class Reasons(Mapping[str, str]):
    """An immutable, hashable str -> str mapping (keeps `Plan` hashable)."""

    __slots__ = ("_items",)
    _items: tuple[tuple[str, str], ...]

    def __init__(self, items: Mapping[str, str] | Any = ()):
        pairs = items.items() if isinstance(items, Mapping) else items
        object.__setattr__(self, "_items", tuple((str(k), str(v)) for k, v in pairs))

    def __getitem__(self, key: str) -> str:
        for k, v in self._items:
            if k == key:
                return v
        raise KeyError(key)

    def __iter__(self) -> Iterator[str]:
        return (k for k, _ in self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        return hash(self._items)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Mapping) and dict(self.items()) == dict(other.items())

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("Reasons is immutable")

    def __repr__(self) -> str:
        return f"Reasons({dict(self._items)!r})"


PLAN_KEYS = ("device", "backend", "dtype", "attention", "quantization", "batch_size")


@dataclass(frozen=True)
class Plan:
    """How to run one model on one machine, with a reason for every choice."""

    device: str  # "cpu", "cuda:0", "mps"
    dtype: str  # float32, float16, bfloat16 (the compute dtype when quantized)
    attention: str  # sdpa, eager, flash_attention_2
    batch_size: int
    quantization: str = "none"  # none, 8bit, 4bit
    reasons: Mapping[str, str] = field(default_factory=Reasons)
    warnings: tuple[str, ...] = ()
    weights_gb: float = 0.0  # estimated weight memory at this dtype / quantization
    per_image_gb: float = 0.0  # estimated working set per image in a batch
    memory_budget_gb: float | None = None  # memory planned for batches (None: not estimated)
    text_device: str = "cpu"  # where labels missing from the cache are encoded (residency.text_tower_on)
    backend: str = "torch"  # torch, openvino (see openvino_backend.choose_backend)

    def __post_init__(self) -> None:
        if not isinstance(self.reasons, Reasons):
            object.__setattr__(self, "reasons", Reasons(self.reasons))
        object.__setattr__(self, "warnings", tuple(self.warnings))

    def reason(self, key: str) -> str:
        """Why `key` (device, dtype, attention, quantization, batch_size) was chosen."""
        return self.reasons.get(key, "")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (for `plan --json` and reports)."""
        return {"device": self.device, "backend": self.backend, "dtype": self.dtype, "attention": self.attention,
                "batch_size": self.batch_size, "quantization": self.quantization,
                "reasons": dict(self.reasons), "warnings": list(self.warnings),
                "weights_gb": round(self.weights_gb, 3), "per_image_gb": round(self.per_image_gb, 4),
                "memory_budget_gb": None if self.memory_budget_gb is None else round(self.memory_budget_gb, 3),
                "text_device": self.text_device}


__all__ = ["Plan", "Reasons", "PLAN_KEYS"]
