"""Thin pluggy hookimpls. Importing this module is cheap: no torch, no model.

The tagger is created on first use and reused while the settings that shape the
model stay the same; threshold, max_tags and labels changes reuse it as is.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from . import __version__
from .config import (DEFAULT_MODEL, PLUGIN_NAME, ConfigError, Settings, plugin_block,
                     settings_from_host_config)
from .hookspecs import hookimpl

if TYPE_CHECKING:
    from .engine import SiglipTagger

RECOMMENDED_THRESHOLD = 0.01
HARDWARE = {"gpu_recommended": True, "gpu_required": False, "min_ram_gb": 4, "min_vram_gb": 2}
DESCRIPTION = "SigLIP / SigLIP 2 zero-shot image tagging with calibrated sigmoid confidences"

_lock = threading.Lock()
_current: tuple[tuple[Any, ...], SiglipTagger] | None = None


def tagger_for(settings: Settings) -> SiglipTagger:
    """The shared tagger for `settings`' model key; replaced (and the old model freed) when it changes."""
    global _current
    key = settings.model_key()
    with _lock:
        if _current is None or _current[0] != key:
            from .engine import SiglipTagger

            _current = (key, SiglipTagger(settings))
        return _current[1]


@hookimpl
def visual_buffet_plugin_info() -> dict[str, Any]:
    return {
        "name": PLUGIN_NAME,
        "version": __version__,
        "description": DESCRIPTION,
        "provides_confidence": True,
        "recommended_threshold": RECOMMENDED_THRESHOLD,
        "hardware": dict(HARDWARE),
        "defaults": {"model": DEFAULT_MODEL, **{k: v for k, v in Settings().to_mapping().items() if k != "model"}},
    }


@hookimpl
def visual_buffet_validate_config(config: Mapping[str, Any]) -> list[str]:
    try:
        Settings.from_mapping(plugin_block(config))
    except ConfigError as exc:
        return list(exc.problems)
    return []


@hookimpl
def visual_buffet_tag(images: Sequence[str], config: Mapping[str, Any]) -> dict[str, Any] | None:
    settings = settings_from_host_config(config)
    if not settings.enabled:
        return None
    from .vocabulary import TagOptions

    results = tagger_for(settings).tag(list(images), options=TagOptions.from_settings(settings))
    return {"plugin": PLUGIN_NAME, "results": results}
