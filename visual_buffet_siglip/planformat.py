"""The text `visual-buffet-siglip plan` prints: the machine, then every choice with its reason."""

from __future__ import annotations

import textwrap
from typing import TYPE_CHECKING

from .plan import PLAN_KEYS

if TYPE_CHECKING:
    from .hardware import HardwareProfile
    from .modelfacts import ModelInfo
    from .plan import Plan


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


__all__ = ["format_plan"]
