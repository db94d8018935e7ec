"""The `visual_buffet` pluggy hook contract: plugin info, config check, tagging (README: "How a host loads it").

A host registers these specs, loads plugins from the `visual_buffet`
entry-point group and calls the hooks with keyword arguments.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pluggy

PROJECT = "visual_buffet"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def visual_buffet_plugin_info() -> dict[str, Any]:
    """Describe the plugin: name, version, description, provides_confidence,
    recommended_threshold, hardware requirements and default settings."""


@hookspec
def visual_buffet_validate_config(config: Mapping[str, Any]) -> list[str]:
    """Problems in this plugin's block of the whole parsed host config; empty when valid."""


@hookspec
def visual_buffet_tag(images: Sequence[str], config: Mapping[str, Any]) -> dict[str, Any] | None:
    """Tag `images` (paths); `config` is the whole parsed host config.

    Returns None when the plugin is disabled, else
    {"plugin": name, "results": [one record per image, in input order]}.
    """


__all__ = ["PROJECT", "hookspec", "hookimpl"]
