"""How to run a model on a machine: `plan(profile, settings, model)` -> `Plan`.

A pure function of a `HardwareProfile` (`hardware.detect` or
`simulate.parse_simulation`), the settings and the model's facts (`modelfacts`,
`memory`): it imports no torch, so the planner is tested on simulated machines
and `visual-buffet-siglip plan --simulate` shows what another machine would get.
Each choice is made by one helper that records its reason, any warning and any
problem in a `Notes`; problems refuse the plan together, in one `ConfigError`.
Memory is `sizing`'s half: whether the model fits and how big a batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .config import ConfigError
from .hardware import MIN_BNB, CudaDevice, HardwareProfile, version_tuple
from .memory import per_image_gb
from .modelfacts import VISION_SHAPES, ModelInfo, vision_tokens
from .plan import HALF, PLAN_KEYS, Plan
from .sizing import Choice, Sizing, Target, size_batches

if TYPE_CHECKING:
    from .config import ModelSettings as Settings  # the planner reads only what shapes the model

BNB_CPU_PACKED = (0, 49)  # bitsandbytes' fused AVX512-BF16 4-bit CPU kernel (PR #1804)


@dataclass
class Notes:
    """What planning records on the way: a reason per plan key, warnings, and problems that refuse the plan."""

    reasons: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def refuse_problems(self) -> None:
        """Raise every problem found so far at once, so one run names all the settings to change."""
        if self.problems:
            raise ConfigError(self.problems)


@dataclass(frozen=True)
class _Request:
    """What `plan` was asked about: a machine, the settings and a model."""

    profile: HardwareProfile
    settings: Settings
    model: ModelInfo


def plan(profile: HardwareProfile, settings: Settings, model: ModelInfo) -> Plan:
    """Choose device, dtype, attention, quantization and batch size, each with its reason.

    Explicit settings win; impossible ones raise `ConfigError` naming the setting,
    and a model that cannot fit the chosen GPU raises before anything loads.
    """
    request, notes = _Request(profile, settings, model), Notes()
    target = _choose_device(profile, settings.device, notes)
    backend = _choose_backend(request, target.device, notes)
    dtype = _choose_dtype(profile, settings.dtype, target, notes)
    if backend == "openvino":
        from .openvino_backend import dtype_note, quantization_reason

        quant = settings.quantization
        notes.reasons["quantization"] = quantization_reason(quant, profile.nncf, profile.cpu.features)
        notes.reasons["dtype"] += dtype_note(dtype, bool(profile.cpu.bf16_features))
    else:
        quant = _choose_quantization(profile, settings.quantization, target.device, notes)
    attention = _choose_attention(request, target, dtype, notes)
    if quant == "4bit" and target.device == "cpu":
        problem = _cpu_4bit_problem(profile, model)
        if problem:
            notes.problems.append(problem)
    notes.refuse_problems()
    if quant != "none":
        role = ("compute dtype of the 4-bit layers" if quant == "4bit" else
                "dtype of the activations") + " and of the layers kept un-quantized"
        notes.reasons["dtype"] += f"; with {quant} quantization it is the {role}"
    tokens = vision_tokens(model, settings.max_num_patches)
    choice = Choice(target, dtype, quant, attention, tokens, per_image_gb(model, tokens, dtype, attention))
    sizing = size_batches(profile, settings, model, choice)
    if sizing.warning:
        notes.warnings.append(sizing.warning)
    batch = _batch_size(settings.batch_size, sizing, target.device, notes)
    return Plan(device=target.device, dtype=dtype, attention=attention, batch_size=batch,
                quantization=quant, reasons={k: notes.reasons[k] for k in PLAN_KEYS},
                warnings=tuple(notes.warnings), weights_gb=sizing.weights_gb, per_image_gb=choice.per_image_gb,
                memory_budget_gb=sizing.budget_gb, text_device=sizing.text_device, backend=backend)


# --- device, backend, dtype, quantization, attention -----------------------------------------

def _gpu_label(gpu: CudaDevice) -> str:
    return f"cuda:{gpu.index} ({gpu.name}, {gpu.total_gb:.1f} GB, cc {gpu.cc})"


def _available_devices(profile: HardwareProfile) -> str:
    parts = [f"cuda:{g.index} ({g.name})" for g in profile.cuda]
    if profile.mps:
        parts.append("mps")
    parts.append("cpu")
    return ", ".join(parts)


def _choose_device(profile: HardwareProfile, setting: str, notes: Notes) -> Target:
    """The device; one that is set but missing raises at once (nothing else can be planned without it)."""
    has = f"this machine has: {_available_devices(profile)}"
    if setting in ("auto", "cuda"):
        if profile.cuda:
            gpu = max(profile.cuda, key=lambda g: (g.free_gb, -g.index))
            pick = ("the one with the most free memory of "
                    f"{len(profile.cuda)} GPUs" if len(profile.cuda) > 1 else "")
            prefix = "auto: CUDA first" if setting == "auto" else 'device = "cuda" set in config'
            notes.reasons["device"] = f"{prefix}; {_gpu_label(gpu)}, {gpu.free_gb:.1f} GB free" + \
                (f" ({pick})" if pick else "")
            return Target(f"cuda:{gpu.index}", gpu)
        if setting == "cuda":
            options = '"auto", "mps" or "cpu"' if profile.mps else '"auto" or "cpu"'
            build = (f"; torch {profile.torch_version} is a CPU-only build"
                     if profile.torch_version.endswith("+cpu") else "")
            raise ConfigError(f'device = "cuda": torch sees no CUDA GPU ({has}{build}); '
                              f"set device = {options}")
        if profile.mps:
            notes.reasons["device"] = "auto: no CUDA GPU; Apple MPS is available"
            return Target("mps")
        notes.reasons["device"] = "auto: no CUDA GPU or Apple MPS found, so the CPU"
        return Target("cpu")
    if setting.startswith("cuda:"):
        index = int(setting[5:])
        for gpu in profile.cuda:
            if gpu.index == index:
                notes.reasons["device"] = f"device = \"{setting}\" set in config; {_gpu_label(gpu)}, " \
                                          f"{gpu.free_gb:.1f} GB free"
                return Target(setting, gpu)
        raise ConfigError(f'device = "{setting}": there is no such CUDA device ({has})')
    if setting == "mps":
        if not profile.mps:
            raise ConfigError(f'device = "mps": Apple MPS is not available ({has}); '
                              'set device = "auto" or "cpu"')
        notes.reasons["device"] = 'device = "mps" set in config'
        return Target("mps")
    notes.reasons["device"] = 'device = "cpu" set in config'
    return Target("cpu")


def _choose_backend(request: _Request, device: str, notes: Notes) -> str:
    from .openvino_backend import choose_backend  # no openvino import: only its version is read

    profile, settings, model = request.profile, request.settings, request.model
    choice = choose_backend(
        settings.backend, model.family, device, settings.dtype, settings.quantization,
        profile.openvino, profile.nncf, model.params_m)
    if choice.problem:
        notes.problems.append(choice.problem)
    notes.reasons["backend"] = choice.reason
    return choice.backend


def _choose_dtype(profile: HardwareProfile, setting: str, target: Target, notes: Notes) -> str:
    device, gpu, reasons, warnings = target.device, target.gpu, notes.reasons, notes.warnings
    bf16 = profile.cpu.bf16_features
    if setting == "auto":
        if gpu is not None:
            if gpu.capability >= (8, 0):
                dtype = "bfloat16"
                reasons["dtype"] = (f"auto: compute capability {gpu.cc} >= 8.0, so bfloat16: half the "
                                    "memory of float32 with float32's range")
            else:
                dtype = "float16"
                reasons["dtype"] = (f"auto: compute capability {gpu.cc} < 8.0 has no fast bfloat16, "
                                    "so float16 (half the memory of float32)")
        elif device == "mps":
            dtype = "float16"
            reasons["dtype"] = "auto: float16 on Apple MPS (half the memory of float32)"
        else:
            dtype = "float32"
            reasons["dtype"] = ("auto: float32 on CPU: exact (scores match the reference); bfloat16 is "
                                "not chosen automatically: measured, it moves confidences by 0.01-0.09 "
                                "against float32, over the 0.005 allowed, though it kept every top tag of the "
                                "model trained here (benchmarks/RESULTS.md)")
            if bf16:
                reasons["dtype"] += (f' (this CPU has {", ".join(bf16)}: dtype = "bfloat16" can run the model '
                                     'about 3x faster, if that is acceptable)')
    else:
        dtype = setting
        reasons["dtype"] = f'dtype = "{dtype}" set in config'
        if dtype == "bfloat16" and gpu is not None and gpu.capability < (8, 0):
            notes.problems.append(f'dtype = "bfloat16": {gpu.name} (compute capability {gpu.cc}) has no '
                                  'bfloat16 support (needs compute capability >= 8.0); use dtype = "float16" '
                                  'or "auto"')
        if dtype == "float16" and device == "cpu":
            warnings.append('dtype = "float16" on CPU: most CPUs have no fast half-precision math, so '
                            'this is usually slower than float32 and less exact')
        if dtype == "bfloat16" and device == "cpu" and not bf16:
            warnings.append('dtype = "bfloat16" on a CPU without avx512_bf16/amx_bf16 is emulated and '
                            'slow; float32 is the CPU default')
        elif dtype == "bfloat16" and device == "cpu":
            warnings.append('dtype = "bfloat16" on CPU: faster, but it moves confidences by up to '
                            '0.01-0.09 against float32 (benchmarks/RESULTS.md); float32 is the CPU default')
        if dtype == "float32" and device != "cpu":
            reasons["dtype"] += " (twice the memory of float16/bfloat16)"
    if dtype == "float16" and gpu is not None and gpu.capability < (7, 0) \
            and gpu.capability not in ((6, 0), (5, 3)):
        warnings.append(f"{gpu.name} (compute capability {gpu.cc}) runs float16 math at a small "
                        'fraction of its float32 speed; set dtype = "float32" if the model fits')
    return dtype


def _choose_quantization(profile: HardwareProfile, setting: str, device: str, notes: Notes) -> str:
    if setting == "none":
        notes.reasons["quantization"] = "none: full weights (quantization only when set in config)"
        return "none"
    install = 'install the `quant` extra: pip install "visual-buffet-siglip[quant]"'
    if profile.bitsandbytes is None:
        notes.problems.append(f'quantization = "{setting}" needs bitsandbytes, which is not installed; {install}')
    elif version_tuple(profile.bitsandbytes) < MIN_BNB:
        notes.problems.append(f'quantization = "{setting}": bitsandbytes {profile.bitsandbytes} is installed '
                              f'but transformers needs >= {".".join(map(str, MIN_BNB))}; {install}')
    if device == "mps":
        notes.problems.append(f'quantization = "{setting}" is not supported on Apple MPS by this plugin; '
                              'use quantization = "none" (MPS runs float16, half the memory of float32) '
                              'or device = "cpu"')
    notes.reasons["quantization"] = f'quantization = "{setting}" set in config; bitsandbytes ' \
                                    f'{profile.bitsandbytes or "(missing)"}'
    if device == "cpu":
        notes.reasons["quantization"] += " on CPU (supported since bitsandbytes 0.46)"
        notes.warnings.append(f'quantization = "{setting}" on CPU saves memory but runs slower than float32; '
                              'use it only when the model does not fit in RAM')
    return setting


def _cpu_4bit_problem(profile: HardwareProfile, model: ModelInfo) -> str | None:
    """bitsandbytes' AVX512-BF16 4-bit CPU path asserts layer sizes divisible by 64 / 32.

    Measured with bitsandbytes 0.50.2: a Linear4bit of 1152 -> 4304 (so400m's MLP)
    fails at the first forward with "N must be divisible by block_n"; CPUs without
    avx512_bf16 take a slower path that works, and 8-bit works everywhere.
    """
    if "avx512_bf16" not in profile.cpu.features or version_tuple(profile.bitsandbytes) < BNB_CPU_PACKED:
        return None
    mlp = model.vision_mlp or (VISION_SHAPES[model.size].mlp if model.in_registry else 0)  # 0: not known
    widths = [model.vision_width] + ([mlp] if mlp else [])
    bad = [d for d in widths if d % 64]
    if not bad:
        return None
    return (f'quantization = "4bit" on this CPU: bitsandbytes {profile.bitsandbytes} runs 4-bit layers '
            f"with its AVX512-BF16 kernel here, which needs layer sizes divisible by 64, and {model.id} "
            f'has layers of width {bad[0]}; use quantization = "8bit" (works on CPU) or "none"')


def _choose_attention(request: _Request, target: Target, dtype: str, notes: Notes) -> str:
    profile, setting, gpu = request.profile, request.settings.attention, target.gpu
    blockers = []
    if request.model.family == "naflex":
        blockers.append("NaFlex models (Siglip2Model) do not support it in transformers "
                        "(Siglip2PreTrainedModel._supports_flash_attn is False)")
    if profile.flash_attn is None:
        blockers.append('flash-attn is not installed (install the `flash` extra: '
                        'pip install "visual-buffet-siglip[flash]")')
    if gpu is None:
        blockers.append(f"it needs a CUDA GPU and the device is {target.device}")
    elif gpu.capability < (8, 0):
        blockers.append(f"it needs compute capability >= 8.0 and {gpu.name} has {gpu.cc}")
    if dtype not in HALF:
        blockers.append(f"it needs dtype float16 or bfloat16 and the dtype is {dtype}")
    if setting == "auto":
        if not blockers:
            notes.reasons["attention"] = (f"auto: flash-attn {profile.flash_attn} is installed, compute "
                                          f"capability {gpu.cc} >= 8.0 and dtype is {dtype}")  # type: ignore[union-attr]
            return "flash_attention_2"
        notes.reasons["attention"] = ("auto: PyTorch scaled-dot-product attention (fused kernels, no extra "
                                      "install); not flash_attention_2 because " + blockers[0])
        return "sdpa"
    notes.reasons["attention"] = f'attention = "{setting}" set in config'
    if setting == "flash_attention_2" and blockers:
        notes.problems.append('attention = "flash_attention_2" cannot be used here: ' + "; ".join(blockers)
                              + '. Use attention = "sdpa" or "auto" (flash_attention_2 needs flash-attn, a CUDA '
                              'GPU with compute capability >= 8.0, dtype float16 or bfloat16, and a '
                              'fixed-resolution model)')
    if setting == "eager":
        notes.reasons["attention"] += " (the reference implementation: slower and more memory than sdpa)"
    return setting


# --- batch size ------------------------------------------------------------------------------

def _batch_size(setting: int | str, sizing: Sizing, device: str, notes: Notes) -> int:
    """The configured batch size, or the one memory allows (`sizing`) when it is "auto"."""
    if setting == "auto":
        notes.reasons["batch_size"] = sizing.why
        return sizing.batch
    batch = int(setting)
    notes.reasons["batch_size"] = f"batch_size = {batch} set in config (auto would pick {sizing.batch})"
    if batch > sizing.batch * 2 and device != "cpu":
        notes.warnings.append(f"batch_size = {batch} is well above the estimated fit ({sizing.batch}); "
                              "on out-of-memory the engine halves the batch and retries")
    return batch


__all__ = ["plan", "Notes"]
