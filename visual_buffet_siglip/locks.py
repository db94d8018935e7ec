"""Inter-process locks on lock files: one writer per output, and short critical sections for shared caches.

Advisory locks (`fcntl.flock`, `msvcrt.locking` on Windows) die with their holder, so a
killed run never leaves a stale lock behind. The holder writes its PID into the lock
file, which names it when a second run is refused.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from .errors import InUseError

__all__ = ["exclusive", "locked"]


def lock_path(target: Path) -> Path:
    """The lock file of `target`: hidden, beside it."""
    return target.with_name(f".{target.name}.lock")


@contextlib.contextmanager
def exclusive(target: str | os.PathLike[str]) -> Iterator[None]:
    """Hold `target`'s lock while the block runs, or raise InUseError naming the PID that holds it.

    The lock file is removed on release; a run that opened it just before is
    noticed by its inode and tries again on the new file.
    """
    path = lock_path(Path(target))
    while True:
        handle = open(path, "a+b")
        try:
            if not _lock(handle, wait=False):
                raise InUseError(f"{str(target)!r} is already in use by {_holder(path)} (another "
                                 "visual-buffet-siglip run writing it); wait for it to finish, or write to "
                                 "another file")
            if _same_file(handle, path):
                break
        except BaseException:
            handle.close()
            raise
        handle.close()  # removed by its last holder between our open and our lock
    try:
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()).encode())
        handle.flush()
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
        handle.close()  # closing releases the lock


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Wait for the exclusive lock on the lock file `path` and hold it while the block runs (kept afterwards)."""
    with open(path, "a+b") as handle:
        _lock(handle, wait=True)
        yield


def _lock(handle: IO[bytes], *, wait: bool) -> bool:
    """Take the exclusive lock on `handle`; False when `wait` is off and another process holds it.

    A no-op (True) where the platform has neither flock nor msvcrt.
    """
    try:
        import fcntl
    except ImportError:
        fcntl = None  # type: ignore[assignment]
    if fcntl is not None:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            return False
        return True
    try:
        import msvcrt
    except ImportError:  # pragma: no cover - neither POSIX nor Windows
        return True
    handle.seek(0)
    try:  # LK_LOCK retries for ~10 s, then raises
        msvcrt.locking(handle.fileno(), msvcrt.LK_LOCK if wait else msvcrt.LK_NBLCK, 1)
    except OSError:
        if wait:
            raise
        return False
    return True


def _same_file(handle: IO[bytes], path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(handle.fileno()), os.stat(path))
    except FileNotFoundError:
        return False


def _holder(path: Path) -> str:
    try:
        pid = path.read_text(encoding="ascii", errors="replace").strip()
    except OSError:
        pid = ""
    return f"PID {pid}" if pid.isdigit() else "another process"
