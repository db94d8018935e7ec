"""`install-into-host`: make a Visual Buffet checkout's `plugins/siglip` load this package.

Nothing outside the host's `plugins/` folder is written. A `plugins/siglip` that is
not ours is renamed to `plugins/.siglip.backup-YYYYmmdd-HHMMSS`, never deleted: the
host's scan skips dot-folders, so it never finds two plugins named "siglip".
`--uninstall` removes the files we wrote (only when `__init__.py` carries our marker,
and only when the folder holds nothing else: a file someone added there stops it
before anything changes) and renames the newest backup back, so the host's plugin
returns byte for byte.
"""

from __future__ import annotations

import os
import re
import shlex
from datetime import datetime
from importlib import resources
from pathlib import Path

from .config import PLUGIN_NAME, tomllib
from .fileio import write_atomic

MARKER = "installed by visual-buffet-siglip install-into-host"
BACKUP_PREFIX = f".{PLUGIN_NAME}.backup-"
_BACKUP = re.compile(re.escape(BACKUP_PREFIX) + r"(\d{8}-\d{6})(?:-(\d+))?")
HOST_FILES = ("src/visual_buffet/plugins/base.py", "plugins")
WRITTEN = ("__init__.py", "plugin.toml")  # what install writes into plugins/siglip
_BYTECODE = re.compile(r"__init__\.[\w-]+\.pyc")  # what the host's import of our __init__.py leaves


class HostInstallError(Exception):
    """The folder is not a Visual Buffet checkout, or its plugins/ cannot be changed safely."""


def manifest() -> str:
    """Our plugin.toml, as shipped in the package."""
    return resources.files("visual_buffet_siglip").joinpath("data/plugin.toml").read_text("utf-8")


def init_line() -> str:
    """The one-line `__init__.py`: imports the manifest's entry point class, carries our marker."""
    entry = tomllib.loads(manifest())["plugin"]["entry_point"]
    return f"from visual_buffet_siglip.host import {entry}  # {MARKER}\n"


def plugins_dir(host: str | os.PathLike[str]) -> Path:
    """`host/plugins`, after checking `host` is a Visual Buffet checkout."""
    root = Path(host).expanduser()
    missing = [name for name in HOST_FILES if not (root / name).exists()]
    if missing:
        raise HostInstallError(
            f"{root} is not a Visual Buffet checkout: it has no {' and no '.join(missing)}. Give the folder "
            "you cloned https://github.com/bizzlechizzle/visual-buffet into (it holds src/visual_buffet/ "
            "and plugins/).")
    return root / "plugins"


def is_ours(folder: Path) -> bool:
    """Whether `folder` is a plugin folder this command wrote (its `__init__.py` has our marker)."""
    try:
        return folder.is_dir() and not folder.is_symlink() and MARKER in (folder / "__init__.py").read_text("utf-8")
    except (OSError, UnicodeDecodeError):
        return False


def backups(plugins: Path) -> list[Path]:
    """Backups of earlier `plugins/siglip` folders, oldest first."""
    found = [(m.group(1), int(m.group(2) or 1), path) for path in plugins.iterdir()
             if (m := _BACKUP.fullmatch(path.name))]
    return [path for *_, path in sorted(found)]


def install(host: str | os.PathLike[str], now: datetime | None = None) -> list[str]:
    """Install into `host`; returns what was done, one sentence each."""
    plugins = plugins_dir(host)
    target = plugins / PLUGIN_NAME
    done = []
    try:
        if is_ours(target):
            done.append(f"replaced the earlier visual-buffet-siglip install in {target}")
        elif target.exists() or target.is_symlink():
            backup = _free_backup(plugins, now or datetime.now())
            target.rename(backup)
            done.append(f"moved the existing {target} aside to {backup} (hidden from the host's plugin scan)")
        target.mkdir(exist_ok=True)
        # __init__.py first: the host never sees a manifest without the code it names
        for name, text in (("__init__.py", init_line()), ("plugin.toml", manifest())):
            write_atomic(target / name, text)
    except OSError as exc:
        raise HostInstallError(f"cannot install into {plugins}: {exc}") from None
    done.append(f"wrote {target / 'plugin.toml'} and {target / '__init__.py'}")
    done.append("the host now runs visual-buffet-siglip for `-p siglip` (in a Python environment where "
                "visual-buffet-siglip is installed); settings come from [plugins.siglip] in "
                "$VISUAL_BUFFET_CONFIG or ~/.config/visual-buffet/config.toml. Undo: "
                f"visual-buffet-siglip install-into-host {shlex.quote(str(host))} --uninstall")
    return done


def uninstall(host: str | os.PathLike[str]) -> list[str]:
    """Remove our plugin folder and restore the newest backup; returns what was done."""
    plugins = plugins_dir(host)
    target = plugins / PLUGIN_NAME
    found = backups(plugins)
    done = []
    present = target.exists() or target.is_symlink()
    if present and not is_ours(target):
        raise HostInstallError(f"{target} was not written by visual-buffet-siglip (its __init__.py lacks the "
                               "marker line), so it is left alone; nothing was changed")
    foreign = _not_written_by_us(target) if present else []
    if foreign:
        raise HostInstallError(f"{target} also holds files visual-buffet-siglip did not write: "
                               f"{', '.join(foreign)}; nothing was changed. Move them elsewhere and run "
                               "--uninstall again")
    if not present and not found:
        raise HostInstallError(f"nothing to uninstall: {plugins} has neither our {PLUGIN_NAME} folder nor a "
                               f"{BACKUP_PREFIX}* backup")
    try:
        if present:
            _remove_ours(target)
            done.append(f"removed visual-buffet-siglip's {target}")
        if found:
            found[-1].rename(target)
            done.append(f"restored {found[-1]} to {target}")
        else:
            done.append("no backup to restore: the host had no siglip plugin before the install")
    except OSError as exc:
        raise HostInstallError(f"cannot uninstall from {plugins}: {exc}") from None
    if len(found) > 1:
        done.append(f"left {len(found) - 1} older backup(s) in place: "
                    + ", ".join(path.name for path in found[:-1]))
    return done


def _not_written_by_us(target: Path) -> list[str]:
    """Entries of our plugin folder that install did not write (nor the host's bytecode of our __init__)."""
    foreign = []
    for entry in sorted(target.iterdir()):
        if entry.name in WRITTEN and entry.is_file() and not entry.is_symlink():
            continue
        if entry.name == "__pycache__" and entry.is_dir() and not entry.is_symlink():
            foreign += [f"__pycache__/{pyc.name}" for pyc in sorted(entry.iterdir())
                        if not (_BYTECODE.fullmatch(pyc.name) and pyc.is_file())]
            continue
        foreign.append(entry.name)
    return foreign


def _remove_ours(target: Path) -> None:
    """Delete what install wrote (checked by _not_written_by_us first), then the emptied folder."""
    cache = target / "__pycache__"
    if cache.is_dir():
        for pyc in cache.iterdir():
            pyc.unlink()
        cache.rmdir()
    for name in WRITTEN:
        (target / name).unlink(missing_ok=True)
    target.rmdir()  # fails, deleting nothing more, if something appeared meanwhile


def _free_backup(plugins: Path, now: datetime) -> Path:
    """A backup name not yet taken: a repeat install in the same second gets a -2, -3... suffix."""
    base = plugins / f"{BACKUP_PREFIX}{now:%Y%m%d-%H%M%S}"
    candidate, n = base, 2
    while candidate.exists() or candidate.is_symlink():
        candidate, n = base.with_name(f"{base.name}-{n}"), n + 1
    return candidate


__all__ = ["HostInstallError", "install", "uninstall", "manifest", "init_line", "plugins_dir", "is_ours",
           "backups", "MARKER"]
