"""Simulated machines for `visual-buffet-siglip plan --simulate SPEC` and the planner's tests.

`parse_simulation` turns a spec such as "cuda:name=T4,vram_gb=16,cc=7.5" into
the same `HardwareProfile` that `hardware.detect` builds for this machine, so
the planner can be asked what another machine would get.
"""

from __future__ import annotations

import math
import re

from .config import ConfigError
from .hardware import CPU_FEATURES, CpuInfo, CudaDevice, HardwareProfile, metal_share

SIM_RESERVED_GB = 0.3  # simulated free VRAM = total minus what the driver/desktop holds

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
        mps_memory_gb=None if mps_memory is None else round(metal_share(mps_memory), 2),
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


__all__ = ["parse_simulation", "SIMULATION_FORM"]
