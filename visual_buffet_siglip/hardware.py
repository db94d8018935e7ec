"""What this machine has (`detect`) and how to run a model on it (`plan`).

`detect()` is the only impure function here: it reads /proc, sysconf and torch.
Everything else is a pure function of a `HardwareProfile`, so the planner is
tested on simulated machines (`parse_simulation`) and `visual-buffet-siglip plan
--simulate` shows what another machine would get. Importing this module does
not import torch.

Memory is in GB meaning GiB (2**30 bytes), which is what torch and nvidia-smi
report: a "16 GB" T4 shows 14.7, a "4 GB" GTX 1650 about 3.8.
"""

from __future__ import annotations

import math
import os
import platform
import re
import textwrap
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .config import ConfigError
from .memory import GIB, VISION_SHAPES, WEIGHT_BYTES, MemoryEstimate, per_image_bytes, predict

if TYPE_CHECKING:
    from .config import ModelSettings as Settings  # the planner reads only what shapes the model
    from .models import ModelInfo

HALF = ("float16", "bfloat16")

# --- memory model (the parts live in `memory`) -----------------------------------------------
# Batches fill about 80% of free accelerator memory: the rest covers fragmentation,
# other tenants and the memory model's own error (benchmarks/gpu_check.py measures it).
HEADROOM = 0.20
MAX_BATCH = 1024  # the largest batch_size the settings accept
SIM_RESERVED_GB = 0.3  # simulated free VRAM = total minus what the driver/desktop holds

MIN_BNB = (0, 46, 1)  # transformers 5's BITSANDBYTES_MIN_VERSION

# CPU features worth knowing for inference (x86 /proc/cpuinfo flags, ARM Features).
CPU_FEATURES = frozenset({
    "avx", "avx2", "fma", "f16c", "avx512f", "avx512_bf16", "avx512_fp16", "avx512_vnni",
    "avx_vnni", "amx_bf16", "amx_tile", "amx_int8", "amx_fp16",
    "asimd", "asimdhp", "sve", "sve2", "bf16", "i8mm",
})
BF16_CPU_FEATURES = ("avx512_bf16", "amx_bf16", "bf16")


# --- profile ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class CudaDevice:
    """One CUDA GPU as torch sees it (index is torch's, after CUDA_VISIBLE_DEVICES)."""

    index: int
    name: str
    total_gb: float
    free_gb: float
    capability: tuple[int, int]

    @property
    def cc(self) -> str:
        return f"{self.capability[0]}.{self.capability[1]}"


@dataclass(frozen=True)
class CpuInfo:
    """The CPU: model name, usable cores, RAM and inference-relevant features."""

    model: str = "unknown CPU"
    cores: int = 1
    ram_gb: float = 0.0
    available_ram_gb: float = 0.0
    features: frozenset[str] = frozenset()


@dataclass(frozen=True)
class HardwareProfile:
    """Everything the planner needs to know about a machine."""

    cpu: CpuInfo
    cuda: tuple[CudaDevice, ...] = ()
    mps: bool = False
    mps_memory_gb: float | None = None  # what Metal lets one process use (recommended max)
    flash_attn: str | None = None  # installed flash-attn version
    bitsandbytes: str | None = None  # installed bitsandbytes version
    torch_version: str = ""
    openvino: str | None = None  # installed openvino version (the `openvino` extra)
    nncf: str | None = None  # installed nncf version (OpenVINO int8 weight compression)
    simulated: bool = False


# --- plan ------------------------------------------------------------------------------------

class Reasons(Mapping[str, str]):
    """An immutable, hashable str -> str mapping (keeps `Plan` hashable)."""

    __slots__ = ("_items",)
    _items: tuple[tuple[str, str], ...]

    def __init__(self, items: Mapping[str, str] | Any = ()):
        pairs = items.items() if isinstance(items, Mapping) else items
        object.__setattr__(self, "_items", tuple((str(k), str(v)) for k, v in pairs))

    def __getitem__(self, key: str) -> str:
        for k, v in self._items:
            if k == key:
                return v
        raise KeyError(key)

    def __iter__(self) -> Iterator[str]:
        return (k for k, _ in self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        return hash(self._items)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Mapping) and dict(self.items()) == dict(other.items())

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("Reasons is immutable")

    def __repr__(self) -> str:
        return f"Reasons({dict(self._items)!r})"


PLAN_KEYS = ("device", "backend", "dtype", "attention", "quantization", "batch_size")


@dataclass(frozen=True)
class Plan:
    """How to run one model on one machine, with a reason for every choice."""

    device: str  # "cpu", "cuda:0", "mps"
    dtype: str  # float32, float16, bfloat16 (the compute dtype when quantized)
    attention: str  # sdpa, eager, flash_attention_2
    batch_size: int
    quantization: str = "none"  # none, 8bit, 4bit
    reasons: Mapping[str, str] = field(default_factory=Reasons)
    warnings: tuple[str, ...] = ()
    weights_gb: float = 0.0  # estimated weight memory at this dtype / quantization
    per_image_gb: float = 0.0  # estimated working set per image in a batch
    memory_budget_gb: float | None = None  # memory planned for batches (None: not estimated)
    text_device: str = "cpu"  # where labels missing from the cache are encoded (residency.text_tower_on)
    backend: str = "torch"  # torch, openvino (see openvino_backend.choose_backend)

    def __post_init__(self) -> None:
        if not isinstance(self.reasons, Reasons):
            object.__setattr__(self, "reasons", Reasons(self.reasons))
        object.__setattr__(self, "warnings", tuple(self.warnings))

    def reason(self, key: str) -> str:
        """Why `key` (device, dtype, attention, quantization, batch_size) was chosen."""
        return self.reasons.get(key, "")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (for `plan --json` and reports)."""
        return {"device": self.device, "backend": self.backend, "dtype": self.dtype, "attention": self.attention,
                "batch_size": self.batch_size, "quantization": self.quantization,
                "reasons": dict(self.reasons), "warnings": list(self.warnings),
                "weights_gb": round(self.weights_gb, 3), "per_image_gb": round(self.per_image_gb, 4),
                "memory_budget_gb": None if self.memory_budget_gb is None else round(self.memory_budget_gb, 3),
                "text_device": self.text_device}


# --- detection (the only impure part) --------------------------------------------------------

def detect() -> HardwareProfile:
    """Profile this machine. Never raises: anything unknown gets a safe default."""
    cpu = _detect_cpu()
    flash = _dist_version("flash-attn", "flash_attn")
    bnb = _dist_version("bitsandbytes")
    openvino, nncf = _dist_version("openvino"), _dist_version("nncf")
    try:
        import torch
    except Exception:  # no torch (or a broken one): plan for the CPU and say so
        return HardwareProfile(cpu=cpu, flash_attn=flash, bitsandbytes=bnb, openvino=openvino, nncf=nncf)
    return HardwareProfile(cpu=cpu, cuda=_detect_cuda(torch), mps=_detect_mps(torch),
                           mps_memory_gb=_detect_mps_memory(torch, cpu),
                           flash_attn=flash, bitsandbytes=bnb,
                           torch_version=str(getattr(torch, "__version__", "")), openvino=openvino, nncf=nncf)


def _dist_version(*names: str) -> str | None:
    """Installed version of a distribution, read from metadata (never imports it)."""
    from importlib import metadata

    for name in names:
        try:
            return metadata.version(name)
        except Exception:
            continue
    return None


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            return handle.read()
    except OSError:
        return None


def _detect_cpu() -> CpuInfo:
    model, features = _cpu_model_and_features()
    ram, available = _ram_gb()
    return CpuInfo(model=model, cores=cpu_cores(), ram_gb=ram, available_ram_gb=available,
                   features=features)


def _cpu_model_and_features() -> tuple[str, frozenset[str]]:
    model, flags = "", set[str]()
    text = _read("/proc/cpuinfo") or ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if not model and key in ("model name", "hardware", "cpu model", "processor") \
                and not value.strip().isdigit():
            model = value.strip()
        elif key in ("flags", "features") and not flags:
            flags = set(value.split())
    if platform.system() == "Darwin":
        model = model or _sysctl("machdep.cpu.brand_string") or ""
        if platform.machine() == "arm64":
            flags.add("asimd")
            if _sysctl("hw.optional.arm.FEAT_BF16") == "1":
                flags.add("bf16")
    model = model or platform.processor() or platform.machine() or "unknown CPU"
    return model, frozenset(flags & CPU_FEATURES)


def _sysctl(name: str) -> str | None:
    import subprocess

    try:
        out = subprocess.run(["sysctl", "-n", name], capture_output=True, text=True, timeout=2)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else None


def cpu_cores() -> int:
    """CPUs this process may use: its affinity mask, capped by a cgroup CPU quota (containers)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    quota = (_read("/sys/fs/cgroup/cpu.max") or "").split()  # cgroup v2: "200000 100000" or "max 100000"
    if len(quota) == 2 and quota[0].isdigit() and quota[1].isdigit() and int(quota[1]) > 0:
        cores = min(cores, max(1, math.ceil(int(quota[0]) / int(quota[1]))))
    return max(1, cores)


def _ram_gb() -> tuple[float, float]:
    total = available = 0.0
    meminfo = _read("/proc/meminfo")
    if meminfo:
        values = {}
        for line in meminfo.splitlines():
            key, _, rest = line.partition(":")
            parts = rest.split()
            if parts and parts[0].isdigit():
                values[key] = int(parts[0]) * 1024 / GIB
        total = values.get("MemTotal", 0.0)
        available = values.get("MemAvailable", values.get("MemFree", 0.0))
    if total <= 0:
        try:
            page = os.sysconf("SC_PAGE_SIZE")
            total = page * os.sysconf("SC_PHYS_PAGES") / GIB
            try:
                available = page * os.sysconf("SC_AVPHYS_PAGES") / GIB
            except (ValueError, OSError):
                available = total / 2
        except (ValueError, OSError, AttributeError):
            total = available = 0.0
    limit = (_read("/sys/fs/cgroup/memory.max") or "").strip()  # container limit, cgroup v2
    if limit.isdigit():
        limit_gb = int(limit) / GIB
        used = (_read("/sys/fs/cgroup/memory.current") or "").strip()
        used_gb = int(used) / GIB if used.isdigit() else 0.0
        if 0 < limit_gb < total or total <= 0:
            total = limit_gb
            available = min(available, max(0.0, limit_gb - used_gb)) if available > 0 else limit_gb - used_gb
    if total <= 0:  # unknown: assume a small machine rather than a big one
        total, available = 8.0, 4.0
    return round(total, 2), round(max(0.0, min(available, total)), 2)


def _detect_cuda(torch: Any) -> tuple[CudaDevice, ...]:
    devices = []
    try:
        if not torch.cuda.is_available():
            return ()
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            total = props.total_memory / GIB
            try:  # NVML (via pynvml) reads usage without creating a CUDA context on every GPU
                free = total - torch.cuda.device_memory_used(index) / GIB
            except Exception:
                try:
                    free = torch.cuda.mem_get_info(index)[0] / GIB
                except Exception:
                    free = total
            capability = tuple(int(x) for x in torch.cuda.get_device_capability(index))
            devices.append(CudaDevice(index, str(props.name), round(total, 2),
                                      round(max(0.0, min(free, total)), 2),
                                      (capability[0], capability[1])))
    except Exception:  # a broken driver is "no CUDA", not a crash
        return tuple(devices)
    return tuple(devices)


def _detect_mps(torch: Any) -> bool:
    try:
        return bool(torch.backends.mps.is_available())
    except Exception:
        return False


def _detect_mps_memory(torch: Any, cpu: CpuInfo) -> float | None:
    if not _detect_mps(torch):
        return None
    try:
        return round(torch.mps.recommended_max_memory() / GIB, 2)
    except Exception:
        return round(_metal_share(cpu.ram_gb), 2)


def _metal_share(memory_gb: float) -> float:
    """Metal's recommended working set: about 2/3 of unified memory, 3/4 on bigger Macs."""
    return memory_gb * (2 / 3 if memory_gb <= 36 else 0.75)


# --- planning (pure) -------------------------------------------------------------------------

def plan(profile: HardwareProfile, settings: Settings, model: ModelInfo) -> Plan:
    """Choose device, dtype, attention, quantization and batch size, each with its reason.

    Explicit settings win; impossible ones raise `ConfigError` naming the setting,
    and a model that cannot fit the chosen GPU raises before anything loads.
    """
    reasons: dict[str, str] = {}
    warnings: list[str] = []
    device, gpu = _choose_device(profile, settings.device, reasons)
    problems: list[str] = []
    backend = _choose_backend(profile, settings, model, device, reasons, problems)
    dtype = _choose_dtype(profile, settings.dtype, device, gpu, reasons, warnings, problems)
    if backend == "openvino":
        from .openvino_backend import dtype_note, quantization_reason

        quant = settings.quantization
        reasons["quantization"] = quantization_reason(quant, profile.nncf, profile.cpu.features)
        reasons["dtype"] += dtype_note(dtype, _has_bf16_cpu(profile.cpu))
    else:
        quant = _choose_quantization(profile, settings.quantization, device, reasons, warnings, problems)
    attention = _choose_attention(profile, settings.attention, model, device, gpu, dtype,
                                  reasons, warnings, problems)
    if quant == "4bit" and device == "cpu":
        problem = _cpu_4bit_problem(profile, model)
        if problem:
            problems.append(problem)
    if problems:
        raise ConfigError(problems)
    if quant != "none":
        role = ("compute dtype of the 4-bit layers" if quant == "4bit" else
                "dtype of the activations") + " and of the layers kept un-quantized"
        reasons["dtype"] += f"; with {quant} quantization it is the {role}"
    precision = quant if quant != "none" else dtype
    tokens = vision_tokens(model, settings.max_num_patches)
    per_image = per_image_gb(model, tokens, dtype, attention)
    budget: float | None = None
    text_device = "cpu"
    if device == "cpu":
        weights = weights_gb(model, precision)  # both towers in RAM
        auto_batch, budget, why = _cpu_batch(profile.cpu, model, tokens, weights, per_image)
        if weights > profile.cpu.available_ram_gb * 0.9:
            warnings.append(f"the weights alone need ~{weights:.1f} GB but only "
                            f"{profile.cpu.available_ram_gb:.1f} GB of RAM is available; expect swapping "
                            "or an out-of-memory kill (use a smaller model or quantization)")
    else:
        total, free, where = _accelerator_memory(profile, device, gpu)
        usable = free * (1 - HEADROOM)
        text_device = _choose_text_device(model, dtype, quant, attention, tokens, device, usable)
        estimate = predict(model, dtype, quant, 0, attention, tokens, text_here=text_device != "cpu")
        weights = (estimate.vision_weights + estimate.resident_text_weights) / GIB
        _check_fit(profile, settings, model, device, gpu, precision, attention, total, free, where)
        budget = usable - (estimate.context + estimate.resident) / GIB
        auto_batch, why = _gpu_batch(budget, per_image, tokens, free, estimate, precision, text_device)
        if budget < per_image:
            warnings.append(f"memory is tight on {where}: one image needs ~{per_image:.2f} GB beyond the "
                            f"weights and ~{max(budget, 0):.2f} GB is left; batch 1 may still run out of memory")
    if settings.batch_size == "auto":
        batch = auto_batch
        reasons["batch_size"] = why
    else:
        batch = int(settings.batch_size)
        reasons["batch_size"] = f"batch_size = {batch} set in config (auto would pick {auto_batch})"
        if batch > auto_batch * 2 and device != "cpu":
            warnings.append(f"batch_size = {batch} is well above the estimated fit ({auto_batch}); "
                            "on out-of-memory the engine halves the batch and retries")
    return Plan(device=device, dtype=dtype, attention=attention, batch_size=batch,
                quantization=quant, reasons={k: reasons[k] for k in PLAN_KEYS},
                warnings=tuple(warnings), weights_gb=weights, per_image_gb=per_image,
                memory_budget_gb=budget, text_device=text_device, backend=backend)


def _choose_backend(profile: HardwareProfile, settings: Settings, model: ModelInfo, device: str,
                    reasons: dict[str, str], problems: list[str]) -> str:
    from .openvino_backend import choose_backend  # no openvino import: only its version is read

    choice = choose_backend(
        settings.backend, model.family, device, settings.dtype, settings.quantization,
        profile.openvino, profile.nncf, model.params_m)
    if choice.problem:
        problems.append(choice.problem)
    reasons["backend"] = choice.reason
    return choice.backend


def _gpu_label(gpu: CudaDevice) -> str:
    return f"cuda:{gpu.index} ({gpu.name}, {gpu.total_gb:.1f} GB, cc {gpu.cc})"


def _available_devices(profile: HardwareProfile) -> str:
    parts = [f"cuda:{g.index} ({g.name})" for g in profile.cuda]
    if profile.mps:
        parts.append("mps")
    parts.append("cpu")
    return ", ".join(parts)


def _choose_device(profile: HardwareProfile, setting: str, reasons: dict[str, str]
                   ) -> tuple[str, CudaDevice | None]:
    has = f"this machine has: {_available_devices(profile)}"
    if setting in ("auto", "cuda"):
        if profile.cuda:
            gpu = max(profile.cuda, key=lambda g: (g.free_gb, -g.index))
            pick = ("the one with the most free memory of "
                    f"{len(profile.cuda)} GPUs" if len(profile.cuda) > 1 else "")
            prefix = "auto: CUDA first" if setting == "auto" else 'device = "cuda" set in config'
            reasons["device"] = f"{prefix}; {_gpu_label(gpu)}, {gpu.free_gb:.1f} GB free" + \
                (f" ({pick})" if pick else "")
            return f"cuda:{gpu.index}", gpu
        if setting == "cuda":
            options = '"auto", "mps" or "cpu"' if profile.mps else '"auto" or "cpu"'
            build = (f"; torch {profile.torch_version} is a CPU-only build"
                     if profile.torch_version.endswith("+cpu") else "")
            raise ConfigError(f'device = "cuda": torch sees no CUDA GPU ({has}{build}); '
                              f"set device = {options}")
        if profile.mps:
            reasons["device"] = "auto: no CUDA GPU; Apple MPS is available"
            return "mps", None
        reasons["device"] = "auto: no CUDA GPU or Apple MPS found, so the CPU"
        return "cpu", None
    if setting.startswith("cuda:"):
        index = int(setting[5:])
        for gpu in profile.cuda:
            if gpu.index == index:
                reasons["device"] = f"device = \"{setting}\" set in config; {_gpu_label(gpu)}, " \
                                    f"{gpu.free_gb:.1f} GB free"
                return setting, gpu
        raise ConfigError(f'device = "{setting}": there is no such CUDA device ({has})')
    if setting == "mps":
        if not profile.mps:
            raise ConfigError(f'device = "mps": Apple MPS is not available ({has}); '
                              'set device = "auto" or "cpu"')
        reasons["device"] = 'device = "mps" set in config'
        return "mps", None
    reasons["device"] = 'device = "cpu" set in config'
    return "cpu", None


def _has_bf16_cpu(cpu: CpuInfo) -> bool:
    return any(f in cpu.features for f in BF16_CPU_FEATURES)


def _choose_dtype(profile: HardwareProfile, setting: str, device: str, gpu: CudaDevice | None,
                  reasons: dict[str, str], warnings: list[str], problems: list[str]) -> str:
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
                                "not chosen automatically: measured, it moves confidences by 0.01-0.03 "
                                "against float32, over the 0.005 allowed (benchmarks/RESULTS.md)")
            if _has_bf16_cpu(profile.cpu):
                native = ", ".join(f for f in BF16_CPU_FEATURES if f in profile.cpu.features)
                reasons["dtype"] += (f' (this CPU has {native}: dtype = "bfloat16" can run the model '
                                     'about 3x faster, if that is acceptable)')
    else:
        dtype = setting
        reasons["dtype"] = f'dtype = "{dtype}" set in config'
        if dtype == "bfloat16" and gpu is not None and gpu.capability < (8, 0):
            problems.append(f'dtype = "bfloat16": {gpu.name} (compute capability {gpu.cc}) has no '
                            'bfloat16 support (needs compute capability >= 8.0); use dtype = "float16" '
                            'or "auto"')
        if dtype == "float16" and device == "cpu":
            warnings.append('dtype = "float16" on CPU: most CPUs have no fast half-precision math, so '
                            'this is usually slower than float32 and less exact')
        if dtype == "bfloat16" and device == "cpu" and not _has_bf16_cpu(profile.cpu):
            warnings.append('dtype = "bfloat16" on a CPU without avx512_bf16/amx_bf16 is emulated and '
                            'slow; float32 is the CPU default')
        elif dtype == "bfloat16" and device == "cpu":
            warnings.append('dtype = "bfloat16" on CPU: faster, but it moves confidences by up to '
                            '0.01-0.03 against float32 (benchmarks/RESULTS.md); float32 is the CPU default')
        if dtype == "float32" and device != "cpu":
            reasons["dtype"] += " (twice the memory of float16/bfloat16)"
    if dtype == "float16" and gpu is not None and gpu.capability < (7, 0) \
            and gpu.capability not in ((6, 0), (5, 3)):
        warnings.append(f"{gpu.name} (compute capability {gpu.cc}) runs float16 math at a small "
                        'fraction of its float32 speed; set dtype = "float32" if the model fits')
    return dtype


def _version_tuple(text: str | None) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", (text or "").split("+")[0])[:3])


def _bnb_ok(profile: HardwareProfile) -> bool:
    return profile.bitsandbytes is not None and _version_tuple(profile.bitsandbytes) >= MIN_BNB


def _choose_quantization(profile: HardwareProfile, setting: str, device: str,
                         reasons: dict[str, str], warnings: list[str], problems: list[str]) -> str:
    if setting == "none":
        reasons["quantization"] = "none: full weights (quantization only when set in config)"
        return "none"
    install = 'install the `quant` extra: pip install "visual-buffet-siglip[quant]"'
    if profile.bitsandbytes is None:
        problems.append(f'quantization = "{setting}" needs bitsandbytes, which is not installed; {install}')
    elif _version_tuple(profile.bitsandbytes) < MIN_BNB:
        problems.append(f'quantization = "{setting}": bitsandbytes {profile.bitsandbytes} is installed but '
                        f'transformers needs >= {".".join(map(str, MIN_BNB))}; {install}')
    if device == "mps":
        problems.append(f'quantization = "{setting}" is not supported on Apple MPS by this plugin; '
                        'use quantization = "none" (MPS runs float16, half the memory of float32) '
                        'or device = "cpu"')
    reasons["quantization"] = f'quantization = "{setting}" set in config; bitsandbytes ' \
                              f'{profile.bitsandbytes or "(missing)"}'
    if device == "cpu":
        reasons["quantization"] += " on CPU (supported since bitsandbytes 0.46)"
        warnings.append(f'quantization = "{setting}" on CPU saves memory but runs slower than float32; '
                        'use it only when the model does not fit in RAM')
    return setting


BNB_CPU_PACKED = (0, 49)  # bitsandbytes' fused AVX512-BF16 4-bit CPU kernel (PR #1804)


def _cpu_4bit_problem(profile: HardwareProfile, model: ModelInfo) -> str | None:
    """bitsandbytes' AVX512-BF16 4-bit CPU path asserts layer sizes divisible by 64 / 32.

    Measured with bitsandbytes 0.50.2: a Linear4bit of 1152 -> 4304 (so400m's MLP)
    fails at the first forward with "N must be divisible by block_n"; CPUs without
    avx512_bf16 take a slower path that works, and 8-bit works everywhere.
    """
    if "avx512_bf16" not in profile.cpu.features or _version_tuple(profile.bitsandbytes) < BNB_CPU_PACKED:
        return None
    mlp = model.vision_mlp or (VISION_SHAPES[model.size].mlp if model.in_registry else 0)  # 0: not known
    widths = [model.vision_width] + ([mlp] if mlp else [])
    bad = [d for d in widths if d % 64]
    if not bad:
        return None
    return (f'quantization = "4bit" on this CPU: bitsandbytes {profile.bitsandbytes} runs 4-bit layers '
            f"with its AVX512-BF16 kernel here, which needs layer sizes divisible by 64, and {model.id} "
            f'has layers of width {bad[0]}; use quantization = "8bit" (works on CPU) or "none"')


def _choose_attention(profile: HardwareProfile, setting: str, model: ModelInfo, device: str,
                      gpu: CudaDevice | None, dtype: str, reasons: dict[str, str],
                      warnings: list[str], problems: list[str]) -> str:
    naflex = model.family == "naflex"
    blockers = []
    if naflex:
        blockers.append("NaFlex models (Siglip2Model) do not support it in transformers "
                        "(Siglip2PreTrainedModel._supports_flash_attn is False)")
    if profile.flash_attn is None:
        blockers.append('flash-attn is not installed (install the `flash` extra: '
                        'pip install "visual-buffet-siglip[flash]")')
    if gpu is None:
        blockers.append(f"it needs a CUDA GPU and the device is {device}")
    elif gpu.capability < (8, 0):
        blockers.append(f"it needs compute capability >= 8.0 and {gpu.name} has {gpu.cc}")
    if dtype not in HALF:
        blockers.append(f"it needs dtype float16 or bfloat16 and the dtype is {dtype}")
    if setting == "auto":
        if not blockers:
            reasons["attention"] = (f"auto: flash-attn {profile.flash_attn} is installed, compute "
                                    f"capability {gpu.cc} >= 8.0 and dtype is {dtype}")  # type: ignore[union-attr]
            return "flash_attention_2"
        reasons["attention"] = ("auto: PyTorch scaled-dot-product attention (fused kernels, no extra "
                                "install); not flash_attention_2 because " + blockers[0])
        return "sdpa"
    reasons["attention"] = f'attention = "{setting}" set in config'
    if setting == "flash_attention_2" and blockers:
        problems.append('attention = "flash_attention_2" cannot be used here: ' + "; ".join(blockers)
                        + '. Use attention = "sdpa" or "auto" (flash_attention_2 needs flash-attn, a CUDA '
                        'GPU with compute capability >= 8.0, dtype float16 or bfloat16, and a '
                        'fixed-resolution model)')
    if setting == "eager":
        reasons["attention"] += " (the reference implementation: slower and more memory than sdpa)"
    return setting


def vision_tokens(model: ModelInfo, max_num_patches: int = 256) -> int:
    """Patch tokens per image: (image_size / patch)^2, or max_num_patches for NaFlex."""
    if model.family == "naflex" or model.image_size is None:
        return int(max_num_patches)
    return max(1, (model.image_size // model.patch_size) ** 2)


def weights_gb(model: ModelInfo, precision: str) -> float:
    """Weight memory of both towers at a dtype or quantization ("float16", "4bit", ...)."""
    return model.params_m * 1e6 * WEIGHT_BYTES[precision] / GIB


def per_image_gb(model: ModelInfo, tokens: int, dtype: str, attention: str = "sdpa") -> float:
    """Working set one more image in a batch adds (`memory.per_image_bytes`)."""
    return per_image_bytes(model, tokens, dtype, attention) / GIB


def _split(precision: str) -> tuple[str, str]:
    """(activation dtype, quantization) for a precision; quantized layers compute in half."""
    return (precision, "none") if precision in ("float32", "float16", "bfloat16") else ("float16", precision)


def min_memory_gb(model: ModelInfo, precision: str, attention: str = "sdpa", max_num_patches: int = 256) -> float:
    """Free accelerator memory `model` needs to tag one image at a time at a dtype or quantization.

    Counts the vision tower only (the text tower can encode labels on the CPU),
    the CUDA context and the planner's margin; quantized models keep both towers.
    """
    dtype, quant = _split(precision)
    estimate = predict(model, dtype, quant, 1, attention, vision_tokens(model, max_num_patches), text_here=False)
    return estimate.peak_total / GIB / (1 - HEADROOM)


def _accelerator_memory(profile: HardwareProfile, device: str, gpu: CudaDevice | None
                        ) -> tuple[float, float, str]:
    if gpu is not None:
        return gpu.total_gb, gpu.free_gb, f"cuda:{gpu.index} ({gpu.name})"
    memory = profile.mps_memory_gb if profile.mps_memory_gb else _metal_share(profile.cpu.ram_gb)
    return memory, memory, "mps"


def _choose_text_device(model: ModelInfo, dtype: str, quant: str, attention: str, tokens: int, device: str,
                        usable_gb: float) -> str:
    """Where labels missing from the cache are encoded: beside the vision tower when it fits, else the CPU."""
    if quant != "none":
        return device  # bitsandbytes placed both towers on the device at load
    visit = predict(model, dtype, quant, 1, attention, tokens, text_here=True)
    return device if visit.encoding + visit.context <= usable_gb * GIB else "cpu"


def _fits(model: ModelInfo, precision: str, free: float, max_num_patches: int) -> bool:
    return min_memory_gb(model, precision, max_num_patches=max_num_patches) <= free


def _check_fit(profile: HardwareProfile, settings: Settings, model: ModelInfo, device: str,
               gpu: CudaDevice | None, precision: str, attention: str, total: float, free: float,
               where: str) -> None:
    """Raise before loading when the model cannot fit, saying what would."""
    need = min_memory_gb(model, precision, attention, settings.max_num_patches)
    if need <= free:
        return
    dtype, quant = _split(precision)
    parts = predict(model, dtype, quant, 1, attention, vision_tokens(model, settings.max_num_patches),
                    text_here=False).parts_gb()
    towers = "both towers" if quant != "none" else "the vision tower"
    problem = (f"model {model.id} needs ~{need:.1f} GB of free accelerator memory at {precision} "
               f"(~{parts['vision_weights'] + parts['resident_text_weights']:.2f} GB of weights for {towers}, "
               f"~{parts['activations']:.2f} GB for one image, ~{parts['context'] + parts['workspace']:.1f} GB "
               f"for the CUDA context and workspaces, and a {HEADROOM:.0%} margin), but {where} has "
               f"{free:.1f} GB free of {total:.1f} GB")
    fixes = []
    patches = settings.max_num_patches
    if precision == "float32":
        half = "bfloat16" if gpu is not None and gpu.capability >= (8, 0) else "float16"
        if _fits(model, half, free, patches):
            fixes.append(f'dtype = "{half}" (~{min_memory_gb(model, half, max_num_patches=patches):.1f} GB)')
    if device != "mps":
        rank = ("8bit", "4bit")
        for quant in rank[rank.index(precision) + 1 if precision in rank else 0:]:
            if _fits(model, quant, free, patches):
                extra = "" if _bnb_ok(profile) else ", after installing the `quant` extra"
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


_SIZE_ORDER = ("base", "large", "so400m", "giant")


def _smaller_model(model: ModelInfo, precision: str, free: float, max_num_patches: int) -> str | None:
    """The largest registry model of the same kind that would fit, closest in resolution."""
    from .models import REGISTRY

    naflex = model.family == "naflex"
    rank = _SIZE_ORDER.index(model.size) if model.size in _SIZE_ORDER else len(_SIZE_ORDER)
    candidates = [m for m in REGISTRY.values()
                  if (m.family == "naflex") == naflex and m.size in _SIZE_ORDER
                  and _SIZE_ORDER.index(m.size) < rank and _fits(m, precision, free, max_num_patches)]
    if not candidates:
        return None
    size = model.image_size or 0

    def score(m: ModelInfo) -> tuple[Any, ...]:
        return (_SIZE_ORDER.index(m.size), m.family == model.family,
                -abs((m.image_size or 0) - size), m.patch_size == model.patch_size, -m.params_m)

    return max(candidates, key=score).id


def _round_batch(n: float) -> int:
    """Down to a power of two below 8, a multiple of 8 above (GPU-friendly shapes)."""
    n = int(n)
    if n >= 8:
        return n - n % 8
    return 1 << (max(n, 1).bit_length() - 1)


def _gpu_batch(budget: float, per_image: float, tokens: int, free: float, estimate: MemoryEstimate,
               precision: str, text_device: str) -> tuple[int, str]:
    fit = budget / per_image if per_image > 0 else MAX_BATCH
    batch = max(1, min(_round_batch(fit), MAX_BATCH))
    parts = estimate.parts_gb()
    resident = "vision tower" if not estimate.resident_text_weights else "both towers (quantized, placed at load)"
    why = (f"auto: {free:.1f} GB free; batches fill {1 - HEADROOM:.0%} of it after ~{parts['context']:.1f} GB "
           f"CUDA context, ~{parts['workspace']:.2f} GB workspaces and "
           f"~{parts['vision_weights'] + parts['resident_text_weights']:.2f} GB "
           f"of {resident} weights at {precision}, leaving {max(budget, 0):.1f} GB; at ~{per_image:.3f} GB "
           f"per image ({tokens} tokens) that is {fit:.1f} images, rounded to {batch}")
    if _round_batch(fit) > MAX_BATCH:
        why += f" (capped at {MAX_BATCH}, the largest batch_size accepted)"
    return batch, why


def _cpu_batch(cpu: CpuInfo, model: ModelInfo, tokens: int, weights: float, per_image: float
               ) -> tuple[int, float, str]:
    """CPU batches only amortise per-call overhead: size them by compute, bound them by RAM."""
    target = min(16, max(8, 2 * cpu.cores))  # for a base model at 224 px (196 tokens)
    cost = max(1.0, (model.vision_params_m * tokens) / (93 * 196))
    by_compute = max(1, int(target / math.sqrt(cost)))
    budget = cpu.available_ram_gb * 0.5 - weights
    by_ram = max(1, int(budget / per_image)) if per_image > 0 else by_compute
    batch = max(1, min(by_compute, by_ram, MAX_BATCH))
    why = (f"auto: {cpu.cores} cores -> {target} images for a base model at 224 px; this model costs "
           f"{cost:.1f}x that per image -> {by_compute}; half the {cpu.available_ram_gb:.1f} GB available RAM "
           f"minus ~{weights:.2f} GB of weights allows {by_ram} at ~{per_image:.2f} GB per image")
    return batch, budget, why


# --- simulation ------------------------------------------------------------------------------

SIMULATION_FORM = (
    'expected KIND:key=value,... with KIND cuda, cpu or mps, several joined with ";", e.g. '
    '"cuda:name=T4,vram_gb=16,cc=7.5" (optional free_gb, flash_attn=2.7.4, bnb=0.50.2), '
    '"cpu:cores=8,ram_gb=32,avx512_bf16=1,model=Xeon" (optional available_ram_gb, '
    'any CPU feature such as avx2=1 or amx_bf16=1), "mps:memory_gb=16"')

_COMMON_KEYS = {"flash_attn", "bnb", "bitsandbytes", "torch"}
_KIND_KEYS = {
    "cuda": {"name", "vram_gb", "free_gb", "cc"},
    "cpu": {"cores", "ram_gb", "available_ram_gb", "model"},
    "mps": {"memory_gb", "name"},
}
_DEFAULT_CPU = CpuInfo(model="simulated x86-64 CPU", cores=8, ram_gb=32.0, available_ram_gb=28.0,
                       features=frozenset({"avx", "avx2", "fma", "f16c"}))


def parse_simulation(spec: str) -> HardwareProfile:
    """A profile from a `plan --simulate` spec (see SIMULATION_FORM)."""
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(f"--simulate {spec!r}: empty; {SIMULATION_FORM}")
    cpu: CpuInfo | None = None
    gpus: list[CudaDevice] = []
    mps_memory: float | None = None
    common: dict[str, str] = {}
    for segment in filter(None, (s.strip() for s in spec.split(";"))):
        kind, _, body = segment.partition(":")
        kind = kind.strip().lower()
        if kind not in _KIND_KEYS:
            raise ConfigError(f"--simulate {spec!r}: unknown kind {kind!r}; {SIMULATION_FORM}")
        values: dict[str, str] = {}
        for item in filter(None, (s.strip() for s in body.split(","))):
            key, eq, value = item.partition("=")
            key = key.strip().lower()
            allowed = _KIND_KEYS[kind] | _COMMON_KEYS | (CPU_FEATURES if kind == "cpu" else set())
            if not eq or not value.strip() or key not in allowed:
                raise ConfigError(f"--simulate {spec!r}: bad item {item!r} for {kind} (keys: "
                                  f"{', '.join(sorted(_KIND_KEYS[kind] | _COMMON_KEYS))}"
                                  f"{', CPU features' if kind == 'cpu' else ''}); {SIMULATION_FORM}")
            (common if key in _COMMON_KEYS else values)[key] = value.strip()
        try:
            if kind == "cuda":
                gpus.append(_sim_gpu(len(gpus), values))
            elif kind == "mps":
                if mps_memory is not None:
                    raise ValueError("mps given twice")
                mps_memory = _positive(values.get("memory_gb", "16"), "memory_gb")
            else:
                if cpu is not None:
                    raise ValueError("cpu given twice")
                cpu = _sim_cpu(values)
        except ValueError as exc:
            raise ConfigError(f"--simulate {spec!r}: {exc}; {SIMULATION_FORM}") from None
    if gpus and mps_memory is not None:
        raise ConfigError(f"--simulate {spec!r}: a machine has CUDA or MPS, not both; {SIMULATION_FORM}")
    if cpu is None:
        if mps_memory is not None:
            cpu = CpuInfo(model="simulated Apple silicon", cores=8, ram_gb=mps_memory,
                          available_ram_gb=round(mps_memory * 0.75, 2), features=frozenset({"asimd"}))
        else:
            cpu = _DEFAULT_CPU
    return HardwareProfile(
        cpu=cpu, cuda=tuple(gpus), mps=mps_memory is not None,
        mps_memory_gb=None if mps_memory is None else round(_metal_share(mps_memory), 2),
        flash_attn=common.get("flash_attn"),
        bitsandbytes=common.get("bnb", common.get("bitsandbytes")),
        torch_version=common.get("torch", "simulated"), simulated=True)


def _positive(text: str, key: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{key}={text!r} is not a number") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{key}={text!r} must be a positive number")
    return value


def _sim_gpu(index: int, values: dict[str, str]) -> CudaDevice:
    if "vram_gb" not in values:
        raise ValueError("cuda needs vram_gb")
    total = _positive(values["vram_gb"], "vram_gb")
    free = _positive(values["free_gb"], "free_gb") if "free_gb" in values else max(0.0, total - SIM_RESERVED_GB)
    if free > total:
        raise ValueError(f"free_gb={free:g} exceeds vram_gb={total:g}")
    cc = values.get("cc", "8.0")
    match = re.fullmatch(r"(\d+)\.(\d)", cc)
    if not match:
        raise ValueError(f"cc={cc!r} is not a compute capability like 7.5 or 9.0")
    return CudaDevice(index, values.get("name", "simulated GPU"), total, free,
                      (int(match.group(1)), int(match.group(2))))


def _sim_cpu(values: dict[str, str]) -> CpuInfo:
    cores_text = values.get("cores", "8")
    if not cores_text.isdigit() or int(cores_text) < 1:
        raise ValueError(f"cores={cores_text!r} must be a whole number >= 1")
    ram = _positive(values.get("ram_gb", "32"), "ram_gb")
    available = _positive(values["available_ram_gb"], "available_ram_gb") \
        if "available_ram_gb" in values else round(ram * 0.9, 2)
    features = set()
    for key, value in values.items():
        if key in CPU_FEATURES:
            if value.lower() not in ("1", "0", "true", "false", "yes", "no"):
                raise ValueError(f"{key}={value!r} must be 1 or 0")
            if value.lower() in ("1", "true", "yes"):
                features.add(key)
    return CpuInfo(model=values.get("model", "simulated CPU"), cores=int(cores_text), ram_gb=ram,
                   available_ram_gb=min(available, ram), features=frozenset(features))


# --- report ----------------------------------------------------------------------------------

def _memory_line(plan: Plan, model: ModelInfo) -> str:
    """How the plan spends memory: which towers stay where, and what is left for batches."""
    head = (f"weights ~{plan.weights_gb:.2f} GB, ~{plan.per_image_gb:.3f} GB per image planned, "
            f"{max(plan.memory_budget_gb or 0.0, 0):.1f} GB for batches")
    if plan.device == "cpu":
        return head + " (both towers in RAM)"
    if plan.quantization != "none":
        return head + f" (both towers stay on {plan.device}: bitsandbytes places quantized weights at load)"
    text = model.params_m - model.vision_params_m
    where = (f"visits {plan.device} only to encode labels missing from the label cache, then returns to RAM"
             if plan.text_device != "cpu" else
             "encodes labels missing from the label cache on the CPU (it does not fit beside the vision tower)")
    return (head + f"; only the vision tower stays on {plan.device}: the text tower (~{text}M parameters) "
            f"{where}, and scores are computed on the CPU")


def format_plan(profile: HardwareProfile, plan: Plan, model: ModelInfo) -> str:
    """The profile and every choice with its reason, as `visual-buffet-siglip plan` prints it."""
    cpu = profile.cpu
    lines = ["Hardware" + (" (simulated)" if profile.simulated else "")]
    lines.append(f"  CPU           {cpu.model}, {cpu.cores} core{'s' if cpu.cores != 1 else ''}, "
                 f"{cpu.ram_gb:.1f} GB RAM ({cpu.available_ram_gb:.1f} GB available)")
    lines.append(f"  CPU features  {', '.join(sorted(cpu.features)) or 'none of note'}")
    if profile.cuda:
        for gpu in profile.cuda:
            lines.append(f"  cuda:{gpu.index:<8} {gpu.name}: {gpu.total_gb:.1f} GB, {gpu.free_gb:.1f} GB free, "
                         f"compute capability {gpu.cc}")
    else:
        lines.append("  CUDA          no GPU")
    lines.append("  MPS           " + (f"available, {profile.mps_memory_gb:.1f} GB for Metal"
                                       if profile.mps and profile.mps_memory_gb else
                                       "available" if profile.mps else "not available"))
    lines.append(f"  software      torch {profile.torch_version or 'not installed'}, flash-attn "
                 f"{profile.flash_attn or 'not installed'}, bitsandbytes {profile.bitsandbytes or 'not installed'}")
    shape = (f"{model.image_size} px" if model.image_size else "NaFlex") + f", patch {model.patch_size}"
    lines.append("")
    lines.append(f"Plan for {model.id} ({model.size}, {shape}, {model.params_m}M parameters)")
    values = {"device": plan.device, "backend": plan.backend, "dtype": plan.dtype, "attention": plan.attention,
              "quantization": plan.quantization, "batch_size": str(plan.batch_size)}
    for key in PLAN_KEYS:
        head = f"  {key:<13} {values[key]:<18} "
        lines.append(textwrap.fill(plan.reason(key) or "-", width=110, initial_indent=head,
                                   subsequent_indent=" " * len(head)))
    if plan.memory_budget_gb is not None:
        lines.append(textwrap.fill(_memory_line(plan, model), width=110, initial_indent="  memory        ",
                                   subsequent_indent=" " * 16))
    if plan.warnings:
        lines.append("")
        lines.append("Warnings")
        for warning in plan.warnings:
            lines.append(textwrap.fill(warning, width=110, initial_indent="  - ", subsequent_indent="    "))
    return "\n".join(lines)


__all__ = ["CudaDevice", "CpuInfo", "HardwareProfile", "Plan", "Reasons", "detect", "plan",
           "parse_simulation", "format_plan", "vision_tokens", "weights_gb", "per_image_gb",
           "min_memory_gb", "SIMULATION_FORM"]
