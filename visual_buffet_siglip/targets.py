"""Output paths checked before anything is opened, so that no typo or mix-up replaces a user's file.

Refused always: an output that is one of the command's inputs (an image, the
results or store it reads, the labels or config file), an existing image, a
symbolic link, folder, device or FIFO, or two outputs that are one file. Refused
unless `--force`: an existing file that this tool did not write (a results file
of another format counts as not ours: a report never replaces a jsonl).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from .fileio import special_file
from .errors import UsageError
from .images import IMAGE_SUFFIXES
from .outputs import path_key

__all__ = ["Target", "check_targets", "is_ours"]

REPORT_MARKER = b'<meta name="generator" content="visual-buffet-siglip">'
STORE_MARKER = b'{"format": "visual-buffet-siglip/embeddings"'
_SNIFF = 1 << 16
# Leading bytes of the image formats people keep (JPEG, PNG, GIF, TIFF, WebP/AVI, HEIF/AVIF, BMP).
_IMAGE_MAGIC = (b"\xff\xd8\xff", b"\x89PNG", b"GIF8", b"II*\x00", b"MM\x00*", b"RIFF", b"BM")
_TABLE_LINE = re.compile(r"  (?:ERROR |\(no tag above the threshold\)|\s*\d+\.\d{4}  )")


@dataclass(frozen=True)
class Target:
    """One output of a command: its path, what it holds and the flag that named it (for messages).

    kind: "results" (json, jsonl or table), "parquet", "report" or "store". `replace` is False for
    an output whose existing file is checked by its own code (a store, which is never replaced).
    """

    path: str
    kind: str
    flag: str
    replace: bool = True


def check_targets(targets: Iterable[Target], inputs: Iterable[str | None], *, force: bool = False) -> None:
    """Raise UsageError for the first output that would destroy something; see the module docstring."""
    targets = list(targets)
    keys = {path_key(t.path): t for t in targets}
    if len(keys) < len(targets):
        raise UsageError("refusing outputs that name one file (" + ", ".join(f"{t.flag} {t.path}" for t in targets)
                         + "); give each its own file")
    for path in inputs:
        target = keys.get(path_key(path)) if path else None
        if target is not None:
            raise UsageError(f"refusing {target.flag} {target.path!r}: it is one of this command's inputs; "
                             "give another output file")
    for target in targets:
        _check_one(target, force=force)


def _check_one(target: Target, *, force: bool) -> None:
    path = target.path
    kind = special_file(path)
    if kind is not None:
        pipe = kind in ("a device", "a FIFO") or os.path.abspath(path).startswith("/dev/")
        hint = " (to write to the terminal or a pipe, leave out -o)" if pipe and target.flag.startswith("-o") else ""
        raise UsageError(f"refusing {target.flag} {path!r}: it is {kind}, not a regular file{hint}; "
                         "give a file name")
    if not os.path.exists(path):
        folder = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(folder):
            if target.kind == "report":  # written at the end, creating its folder
                return
            raise UsageError(f"cannot write {target.flag} {path!r}: folder {folder!r} does not exist")
        if not os.access(folder, os.W_OK | os.X_OK):
            raise UsageError(f"cannot write {target.flag} {path!r}: folder {folder!r} is not writable")
        return
    if _is_image(path):
        raise UsageError(f"refusing {target.flag} {path!r}: it is an existing image, which this tool never "
                         "writes over (a typo such as `-o *.jpg`?); give an output file name")
    if target.replace and not force and not is_ours(path, target.kind):
        raise UsageError(f"{target.flag} {path!r} exists and was not written by visual-buffet-siglip "
                         f"as {target.kind}; will not replace it: pass --force to replace it, or give "
                         "another file name")


def _is_image(path: str) -> bool:
    if Path(path).suffix.lower() in IMAGE_SUFFIXES:
        return True
    head = _head(path, 16) or b""
    return head.startswith(_IMAGE_MAGIC) or head[4:8] == b"ftyp"


def is_ours(path: str, kind: str) -> bool:
    """Whether `path` looks like an output of `kind` that this tool wrote (an empty file counts: nothing to lose).

    Only the start of the file is read: results files of 100,000 images stay cheap to check.
    """
    head = _head(path, _SNIFF)
    if head is None:  # unreadable: whatever it is, not ours to replace
        return False
    if not head:
        return True
    if kind == "report":
        return REPORT_MARKER in head
    if kind == "store":
        return head.startswith(STORE_MARKER)
    if kind == "parquet":
        return head.startswith(b"PAR1") and _parquet_is_ours(path)
    text = head.decode("utf-8", "replace")
    if text.startswith('[\n  {\n    "path": '):  # our json array
        return True
    lines = text.splitlines()[:-1] or text.splitlines()  # the last line may be cut by the sniff
    if text.startswith('{"path": '):  # our jsonl
        return all(_is_record(line) for line in lines if line.strip())
    return len(lines) >= 2 and not lines[0].startswith(" ") and bool(_TABLE_LINE.match(lines[1]))


def _is_record(line: str) -> bool:
    import json

    try:
        record = json.loads(line)
    except ValueError:
        return False
    return isinstance(record, dict) and isinstance(record.get("path"), str)


def _parquet_is_ours(path: str) -> bool:
    try:
        import pyarrow.parquet as pq

        names = set(pq.read_schema(path).names)
    except Exception:  # no pyarrow, or not a readable Parquet file: not ours to replace
        return False
    return {"path", "tags", "error_type"} <= names


def _head(path: str, size: int) -> bytes | None:
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except OSError:
        return None
    with os.fdopen(fd, "rb") as handle:
        return handle.read(size)
