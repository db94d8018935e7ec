"""Label embeddings, kept per label so a new or extended label set encodes only what is new.

Two layers. Memory: label -> vector, for one tagger's model. Disk (optional):
one safetensors file per *cache key* under the user cache directory, holding
every label ever encoded with that key as a row of `embeddings` [m, d], the
label list in the file's metadata, and a checksum over both.

The key is everything that changes an embedding: the model's weights
(`LoadedModel.fingerprint`, the hub commit of a cached snapshot, else the weight
files' sizes and mtimes, strengthened here with a digest of their headers and
sampled bytes), the prompt template, lowercasing, padding and max_length, dtype,
quantization, attention implementation, device type, and the versions of torch,
transformers, tokenizers and sentencepiece. A file's name is a hash of its key
and the key is stored inside it too, so a collision or a foreign file is noticed.

Writes are atomic (a temp file in the same folder, then `os.replace`), made
under an exclusive lock file (`fcntl.flock`, `msvcrt.locking` on Windows) after
re-reading what is there, so two processes adding different labels keep each
other's rows. A truncated or corrupt file (bad header, wrong sizes, checksum
mismatch, non-finite values) is reported once as a warning naming it, ignored,
and replaced by the next write. Any I/O failure degrades to the memory layer
with a warning: the cache can never fail a tagging run.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from .fileio import safetensors_header_size, safetensors_metadata, write_atomic
from .locks import locked
from .versions import installed_version

log = logging.getLogger(__name__)

CACHE_ENV = "VISUAL_BUFFET_SIGLIP_CACHE"
APP_NAME = "visual-buffet-siglip"
SUBDIR = "label-embeddings"
FORMAT = "1"
TENSOR = "embeddings"
_STALE_TMP_SECONDS = 3600.0


# --- where ------------------------------------------------------------------------------------

def user_cache_root() -> Path:
    """The platform's per-user cache folder for this package (stdlib only, no platformdirs)."""
    home = Path.home()
    if sys.platform == "win32":
        base = os.environ.get("LOCALAPPDATA") or str(home / "AppData" / "Local")
        return Path(base) / APP_NAME / "Cache"
    if sys.platform == "darwin":
        return home / "Library" / "Caches" / APP_NAME
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(xdg) if xdg and os.path.isabs(xdg) else home / ".cache"
    return base / APP_NAME


def cache_root(setting: str | None = None) -> Path:
    """`$VISUAL_BUFFET_SIGLIP_CACHE`, else the `cache_dir` setting, else the user cache folder."""
    env = os.environ.get(CACHE_ENV, "").strip()
    if env:
        return Path(env).expanduser()
    if setting:
        return Path(setting).expanduser()
    return user_cache_root()


# --- what -------------------------------------------------------------------------------------

def library_versions() -> dict[str, str]:
    """Versions of the libraries whose changes can change a text embedding ("-": not installed)."""
    return {name: installed_version(name) or "-" for name in ("torch", "transformers", "tokenizers", "sentencepiece")}


def weights_digest(source: Path, sample: int = 1 << 16) -> str:
    """A cheap content digest of a folder's safetensors files: size, header, three sampled blocks.

    Complements a fingerprint made of sizes and mtimes: two random checkpoints of
    the same shape saved within one mtime tick still differ here. Reads ~200 KB a file.
    """
    digest = hashlib.sha256()
    for path in sorted(source.glob("*.safetensors")):
        try:
            with open(path, "rb") as fh:
                size = os.fstat(fh.fileno()).st_size
                header_len = safetensors_header_size(fh.read(8))
                digest.update(f"{path.name}:{size};".encode())
                digest.update(fh.read(min(header_len, 1 << 24)))
                _sample_blocks(fh, size, min(8 + header_len, size), sample, digest)
        except OSError as exc:  # unreadable here means unloadable too; keep the key distinct
            digest.update(f"{path.name}:error:{exc}".encode())
    return digest.hexdigest()[:24]


def file_digest(path: Path, sample: int = 1 << 16) -> str:
    """The same cheap digest for a file of any format: its size and three sampled blocks (head, middle, tail)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        digest.update(f"{size};".encode())
        _sample_blocks(fh, size, 0, sample, digest)
    return digest.hexdigest()[:24]


def _sample_blocks(fh: BinaryIO, size: int, first: int, sample: int, digest: Any) -> None:
    """Feed `digest` the `sample`-byte blocks at `first`, the middle and the end of an open file."""
    for offset in (first, (size - sample) // 2, size - sample):
        fh.seek(max(0, offset))
        digest.update(fh.read(sample))


def key_digest(key: Mapping[str, Any]) -> str:
    """The file-name hash of a cache key."""
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]


# --- the disk layer ---------------------------------------------------------------------------

class CacheFileError(Exception):
    """A cache file that cannot be trusted (truncated, corrupt, foreign)."""


class DiskLabelStore:
    """One key's label embeddings in `<root>/label-embeddings/<hash>.safetensors`. Thread- and process-safe."""

    def __init__(self, root: Path, key: Mapping[str, Any]):
        self.key = dict(key)
        self.folder = Path(root) / SUBDIR
        name = key_digest(self.key)
        self.path = self.folder / f"{name}.safetensors"
        self.lock_path = self.folder / f"{name}.lock"
        self._lock = threading.Lock()
        self._disabled: str | None = None
        self._warned: set[tuple[Any, ...] | None] = set()

    @property
    def enabled(self) -> bool:
        return self._disabled is None

    def load(self) -> dict[str, np.ndarray]:
        """Every label stored for this key ({} when there is no usable file)."""
        if not self.enabled:
            return {}
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return {}
        except OSError as exc:
            self._disable(f"cannot read {self.path}: {exc}")
            return {}
        try:
            return decode(data, self.key)
        except CacheFileError as exc:
            self._warn_corrupt(exc)
            return {}

    def add(self, fresh: Mapping[str, np.ndarray]) -> None:
        """Merge `fresh` into the file: re-read under the lock, keep every stored row, write atomically."""
        if not fresh or not self.enabled:
            return
        with self._lock:
            try:
                self.folder.mkdir(parents=True, exist_ok=True)
                with locked(self.lock_path):
                    stored = self.load()
                    new = {label: vec for label, vec in fresh.items() if label not in stored}
                    if not new and self.path.exists():
                        return
                    merged = {**stored, **new}
                    write_atomic(self.path, encode(merged, self.key))
                    self._clean_stale_temps()
            except OSError as exc:
                self._disable(f"cannot write {self.path}: {exc}")

    def signature(self) -> tuple[int, int, int] | None:
        """(inode, size, mtime_ns) of the file, or None: tells whether another process changed it."""
        try:
            st = self.path.stat()
        except OSError:
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    def _warn_corrupt(self, exc: CacheFileError) -> None:
        sig = self.signature()
        if sig not in self._warned:  # once per file version, not once per lookup
            self._warned.add(sig)
            log.warning("label-embedding cache file %s is unusable (%s); ignoring it, the labels will be "
                        "encoded again and the file rewritten", self.path, exc)

    def _disable(self, why: str) -> None:
        if self._disabled is None:
            self._disabled = why
            log.warning("label-embedding disk cache off for this run: %s (set cache_dir or %s to a writable "
                        "folder, or text_cache = false)", why, CACHE_ENV)

    def _clean_stale_temps(self) -> None:
        """Temp files left by killed writers (never ones a live writer may still own)."""
        cutoff = time.time() - _STALE_TMP_SECONDS
        for tmp in self.folder.glob(".*.tmp"):
            with contextlib.suppress(OSError):
                if tmp.stat().st_mtime < cutoff:
                    tmp.unlink()


def encode(embeddings: Mapping[str, np.ndarray], key: Mapping[str, Any]) -> bytes:
    """A cache file's bytes: `embeddings` [m, d] float32 and metadata (format, key, labels, checksum)."""
    from safetensors.numpy import save

    labels = list(embeddings)
    matrix = np.ascontiguousarray(np.stack([np.asarray(embeddings[label], dtype=np.float32) for label in labels]))
    labels_json = json.dumps(labels, ensure_ascii=False)
    metadata = {"format": FORMAT, "key": json.dumps(dict(key), sort_keys=True), "labels": labels_json,
                "sha256": _checksum(labels_json, matrix)}
    return save({TENSOR: matrix}, metadata=metadata)


def decode(data: bytes, key: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Parse and verify a cache file's bytes; raises CacheFileError on anything suspicious."""
    from safetensors.numpy import load

    try:
        metadata = safetensors_metadata(data)
    except ValueError as exc:
        raise CacheFileError(str(exc)) from None
    try:
        tensors = load(data)
    except Exception as exc:  # safetensors raises its own error types for bad files
        raise CacheFileError(f"not a valid safetensors file: {exc}") from None
    if metadata.get("format") != FORMAT:
        raise CacheFileError(f"format {metadata.get('format')!r}, expected {FORMAT!r}")
    if metadata.get("key") != json.dumps(dict(key), sort_keys=True):
        raise CacheFileError("it belongs to another model or setting (key mismatch)")
    matrix = tensors.get(TENSOR)
    try:
        labels = json.loads(metadata.get("labels", ""))
    except ValueError:
        raise CacheFileError("the label list is not valid JSON") from None
    if matrix is None or matrix.dtype != np.float32 or matrix.ndim != 2 or not isinstance(labels, list) \
            or len(labels) != matrix.shape[0] or len(set(labels)) != len(labels):
        raise CacheFileError("the label list and the embedding matrix do not match")
    if metadata.get("sha256") != _checksum(metadata["labels"], matrix):
        raise CacheFileError("checksum mismatch")
    if not np.isfinite(matrix).all():
        raise CacheFileError("non-finite values")
    return dict(zip(labels, matrix))


def _checksum(labels_json: str, matrix: np.ndarray) -> str:
    digest = hashlib.sha256(labels_json.encode())
    digest.update(str(matrix.shape).encode())
    digest.update(np.ascontiguousarray(matrix, dtype=np.float32).tobytes())
    return digest.hexdigest()


# --- both layers ------------------------------------------------------------------------------

class LabelEmbeddingCache:
    """Normalised float32 label embeddings for one model, keyed by label: memory, then disk.

    `stats` counts, per label looked up, where it was found: `memory`, `disk`, or
    `missing` (the caller encodes those and `put`s them back).
    """

    def __init__(self, disk: DiskLabelStore | None = None) -> None:
        self._memory: dict[str, np.ndarray] = {}
        self._lock = threading.Lock()
        self.disk = disk
        self._disk_signature: tuple[int, int, int] | None = None
        self.stats = {"memory": 0, "disk": 0, "missing": 0}

    def get(self, labels: Iterable[str], *, count: bool = True) -> dict[str, np.ndarray]:
        """The cached embeddings among `labels` (reads the disk file only when memory misses).

        `count=False` leaves `stats` alone (a re-check of labels already counted).
        """
        wanted = list(dict.fromkeys(labels))
        with self._lock:
            found = {label: self._memory[label] for label in wanted if label in self._memory}
            in_memory = len(found)
            if len(found) < len(wanted) and self.disk is not None:
                self._refresh_from_disk()
                found.update((label, self._memory[label]) for label in wanted
                             if label not in found and label in self._memory)
            if count:
                self.stats["memory"] += in_memory
                self.stats["disk"] += len(found) - in_memory
                self.stats["missing"] += len(wanted) - len(found)
            return found

    def put(self, embeddings: dict[str, np.ndarray]) -> None:
        """Remember freshly encoded embeddings (and store them on disk when there is a disk layer)."""
        with self._lock:
            self._memory.update(embeddings)
        if self.disk is not None:
            self.disk.add(embeddings)

    def _refresh_from_disk(self) -> None:
        assert self.disk is not None
        signature = self.disk.signature()
        if signature is None or signature == self._disk_signature:
            return  # no file, or nothing new since we last read it
        stored = self.disk.load()
        self._disk_signature = signature
        for label, vector in stored.items():
            self._memory.setdefault(label, vector)

    def __len__(self) -> int:
        return len(self._memory)


__all__ = ["LabelEmbeddingCache", "DiskLabelStore", "CacheFileError", "cache_root", "user_cache_root"]
