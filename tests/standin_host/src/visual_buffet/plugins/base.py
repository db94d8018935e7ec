"""What every host plugin subclasses; `configure(**kwargs)` is optional and not declared here."""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path

from .schemas import PluginInfo, TagResult


class PluginBase(ABC):
    def __init__(self, plugin_dir: Path):
        self.plugin_dir = Path(plugin_dir)

    @abstractmethod
    def get_info(self) -> PluginInfo: ...

    @abstractmethod
    def is_available(self) -> bool: ...

    @abstractmethod
    def setup(self) -> bool: ...

    @abstractmethod
    def tag(self, image_path: Path) -> TagResult: ...
