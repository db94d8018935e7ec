"""Installed versions of libraries, read from their package metadata without importing them.

The doctor reports them, the hardware profile plans with them, and the label and
graph caches key on them: one reader for all.
"""

from __future__ import annotations

from importlib import metadata


def installed_version(*names: str) -> str | None:
    """The version of the first of `names` (distribution names, spellings of one) that is installed, else None.

    Never raises: a distribution whose metadata cannot be read counts as not installed.
    """
    for name in names:
        try:
            return metadata.version(name)
        except Exception:  # PackageNotFoundError, or metadata broken by a half-finished install
            continue
    return None


__all__ = ["installed_version"]
