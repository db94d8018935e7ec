"""`visual-buffet-siglip`: the standalone debug runner.

Exit codes: 0 every image tagged, 1 some images failed (their errors are in
the output), 2 usage, configuration, model or file-system errors, 141 the
reader of stdout went away (`... | head`: quiet, as a tool killed by SIGPIPE).
No traceback is shown unless --verbose.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

from . import __version__
from .commands import cmd_report, cmd_retag, cmd_search, cmd_tag
from .errors import ConfigError, InUseError, ModelLoadError, StoreError, UsageError
from .setupcommands import cmd_doctor, cmd_download, cmd_install_into_host, cmd_models, cmd_plan
from .vocabulary import DEFAULT_MAX_TAGS, DEFAULT_THRESHOLD

__all__ = ["main", "build_parser"]

PACKAGE_LOGGER = "visual_buffet_siglip"
log = logging.getLogger(PACKAGE_LOGGER)

# --- arguments ------------------------------------------------------------------------------

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


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text}")
    return value


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
