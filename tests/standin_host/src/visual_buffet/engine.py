"""The host's tagging loop: one image at a time, `configure(**settings)` before every `tag()`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .plugins.base import PluginBase
from .plugins.loader import discover_plugins
from .plugins.schemas import TagResult


class TaggingEngine:
    def __init__(self, plugins_dir: Path | None = None):
        self.plugins = discover_plugins(plugins_dir)
        self._ready: set[str] = set()

    def _prepare(self, name: str) -> PluginBase:
        plugin = self.plugins[name]
        if name not in self._ready:
            if not plugin.is_available() or not plugin.setup():
                raise RuntimeError(f"plugin {name!r} is not available")
            if name == "siglip" and hasattr(plugin, "set_discovery_plugins"):
                helpers = {other: p for other, p in self.plugins.items()
                           if other != name and p.is_available() and p.setup()}
                plugin.set_discovery_plugins(helpers)
            self._ready.add(name)
        return plugin

    def tag_image(self, image_path: str | Path, plugin_names: Sequence[str],
                  settings: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, TagResult]:
        results = {}
        for name in plugin_names:
            plugin = self._prepare(name)
            configure = getattr(plugin, "configure", None)
            if configure is not None:
                configure(**dict((settings or {}).get(name, {})))
            results[name] = plugin.tag(Path(image_path))
        return results
