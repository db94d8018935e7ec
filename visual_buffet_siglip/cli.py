"""`visual-buffet-siglip`: the standalone debug runner.

Exit codes: 0 every image tagged, 1 some images failed (their errors are in
the output), 2 usage, configuration, model or file-system errors. No traceback
is shown unless --verbose.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any

from . import __version__
from .config import ConfigError, Settings, load_settings
from .images import IMAGE_SUFFIXES
from .outputs import Sink, StreamSink, UsageError

__all__ = ["main", "build_parser", "expand_paths", "run_tagging", "settings_from_args", "Sink", "UsageError"]

log = logging.getLogger("visual_buffet_siglip")

# --- inputs ---------------------------------------------------------------------------------

def expand_paths(paths: Sequence[str], recursive: bool = False) -> Iterator[str]:
    """Image paths from files and directories, as the user named them, sorted within each directory.

    A named file is always included (a bad one becomes an error record); inside
    directories only files with image suffixes count. Streams, so 100,000 files
    never sit in one list.
    """
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            yield from _walk(path, recursive)
        else:
            yield raw


def _walk(folder: Path, recursive: bool) -> Iterator[str]:
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError as exc:
        log.warning("cannot list %s: %s", folder, exc)
        return
    for entry in entries:
        if entry.is_dir(follow_symlinks=False):
            if recursive and not entry.name.startswith("."):
                yield from _walk(Path(entry.path), recursive)
        elif Path(entry.name).suffix.lower() in IMAGE_SUFFIXES and not entry.name.startswith("."):
            yield os.path.join(str(folder), entry.name)


# --- settings -------------------------------------------------------------------------------

def settings_from_args(args: argparse.Namespace) -> Settings:
    """The config file's [plugins.siglip] block (or defaults) with command-line overrides applied."""
    settings = load_settings(args.config) if getattr(args, "config", None) else Settings.from_mapping({})
    overrides = {key: getattr(args, attr) for key, attr in _OVERRIDES
                 if getattr(args, attr, None) is not None}
    if "labels_file" in overrides:
        overrides["labels_file"] = str(Path(overrides["labels_file"]).resolve())
    return settings.replace(**overrides) if overrides else settings


_OVERRIDES = (("model", "model"), ("confidence_threshold", "threshold"), ("max_tags", "max_tags"),
              ("labels_file", "labels_file"), ("batch_size", "batch_size"), ("device", "device"),
              ("backend", "backend"), ("dtype", "dtype"), ("attention", "attention"), ("quantization", "quantization"),
              ("decode", "decode"), ("max_num_patches", "max_num_patches"), ("text_cache", "text_cache"))


def _add_settings_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", help="TOML file with a [plugins.siglip] block")
    parser.add_argument("--model", help="registry id, SigLIP hub id or local directory")
    parser.add_argument("--threshold", type=float, help="confidence_threshold (default 0.01)")
    parser.add_argument("--max-tags", type=int, help="max_tags (default 50)")
    parser.add_argument("--labels-file", metavar="FILE", help="one label a line; replaces the built-in vocabulary")
    parser.add_argument("--batch-size", type=_batch_size, help="'auto' or 1..1024")
    parser.add_argument("--device", help="auto, cpu, cuda, cuda:N, mps")
    parser.add_argument("--backend", help="auto, torch, openvino (CPU; the `openvino` extra)")
    parser.add_argument("--dtype", help="auto, float16, bfloat16, float32")
    parser.add_argument("--attention", help="auto, sdpa, flash_attention_2, eager")
    parser.add_argument("--quantization", help="none, 8bit, 4bit")
    parser.add_argument("--decode", help="fast (reduced-size JPEG decoding) or exact")
    parser.add_argument("--max-num-patches", type=int, help="NaFlex models: 64..1024 (default 256)")
    parser.add_argument("--no-text-cache", dest="text_cache", action="store_const", const=False,
                        help="do not read or write the on-disk label-embedding cache (text_cache = false)")


def _batch_size(text: str) -> int | str:
    return text if text == "auto" else int(text)


# --- output ---------------------------------------------------------------------------------

def open_output(stack: contextlib.ExitStack, path: str | None, append: bool = False) -> IO[str]:
    """`path` opened for writing or appending (closed with `stack`), or stdout when no path is given."""
    return stack.enter_context(open(path, "a" if append else "w", encoding="utf-8")) if path else sys.stdout


# --- commands -------------------------------------------------------------------------------

def cmd_tag(args: argparse.Namespace) -> int:
    from .engine import SiglipTagger

    settings = settings_from_args(args)
    paths = list(expand_paths(args.paths, args.recursive))
    if not paths:
        raise UsageError("no images found in " + ", ".join(args.paths)
                         + ("" if args.recursive else " (use --recursive for subfolders)"))
    if args.overwrite and not args.sidecar:
        raise UsageError("--overwrite only applies to --sidecar")
    if args.resume:
        from .outputs import remaining_paths

        requested, paths = paths, remaining_paths(paths, args.output, args.format)
        if not paths:
            log.info("nothing to do: every image is already in %s", args.output)
            return 0
    with contextlib.ExitStack() as stack:
        if args.ray or args.ray_address or args.actors is not None:
            from .distributed import cli_tagger

            tagger = stack.enter_context(cli_tagger(args, settings))
        else:
            tagger = SiglipTagger(settings)
        if args.format == "parquet":
            from .distributed import parquet_sink

            sinks: list[Sink] = [parquet_sink(args.output)]
        else:
            sinks = [StreamSink(open_output(stack, args.output, append=args.resume), args.format)]
        if args.sidecar:
            from .outputs import SidecarSink

            sinks.append(SidecarSink(overwrite=args.overwrite))
        if args.save_embeddings:
            from .store import writer_for_tag

            sinks.append(writer_for_tag(args.save_embeddings, tagger, todo=paths,
                                        requested=requested if args.resume else None))
        if args.report:
            from .report import ReportSink

            sinks.append(ReportSink(tagger, Path(args.report), threshold=settings.confidence_threshold))
        failed = run_tagging(tagger, paths, sinks, quiet=args.quiet)
    if failed:
        log.warning("%d of %d images failed; their errors are in the output", failed, len(paths))
    return 1 if failed else 0


def run_tagging(tagger: Any, paths: list[str], sinks: list[Sink], *, quiet: bool = False,
                **tag_options: Any) -> int:
    """Tag `paths`, feeding every sink as results arrive; returns how many images failed."""
    from tqdm import tqdm

    failed = 0
    progress = tqdm(total=len(paths), unit="img", file=sys.stderr, disable=quiet or None)
    try:
        for item, record in tagger.iter_tag(paths, **tag_options):
            failed += "error" in record
            for sink in sinks:
                sink.write(paths[item.index], item, record)
            progress.update()
    finally:
        progress.close()
        for sink in sinks:
            sink.close()
    return failed


def cmd_models(args: argparse.Namespace) -> int:
    from .models import REGISTRY, cached_snapshot

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
    from .hardware import detect, format_plan, parse_simulation, plan
    from .models import model_info

    settings = settings_from_args(args)
    profile = parse_simulation(args.simulate) if args.simulate else detect()
    info = model_info(settings.model)
    print(format_plan(profile, plan(profile, settings, info), info))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .report import read_records, write_report

    try:
        records = read_records(Path(args.results))
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot read results {args.results!r}: {exc}") from None
    root = Path(args.images_root) if args.images_root else Path.cwd()
    print(write_report(records, Path(args.output), threshold=args.threshold, images_root=root))
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


def cmd_retag(args: argparse.Namespace) -> int:
    from .engine import SiglipTagger
    from .retag import retag
    from .store import EmbeddingStore

    records = retag(EmbeddingStore(args.store), SiglipTagger(settings_from_args(args)))
    failed = total = 0
    with contextlib.ExitStack() as stack:
        sink = StreamSink(open_output(stack, args.output), args.format)
        stack.callback(sink.close)
        for path, record in records:
            failed += "error" in record
            total += 1
            sink.write(path, None, record)
    if failed:
        log.warning("%d of %d images had failed when tagged; their errors are in the output", failed, total)
    return 1 if failed else 0


def cmd_search(args: argparse.Namespace) -> int:
    from .engine import SiglipTagger
    from .retag import search
    from .store import EmbeddingStore

    for hit in search(EmbeddingStore(args.store), SiglipTagger(settings_from_args(args)), args.query, args.k):
        if args.format == "jsonl":
            print(json.dumps({"path": hit.path, "score": hit.score}, ensure_ascii=False))
        else:
            print(f"{hit.score:8.4f}  {hit.path}")
    return 0


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text}")
    return value


def cmd_doctor(args: argparse.Namespace) -> int:
    from .doctor import FAIL, format_checks, run_checks

    checks = run_checks(settings_from_args(args).model)
    print(format_checks(checks))
    return 1 if any(check.status == FAIL for check in checks) else 0


# --- entry point ----------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="visual-buffet-siglip", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    _add_verbosity(parser, default=False)
    parser.register("action", "parsers", _SubcommandsWithVerbosity)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    tag = sub.add_parser("tag", help="tag image files and folders")
    tag.add_argument("paths", nargs="+", metavar="PATH", help="image files and/or folders")
    tag.add_argument("-r", "--recursive", action="store_true", help="descend into subfolders")
    tag.add_argument("--format", choices=("json", "jsonl", "table", "parquet"), default="json",
                     help="parquet needs --output FILE and pyarrow (extra `ray`)")
    tag.add_argument("-o", "--output", metavar="FILE", help="write results here instead of stdout")
    _add_settings_args(tag)
    tag.add_argument("--ray", action="store_true", help="tag on Ray actors (extra `ray`): a local Ray instance "
                     "unless --ray-address names a cluster; same records as without it")
    tag.add_argument("--ray-address", metavar="ADDR", help="with --ray: the cluster to join, as ray.init takes it "
                     "(auto, ray://head:10001)")
    tag.add_argument("--actors", type=int, metavar="N", help="with --ray: tagging actors (default: one per GPU, "
                     "else one per 4 CPUs)")
    tag.add_argument("--resume", action="store_true", help="with --output FILE --format jsonl: skip the images "
                     "already in FILE and append the rest (for a run that was interrupted)")
    tag.add_argument("--sidecar", action="store_true", help="also write <stem>_tags.json next to each image "
                     "(the host's layout), atomically; sidecars newer than their image are kept")
    tag.add_argument("--overwrite", action="store_true", help="with --sidecar: replace sidecars even when "
                     "they are newer than their image")
    tag.add_argument("--save-embeddings", metavar="FILE", help="also keep the image embeddings in a new "
                     "store FILE, for `retag` and `search` without another vision pass")
    tag.add_argument("--report", metavar="HTML", help="also write a self-contained HTML contact sheet "
                     "with a threshold explorer (tags kept down to 0.001 for it)")
    tag.set_defaults(func=cmd_tag)

    models = sub.add_parser("models", help="list the known SigLIP checkpoints")
    models.set_defaults(func=cmd_models)

    download = sub.add_parser("download", help="fetch a model into the Hugging Face cache")
    download.add_argument("model")
    download.add_argument("--revision", help="branch, tag or commit (default: main)")
    download.set_defaults(func=cmd_download)

    plan = sub.add_parser("plan", help="show the hardware profile and the settings chosen for it")
    plan.add_argument("--simulate", metavar="SPEC",
                      help='plan for another machine, e.g. "cuda:name=T4,vram_gb=16,cc=7.5", '
                           '"cpu:cores=8,ram_gb=32,avx512_bf16=1", "mps:memory_gb=16"')
    _add_settings_args(plan)
    plan.set_defaults(func=cmd_plan)

    report = sub.add_parser("report", help="HTML contact sheet from an earlier jsonl run")
    report.add_argument("results", metavar="RESULTS.jsonl")
    report.add_argument("-o", "--output", metavar="HTML", required=True)
    report.add_argument("--images-root", metavar="DIR",
                        help="folder the records' relative paths start from (default: the current folder, "
                        "as when tagging)")
    report.add_argument("--threshold", type=float, default=0.01, help="where the slider starts (default 0.01)")
    report.set_defaults(func=cmd_report)

    host = sub.add_parser("install-into-host", help="make a Visual Buffet checkout use this plugin for 'siglip'")
    host.add_argument("dir", metavar="DIR",
                      help="the Visual Buffet checkout (it holds src/visual_buffet/ and plugins/)")
    host.add_argument("--uninstall", action="store_true",
                      help="remove it and restore the newest backup of the host's own siglip plugin")
    host.set_defaults(func=cmd_install_into_host)

    retag = sub.add_parser("retag", help="tag again from an embedding store (new labels, no image opened)")
    retag.add_argument("store", metavar="FILE", help="a store written by `tag --save-embeddings`")
    retag.add_argument("--format", choices=("json", "jsonl", "table"), default="json")
    retag.add_argument("-o", "--output", metavar="FILE", help="write results here instead of stdout")
    _add_settings_args(retag)
    retag.set_defaults(func=cmd_retag)

    search = sub.add_parser("search", help="find the stored images that best match a text")
    search.add_argument("store", metavar="FILE", help="a store written by `tag --save-embeddings`")
    search.add_argument("query", help='what to look for, e.g. "a dog on a beach"')
    search.add_argument("-k", type=_positive_int, default=20, help="how many images to show (default 20)")
    search.add_argument("--format", choices=("table", "jsonl"), default="table")
    _add_settings_args(search)
    search.set_defaults(func=cmd_search)

    doctor = sub.add_parser("doctor", help="check this machine: versions, device, extras, cache, offline mode")
    doctor.add_argument("--config", metavar="FILE", help="TOML file whose [plugins.siglip] model is checked")
    doctor.add_argument("--model", help="the model to check is cached (default: the configured one)")
    doctor.set_defaults(func=cmd_doctor)
    return parser


def _add_verbosity(parser: argparse.ArgumentParser, default: Any) -> None:
    verbosity = parser.add_mutually_exclusive_group()
    verbosity.add_argument("-q", "--quiet", action="store_true", default=default,
                           help="only errors; no progress bar")
    verbosity.add_argument("-v", "--verbose", action="store_true", default=default,
                           help="debug logging and tracebacks")


class _SubcommandsWithVerbosity(argparse._SubParsersAction):
    """Every subcommand also takes -q/-v (`tag DIR -v`); SUPPRESS keeps one given before the subcommand."""

    def add_parser(self, name: str, **kwargs: Any) -> argparse.ArgumentParser:
        parser = super().add_parser(name, **kwargs)
        _add_verbosity(parser, default=argparse.SUPPRESS)
        return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    for option in ("quiet", "verbose"):  # accepted before or after the subcommand
        setattr(args, option, getattr(args, option, False))
    if args.quiet and args.verbose:
        parser.error("-q/--quiet and -v/--verbose cannot be combined")
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.ERROR if args.quiet else logging.INFO,
                        format="%(levelname)s: %(message)s", stream=sys.stderr)
    if not args.verbose:
        _quiet_libraries(hub_progress=args.command == "download")
    from .models import ModelLoadError

    try:
        return args.func(args)
    except (ConfigError, ModelLoadError, UsageError, OSError) as exc:  # OSError: an output path, a full disk
        if args.verbose:
            log.exception("failed")
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # a bug: still no traceback unless asked for
        if args.verbose:
            log.exception("failed")
        print(f"error: unexpected {type(exc).__name__}: {exc} (rerun with --verbose for the traceback)",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _quiet_libraries(hub_progress: bool = False) -> None:
    """transformers' and the hub's progress bars and warnings are noise in a CLI's stderr (except `download`'s)."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if not hub_progress:
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    for name in ("transformers", "huggingface_hub", "accelerate"):
        logging.getLogger(name).setLevel(logging.ERROR)
