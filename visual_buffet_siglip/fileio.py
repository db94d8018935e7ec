"""File I/O shared across modules: atomic writes, and the header of a safetensors document.

Atomic writes serve every output that a reader may open, or a kill may interrupt,
while we write it. Nothing here writes through a symbolic link or into a device,
FIFO or folder that happens to have the output's name: those are refused, never
replaced. The safetensors reader gives the metadata that the safetensors
library's loaders do not (they return tensors only; `safe_open` needs a file).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import stat
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

_SAFETENSORS_SIZE = struct.Struct("<Q")  # a safetensors document starts with its JSON header's length


def special_file(path: str | os.PathLike[str]) -> str | None:
    """What `path` is when it exists and is not a regular file ("a symbolic link", "a FIFO", ...), else None."""
    try:
        mode = os.lstat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return None
    if stat.S_ISREG(mode):
        return None
    kinds = ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"),
             (stat.S_ISCHR, "a device"), (stat.S_ISBLK, "a device"), (stat.S_ISSOCK, "a socket"))
    return next((name for test, name in kinds if test(mode)), "not a regular file")


def refuse_special(path: str | os.PathLike[str]) -> None:
    """Raise OSError when `path` exists and is not a regular file: we only ever replace regular files."""
    kind = special_file(path)
    if kind is not None:
        raise OSError(errno.EEXIST, f"{kind}, not a regular file: not replaced", str(path))


def write_atomic(target: Path, data: str | bytes) -> None:
    """Write `data` to a temporary file beside `target`, fsync it, then rename it over `target`.

    A reader sees the old file or the new one, never half; a failure leaves no
    temporary file behind. Permissions follow the umask, as for any new file.
    A `target` that is a symbolic link, folder, device or FIFO is refused.
    """
    refuse_special(target)
    fd, temp = _temp_beside(Path(target))
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data.encode("utf-8") if isinstance(data, str) else data)
            handle.flush()
            os.fsync(handle.fileno())
        _replace(temp, Path(target))
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise


def create_with(target: Path, head: bytes) -> IO[bytes]:
    """A new file `target` that appears already holding `head` (never empty, never half), open for appending.

    FileExistsError when `target` exists: nothing is replaced. A kill before the
    return leaves no `target` at all (a hidden temporary file at worst).
    """
    fd, temp = _temp_beside(target)
    handle = os.fdopen(fd, "r+b")
    try:
        handle.write(head)
        handle.flush()
        os.fsync(handle.fileno())
        try:
            os.link(temp, target)  # atomic and never replaces: fails when target exists
        except FileExistsError:
            raise
        except OSError:  # a file system without hard links (FAT, some network shares)
            if os.path.lexists(target):
                raise FileExistsError(errno.EEXIST, "File exists", str(target)) from None
            os.rename(temp, target)
    except BaseException:
        handle.close()
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
    with contextlib.suppress(FileNotFoundError):
        os.unlink(temp)
    return handle


class ReplacingOutput:
    """A text output for `target` that leaves it alone until the first write, then replaces it atomically.

    The first write goes to a temporary file beside `target`, which is fsynced and
    renamed over it; later writes append to the same file. A run that fails
    before its first record so leaves the previous output whole, and a killed run
    leaves every record written so far. `append` adds to `target` instead.
    """

    def __init__(self, target: str | os.PathLike[str], *, append: bool = False):
        self.target, self.append = Path(target), append
        self._file: IO[str] | None = None

    def write(self, text: str) -> None:
        if self._file is None:
            self._file = self._open_with(text)
        else:
            self._file.write(text)

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()

    def close(self) -> None:
        """Flush and fsync; called whether or not anything was written."""
        if self._file is not None and not self._file.closed:
            try:
                self._file.flush()
                os.fsync(self._file.fileno())
            finally:
                self._file.close()

    def _open_with(self, text: str) -> IO[str]:
        refuse_special(self.target)
        if self.append:
            handle = open(self.target, "a", encoding="utf-8")
            handle.write(text)
            return handle
        fd, temp = _temp_beside(self.target)
        handle = os.fdopen(fd, "w", encoding="utf-8")
        try:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
            _replace(temp, self.target)
        except BaseException:
            handle.close()
            with contextlib.suppress(OSError):
                os.unlink(temp)
            raise
        return handle


@contextlib.contextmanager
def replaced_at_end(target: str | os.PathLike[str] | None) -> Iterator[str | None]:
    """A temporary path beside `target` for a writer that needs a path; renamed over `target` when the block
    ends without an exception and the file was written, removed otherwise (None passes through)."""
    if target is None:
        yield None
        return
    target = Path(target)
    fd, temp = _temp_beside(target)
    os.close(fd)
    os.unlink(temp)  # the writer creates it; an empty file would look like output
    try:
        yield str(temp)
        if os.path.exists(temp):
            refuse_special(target)
            _replace(temp, target)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(temp)


def _temp_beside(target: Path) -> tuple[int, Path]:
    temp = target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp")
    return os.open(temp, os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666), temp


def _replace(temp: Path, target: Path) -> None:
    for attempt in range(5):
        try:
            os.replace(temp, target)
            return
        except PermissionError:  # Windows: a reader holds the target open for a moment
            if attempt == 4:
                raise
            time.sleep(0.05 * (attempt + 1))


# --- safetensors headers ---------------------------------------------------------------------

def safetensors_header_size(head: bytes) -> int:
    """The length of the JSON header that follows the first 8 bytes of a safetensors document (0 when shorter)."""
    return _SAFETENSORS_SIZE.unpack_from(head)[0] if len(head) >= _SAFETENSORS_SIZE.size else 0


def safetensors_metadata(document: bytes) -> dict[str, str]:
    """The `__metadata__` of a safetensors document held in memory.

    Raises ValueError, its message saying what is wrong, when the document is
    truncated or its header is not a JSON object.
    """
    if len(document) < _SAFETENSORS_SIZE.size:
        raise ValueError(f"truncated: {len(document)} bytes")
    size = safetensors_header_size(document)
    if size > len(document) - _SAFETENSORS_SIZE.size:
        raise ValueError("truncated: the header runs past the end of the file")
    try:
        header = json.loads(document[_SAFETENSORS_SIZE.size:_SAFETENSORS_SIZE.size + size])
    except (ValueError, RecursionError) as exc:
        raise ValueError(f"not a valid safetensors file: {exc}") from None
    if not isinstance(header, dict):
        raise ValueError("not a valid safetensors file: its header is not a JSON object")
    return header.get("__metadata__") or {}


__all__ = ["write_atomic", "create_with", "ReplacingOutput", "replaced_at_end", "refuse_special",
           "special_file", "safetensors_header_size", "safetensors_metadata"]
