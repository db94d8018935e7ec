"""Adapter for today's Visual Buffet host, which loads `plugins/siglip/` and tags one image per call.

Only the host imports this module (through the `plugins/siglip/__init__.py` that
`install-into-host` writes), so `visual_buffet` is a plain import here and nothing
else in the package imports it.

The host calls `configure(**settings)` before every image. Identical settings cost
a comparison; threshold, limit and label changes reuse the loaded model and the
per-label embedding cache (they are the call's `TagOptions`); only a change to the
`ModelSettings` loads a model (`plugin.tagger_for` keeps one tagger per value). Images are
embedded in batches the host cannot ask for (`readahead`): that, and the label
cache, keep the one-image-at-a-time interface close to our batched speed.
"""

from __future__ import annotations

import copy
import difflib
import importlib.util
import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from visual_buffet.plugins.base import PluginBase
from visual_buffet.plugins.schemas import PluginInfo, Tag, TagResult

from . import __version__
from .config import KEYS, PLUGIN_NAME, ConfigError, Settings, plugin_block, read_toml
from .plugin import DESCRIPTION, HARDWARE, tagger_for
from .readahead import ImageReadAhead
from .records import TagDict
from .vocabulary import DEFAULT_THRESHOLD, normalize_labels

log = logging.getLogger(__name__)

CONFIG_ENV = "VISUAL_BUFFET_CONFIG"
DEFAULT_CONFIG = "~/.config/visual-buffet/config.toml"

# The host's own SigLIP plugin names its models by these short names.
MODEL_VARIANTS = {
    "base": "google/siglip-base-patch16-224",
    "large": "google/siglip-large-patch16-384",
    "so400m": "google/siglip-so400m-patch14-384",
    "giant": "google/siglip2-giant-opt-patch16-384",  # SigLIP v1 has no giant; the SigLIP 2 one
    "v2-base": "google/siglip2-base-patch16-224",
    "v2-so400m": "google/siglip2-so400m-patch14-384",
    "v2-naflex": "google/siglip2-so400m-patch16-naflex",
    "v2-giant": "google/siglip2-giant-opt-patch16-384",
}

# host key -> our key
HOST_ALIASES = {"threshold": "confidence_threshold", "limit": "max_tags", "model_variant": "model",
                "custom_vocabulary": "labels"}
DISCOVERY_MODE = "discovery_mode"
_DEFAULTS = Settings().to_mapping()  # what a twin yields to when it holds it


def host_config_path() -> Path:
    """The host user's config file: $VISUAL_BUFFET_CONFIG, else ~/.config/visual-buffet/config.toml."""
    return Path(os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG).expanduser()


def read_host_block(path: Path) -> Mapping[str, Any]:
    """The `[plugins.siglip]` block of the host config; a missing default file means no block."""
    if not path.is_file():
        if os.environ.get(CONFIG_ENV):
            raise ConfigError(f"{CONFIG_ENV} = {str(path)!r}: no such file; point it at the Visual Buffet "
                              "config file or unset it")
        return {}
    data = read_toml(path, "the Visual Buffet config")
    try:
        return plugin_block(data)
    except ConfigError as exc:
        raise ConfigError([f"{path}: {problem}" for problem in exc.problems]) from None


def translate(values: Mapping[str, Any], source: str) -> tuple[dict[str, Any], dict[str, bool]]:
    """Split host settings into changes to our Settings and discovery switches.

    Host names map to ours (`threshold`, `limit`, `model_variant`, `custom_vocabulary`).
    When a mapping holds both a host name and ours (the manifest's defaults list both),
    a value equal to our default yields to its twin; otherwise the host's name wins.
    `discovery_mode` and boolean `use_<plugin>` keys are discovery switches. Unknown keys are
    logged and ignored: the host passes settings of its own.
    """
    changes = {key: value for key, value in values.items() if key in KEYS}
    switches: dict[str, bool] = {}
    for key, value in values.items():
        if key == DISCOVERY_MODE or (key.startswith("use_") and isinstance(value, bool)):
            if not isinstance(value, bool):
                raise ConfigError(f"{source}: {key} = {value!r}: expected true or false")
            switches[key] = value
        elif key in HOST_ALIASES:
            ours, mapped = HOST_ALIASES[key], _convert(key, value, source)
            if mapped is None or (ours in values and values[ours] != mapped
                                  and mapped == _DEFAULTS.get(ours)):
                continue
            changes[ours] = mapped
            if ours == "labels":
                changes.pop("labels_file", None)
        elif key not in KEYS:
            _warn_unknown(key, source)
    return changes, switches


def _convert(key: str, value: Any, source: str) -> Any:
    if key == "model_variant":
        variant = value.lower() if isinstance(value, str) else value
        if variant not in MODEL_VARIANTS:
            raise ConfigError(f"{source}: model_variant = {value!r}: expected one of "
                              f"{', '.join(MODEL_VARIANTS)} (or set `model` to any id from "
                              "`visual-buffet-siglip models`)")
        return MODEL_VARIANTS[variant]
    if key == "custom_vocabulary":  # empty means "no custom vocabulary": keep the configured labels
        labels = value.split(",") if isinstance(value, str) else value
        return list(labels) if labels else None
    return value


_warned: set[str] = set()


def _warn_unknown(key: str, source: str) -> None:
    if key in _warned:
        return
    _warned.add(key)
    close = difflib.get_close_matches(key, (*KEYS, *HOST_ALIASES, DISCOVERY_MODE), n=1, cutoff=0.7)
    log.warning("siglip: ignoring unknown setting %r from %s%s", key, source,
                f" (did you mean {close[0]!r}?)" if close else "")


class SiglipPlugin(PluginBase):
    """visual-buffet-siglip as a Visual Buffet `PluginBase` plugin named "siglip"."""

    def __init__(self, plugin_dir: Path):
        super().__init__(plugin_dir)
        self._configured: dict[str, Any] | None = None
        self._settings: Settings | None = None
        self._switches: dict[str, bool] = {}
        self._file: tuple[Settings, dict[str, bool]] | None = None
        self._helpers: dict[str, Any] = {}
        self._images = ImageReadAhead()

    # --- settings ---------------------------------------------------------------------------
    def _from_file(self) -> tuple[Settings, dict[str, bool]]:
        """Settings and switches from the host config's [plugins.siglip], read once."""
        if self._file is None:
            path = host_config_path()
            changes, switches = translate(read_host_block(path), str(path))
            try:
                self._file = Settings.from_mapping(changes, base_dir=path.parent), switches
            except ConfigError as exc:
                raise ConfigError([f"{path} [plugins.{PLUGIN_NAME}]: {p}" for p in exc.problems]) from None
        return self._file

    @property
    def settings(self) -> Settings:
        """The effective settings: last configure() kwargs > config file block > defaults."""
        if self._settings is None:
            self._settings, self._switches = self._from_file()
        return self._settings

    def configure(self, **kwargs: Any) -> None:
        """Apply the host's settings for the next images; each call states them whole, as the host does."""
        if kwargs == self._configured:
            return
        base, switches = self._from_file()
        changes, new_switches = translate(kwargs, "configure()")
        try:
            settings = base.replace(**changes) if changes else base
        except ConfigError as exc:
            raise ConfigError([f"configure(): {p}" for p in exc.problems]) from None
        self._settings, self._switches = settings, {**switches, **new_switches}
        self._configured = copy.deepcopy(kwargs)

    def set_discovery_plugins(self, plugins: Mapping[str, Any]) -> None:
        """The host's other plugins, asked for candidate labels per image in discovery mode."""
        self._helpers = {name: plugin for name, plugin in plugins.items() if plugin is not self}

    # --- host interface ---------------------------------------------------------------------
    def get_info(self) -> PluginInfo:
        return PluginInfo(name=PLUGIN_NAME, version=__version__, description=DESCRIPTION,
                          hardware_reqs=dict(HARDWARE), provides_confidence=True,
                          recommended_threshold=DEFAULT_THRESHOLD)

    def is_available(self) -> bool:
        """torch and transformers can be imported (checked without importing them)."""
        return all(importlib.util.find_spec(name) is not None for name in ("torch", "transformers"))

    def setup(self) -> bool:
        """Load the model and embed the label set now, so the first image does not pay for it."""
        try:
            settings = self.settings
            tagger_for(settings.model_settings).embed_texts(settings.options.labels)
        except Exception as exc:  # the host wants False and a reason, not an exception
            log.error("siglip: setup failed: %s", exc)
            log.debug("siglip setup failure", exc_info=True)
            return False
        return True

    def tag(self, image_path: str | os.PathLike[str]) -> TagResult:
        """Tags for one image; a failed image gives no tags and `metadata["error"]`, never an exception."""
        start = time.perf_counter()
        settings = self.settings
        if not settings.enabled:
            return self._result([], settings.model_settings.model, start,
                                {"skipped": "enabled = false in [plugins.siglip]"})
        options = settings.options
        labels, metadata = options.labels, {}
        if self._switches.get(DISCOVERY_MODE) and self._helpers:
            candidates, metadata["discovery"] = self._candidates(image_path)
            labels = normalize_labels((*labels, *candidates))
        tagger = tagger_for(settings.model_settings)
        record = tagger.record(self._images.embedding(tagger, image_path), tagger.embed_texts(labels), options,
                               labels)
        if "error" in record:
            log.warning("siglip: %s", record["error"]["message"])
            metadata["error"] = dict(record["error"])
        return self._result(record["tags"], tagger.settings.model, start, metadata)

    def _candidates(self, image_path: str | os.PathLike[str]) -> tuple[tuple[str, ...], dict[str, Any]]:
        """Normalised, de-duplicated candidate labels from the enabled discovery plugins."""
        found: list[str] = []
        report: dict[str, Any] = {}
        for name, helper in self._helpers.items():
            if not self._switches.get(f"use_{name}", True):
                continue
            try:
                labels = normalize_labels(tag.label for tag in helper.tag(image_path).tags)
            except Exception as exc:  # one broken helper must not cost the image its SigLIP tags
                log.warning("siglip discovery: plugin %r failed on %s (%s: %s); skipped for this image",
                            name, os.fspath(image_path), type(exc).__name__, exc)
                report[name] = {"error": f"{type(exc).__name__}: {exc}"}
                continue
            found.extend(labels)
            report[name] = {"candidates": len(labels)}
        return normalize_labels(found), report

    @staticmethod
    def _result(tags: list[TagDict], model: str, start: float, metadata: dict[str, Any]) -> TagResult:
        return TagResult(tags=[Tag(label=t["label"], confidence=t["confidence"]) for t in tags], model=model,
                         version=__version__, inference_time_ms=round((time.perf_counter() - start) * 1000, 3),
                         metadata=metadata)


__all__ = ["SiglipPlugin", "host_config_path", "read_host_block", "translate"]
