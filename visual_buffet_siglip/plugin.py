"""Thin pluggy hookimpls. Importing this module is cheap: no torch, no model.

Taggers are created on first use from a block's `ModelSettings` and reused while
those stay equal; each call passes the block's `TagOptions` (labels, thresholds,
max_tags), so changing them reuses a tagger as is. The last few model settings
used keep their tagger (least recently used dropped first), so a host alternating
between two models does not reload on every call.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from . import __version__
from .config import PLUGIN_NAME, ConfigError, ModelSettings, Settings, plugin_block, settings_from_host_config
from .hookspecs import hookimpl
from .vocabulary import DEFAULT_THRESHOLD

if TYPE_CHECKING:
    from .engine import SiglipTagger

HARDWARE = {"gpu_recommended": True, "gpu_required": False, "min_ram_gb": 4, "min_vram_gb": 2}
DESCRIPTION = "SigLIP / SigLIP 2 zero-shot image tagging with calibrated sigmoid confidences"

TAGGERS_KEPT = 3  # models held at once: each one is its full weights in memory

_lock = threading.Lock()
_taggers: OrderedDict[ModelSettings, SiglipTagger] = OrderedDict()


def tagger_for(settings: ModelSettings) -> SiglipTagger:
    """The shared tagger for these model settings, from a small LRU cache keyed by them.

    Creating a tagger is cheap (the model loads on first use, serialised process-wide
    by models.load); the least recently used one is dropped, and its model freed once
    no call still holds it.
    """
    with _lock:
        tagger = _taggers.get(settings)
        if tagger is None:
            from .engine import SiglipTagger

            tagger = _taggers[settings] = SiglipTagger(settings)
            while len(_taggers) > TAGGERS_KEPT:
                _taggers.popitem(last=False)
        _taggers.move_to_end(settings)
        return tagger


@hookimpl
def visual_buffet_plugin_info() -> dict[str, Any]:
    return {
        "name": PLUGIN_NAME,
        "version": __version__,
        "description": DESCRIPTION,
        "provides_confidence": True,
        "recommended_threshold": DEFAULT_THRESHOLD,
        "hardware": dict(HARDWARE),
        "defaults": Settings().to_mapping(),
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
    results = tagger_for(settings.model_settings).tag(list(images), settings.options)
    return {"plugin": PLUGIN_NAME, "results": results}


__all__ = ["tagger_for", "visual_buffet_plugin_info", "visual_buffet_validate_config", "visual_buffet_tag"]
