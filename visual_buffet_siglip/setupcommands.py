"""The commands that set the tool up: `models`, `download`, `plan`, `doctor`, `install-into-host`.

They look at models, the machine or a host checkout and print what they found;
no image is tagged. `cli` parses the command line and calls these.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from typing import Any

from .commands import settings_from_args
from .errors import UsageError

__all__ = ["cmd_models", "cmd_download", "cmd_plan", "cmd_doctor", "cmd_install_into_host"]


def cmd_models(args: argparse.Namespace) -> int:
    from .modelfacts import REGISTRY
    from .models import cached_snapshot

    if args.format == "json":
        print_json([{**dataclasses.asdict(info), "min_vram_gb_fp16": info.min_vram_gb_fp16,
                     "cached": cached_snapshot(info.id) is not None} for info in REGISTRY.values()])
        return 0
    rows = [("id", "family", "resolution", "params", "min VRAM fp16", "cached")]
    for info in REGISTRY.values():
        rows.append((info.id, info.family, str(info.image_size or "naflex"), f"{info.params_m}M",
                     f"{info.min_vram_gb_fp16:g} GB", "yes" if cached_snapshot(info.id) else "no"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    return 0


def cmd_download(args: argparse.Namespace) -> int:
    from huggingface_hub.utils import disable_progress_bars

    from .models import download

    if args.quiet:
        disable_progress_bars()
    folder = download(args.model, revision=args.revision)
    print(f"{args.model}: cached at {folder}")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from .hardware import detect
    from .models import model_info
    from .planformat import format_plan
    from .planner import plan
    from .simulate import parse_simulation

    settings = settings_from_args(args).model_settings
    profile = parse_simulation(args.simulate) if args.simulate else detect()
    info = model_info(settings.model)
    chosen = plan(profile, settings, info)
    if args.format == "json":
        print_json({"hardware": dataclasses.asdict(profile), "model": dataclasses.asdict(info),
                    "plan": chosen.to_dict()})
    else:
        print(format_plan(profile, chosen, info))
    return 0


def cmd_install_into_host(args: argparse.Namespace) -> int:
    from .hostinstall import HostInstallError, install, uninstall

    try:
        done = uninstall(args.dir) if args.uninstall else install(args.dir)
    except HostInstallError as exc:
        raise UsageError(str(exc)) from None
    for line in done:
        print(line)
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from .doctor import FAIL, format_checks, run_checks

    checks = run_checks(settings_from_args(args).model_settings.model)
    if args.format == "json":
        print_json([dataclasses.asdict(check) for check in checks])
    else:
        print(format_checks(checks))
    return 1 if any(check.status == FAIL for check in checks) else 0


def print_json(value: Any) -> None:
    """`value` as indented JSON on stdout; sets (CPU features) become sorted lists."""
    print(json.dumps(value, indent=2, ensure_ascii=False, default=sorted))
