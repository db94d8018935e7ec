"""Plugin discovery as the host does it: `plugins/*/plugin.toml`, one PluginBase subclass per folder."""

from __future__ import annotations

import importlib.util
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from .base import PluginBase


class PluginLoadError(RuntimeError):
    pass


def default_plugins_dir() -> Path:
    """`<checkout>/plugins`: this file is `<checkout>/src/visual_buffet/plugins/loader.py`."""
    return Path(__file__).resolve().parents[3] / "plugins"


def discover_plugins(plugins_dir: Path | None = None) -> dict[str, PluginBase]:
    """name -> plugin instance for every `plugins/<folder>/plugin.toml`; dot-folders are skipped."""
    plugins: dict[str, PluginBase] = {}
    root = Path(plugins_dir) if plugins_dir is not None else default_plugins_dir()
    for folder in sorted(root.iterdir()):
        if folder.name.startswith(".") or not (folder / "plugin.toml").is_file():
            continue
        manifest = tomllib.loads((folder / "plugin.toml").read_text("utf-8"))["plugin"]
        name = manifest["name"]
        if name in plugins:
            raise PluginLoadError(f"two plugins are named {name!r}: {plugins[name].plugin_dir} and {folder}")
        spec = importlib.util.spec_from_file_location(
            f"visual_buffet_plugin_{folder.name}", folder / "__init__.py", submodule_search_locations=[str(folder)])
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        cls = getattr(module, manifest["entry_point"])
        if not (isinstance(cls, type) and issubclass(cls, PluginBase)):
            raise PluginLoadError(f"{folder}: {manifest['entry_point']} is not a PluginBase subclass")
        plugins[name] = cls(folder)
    return plugins
