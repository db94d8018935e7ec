"""`visual-buffet-siglip`: the standalone debug runner.

Exit codes: 0 every image tagged, 1 some images failed (their errors are in
the output), 2 usage, configuration, model or file-system errors, 141 the
reader of stdout went away (`... | head`: quiet, as a tool killed by SIGPIPE).
No traceback is shown unless --verbose.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from . import __version__
from .config import Settings, load_settings
from .vocabulary import DEFAULT_MAX_TAGS, DEFAULT_THRESHOLD
from .errors import ConfigError, InUseError, ModelLoadError, StoreError, UsageError
from .fileio import ReplacingOutput, replaced_at_end
from .images import IMAGE_SUFFIXES
from .locks import exclusive
from .outputs import Sink, StreamSink, json_text, path_key
from .targets import Target, check_targets

if TYPE_CHECKING:
    from .distributed import RayTagger
    from .xmp import XmpSink

__all__ = ["main", "build_parser", "expand_paths", "run_tagging", "settings_from_args", "Sink", "UsageError"]

PACKAGE_LOGGER = "visual_buffet_siglip"
log = logging.getLogger(PACKAGE_LOGGER)

# --- inputs ---------------------------------------------------------------------------------

def expand_paths(paths: Sequence[str], recursive: bool = False,
                 unreadable: list[str] | None = None) -> Iterator[str]:
    """Image paths from files and directories, as the user named them, sorted within each directory.

    A named file is always included (a bad one becomes an error record); inside
    directories only files with image suffixes count. Streams, so 100,000 files
    never sit in one list. A folder that cannot be listed is logged as an error
    and appended to `unreadable`, so the run can exit 1.
    """
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            yield from _walk(path, recursive, unreadable)
        else:
            yield raw


def _walk(folder: Path, recursive: bool, unreadable: list[str] | None) -> Iterator[str]:
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError as exc:
        log.error("cannot list folder %s (%s); its images are not tagged", folder, exc.strerror or exc)
        if unreadable is not None:
            unreadable.append(str(folder))
        return
    for entry in entries:
        if entry.is_dir(follow_symlinks=False):
            if recursive and not entry.name.startswith("."):
                yield from _walk(Path(entry.path), recursive, unreadable)
        elif Path(entry.name).suffix.lower() in IMAGE_SUFFIXES and not entry.name.startswith("."):
            yield os.path.join(str(folder), entry.name)


def read_path_list(stream: IO[bytes], null: bool = False) -> list[str]:
    """Paths one a line (or NUL-separated, as `find -print0` writes them); names that are not UTF-8 survive."""
    data = stream.read()
    entries = data.split(b"\0") if null else data.split(b"\n")
    if not null:
        entries = [entry[:-1] if entry.endswith(b"\r") else entry for entry in entries]
    return [os.fsdecode(entry) for entry in entries if entry]


def input_paths(args: argparse.Namespace) -> list[str]:
    """`tag`'s PATHs, where `-` (or `--files-from -`) reads a list from stdin: `find ... | tag -`.

    A list read from stdin or a file lifts the command line's length limit.
    """
    if not args.paths and args.files_from is None:
        raise UsageError("no PATH given: name image files or folders, `-` to read them from stdin, "
                         "or --files-from FILE")
    if args.paths.count("-") + (args.files_from == "-") > 1:
        raise UsageError("stdin can be read once: give `-` as a PATH or `--files-from -`, not both")
    if args.null and args.files_from is None and "-" not in args.paths:
        raise UsageError("--null applies to a path list: add `-` (stdin) or --files-from FILE")
    named: list[str] = []
    for raw in args.paths:
        named.extend(read_path_list(sys.stdin.buffer, args.null) if raw == "-" else [raw])
    if args.files_from == "-":
        named.extend(read_path_list(sys.stdin.buffer, args.null))
    elif args.files_from is not None:
        try:
            with open(args.files_from, "rb") as listing:
                named.extend(read_path_list(listing, args.null))
        except OSError as exc:
            raise UsageError(f"cannot read the path list --files-from {args.files_from!r}: "
                             f"{exc.strerror or exc}") from None
    return named


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
              ("backend", "backend"), ("dtype", "dtype"), ("attention", "attention"),
              ("quantization", "quantization"), ("decode", "decode"), ("max_num_patches", "max_num_patches"),
              ("text_cache", "text_cache"), ("xmp_max_keywords", "xmp_max_keywords"))


def _add_settings_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", help="TOML file with a [plugins.siglip] block")
    parser.add_argument("--model", help="registry id, SigLIP hub id or local directory")
    parser.add_argument("--threshold", type=float, help=f"confidence_threshold (default {DEFAULT_THRESHOLD})")
    parser.add_argument("--max-tags", type=int, help=f"max_tags (default {DEFAULT_MAX_TAGS})")
    parser.add_argument("--labels-file", metavar="FILE", help="one label a line, optionally "
                        "label<TAB>threshold|off<TAB>Keyword|Path; replaces the built-in vocabulary")
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


def _add_xmp_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--xmp", action="store_true", help="also write or merge <image file name>.xmp beside "
                        "each image (dc:subject, lr:hierarchicalSubject); the user's own keywords are kept")
    parser.add_argument("--xmp-dir", metavar="DIR", help="like --xmp, but the sidecars go to the same tree "
                        "under DIR (for read-only libraries)")
    parser.add_argument("--xmp-max-keywords", type=_positive_int, metavar="N",
                        help="at most N keywords per sidecar (xmp_max_keywords, default 15)")


def _batch_size(text: str) -> int | str:
    return text if text == "auto" else int(text)


# --- output ---------------------------------------------------------------------------------

def open_output(stack: contextlib.ExitStack, path: str | None, append: bool = False) -> IO[str] | ReplacingOutput:
    """Where records go: stdout when no path is given, else `path`, replaced (or appended to) only at the first
    record, so a run that fails before it leaves the previous file whole. Closed with `stack`."""
    if not path:
        return sys.stdout
    output = ReplacingOutput(path, append=append)
    stack.callback(output.close)
    return output


# --- commands -------------------------------------------------------------------------------

def _tag_targets(args: argparse.Namespace) -> list[Target]:
    targets = []
    if args.output:
        targets.append(Target(args.output, "parquet" if args.format == "parquet" else "results", "-o/--output",
                              replace=not args.resume))  # resume appends, after read_done checked every line
    if args.report:
        targets.append(Target(args.report, "report", "--report"))
    if args.save_embeddings:
        targets.append(Target(args.save_embeddings, "store", "--save-embeddings", replace=False))
    return targets


# --- commands -------------------------------------------------------------------------------

def cmd_tag(args: argparse.Namespace) -> int:
    from .engine import SiglipTagger

    settings = settings_from_args(args)
    named = input_paths(args)
    unreadable: list[str] = []
    paths = list(expand_paths(named, args.recursive, unreadable))
    if not paths:
        raise UsageError("no images found in " + (", ".join(named[:5]) or "the path list")
                         + ("" if args.recursive else " (use --recursive for subfolders)"))
    if args.overwrite and not args.sidecar:
        raise UsageError("--overwrite only applies to --sidecar")
    if args.resume and (args.output is None or args.format != "jsonl"):
        raise UsageError("--resume needs --output FILE --format jsonl: it reads FILE back to skip the images "
                         "already tagged and appends the others")
    targets = _tag_targets(args)
    check_targets(targets, [*paths, settings.labels_file, args.config], force=args.force)
    xmp = xmp_sink(args, settings)
    with contextlib.ExitStack() as stack:
        for target in targets:  # one writer per appended output: a second run is refused, naming this one's PID
            if target.kind != "report":  # a report is written whole at the end: the last run's wins
                stack.enter_context(exclusive(target.path))
        contents, embed_first = None, []
        if args.save_embeddings:
            from .store import check_new, read_contents

            if args.resume:
                contents = read_contents(args.save_embeddings)
            else:
                check_new(args.save_embeddings)
        if args.resume:
            from .outputs import remaining_paths

            requested, paths = paths, remaining_paths(paths, args.output, args.format)
            if args.save_embeddings:  # images in the output whose store rows were lost: embedded first
                stored, pending = contents.stored if contents else set(), set(paths)
                embed_first = [p for p in requested if p not in pending and path_key(p) not in stored]
            if not paths and not embed_first:
                log.info("nothing to do: every image is already in %s", args.output)
                return 1 if unreadable else 0
        tagger: Any  # a SiglipTagger, or a RayTagger with the same iter_tag
        if args.ray or args.ray_address or args.actors is not None:
            tagger = stack.enter_context(ray_tagger(args, settings))
        else:
            tagger = SiglipTagger(settings)
        if args.format == "parquet":  # binary, written whole: a temporary file, moved into place at the end
            from .distributed import parquet_sink

            parquet = stack.enter_context(replaced_at_end(args.output))
            sinks: list[Sink] = [parquet_sink(parquet)]
        else:
            sinks = [StreamSink(open_output(stack, args.output, append=args.resume), args.format)]
        sidecars = None
        if args.sidecar:
            from .outputs import SidecarSink

            sidecars = SidecarSink(overwrite=args.overwrite)
            sinks.append(sidecars)
        if args.save_embeddings:
            from .store import writer_for_tag

            sinks.append(writer_for_tag(args.save_embeddings, tagger, contents=contents, embed_first=embed_first))
        if args.report:
            from .report import ReportSink

            sinks.append(ReportSink(tagger, Path(args.report), threshold=settings.options.confidence_threshold))
        failed = run_tagging(tagger, paths, sinks + ([xmp] if xmp else []), quiet=args.quiet,
                             options=settings.options)
    if failed:
        log.warning("%d of %d images failed; their errors are in the output", failed, len(paths))
    sidecars_failed = sidecars is not None and bool(sidecars.failed or sidecars.clashes)
    return 1 if failed or unreadable or (xmp and xmp.failed) or sidecars_failed else 0


def ray_tagger(args: argparse.Namespace, settings: Settings) -> RayTagger:
    """The `tag --ray` tagger, after refusing the options that need the model in this process."""
    if not args.ray:
        raise UsageError("--ray-address and --actors only apply with --ray")
    if args.actors is not None and args.actors < 1:
        raise UsageError(f"--actors {args.actors}: expected 1 or more")
    local_only = [flag for flag, value in (("--save-embeddings", args.save_embeddings), ("--report", args.report))
                  if value]
    if local_only:
        raise UsageError(f"{' and '.join(local_only)} need the model in this process and do not work with --ray "
                         "yet; run without --ray, or use the Python API (tag_dataset(..., embeddings=True))")
    from .distributed import RayTagger

    return RayTagger(settings, address=args.ray_address, actors=args.actors, verbose=args.verbose)


def xmp_sink(args: argparse.Namespace, settings: Settings) -> XmpSink | None:
    """The XMP sidecar output `--xmp` / `--xmp-dir DIR` ask for, or None."""
    if not (args.xmp or args.xmp_dir):
        return None
    from .xmp import XmpSink

    if args.xmp_dir and os.path.exists(args.xmp_dir) and not os.path.isdir(args.xmp_dir):
        raise UsageError(f"--xmp-dir {args.xmp_dir!r} is not a folder")
    return XmpSink(settings.options, model=settings.model_settings.model, root=settings.xmp_root,
                   limit=settings.xmp_max_keywords, xmp_dir=args.xmp_dir)


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


def cmd_report(args: argparse.Namespace) -> int:
    from .report import read_records, write_report

    check_targets([Target(args.output, "report", "-o/--output")], [args.results], force=args.force)
    try:
        records = read_records(Path(args.results))
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot read results {args.results!r}: {exc}") from None
    root = Path(args.images_root) if args.images_root else Path.cwd()
    vocabulary = None
    if args.labels_file:
        from .vocabulary import read_vocabulary

        vocabulary = read_vocabulary(args.labels_file)
    print(write_report(records, Path(args.output), threshold=args.threshold, images_root=root,
                       vocabulary=vocabulary, max_tags=args.max_tags))
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

    settings = settings_from_args(args)
    if args.output:
        check_targets([Target(args.output, "results", "-o/--output")],
                      [args.store, settings.labels_file, args.config], force=args.force)
    store = EmbeddingStore(args.store)
    records = retag(store, SiglipTagger(settings.model_settings), settings.options)
    xmp = xmp_sink(args, settings)
    failed = total = 0
    with contextlib.ExitStack() as stack:
        sinks: list[StreamSink | XmpSink] = [StreamSink(open_output(stack, args.output), args.format)]
        sinks += [xmp] if xmp else []
        for sink in sinks:
            stack.callback(sink.close)
        for path, record in records:
            failed += "error" in record
            total += 1
            for sink in sinks:
                sink.write(path, None, record)
    if failed:
        log.warning("%d of %d images had failed when tagged; their errors are in the output", failed, total)
    return 1 if failed or store.damaged or (xmp and xmp.failed) else 0


def cmd_search(args: argparse.Namespace) -> int:
    from .engine import SiglipTagger
    from .retag import search
    from .store import EmbeddingStore

    store = EmbeddingStore(args.store)
    for hit in search(store, SiglipTagger(settings_from_args(args).model_settings), args.query, args.k):
        if args.format == "jsonl":
            print(json_text({"path": hit.path, "score": hit.score}))
        else:
            print(f"{hit.score:8.4f}  {hit.path}".encode("utf-8", "surrogateescape").decode("utf-8", "replace"))
    return 1 if store.damaged else 0


def print_json(value: Any) -> None:
    """`value` as indented JSON on stdout; sets (CPU features) become sorted lists."""
    print(json.dumps(value, indent=2, ensure_ascii=False, default=sorted))


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text}")
    return value


def cmd_doctor(args: argparse.Namespace) -> int:
    from .doctor import FAIL, format_checks, run_checks

    checks = run_checks(settings_from_args(args).model_settings.model)
    if args.format == "json":
        print_json([dataclasses.asdict(check) for check in checks])
    else:
        print(format_checks(checks))
    return 1 if any(check.status == FAIL for check in checks) else 0


# --- entry point ----------------------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    """argparse, with a "did you mean" for a mistyped flag (`--treshold` -> `--threshold`)."""

    def parse_args(self, args: Sequence[str] | None = None,  # type: ignore[override]
                   namespace: argparse.Namespace | None = None) -> argparse.Namespace:
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            command = self._subcommand(getattr(parsed, "command", None))
            hints = [hint for extra in extras if (hint := _flag_hint(extra, command or self))]
            (command or self).error(f"unrecognized arguments: {' '.join(extras)}"
                                    + "".join(f"\n  {hint}" for hint in hints))
        return parsed

    def _subcommand(self, name: str | None) -> argparse.ArgumentParser | None:
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction) and name in action.choices:
                return action.choices[name]
        return None


def _flag_hint(extra: str, parser: argparse.ArgumentParser) -> str | None:
    """'did you mean --x?' for an unknown `--flag` (or `--flag=value`) close to one `parser` takes."""
    from .config import suggest

    if not extra.startswith("-") or extra == "-":
        return None
    flag = extra.split("=", 1)[0]
    flags = tuple(option for option in parser._option_string_actions if option.startswith("--"))
    close = suggest(flag, flags) or suggest("--" + flag.lstrip("-"), flags)
    return f"{flag}: did you mean {close}?" if close else None


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="visual-buffet-siglip", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    _add_verbosity(parser, default=False)
    parser.register("action", "parsers", _SubcommandsWithVerbosity)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    tag = sub.add_parser("tag", help="tag image files and folders")
    tag.add_argument("paths", nargs="*", metavar="PATH",
                     help="image files and/or folders; `-` reads a list of them from stdin, one a line")
    tag.add_argument("--files-from", metavar="FILE", help="also tag the paths listed in FILE, one a line "
                     "(`-`: stdin); no command-line length limit")
    tag.add_argument("-0", "--null", action="store_true", help="the path list is NUL-separated "
                     "(find -print0)")
    tag.add_argument("-r", "--recursive", action="store_true", help="descend into subfolders")
    tag.add_argument("--format", choices=("json", "jsonl", "table", "parquet"), default="json",
                     help="parquet needs --output FILE and pyarrow (extra `ray`)")
    tag.add_argument("-o", "--output", metavar="FILE", help="write results here instead of stdout")
    tag.add_argument("--force", action="store_true", help=_FORCE_HELP)
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
    _add_xmp_args(tag)
    tag.set_defaults(func=cmd_tag)

    models = sub.add_parser("models", help="list the known SigLIP checkpoints")
    models.add_argument("--format", choices=("table", "json"), default="table")
    models.set_defaults(func=cmd_models)

    download = sub.add_parser("download", help="fetch a model into the Hugging Face cache")
    download.add_argument("model")
    download.add_argument("--revision", help="branch, tag or commit (default: main)")
    download.set_defaults(func=cmd_download)

    plan = sub.add_parser("plan", help="show the hardware profile and the settings chosen for it")
    plan.add_argument("--simulate", metavar="SPEC",
                      help='plan for another machine, e.g. "cuda:name=T4,vram_gb=16,cc=7.5", '
                           '"cpu:cores=8,ram_gb=32,avx512_bf16=1", "mps:memory_gb=16"')
    plan.add_argument("--format", choices=("text", "json"), default="text")
    _add_settings_args(plan)
    plan.set_defaults(func=cmd_plan)

    report = sub.add_parser("report", help="HTML contact sheet from an earlier jsonl run")
    report.add_argument("results", metavar="RESULTS.jsonl")
    report.add_argument("-o", "--output", metavar="HTML", required=True)
    report.add_argument("--force", action="store_true", help=_FORCE_HELP)
    report.add_argument("--images-root", metavar="DIR",
                        help="folder the records' relative paths start from (default: the current folder, "
                        "as when tagging)")
    report.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD,
                        help=f"where the slider starts (default {DEFAULT_THRESHOLD})")
    report.add_argument("--labels-file", metavar="FILE", help="the vocabulary the run used: the page starts from "
                        "its per-label thresholds and off switches, and its download keeps all its labels and "
                        "keyword paths")
    report.add_argument("--max-tags", type=_positive_int, help="the run's max_tags, applied by the page too "
                        "(default: no cap)")
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
    retag.add_argument("--force", action="store_true", help=_FORCE_HELP)
    _add_settings_args(retag)
    _add_xmp_args(retag)
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
    doctor.add_argument("--format", choices=("text", "json"), default="text")
    doctor.set_defaults(func=cmd_doctor)
    return parser


_FORCE_HELP = ("replace an existing output file that this tool did not write (images, inputs, links and "
               "devices are refused even so)")


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
    configure_logging(verbose=args.verbose, quiet=args.quiet)
    if not args.verbose:
        _quiet_libraries(hub_progress=args.command == "download")
    try:
        code = args.func(args)
        sys.stdout.flush()  # a reader that went away shows here, not at interpreter exit
        return code
    except BrokenPipeError:
        return _stdout_gone()
    except (ConfigError, InUseError, ModelLoadError, StoreError, UsageError,
            OSError) as exc:  # OSError: an output path, a full disk
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


SIGPIPE_EXIT = 141  # 128 + SIGPIPE: what the shell reports for `yes | head -1`'s `yes`


def _stdout_gone() -> int:
    """The reader of stdout closed it (`| head -1`): stop quietly, as tools killed by SIGPIPE do.

    stdout is pointed at /dev/null first, so the interpreter's final flush of what is
    still buffered does not fail a second time with "Exception ignored ... BrokenPipeError".
    """
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # stdout replaced by something without a descriptor (tests)
        pass
    return SIGPIPE_EXIT


# --- logging ---------------------------------------------------------------------------------

class _StderrHandler(logging.Handler):
    """Writes to whatever sys.stderr is at the time (pytest swaps it between tests)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(self.format(record) + "\n")
        except Exception:
            self.handleError(record)


_handler = _StderrHandler()
_handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
_root_level: list[int] = []  # the root logger's level before -v changed it


def configure_logging(verbose: bool = False, quiet: bool = False) -> None:
    """Our package's messages to stderr at the verbosity asked for; other libraries' left at WARNING.

    No basicConfig: the root logger keeps its level and handlers, so HTTP clients'
    INFO lines ("HTTP Request: GET ...") stay out. Only -v opens the root logger,
    at INFO (libraries' DEBUG floods, e.g. a line per PNG chunk), with our package at DEBUG.
    Safe to call again (each call replaces the previous setup).
    """
    ours, root = logging.getLogger(PACKAGE_LOGGER), logging.getLogger()
    ours.removeHandler(_handler)
    root.removeHandler(_handler)
    if _root_level:
        root.setLevel(_root_level.pop())
    ours.setLevel(logging.DEBUG if verbose else logging.ERROR if quiet else logging.INFO)
    if verbose:
        _root_level.append(root.level)
        root.setLevel(logging.INFO)
        root.addHandler(_handler)  # ours propagate to it: one handler, each line printed once
    else:
        ours.addHandler(_handler)


def _quiet_libraries(hub_progress: bool = False) -> None:
    """transformers' and the hub's progress bars and warnings are noise in a CLI's stderr (except `download`'s)."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if not hub_progress:
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    for name in ("transformers", "huggingface_hub", "accelerate"):
        logging.getLogger(name).setLevel(logging.ERROR)
