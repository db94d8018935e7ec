"""What this machine has: `detect()` profiles its CPU, RAM, CUDA GPUs, Apple MPS and libraries.

`detect()` is the only impure function of the planning code: it reads /proc,
sysconf and torch. The planner (`planner.plan`) is a pure function of the
`HardwareProfile` built here, so it is tested on simulated machines
(`simulate.parse_simulation`). Importing this module does not import torch.

Memory is in GB meaning GiB (2**30 bytes), which is what torch and nvidia-smi
report: a "16 GB" T4 shows 14.7, a "4 GB" GTX 1650 about 3.8.
"""

from __future__ import annotations

import math
import os
import platform
import re
from dataclasses import dataclass
from typing import Any

from .memory import GIB
from .versions import installed_version

# CPU features worth knowing for inference (x86 /proc/cpuinfo flags, ARM Features).
CPU_FEATURES = frozenset({
    "avx", "avx2", "fma", "f16c", "avx512f", "avx512_bf16", "avx512_fp16", "avx512_vnni",
    "avx_vnni", "amx_bf16", "amx_tile", "amx_int8", "amx_fp16",
    "asimd", "asimdhp", "sve", "sve2", "bf16", "i8mm",
})
BF16_CPU_FEATURES = ("avx512_bf16", "amx_bf16", "bf16")
MIN_BNB = (0, 46, 1)  # transformers 5's BITSANDBYTES_MIN_VERSION


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

    @property
    def bf16_features(self) -> tuple[str, ...]:
        """Its native bfloat16 features (BF16_CPU_FEATURES order); none: bfloat16 is emulated, slowly."""
        return tuple(f for f in BF16_CPU_FEATURES if f in self.features)


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

    @property
    def bitsandbytes_ok(self) -> bool:
        """Whether the installed bitsandbytes is one transformers accepts for quantization."""
        return self.bitsandbytes is not None and version_tuple(self.bitsandbytes) >= MIN_BNB


def version_tuple(text: str | None) -> tuple[int, ...]:
    """Up to three leading numbers of a version ("0.50.2+cu12" -> (0, 50, 2)); () when unknown."""
    return tuple(int(x) for x in re.findall(r"\d+", (text or "").split("+")[0])[:3])


# --- detection (the only impure part) --------------------------------------------------------

def detect() -> HardwareProfile:
    """Profile this machine. Never raises: anything unknown gets a safe default."""
    cpu = _detect_cpu()
    flash = installed_version("flash-attn", "flash_attn")
    bnb = installed_version("bitsandbytes")
    openvino, nncf = installed_version("openvino"), installed_version("nncf")
    try:
        import torch
    except Exception:  # no torch (or a broken one): plan for the CPU and say so
        return HardwareProfile(cpu=cpu, flash_attn=flash, bitsandbytes=bnb, openvino=openvino, nncf=nncf)
    return HardwareProfile(cpu=cpu, cuda=_detect_cuda(torch), mps=_detect_mps(torch),
                           mps_memory_gb=_detect_mps_memory(torch, cpu),
                           flash_attn=flash, bitsandbytes=bnb,
                           torch_version=str(getattr(torch, "__version__", "")), openvino=openvino, nncf=nncf)


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
        return round(metal_share(cpu.ram_gb), 2)


def metal_share(memory_gb: float) -> float:
    """Metal's recommended working set: about 2/3 of unified memory, 3/4 on bigger Macs."""
    return memory_gb * (2 / 3 if memory_gb <= 36 else 0.75)


__all__ = ["CudaDevice", "CpuInfo", "HardwareProfile", "CPU_FEATURES", "BF16_CPU_FEATURES", "MIN_BNB", "detect",
           "cpu_cores", "metal_share", "version_tuple"]
