"""How much memory the chosen precision leaves for batches, and whether the model fits at all.

The planner's second half: once `planner` has chosen device, dtype, quantization
and attention (a `Choice`), `size_batches` decides where missing labels are
encoded, refuses a model that cannot fit the accelerator (naming settings that
would), and sizes the automatic batch from the memory model (`memory`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .config import ConfigError
from .hardware import CudaDevice, HardwareProfile, metal_share
from .memory import GIB, HEADROOM, MemoryEstimate, fits, min_memory_gb, predict, split_precision, weights_gb
from .modelfacts import REGISTRY, SIZE_ORDER, VISION_PARAMS_M, ModelInfo

if TYPE_CHECKING:
    from .config import ModelSettings as Settings  # the planner reads only what shapes the model

MAX_BATCH = 1024  # the largest batch_size the settings accept


@dataclass(frozen=True)
class Target:
    """The chosen device, and the CUDA GPU behind it when it is one."""

    device: str  # "cpu", "cuda:N", "mps"
    gpu: CudaDevice | None = None


@dataclass(frozen=True)
class Choice:
    """What the planner chose before memory decides the batch size."""

    target: Target
    dtype: str
    quantization: str
    attention: str
    tokens: int  # patch tokens per image
    per_image_gb: float

    @property
    def precision(self) -> str:
        """The weights' precision: the quantization, or the dtype when there is none."""
        return self.quantization if self.quantization != "none" else self.dtype


@dataclass(frozen=True)
class Sizing:
    """What memory allows: the weights, what is left for batches, the batch that fits and why."""

    weights_gb: float
    budget_gb: float
    batch: int
    why: str
    text_device: str = "cpu"  # where labels missing from the cache are encoded
    warning: str | None = None  # memory is short, but the plan may still run


@dataclass(frozen=True)
class _Accelerator:
    total_gb: float
    free_gb: float
    where: str  # how messages name it: "cuda:0 (T4)", "mps"


def size_batches(profile: HardwareProfile, settings: Settings, model: ModelInfo, choice: Choice) -> Sizing:
    """The automatic batch for `choice` with its reason; raises `ConfigError` when one image cannot fit."""
    if choice.target.device == "cpu":
        return _size_on_cpu(profile, model, choice)
    return _size_on_accelerator(profile, settings, model, choice)


def _size_on_cpu(profile: HardwareProfile, model: ModelInfo, choice: Choice) -> Sizing:
    """CPU batches only amortise per-call overhead: size them by compute, bound them by RAM."""
    cpu, per_image = profile.cpu, choice.per_image_gb
    weights = weights_gb(model, choice.precision)  # both towers in RAM
    base = min(16, max(8, 2 * cpu.cores))  # for a base model at 224 px (196 tokens)
    cost = max(1.0, (model.vision_params_m * choice.tokens) / (VISION_PARAMS_M["base"] * 196))
    by_compute = max(1, int(base / math.sqrt(cost)))
    budget = cpu.available_ram_gb * 0.5 - weights
    by_ram = max(1, int(budget / per_image)) if per_image > 0 else by_compute
    batch = max(1, min(by_compute, by_ram, MAX_BATCH))
    why = (f"auto: {cpu.cores} cores -> {base} images for a base model at 224 px; this model costs "
           f"{cost:.1f}x that per image -> {by_compute}; half the {cpu.available_ram_gb:.1f} GB available RAM "
           f"minus ~{weights:.2f} GB of weights allows {by_ram} at ~{per_image:.2f} GB per image")
    warning = (f"the weights alone need ~{weights:.1f} GB but only {cpu.available_ram_gb:.1f} GB of RAM is "
               "available; expect swapping or an out-of-memory kill (use a smaller model or quantization)"
               if weights > cpu.available_ram_gb * 0.9 else None)
    return Sizing(weights, budget, batch, why, warning=warning)


def _size_on_accelerator(profile: HardwareProfile, settings: Settings, model: ModelInfo, choice: Choice) -> Sizing:
    """GPU / MPS batches fill what the weights, context and margin leave of free memory."""
    memory = _accelerator_memory(profile, choice.target)
    usable = memory.free_gb * (1 - HEADROOM)
    text_device = _choose_text_device(model, choice, usable)
    estimate = predict(model, choice.dtype, choice.quantization, 0, choice.attention, choice.tokens,
                       text_here=text_device != "cpu")
    weights = (estimate.vision_weights + estimate.resident_text_weights) / GIB
    _check_fit(profile, settings, model, choice, memory)
    budget = usable - (estimate.context + estimate.resident) / GIB
    batch, why = _gpu_batch(budget, memory.free_gb, estimate, choice)
    warning = (f"memory is tight on {memory.where}: one image needs ~{choice.per_image_gb:.2f} GB beyond the "
               f"weights and ~{max(budget, 0):.2f} GB is left; batch 1 may still run out of memory"
               if budget < choice.per_image_gb else None)
    return Sizing(weights, budget, batch, why, text_device, warning)


def _accelerator_memory(profile: HardwareProfile, target: Target) -> _Accelerator:
    gpu = target.gpu
    if gpu is not None:
        return _Accelerator(gpu.total_gb, gpu.free_gb, f"cuda:{gpu.index} ({gpu.name})")
    memory = profile.mps_memory_gb if profile.mps_memory_gb else metal_share(profile.cpu.ram_gb)
    return _Accelerator(memory, memory, "mps")


def _choose_text_device(model: ModelInfo, choice: Choice, usable_gb: float) -> str:
    """Where labels missing from the cache are encoded: beside the vision tower when it fits, else the CPU."""
    device = choice.target.device
    if choice.quantization != "none":
        return device  # bitsandbytes placed both towers on the device at load
    visit = predict(model, choice.dtype, choice.quantization, 1, choice.attention, choice.tokens, text_here=True)
    return device if visit.encoding + visit.context <= usable_gb * GIB else "cpu"


def _check_fit(profile: HardwareProfile, settings: Settings, model: ModelInfo, choice: Choice,
               memory: _Accelerator) -> None:
    """Raise before loading when the model cannot fit, saying what would."""
    precision, patches, free = choice.precision, settings.max_num_patches, memory.free_gb
    need = min_memory_gb(model, precision, choice.attention, patches)
    if need <= free:
        return
    dtype, quant = split_precision(precision)
    parts = predict(model, dtype, quant, 1, choice.attention, choice.tokens, text_here=False).parts_gb()
    towers = "both towers" if quant != "none" else "the vision tower"
    problem = (f"model {model.id} needs ~{need:.1f} GB of free accelerator memory at {precision} "
               f"(~{parts['vision_weights'] + parts['resident_text_weights']:.2f} GB of weights for {towers}, "
               f"~{parts['activations']:.2f} GB for one image, ~{parts['context'] + parts['workspace']:.1f} GB "
               f"for the CUDA context and workspaces, and a {HEADROOM:.0%} margin), but {memory.where} has "
               f"{free:.1f} GB free of {memory.total_gb:.1f} GB")
    fixes = []
    if precision == "float32":
        gpu = choice.target.gpu
        half = "bfloat16" if gpu is not None and gpu.capability >= (8, 0) else "float16"
        if fits(model, half, free, patches):
            fixes.append(f'dtype = "{half}" (~{min_memory_gb(model, half, max_num_patches=patches):.1f} GB)')
    if choice.target.device != "mps":
        rank = ("8bit", "4bit")
        for quant in rank[rank.index(precision) + 1 if precision in rank else 0:]:
            if fits(model, quant, free, patches):
                extra = "" if profile.bitsandbytes_ok else ", after installing the `quant` extra"
                fixes.append(f'quantization = "{quant}" '
                             f'(~{min_memory_gb(model, quant, max_num_patches=patches):.1f} GB{extra})')
    smaller = _smaller_model(model, precision, free, patches)
    if smaller:
        fixes.append(f'model = "{smaller}"')
    if settings.device == "auto":
        fixes.append('device = "cpu" (much slower)')
    if not fixes:
        raise ConfigError(f"{problem}. Use a GPU with more memory or set device = \"cpu\".")
    raise ConfigError(f"{problem}. Set one of: {'; '.join(fixes)}.")


def _smaller_model(model: ModelInfo, precision: str, free: float, max_num_patches: int) -> str | None:
    """The largest registry model of the same kind that would fit, closest in resolution."""
    naflex = model.family == "naflex"
    rank = SIZE_ORDER.index(model.size) if model.size in SIZE_ORDER else len(SIZE_ORDER)
    candidates = [m for m in REGISTRY.values()
                  if (m.family == "naflex") == naflex and m.size in SIZE_ORDER
                  and SIZE_ORDER.index(m.size) < rank and fits(m, precision, free, max_num_patches)]
    if not candidates:
        return None
    size = model.image_size or 0

    def score(m: ModelInfo) -> tuple[Any, ...]:
        return (SIZE_ORDER.index(m.size), m.family == model.family,
                -abs((m.image_size or 0) - size), m.patch_size == model.patch_size, -m.params_m)

    return max(candidates, key=score).id


def _round_batch(n: float) -> int:
    """Down to a power of two below 8, a multiple of 8 above (GPU-friendly shapes)."""
    n = int(n)
    if n >= 8:
        return n - n % 8
    return 1 << (max(n, 1).bit_length() - 1)


def _gpu_batch(budget: float, free: float, estimate: MemoryEstimate, choice: Choice) -> tuple[int, str]:
    per_image = choice.per_image_gb
    fit = budget / per_image if per_image > 0 else MAX_BATCH
    batch = max(1, min(_round_batch(fit), MAX_BATCH))
    parts = estimate.parts_gb()
    resident = "vision tower" if not estimate.resident_text_weights else "both towers (quantized, placed at load)"
    why = (f"auto: {free:.1f} GB free; batches fill {1 - HEADROOM:.0%} of it after ~{parts['context']:.1f} GB "
           f"CUDA context, ~{parts['workspace']:.2f} GB workspaces and "
           f"~{parts['vision_weights'] + parts['resident_text_weights']:.2f} GB "
           f"of {resident} weights at {choice.precision}, leaving {max(budget, 0):.1f} GB; at ~{per_image:.3f} GB "
           f"per image ({choice.tokens} tokens) that is {fit:.1f} images, rounded to {batch}")
    if _round_batch(fit) > MAX_BATCH:
        why += f" (capped at {MAX_BATCH}, the largest batch_size accepted)"
    return batch, why


__all__ = ["size_batches", "Target", "Choice", "Sizing", "MAX_BATCH"]
