"""`visual-buffet-siglip doctor`: is this machine ready to tag, and if not, what to do.

Each check returns one `Check` (OK, WARN or FAIL, what was found, the fix) so the
CLI prints them and tests assert on them. Checks take what they inspect as
arguments where they can (a hardware profile, versions, a cache folder), so they
are tested on simulated machines. Nothing here touches the network.
"""

from __future__ import annotations

import os
import stat
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .config import DEFAULT_MODEL
from .hardware import HardwareProfile
from .versions import installed_version

OK, WARN, FAIL = "OK", "WARN", "FAIL"
TORCH_FLOOR = (2, 5)  # torch.OutOfMemoryError, which the engine catches, exists from 2.5
CUDA_TORCH = "install the torch build for your CUDA version (https://pytorch.org/get-started/locally/)"


@dataclass(frozen=True)
class Check:
    """One line of the report: `fix` says what to do when status is WARN or FAIL."""

    status: str
    name: str
    detail: str
    fix: str = ""


def _major_minor(version: str) -> tuple[int, int]:
    parts = [int("".join(ch for ch in part if ch.isdigit()) or 0) for part in version.split(".")[:2]]
    return (parts + [0, 0])[0], (parts + [0, 0])[1]


def check_python(version: Sequence[int] = tuple(sys.version_info[:3])) -> Check:
    text = ".".join(map(str, version))
    if tuple(version[:2]) < (3, 10):
        return Check(FAIL, "python", text, "use Python 3.10 or newer")
    return Check(OK, "python", text)


def check_torch(version: str | None, cuda_build: str | None) -> Check:
    if version is None:
        return Check(FAIL, "torch", "not installed",
                     f"pip install torch==2.13.0 (CPU), or {CUDA_TORCH}")
    build = f"CUDA {cuda_build} build" if cuda_build else "CPU-only build"
    if _major_minor(version) < TORCH_FLOOR:
        floor = ".".join(map(str, TORCH_FLOOR))
        return Check(FAIL, "torch", f"{version} ({build}): this plugin needs {floor} or newer",
                     f"pip install -U 'torch>={floor}'")
    return Check(OK, "torch", f"{version} ({build})")


def check_transformers(version: str | None) -> Check:
    if version is None:
        return Check(FAIL, "transformers", "not installed", "pip install 'transformers>=5,<6'")
    if _major_minor(version)[0] != 5:
        return Check(FAIL, "transformers", f"{version}: this plugin needs 5.x", "pip install 'transformers>=5,<6'")
    return Check(OK, "transformers", version)


def check_device(profile: HardwareProfile) -> Check:
    if profile.cuda:
        gpus = "; ".join(f"cuda:{g.index} {g.name} ({g.total_gb:.0f} GB, cc {g.cc})" for g in profile.cuda)
        return Check(OK, "device", gpus)
    if profile.mps:
        return Check(OK, "device", "Apple GPU (mps)")
    return Check(WARN, "device", f"CPU only: {profile.cpu.model}, {profile.cpu.cores} cores, "
                 f"{profile.cpu.ram_gb:.0f} GB RAM; large models are slow here",
                 f"for speed use a machine with a GPU and {CUDA_TORCH}, or a base-size model "
                 "(model = \"google/siglip2-base-patch16-224\")")


def check_bitsandbytes(profile: HardwareProfile) -> Check:
    extra = "pip install 'visual-buffet-siglip[quant]'"
    if profile.bitsandbytes is None:
        if profile.cuda:
            return Check(WARN, "bitsandbytes", "not installed: quantization = \"8bit\"/\"4bit\" is unavailable",
                         f"{extra} (only needed to fit a big model in a small GPU)")
        return Check(OK, "bitsandbytes", "not installed (quantization is optional: it saves memory, not time)")
    if not profile.cuda:
        return Check(OK, "bitsandbytes", f"{profile.bitsandbytes}: 8bit/4bit run on the CPU too, to save RAM "
                     "(slower than float32 there)")
    return Check(OK, "bitsandbytes", profile.bitsandbytes)


def check_flash_attn(profile: HardwareProfile) -> Check:
    ampere = [g for g in profile.cuda if g.capability >= (8, 0)]
    if profile.flash_attn is None:
        if ampere:
            return Check(WARN, "flash-attn", "not installed: attention uses sdpa (correct, a little slower)",
                         "pip install 'visual-buffet-siglip[flash]' for flash_attention_2 on this GPU")
        return Check(OK, "flash-attn", "not installed (only used on CUDA GPUs with compute capability >= 8.0; "
                     "sdpa is used)")
    if not ampere:
        return Check(WARN, "flash-attn", f"{profile.flash_attn} installed, but no CUDA GPU with compute "
                     "capability >= 8.0 is visible, so sdpa is used", "nothing to do; it is not needed here")
    return Check(OK, "flash-attn", profile.flash_attn)


def check_heif(version: str | None) -> Check:
    if version is None:
        return Check(WARN, "heif", "pillow-heif not installed: HEIC/HEIF photos (iPhones) fail with "
                     "UnsupportedFormatError", "pip install 'visual-buffet-siglip[heif]'")
    return Check(OK, "heif", f"pillow-heif {version}: HEIC/HEIF readable")


def check_avif(supported: bool, pillow: str) -> Check:
    if not supported:
        return Check(WARN, "avif", f"Pillow {pillow} cannot read AVIF", "pip install -U 'pillow>=11.3'")
    return Check(OK, "avif", f"Pillow {pillow} reads AVIF")


def folder_size(folder: Path) -> int:
    """Bytes in regular files under `folder`, symlinks not followed (the hub cache links into blobs/)."""
    total = 0
    for root, _dirs, files in os.walk(folder):
        for name in files:
            try:
                info = os.lstat(os.path.join(root, name))
            except OSError:
                continue
            if stat.S_ISREG(info.st_mode):
                total += info.st_size
    return total


def check_cache(folder: Path) -> Check:
    existing = next((p for p in (folder, *folder.parents) if p.exists()), None)
    if existing is None or not os.access(existing, os.W_OK):
        return Check(WARN, "cache", f"{folder} is not writable: `download` cannot store models",
                     "set HF_HOME (or HF_HUB_CACHE) to a writable folder")
    if not folder.exists():
        return Check(OK, "cache", f"{folder} (created on the first download)")
    return Check(OK, "cache", f"{folder}, {folder_size(folder) / 2**30:.2f} GB")


def check_models(cached: Sequence[str], model: str, model_cached: bool) -> Check:
    listed = ", ".join(cached) if cached else "none"
    local = Path(os.path.expanduser(model)).is_dir()
    if local or model_cached:
        where = "a local directory" if local else "cached"
        return Check(OK, "models", f"{model} is {where}; cached registry models: {listed}")
    return Check(WARN, "models", f"{model} is not cached; cached registry models: {listed}",
                 f"visual-buffet-siglip download {model}   (or set model to a cached one or a local directory)")


def check_offline(offline: bool, cached: Sequence[str]) -> Check:
    if not offline:
        return Check(OK, "offline", "HF_HUB_OFFLINE is not set: `download` may reach the Hugging Face hub "
                     "(tagging downloads an uncached model once; cached ones load with no network access)")
    if cached:
        return Check(OK, "offline", "HF_HUB_OFFLINE is set: only cached models and local directories load")
    return Check(WARN, "offline", "HF_HUB_OFFLINE is set and no registry model is cached",
                 "unset HF_HUB_OFFLINE and run `visual-buffet-siglip download MODEL`, or set model to a "
                 "local directory")


def run_checks(model: str = DEFAULT_MODEL) -> list[Check]:
    """Every check on this machine, in report order."""
    from huggingface_hub import constants
    from PIL import features

    from .hardware import detect
    from .modelfacts import REGISTRY
    from .models import cached_snapshot

    profile = detect()
    try:
        import torch

        cuda_build = torch.version.cuda
    except Exception:  # a missing or broken torch is what the torch line reports
        cuda_build = None
    cached = [name for name in REGISTRY if cached_snapshot(name)]
    return [
        check_python(),
        check_torch(installed_version("torch"), cuda_build),
        check_transformers(installed_version("transformers")),
        check_device(profile),
        check_bitsandbytes(profile),
        check_flash_attn(profile),
        check_heif(installed_version("pillow-heif")),
        check_avif(bool(features.check("avif")), installed_version("pillow") or "?"),
        check_cache(Path(constants.HF_HUB_CACHE)),
        check_models(cached, model, cached_snapshot(model) is not None),
        check_offline(bool(constants.HF_HUB_OFFLINE), cached),
    ]


def format_checks(checks: Sequence[Check]) -> str:
    """One line per check, the fix indented below it."""
    width = max(len(check.name) for check in checks)
    lines = []
    for check in checks:
        lines.append(f"{check.status:<4}  {check.name:<{width}}  {check.detail}")
        if check.fix and check.status != OK:
            lines.append(f"{'':<4}  {'':<{width}}  fix: {check.fix}")
    return "\n".join(lines)


__all__ = ["Check", "OK", "WARN", "FAIL", "run_checks", "format_checks", "check_python", "check_torch",
           "check_transformers", "check_device", "check_bitsandbytes", "check_flash_attn", "check_heif",
           "check_avif", "check_cache", "check_models", "check_offline", "folder_size"]
