"""The objects plugins return to the host."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Tag:
    label: str
    confidence: float | None = None


@dataclass
class TagResult:
    tags: list[Tag]
    model: str
    version: str
    inference_time_ms: float
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass
class PluginInfo:
    name: str
    version: str
    description: str
    hardware_reqs: dict[str, Any] = field(default_factory=dict)
    provides_confidence: bool = True
    recommended_threshold: float = 0.0
