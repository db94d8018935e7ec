"""The `[plugins.siglip]` settings block: parsed once, validated completely, frozen.

Every problem in a block is collected and reported together, each naming the
key, the value it got and what is allowed, so a user fixes a config in one
round trip instead of one error at a time.

A block holds two different things, kept apart once parsed (`Settings.from_mapping`):
`ModelSettings`, what shapes the loaded model (a tagger is built from them and
reused while they are equal), and `vocabulary.TagOptions`, what each tagging call
selects with (labels, per-label and global thresholds, max_tags). The pluggy hook,
the host adapter, the CLI, Ray and retag all parse a block here and take both
halves from the result.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .errors import PLUGIN_NAME, ConfigError
from .vocabulary import TagOptions, Vocabulary, builtin, file_kind, normalize_labels, parse_vocabulary, read_vocabulary

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

DEFAULT_MODEL = "google/siglip2-so400m-patch14-384"
TEMPLATE = "This is a photo of {label}."
MAX_LENGTH = 64

ATTENTIONS = ("auto", "sdpa", "flash_attention_2", "eager")
DTYPES = ("auto", "float16", "bfloat16", "float32")
QUANTIZATIONS = ("none", "8bit", "4bit")
DECODES = ("fast", "exact")
BACKENDS = ("auto", "torch", "openvino")




@dataclass(frozen=True)
class ModelSettings:
    """What shapes the loaded model: a tagger is built from these and reused while they stay equal.

    The planner reads them (`planner.plan`); nothing a single call asks
    for (labels, thresholds, max_tags) is here: that is `vocabulary.TagOptions`.
    """

    model: str = DEFAULT_MODEL
    batch_size: int | Literal["auto"] = "auto"
    attention: str = "auto"
    dtype: str = "auto"
    quantization: str = "none"
    device: str = "auto"
    backend: str = "auto"
    max_num_patches: int = 256
    decode: str = "fast"
    text_cache: bool = True
    cache_dir: str | None = None


@dataclass(frozen=True)
class Settings:
    """A validated `[plugins.siglip]` block, split by what each part is for. Build with `Settings.from_mapping`.

    `model_settings` builds the tagger; `options` are what each tagging call
    selects with; the rest is the plugin switch, where the vocabulary came from
    and the XMP output. `Settings()` is every default (the built-in vocabulary).
    """

    model_settings: ModelSettings = field(default_factory=ModelSettings)
    options: TagOptions = field(default_factory=TagOptions)
    enabled: bool = True
    labels_file: str | None = None
    xmp_max_keywords: int = 15
    xmp_root: str = "AI"

    @classmethod
    def from_mapping(cls, block: Mapping[str, Any] | None = None, *,
                     base_dir: str | os.PathLike[str] | None = None) -> Settings:
        """Validate a `[plugins.siglip]` mapping; relative `labels_file` resolves against base_dir."""

        values, problems = _validate(block or {}, base_dir)
        if problems:
            raise ConfigError(problems)
        vocabulary = _read_vocabulary(values)
        if not vocabulary:
            raise ConfigError(f"labels_file = {values.get('labels_file')!r}: the file holds no labels")
        return cls(ModelSettings(**_pick(values, MODEL_KEYS)), TagOptions(vocabulary, **_pick(values, OPTION_KEYS)),
                   **_pick(values, _OWN_KEYS))

    def replace(self, **changes: Any) -> Settings:
        """A copy with `changes` (TOML keys) applied and validated like a config block."""
        merged = {k: v for k, v in self.to_mapping().items() if k not in _LABEL_KEYS or not
                  (_LABEL_KEYS & changes.keys())}
        merged.update(changes)
        return Settings.from_mapping(merged)

    def to_mapping(self) -> dict[str, Any]:
        """The settings as a TOML-style mapping (what `from_mapping` accepts), keys in `KEYS` order."""

        plain_labels = self.labels_file is None and self.options.vocabulary is not builtin()
        values = {**dataclasses.asdict(self.model_settings),
                  **{key: getattr(self.options, key) for key in OPTION_KEYS},
                  **{key: getattr(self, key) for key in _OWN_KEYS},
                  "labels": list(self.options.labels) if plain_labels else None}
        return {key: values[key] for key in KEYS if values[key] is not None}


def tagger_parts(settings: ModelSettings | Settings | None) -> tuple[ModelSettings, TagOptions]:
    """A tagger's model settings and the options for its calls that pass none: a whole config's, else defaults."""
    if isinstance(settings, Settings):
        return settings.model_settings, settings.options
    return settings or ModelSettings(), TagOptions()


def _pick(values: Mapping[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    return {key: values[key] for key in keys if key in values}


_LABEL_KEYS = {"labels", "labels_file"}
MODEL_KEYS = tuple(f.name for f in dataclasses.fields(ModelSettings))
OPTION_KEYS = ("confidence_threshold", "max_tags")  # TagOptions' own; the labels keys give its vocabulary
_OWN_KEYS = tuple(f.name for f in dataclasses.fields(Settings) if f.name not in ("model_settings", "options"))


def settings_from_host_config(config: Mapping[str, Any] | None,
                              base_dir: str | os.PathLike[str] | None = None) -> Settings:
    """Settings from a whole parsed host config (reads `config["plugins"]["siglip"]`)."""
    return Settings.from_mapping(plugin_block(config), base_dir=base_dir)


def plugin_block(config: Mapping[str, Any] | None) -> Mapping[str, Any]:
    """This plugin's block of a whole host config; a missing block means defaults."""
    if config is None:
        return {}
    if not isinstance(config, Mapping):
        raise ConfigError(f"the host config must be a table (mapping), got {type(config).__name__}")
    plugins = config.get("plugins", {})
    if not isinstance(plugins, Mapping):
        raise ConfigError(f"[plugins] must be a table, got {type(plugins).__name__}")
    block = plugins.get(PLUGIN_NAME, {})
    if not isinstance(block, Mapping):
        raise ConfigError(f"[plugins.{PLUGIN_NAME}] must be a table, got {type(block).__name__}")
    return block


def read_toml(path: Path, name: str = "config file") -> dict[str, Any]:
    """A TOML file's tables; every way it can fail is a ConfigError naming the file as `name`."""
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{name} {str(path)!r} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {name} {str(path)!r}: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{name} {str(path)!r} is not valid TOML: {exc}") from None


def load_settings(path: str | os.PathLike[str]) -> Settings:
    """Settings from the `[plugins.siglip]` block of a TOML file (the whole file if it has no [plugins])."""
    path = Path(path)
    data = read_toml(path)
    block = plugin_block(data) if "plugins" in data else data
    return Settings.from_mapping(block, base_dir=path.parent)




def parse_label_lines(text: str) -> tuple[str, ...]:
    """The labels of a labels file's text (the vocabulary format: per-label columns are read and dropped)."""

    return parse_vocabulary(text).labels


def builtin_vocabulary() -> tuple[str, ...]:
    """The labels of the curated built-in vocabulary shipped in `data/vocabulary.txt`."""

    return builtin().labels


def _read_vocabulary(values: Mapping[str, Any]) -> Vocabulary:
    """The vocabulary validated `values` name: `labels`, else `labels_file`, else the built-in one."""

    if "labels" in values:
        return Vocabulary.from_labels(values["labels"])
    if "labels_file" in values:
        return read_vocabulary(values["labels_file"])
    return builtin()


# --- validation -----------------------------------------------------------------------------

def _describe(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def suggest(value: str, choices: tuple[str, ...]) -> str | None:
    """The choice a near-miss `value` most likely meant: a unique prefix, else the closest spelling."""
    prefixed = [choice for choice in choices if value and choice.startswith(value)]
    if len(prefixed) == 1:
        return prefixed[0]
    close = difflib.get_close_matches(value, choices, n=1, cutoff=0.7)
    return close[0] if close else None


def _check_bool(key: str, value: Any) -> tuple[Any, str | None]:
    if isinstance(value, bool):
        return value, None
    return None, f"{key} = {_describe(value)}: expected true or false"


def _check_int(key: str, value: Any, low: int, high: int | None) -> tuple[Any, str | None]:
    allowed = f"an integer from {low} to {high}" if high is not None else f"an integer >= {low}"
    if not _is_int(value) or value < low or (high is not None and value > high):
        return None, f"{key} = {_describe(value)}: expected {allowed}"
    return value, None


def _check_choice(key: str, value: Any, choices: tuple[str, ...]) -> tuple[Any, str | None]:
    if isinstance(value, str) and value.lower() in choices:
        return value.lower(), None
    close = suggest(value.lower(), choices) if isinstance(value, str) else None
    hint = f" (did you mean {close!r}?)" if close else ""
    return None, f"{key} = {_describe(value)}: expected one of {', '.join(map(repr, choices))}{hint}"


def _check_threshold(key: str, value: Any) -> tuple[Any, str | None]:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) \
            and 0.0 <= value <= 1.0:
        return float(value), None
    return None, (f"{key} = {_describe(value)}: expected a number from 0 to 1 "
                  "(SigLIP's sigmoid scores are low: 0.005-0.05 is a sensible range)")


def _check_device(key: str, value: Any) -> tuple[Any, str | None]:
    if isinstance(value, str):
        low = value.lower()
        if low in ("auto", "cpu", "cuda", "mps") or (
                low.startswith("cuda:") and low[5:].isdigit()):
            return low, None
    return None, f"{key} = {_describe(value)}: expected 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'"


def _check_batch(key: str, value: Any) -> tuple[Any, str | None]:
    if value == "auto" and isinstance(value, str):
        return value, None
    checked, problem = _check_int(key, value, 1, 1024)
    if problem:
        problem = f"{key} = {_describe(value)}: expected 'auto' or an integer from 1 to 1024"
    return checked, problem


def _check_model(key: str, value: Any) -> tuple[Any, str | None]:
    from .models import model_name_problem  # pure string checks, no torch

    if not isinstance(value, str) or not value.strip():
        return None, f"{key} = {_describe(value)}: expected a model id such as {DEFAULT_MODEL!r} or a local directory"
    problem = model_name_problem(value.strip())
    return (None, f"{key} = {_describe(value)}: {problem}") if problem else (value.strip(), None)


def _check_labels(key: str, value: Any) -> tuple[Any, str | None]:
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
        labels = normalize_labels(value)
        if labels:
            return labels, None
    return None, f"{key} = {_describe(value)}: expected a non-empty list of label strings"


def _check_keyword_root(key: str, value: Any) -> tuple[Any, str | None]:
    if isinstance(value, str):
        parts = [" ".join(part.split()) for part in value.split("|")] if value.strip() else []
        if all(parts):
            return "|".join(parts), None
    return None, (f"{key} = {_describe(value)}: expected a keyword path such as \"AI\" or \"AI|SigLIP\" "
                  "(no empty parts), or \"\" for none")


def _check_optional_path(key: str, value: Any) -> tuple[Any, str | None]:
    if isinstance(value, str) and value.strip():
        return value, None
    return None, f"{key} = {_describe(value)}: expected a path string"


_CHECKS = {
    "enabled": _check_bool,
    "model": _check_model,
    "batch_size": _check_batch,
    "attention": lambda k, v: _check_choice(k, v, ATTENTIONS),
    "dtype": lambda k, v: _check_choice(k, v, DTYPES),
    "quantization": lambda k, v: _check_choice(k, v, QUANTIZATIONS),
    "device": _check_device,
    "backend": lambda k, v: _check_choice(k, v, BACKENDS),
    "confidence_threshold": _check_threshold,
    "max_tags": lambda k, v: _check_int(k, v, 1, None),
    "max_num_patches": lambda k, v: _check_int(k, v, 64, 1024),
    "labels": _check_labels,
    "labels_file": _check_optional_path,
    "decode": lambda k, v: _check_choice(k, v, DECODES),
    "text_cache": _check_bool,
    "cache_dir": _check_optional_path,
    "xmp_max_keywords": lambda k, v: _check_int(k, v, 1, None),
    "xmp_root": _check_keyword_root,
}

KEYS = tuple(_CHECKS)  # every key of the block, in the order messages list them

# Keys people write from other tools' configs (the host's own names among them).
ALIASES = {"threshold": "confidence_threshold", "min_confidence": "confidence_threshold",
           "limit": "max_tags", "vocabulary": "labels_file", "max_keywords": "xmp_max_keywords"}


def _validate(block: Mapping[Any, Any], base_dir: str | os.PathLike[str] | None
              ) -> tuple[dict[str, Any], list[str]]:
    if not isinstance(block, Mapping):
        return {}, [f"[plugins.{PLUGIN_NAME}] must be a table, got {type(block).__name__}"]
    values: dict[str, Any] = {}
    problems: list[str] = []
    for key, value in block.items():
        if not isinstance(key, str) or key not in _CHECKS:
            close = ALIASES.get(str(key).lower()) or suggest(str(key), KEYS)
            hint = f" (did you mean {close!r}?)" if close else ""
            problems.append(f"unknown key {_describe(key)} in [plugins.{PLUGIN_NAME}]{hint}; "
                            f"known keys: {', '.join(KEYS)}")
            continue
        checked, problem = _CHECKS[key](key, value)
        if problem:
            problems.append(problem)
        else:
            values[key] = checked
    if "labels" in values and "labels_file" in values:
        problems.append("labels and labels_file are both set: use one of them")
    if "labels_file" in values:
        path = Path(os.path.expanduser(values["labels_file"]))  # Path.expanduser raises on ~unknown-user
        if base_dir is not None and not path.is_absolute():
            path = Path(base_dir) / path
        problem = _labels_file_problem(path)
        if problem:
            problems.append(f"labels_file = {_describe(values['labels_file'])}: {problem}")
        else:
            values["labels_file"] = str(path.resolve())
    if "cache_dir" in values:
        values["cache_dir"] = os.path.expanduser(values["cache_dir"])
        if values["cache_dir"].startswith("~"):
            problems.append(f"cache_dir = {_describe(values['cache_dir'])}: cannot expand '~' (no such user); "
                            "give an absolute path")
    return values, problems


def _labels_file_problem(path: Path) -> str | None:
    """Why `path` cannot be a labels file (a missing file, a folder, a device...), or None."""

    try:
        kind = file_kind(path.stat().st_mode)
    except FileNotFoundError:
        return f"no such file ({str(path)!r}); give a text file with one label a line"
    except OSError as exc:
        return f"cannot read {str(path)!r} ({exc.strerror or exc})"
    if kind != "file":
        return f"{str(path)!r} is {kind}, not a text file; give a text file with one label a line"
    return None


__all__ = ["ConfigError", "Settings", "ModelSettings", "load_settings", "settings_from_host_config", "plugin_block",
           "builtin_vocabulary", "TEMPLATE", "MAX_LENGTH",
           "DEFAULT_MODEL", "tagger_parts", "KEYS", "read_toml"]
