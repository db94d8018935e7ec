"""Atomic file replacement, shared by every output that a reader may open while we write it."""

from __future__ import annotations

import contextlib
import os
import secrets
import time
from pathlib import Path


def write_atomic(target: Path, data: str | bytes) -> None:
    """Write `data` to a temporary file beside `target`, fsync it, then rename it over `target`.

    A reader sees the old file or the new one, never half; a failure leaves no
    temporary file behind. Permissions follow the umask, as for any new file.
    """
    temp = target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data.encode("utf-8") if isinstance(data, str) else data)
            handle.flush()
            os.fsync(handle.fileno())
        for attempt in range(5):
            try:
                os.replace(temp, target)
                break
            except PermissionError:  # Windows: a reader holds the target open for a moment
                if attempt == 4:
                    raise
                time.sleep(0.05 * (attempt + 1))
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise


__all__ = ["write_atomic"]
