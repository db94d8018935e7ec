"""The commands that tag and read results: `tag`, `retag`, `search` and `report`.

Also what they share: the image paths a command is given, the settings its flags
override, and where its records go. `cli` parses the command line and calls these.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from .config import Settings, load_settings
from .errors import UsageError
from .fileio import ReplacingOutput, replaced_at_end
from .images import IMAGE_SUFFIXES
from .locks import exclusive
from .outputs import Sink, StreamSink, json_text, path_key
from .targets import Target, check_targets

if TYPE_CHECKING:
    from .distributed import RayTagger
    from .xmp import XmpSink

__all__ = ["cmd_tag", "cmd_retag", "cmd_search", "cmd_report", "expand_paths", "read_path_list",
           "run_tagging", "settings_from_args"]

log = logging.getLogger(__name__)

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
