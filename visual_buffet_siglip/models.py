"""Whether a model name is usable, what an unregistered checkpoint is, and how to load one safely.

The registry and tower shapes are in `modelfacts`; this module checks names
against them, derives a `ModelInfo` from a checkpoint's config.json, finds its
files and loads it. Name checks are pure string work (config validation runs
them without torch); loading imports torch and transformers lazily.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import logging
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import ModelLoadError
from .modelfacts import REGISTRY, VISION_SHAPES, ModelInfo, TowerShape, vision_tower_params

if TYPE_CHECKING:
    from .plan import Plan

log = logging.getLogger(__name__)

SIGLIP_MODEL_TYPES = ("siglip", "siglip2")

# One model load at a time in the process: transformers' loading is not thread-safe (its lazy
# module raises "cannot import name 'AutoModel'" to a second thread importing it, and two
# concurrent from_pretrained calls have swapped weights between models).
_LOAD_LOCK = threading.RLock()
TOKENIZER_FILES = ("tokenizer.json", "spiece.model", "tokenizer.model")  # SigLIP 2 (Gemma), SigLIP v1


def closest_models(name: str, n: int = 3) -> list[str]:
    """Registry ids closest to `name`: same family and size first, then by spelling."""
    lowered = name.lower()
    family = "siglip2" if "siglip2" in lowered else "siglip"
    size = next((s for s in VISION_SHAPES if s in lowered), None)
    numbers = [int(t) for t in re.findall(r"\d+", lowered.rsplit("/", 1)[-1]) if t != "2"]

    def rank(model_id: str) -> tuple[float, ...]:
        info = REGISTRY[model_id]
        same_family = (info.family != "siglip") == (family == "siglip2")
        resolution = info.image_size or 0
        distance = min((abs(resolution - x) for x in numbers), default=0)
        spelling = difflib.SequenceMatcher(None, lowered, model_id.lower()).ratio()
        return (-same_family, -(info.size == size), distance, -spelling)

    return sorted(REGISTRY, key=rank)[:n]


def _looks_like_google_siglip(name: str) -> bool:
    return name.lower().startswith(("google/siglip", "siglip", "google/siglip2"))


def model_name_problem(name: str) -> str | None:
    """Why `name` cannot be a SigLIP model, or None when it may be one (pure, no I/O beyond a stat)."""
    if name in REGISTRY or Path(os.path.expanduser(name)).is_dir():  # Path.expanduser raises on ~unknown-user
        return None
    if _looks_like_google_siglip(name) or name.lower() in {k.lower() for k in REGISTRY}:
        close = closest_models(name)
        hint = f"; closest real ones: {', '.join(close)}" if close else ""
        return (f"{name!r} is not a released Google SigLIP checkpoint{hint} "
                "(`visual-buffet-siglip models` lists them all)")
    if name.startswith(("/", ".", "~")) or os.sep in name.strip("/").replace("/", "", 1) \
            or name.count("/") > 1:
        return f"{name!r} is not an existing directory; give a local model directory or a hub id like owner/name"
    if name.count("/") != 1 or not all(name.split("/")):
        return f"{name!r} is neither a registry id, a hub id (owner/name) nor an existing directory"
    return None


def model_info(name: str, *, config: dict[str, Any] | None = None) -> ModelInfo:
    """Registry entry for `name`, or one derived from its config.json (local dir or cached hub id)."""
    if name in REGISTRY:
        return REGISTRY[name]
    if config is None:
        config = read_model_config(name)
    return info_from_config(name, config)


def info_from_config(name: str, config: dict[str, Any]) -> ModelInfo:
    """A ModelInfo for an unregistered checkpoint, from its config.json contents."""
    model_type = config.get("model_type")
    if model_type not in SIGLIP_MODEL_TYPES:
        raise ModelLoadError(f"model {name!r} is a {model_type or 'unknown'!s} model, not SigLIP or SigLIP 2; "
                             "this plugin only runs SigLIP checkpoints (`visual-buffet-siglip models` lists them)")
    check_config_sizes(name, config)
    vision = config.get("vision_config") or {}
    width = int(vision.get("hidden_size", 768))
    layers = int(vision.get("num_hidden_layers", 12))
    inter = int(vision.get("intermediate_size", 4 * width))
    heads = int(vision.get("num_attention_heads", max(1, width // 64)))
    patch = int(vision.get("patch_size", 16))
    positions = int(vision.get("num_patches", 0)) or (int(vision.get("image_size", 224)) // patch) ** 2
    vision_params = vision_tower_params(TowerShape(width, layers, inter, heads), patch, positions) // 1_000_000
    text = config.get("text_config") or {}
    t_width = int(text.get("hidden_size", width))
    t_params = (int(text.get("num_hidden_layers", layers)) * 12 * t_width * t_width
                + int(text.get("vocab_size", 32000)) * t_width) // 1_000_000
    size = min(VISION_SHAPES, key=lambda s: abs(VISION_SHAPES[s].width - width))
    naflex = model_type == "siglip2"
    return ModelInfo(
        id=name, family="naflex" if naflex else "siglip", size=size,
        image_size=None if naflex else int(vision.get("image_size", 224)),
        patch_size=patch,
        params_m=max(1, vision_params + t_params), vision_params_m=max(1, vision_params),
        vision_width=width, vision_layers=layers, in_registry=False, vision_mlp=inter, vision_heads=heads)


# Bounds far beyond any SigLIP checkpoint (giant: width 1536, 40 layers; Gemma vocabulary 256k),
# yet low enough that a damaged or hostile config.json is refused before memory is planned for it.
CONFIG_BOUNDS = {"hidden_size": 16384, "intermediate_size": 65536, "num_hidden_layers": 256,
                 "num_attention_heads": 256, "vocab_size": 2_000_000, "image_size": 8192, "patch_size": 1024,
                 "num_patches": 65536, "max_position_embeddings": 65536}


def check_config_sizes(name: str, config: dict[str, Any]) -> None:
    """Refuse a config.json whose sizes no real checkpoint has (damaged, edited or hostile)."""
    problems = []
    for part in ("vision_config", "text_config"):
        section = config.get(part) or {}
        if not isinstance(section, dict):
            problems.append(f"{part} is {type(section).__name__}, not a table")
            continue
        for key, bound in CONFIG_BOUNDS.items():
            value = section.get(key)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= bound:
                problems.append(f"{part}.{key} = {value!r} (expected a whole number from 1 to {bound:,})")
    if problems:
        raise ModelLoadError(f"model {name!r}: its config.json has sizes no SigLIP checkpoint has: "
                             f"{'; '.join(problems)}. The file is damaged or was edited; download the model again "
                             "or restore config.json")


# --- locating files ---------------------------------------------------------------------------

def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def not_cached_message(name: str) -> str:
    return (f"model {name!r} is not in the local Hugging Face cache and cannot be downloaded now"
            f"{' (HF_HUB_OFFLINE is set)' if _offline() else ''}. Fix: run "
            f"`visual-buffet-siglip download {name}` on a machine with network access "
            "(it fills the cache), or set `model` to a local directory holding the checkpoint.")


def cached_snapshot(name: str) -> Path | None:
    """The cached snapshot folder of hub model `name` (its config.json present), or None."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(name, "config.json")
    return Path(found).parent if isinstance(found, str) else None


def resolve_source(name: str) -> Path:
    """A local folder holding `name`'s files: the directory itself or its cached hub snapshot.

    Cached hub models load with no network access at all (fast, never hangs); an
    uncached one is downloaded once, unless HF_HUB_OFFLINE says there is no
    network, in which case the error says how to get it at once.
    `visual-buffet-siglip download` fetches or refreshes a cached copy explicitly.
    """
    local = Path(os.path.expanduser(name))
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise ModelLoadError(f"model directory {str(local)!r} has no config.json; "
                                 "it does not hold a transformers checkpoint (save one with save_pretrained)")
        return local.resolve()
    snapshot = cached_snapshot(name)
    if snapshot is not None:
        return snapshot
    if _offline():
        raise ModelLoadError(not_cached_message(name))
    log.info("%s is not in the Hugging Face cache: downloading it once", name)
    try:
        return download(name)
    except Exception as exc:  # no route to the hub, a proxy, a gated repo: say what to do instead
        raise ModelLoadError(f"{not_cached_message(name)} (the download failed: {exc})") from None


def read_model_config(name: str) -> dict[str, Any]:
    """The config.json of a local directory or cached hub model."""
    path = resolve_source(name) / "config.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read {str(path)!r} for model {name!r}: {exc}") from None


def download(name: str, revision: str | None = None) -> Path:
    """Fetch a hub model's safetensors checkpoint into the Hugging Face cache (with progress bars)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    problem = model_name_problem(name)
    if problem:
        raise ModelLoadError(problem)
    try:
        folder = snapshot_download(name, revision=revision, allow_patterns=[
            "*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"])
    except LocalEntryNotFoundError:
        raise ModelLoadError(f"cannot download {name!r}: no network access to the Hugging Face hub "
                             "(or HF_HUB_OFFLINE is set). Run this where the hub is reachable.") from None
    except HfHubHTTPError as exc:
        raise ModelLoadError(f"cannot download {name!r}: {exc}") from None
    return Path(folder)


def fingerprint(source: Path) -> str:
    """Identifies the exact weights: the hub commit of a cached snapshot, else file sizes and mtimes."""
    if source.parent.name == "snapshots":
        return f"hub:{source.name}"
    digest = hashlib.sha256()
    for path in sorted(source.glob("*")):
        if path.is_file() and path.suffix in (".safetensors", ".json", ".model"):
            stat = path.stat()
            digest.update(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns};".encode())
    return f"dir:{digest.hexdigest()[:16]}"


# --- loading ---------------------------------------------------------------------------------

@dataclass
class LoadedModel:
    """A model ready for inference, with what produced it."""

    model: Any  # SiglipModel or Siglip2Model
    processor: Any  # SiglipProcessor / Siglip2Processor
    info: ModelInfo
    source: Path
    fingerprint: str
    plan: Plan


def load(name: str, plan: Plan) -> LoadedModel:
    """Load model + processor for `plan`: safetensors only, never remote code."""
    source = resolve_source(name)  # before importing transformers (seconds), so a missing model fails fast
    config = read_model_config(str(source))
    check_config_sizes(name, config)
    info = model_info(name, config=config)

    if not any(source.glob("*.safetensors")):
        pickles = [p.name for p in source.glob("*.bin")] + [p.name for p in source.glob("*.pt*")]
        found = f" (found only {', '.join(pickles)})" if pickles else ""
        raise ModelLoadError(
            f"model {name!r} at {str(source)!r} has no .safetensors weights{found}. Pickle checkpoints can run "
            "arbitrary code and are refused; convert it with save_pretrained(..., safe_serialization=True) "
            "or pick a checkpoint that ships safetensors.")
    if not any((source / tokenizer).is_file() for tokenizer in TOKENIZER_FILES):
        raise ModelLoadError(
            f"model {name!r} at {str(source)!r} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}); "
            "the labels cannot be encoded without it. Save it beside the weights "
            "(processor.save_pretrained(folder)) or download the whole checkpoint again.")
    with _LOAD_LOCK:
        model, processor = _from_pretrained(name, source, config, plan)
    from .residency import place

    model = place(model, plan)  # the vision tower on the device; the text tower waits in RAM
    model.eval()
    log.info("loaded %s from %s (%s, %s, %s attention)", name, source, plan.device, plan.dtype, plan.attention)
    return LoadedModel(model, processor, info, source, fingerprint(source), plan)


def _from_pretrained(name: str, source: Path, config: dict[str, Any], plan: Plan) -> tuple[Any, Any]:
    """Model and processor from `source` (the caller holds _LOAD_LOCK)."""
    import torch
    from transformers import AutoModel, AutoProcessor, Siglip2Model

    kwargs: dict[str, Any] = {
        "use_safetensors": True, "trust_remote_code": False, "local_files_only": True,
        # OpenVINO converts from float32 weights and applies dtype / quantization itself
        "dtype": getattr(torch, plan.dtype if plan.backend == "torch" else "float32"),
        "attn_implementation": plan.attention,
    }
    if plan.quantization != "none" and plan.backend == "torch":
        from .quantization import quantization_config

        kwargs["quantization_config"] = quantization_config(plan)
        kwargs["device_map"] = plan.device
    model_cls = Siglip2Model if config["model_type"] == "siglip2" else AutoModel
    try:
        model = model_cls.from_pretrained(str(source), **kwargs)
        processor = AutoProcessor.from_pretrained(str(source), trust_remote_code=False, local_files_only=True)
    except (OSError, ValueError, ImportError) as exc:
        raise ModelLoadError(f"cannot load model {name!r} from {str(source)!r}: {exc}") from exc
    except Exception as exc:  # safetensors' SafetensorError, transformers' size-mismatch RuntimeError
        raise _weights_error(name, source, exc) from exc
    return model, processor


def _weights_error(name: str, source: Path, exc: Exception) -> Exception:
    """A clear ModelLoadError for weights that cannot be read or do not fit config.json; else `exc` itself."""
    fix = (f"download it again (`visual-buffet-siglip download {name}`) or re-save the checkpoint"
           if name in REGISTRY or not Path(os.path.expanduser(name)).is_dir() else "re-save the checkpoint")
    if type(exc).__name__ == "SafetensorError":
        broken = _unreadable_weights(source)
        where = ", ".join(broken) if broken else "its .safetensors files"
        return ModelLoadError(f"cannot load model {name!r}: {where} in {str(source)!r} is damaged or truncated "
                              f"({exc}); {fix}")
    if isinstance(exc, RuntimeError) and "mismatch" in str(exc):
        return ModelLoadError(f"cannot load model {name!r}: the weights in {str(source)!r} do not fit its "
                              f"config.json (tensor shapes differ: config.json edited, or weights from another "
                              f"model); {fix}")
    return exc


def _unreadable_weights(source: Path) -> list[str]:
    """The .safetensors files in `source` whose header or size is broken."""
    from safetensors import safe_open

    broken = []
    for path in sorted(source.glob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt") as weights:
                for key in weights.keys():
                    weights.get_slice(key)
        except Exception:
            broken.append(path.name)
    return broken


__all__ = ["ModelLoadError", "LoadedModel", "load", "download", "model_info",
           "info_from_config", "model_name_problem", "closest_models", "resolve_source", "read_model_config",
           "cached_snapshot", "not_cached_message", "fingerprint"]
