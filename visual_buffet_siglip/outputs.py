"""Where result records go: streams, a resumable jsonl file and per-image sidecars.

Every output of `tag` is a `Sink` fed each image's outcome as soon as it is
known, so adding an output (a store, a report) is one small class.


A run over 50,000 photos gets killed sooner or later (power, the OOM killer, a
closed laptop). `tag --output FILE --format jsonl` flushes every record as soon
as it is known; `--resume` reads FILE back, repairs a line cut off mid-write,
skips the images already in it and appends the rest, so a killed and resumed
run holds exactly one line per image. Sidecars are written through a temporary
file and a rename, so a reader sees the old sidecar or the new one, never half.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import stat
import textwrap
from datetime import datetime
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Protocol, runtime_checkable

from .config import PLUGIN_NAME
from .errors import UsageError
from .fileio import refuse_special, write_atomic
from .records import Record

if TYPE_CHECKING:
    from .engine import ImageEmbedding

log = logging.getLogger(__name__)

SIDECAR_SUFFIX = "_tags.json"


# --- records and sinks ----------------------------------------------------------------------

def path_record(path: str, record: Record) -> dict[str, Any]:
    """A result record carrying the image path first, as the CLI writes them."""
    return {"path": path, **record}


def json_text(value: Any, **options: Any) -> str:
    """JSON with non-ASCII kept readable, except when a file name is not valid UTF-8.

    Such names (old archives) reach Python as lone surrogates, which a UTF-8
    stream refuses; escaped as \\udcXX they stay valid JSON and round-trip.
    """
    text = json.dumps(value, ensure_ascii=False, **options)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(value, **options)
    return text


def format_table(record: dict[str, Any]) -> str:
    """A human-readable block for one image."""
    lines = [record["path"]]
    if "error" in record:
        lines.append(f"  ERROR {record['error']['type']}: {record['error']['message']}")
    elif not record["tags"]:
        lines.append("  (no tag above the threshold)")
    for tag in record["tags"]:
        bar = "#" * max(1, round(tag["confidence"] * 40))
        lines.append(f"  {tag['confidence']:8.4f}  {tag['label']:<32} {bar}")
    return "\n".join(lines)


@runtime_checkable
class Sink(Protocol):
    """Receives each image's outcome as soon as it is known; `close` runs once at the end.

    `tag` feeds every sink the user asked for (the output stream, sidecars,
    an embedding store, a report), so each output is one small class with these
    two methods. `item` is the image's embedding (its vector, or its error).
    """

    def write(self, path: str, item: ImageEmbedding, record: Record) -> None:
        """Take one image's outcome; `path` names the image as the user did."""

    def close(self) -> None:
        """Finish the output (flush, write a trailer); called even after an interruption."""


class StreamSink:
    """Records to a stream as they arrive, flushed per image: jsonl lines, table blocks, or a json array.

    Nothing is written before the first record, so a run that fails before it
    prints nothing (not an empty `[]`) and replaces no file.
    """

    def __init__(self, stream: IO[str] | Any, fmt: str):
        self.stream, self.fmt = stream, fmt
        self.count = 0

    def write(self, path: str, item: ImageEmbedding | None, record: Record) -> None:
        line = path_record(path, record)
        if self.fmt == "jsonl":
            text = json_text(line) + "\n"
        elif self.fmt == "table":  # a name that is not valid UTF-8 shows as \xNN rather than crashing
            text = (format_table(line).encode("utf-8", "surrogateescape")
                    .decode("utf-8", "backslashreplace") + "\n")
        else:  # the lines json.dumps(records, indent=2) would give, one record at a time
            text = ("[\n" if self.count == 0 else ",\n") + textwrap.indent(json_text(line, indent=2), "  ")
        self.stream.write(text)
        self.stream.flush()
        self.count += 1

    def close(self) -> None:
        if self.fmt == "json" and self.count:
            self.stream.write("\n]\n")
        self.stream.flush()


# --- resume -----------------------------------------------------------------------------------

def path_key(path: str) -> str:
    """How resume matches images: absolute and normalised, so `./a.jpg` and `a.jpg` are one image."""
    return os.path.normpath(os.path.abspath(path))


def read_done(output: Path) -> set[str]:
    """`path_key`s of the images already recorded in jsonl file `output` (empty when it does not exist).

    A last line without its newline is what a killed run leaves: kept (newline
    added) when it is a whole record, otherwise cut off so the file stays valid
    jsonl and that image is tagged again.
    """
    try:
        data = output.read_bytes()
    except FileNotFoundError:
        return set()
    end = data.rfind(b"\n") + 1
    done = set()
    for number, line in enumerate(data[:end].splitlines(), 1):
        if not line.strip():
            continue
        path = _record_path(line)
        if path is None:  # checked before the repair below: a file that is not ours is never changed
            raise UsageError(f"{output}: line {number} is not a record written by `visual-buffet-siglip tag "
                             "--format jsonl`, so this run cannot resume from it; give another --output "
                             "file or remove that line")
        done.add(path_key(path))
    if data[end:].strip():
        last = _record_path(data[end:])
        if last is not None:
            with open(output, "ab") as handle:
                handle.write(b"\n")
            done.add(path_key(last))
        elif not done:  # nothing of ours before it: not a torn record but someone else's file
            raise UsageError(f"{output}: it is not a results file written by `visual-buffet-siglip tag "
                             "--format jsonl` (its only line is not a record), so this run cannot resume "
                             "from it; give another --output file")
        else:
            log.warning("%s: dropped its incomplete last line (left by an interrupted run); "
                        "that image is tagged again", output)
            os.truncate(output, end)
    return done


def _record_path(line: bytes) -> str | None:
    try:
        record = json.loads(line)
    except ValueError:
        return None
    path = record.get("path") if isinstance(record, dict) else None
    return path if isinstance(path, str) else None


def remaining_paths(paths: list[str], output: str | None, fmt: str) -> list[str]:
    """`paths` minus those already in `output`, for `tag --resume`."""
    if output is None or fmt != "jsonl":
        raise UsageError("--resume needs --output FILE --format jsonl: it reads FILE back to skip the images "
                         "already tagged and appends the others")
    done = read_done(Path(output))
    remaining = [path for path in paths if path_key(path) not in done]
    if done:
        log.info("resuming %s: %d of %d images already done, %d to go", output,
                 len(paths) - len(remaining), len(paths), len(remaining))
    return remaining


# --- sidecars ---------------------------------------------------------------------------------

def sidecar_path(image: str) -> Path:
    """`<folder>/<stem>_tags.json`, where the Visual Buffet host keeps an image's tags."""
    path = Path(image)
    return path.with_name(path.stem + SIDECAR_SUFFIX)


class SidecarSink:
    """`<stem>_tags.json` beside each tagged image, in the host's layout, written atomically.

    The host's document is {"file", "filename", "tagged_at", "results": {plugin:
    result}}; other plugins' results in an existing sidecar are kept. A sidecar
    newer than its image (this tool's earlier run, the host's, or a hand edit) is
    left alone unless `overwrite`. Failed images get no sidecar: their error is in
    the main output.
    """

    def __init__(self, overwrite: bool = False):
        self.overwrite = overwrite
        self.written = self.kept = self.failed = self.clashes = 0
        self._stems: dict[Path, dict[str, list[str]]] = {}  # folder -> stem -> image names

    def write(self, path: str, item: ImageEmbedding | None, record: Record) -> None:
        if "error" in record:
            return
        target = sidecar_path(path)
        clash = self._clash(Path(path), target)
        if clash:
            self.clashes += 1
            log.error("%s: no sidecar written: %s; its tags are only in the main output", path, clash)
            return
        try:
            if not self.overwrite and _newer(target, Path(path)):
                self.kept += 1
                log.debug("%s: kept %s, which is newer than the image (--overwrite replaces it)", path, target)
                return
            document = {"file": path, "filename": Path(path).name,
                        "tagged_at": datetime.now().astimezone().isoformat(timespec="seconds"),
                        "results": {**_other_results(target), PLUGIN_NAME: path_record(path, record)}}
            write_atomic(target, json_text(document, indent=2) + "\n")
            self.written += 1
        except (OSError, RecursionError) as exc:
            self.failed += 1
            reason = ("it holds JSON nested too deeply to be a sidecar; left alone" if isinstance(exc, RecursionError)
                      else exc.strerror or exc)
            log.error("%s: cannot write its sidecar %s (%s); its tags are only in the main output",
                      path, target, reason)

    def _clash(self, image: Path, target: Path) -> str | None:
        """Why `target` is not this image's alone (another image shares its stem, or it names another file)."""
        folder = image.parent
        if folder not in self._stems:
            from .images import IMAGE_SUFFIXES

            stems: dict[str, list[str]] = {}
            try:
                for entry in os.scandir(folder):
                    if Path(entry.name).suffix.lower() in IMAGE_SUFFIXES:
                        stems.setdefault(Path(entry.name).stem, []).append(entry.name)
            except OSError:
                pass  # an unlistable folder: the document check below still guards the sidecar
            self._stems[folder] = stems
        others = sorted(name for name in self._stems[folder].get(image.stem, ()) if name != image.name)
        if others:
            return (f"{', '.join(others)} in the same folder would share {target.name}, so the host could not "
                    "tell their tags apart; rename one of them")
        owner = _sidecar_owner(target)
        if owner is not None and owner != image.name:
            return f"{target.name} holds the tags of {owner!r}, another image; move or remove it to tag this one"
        return None

    def close(self) -> None:
        log.info("sidecars: %d written, %d kept because they are newer than their image%s", self.written,
                 self.kept, " (--overwrite replaces them)" if self.kept else "")
        if self.clashes:
            log.error("%d images got no sidecar because their name clashes with another image's; see above",
                      self.clashes)
        if self.failed:
            log.error("%d sidecars could not be written; see the errors above", self.failed)


def _newer(sidecar: Path, image: Path) -> bool:
    try:
        return sidecar.stat().st_mtime_ns >= image.stat().st_mtime_ns
    except FileNotFoundError:
        return False


def _sidecar_owner(sidecar: Path) -> str | None:
    """The image file name an existing host-layout sidecar is about (None when missing or unknown)."""
    try:
        if not sidecar.is_file() or sidecar.stat().st_size > 64 * 1024 * 1024:  # a FIFO would block the read
            return None
        document = json.loads(sidecar.read_bytes())
    except (OSError, ValueError, RecursionError):
        return None
    if not isinstance(document, dict):
        return None
    name = document.get("filename") or document.get("file")
    return os.path.basename(name) if isinstance(name, str) and name else None


def _other_results(sidecar: Path) -> dict[str, Any]:
    """Other plugins' results in an existing sidecar (none when it is missing or not the host's layout)."""
    try:  # non-blocking and checked once open: a FIFO named like a sidecar must not hang the run
        fd = os.open(sidecar, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except FileNotFoundError:
        return {}
    with os.fdopen(fd, "rb") as handle:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            refuse_special(sidecar)
            raise OSError(errno.EEXIST, "not a regular file: not replaced", str(sidecar))
        data = handle.read()
    try:
        document = json.loads(data)  # RecursionError for absurd nesting: the caller reports it
    except ValueError:
        return {}
    results = document.get("results") if isinstance(document, dict) else None
    return {k: v for k, v in results.items() if k != PLUGIN_NAME} if isinstance(results, dict) else {}


__all__ = ["Sink", "StreamSink", "SidecarSink", "path_record", "json_text", "format_table",
           "read_done", "remaining_paths", "sidecar_path"]
