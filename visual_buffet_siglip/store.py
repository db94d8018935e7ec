"""The embedding store: image embeddings kept from a tagging run, so re-tagging and search need no vision pass.

File layout (one file, append-only, so a run that is killed keeps what it wrote):

    line 1      JSON header + "\\n": format marker and version, the model and its
                revision, the settings that shape an image embedding (see `StoreIdentity`)
    then        frames, each a 16-byte little-endian prefix (document length, CRC-32
                of the document, CRC-32 of the first 12 prefix bytes) and one
                safetensors document: tensor "embeddings" [k, d] float32 (NaN rows
                for images that failed) and metadata "paths", "errors", "elapsed_ms"
                (JSON, ASCII with escapes, so names that are not valid UTF-8 survive)

Each frame is a complete safetensors document parsed by the safetensors
library; the prefix delimits and checks it. A new store appears with its header
already in it (written beside it, then linked into place), never empty. Frames
are written whole and fsynced, so an interrupted run leaves at most one torn
frame at the end, which the reader skips with a warning (a resumed run cuts it
off and appends). Anything else that fails (a checksum, a prefix, a document
that does not parse or fails its checks) is damage: the rows before it are used,
a warning names the store and how many rows were kept, `damaged` is set (retag
and search then exit 1), and a resumed run cuts the store there and embeds the
lost images again. Version 1 stores (0.1.0, no checksums) are read and appended
to with a warning that damage cannot be detected in them. Readers stream frames,
joined into chunks of a size the caller picks: memory follows the chunk, not the
archive.

The format's writer, reader and repair live together (a little over 450 lines):
each relies on exactly how the others lay out and check a frame.
"""

from __future__ import annotations

import json
import logging
import os
import struct
import time
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import numpy as np

from .errors import StoreError
from .fileio import create_with, safetensors_metadata
from .outputs import path_key
from .records import ErrorDict, Record

if TYPE_CHECKING:
    from .config import ModelSettings
    from .engine import ImageEmbedding, SiglipTagger

log = logging.getLogger(__name__)

FORMAT = "visual-buffet-siglip/embeddings"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
_LENGTH = struct.Struct("<Q")  # version 1's frame prefix
_PREFIX = struct.Struct("<QII")  # length, crc32(document), crc32(length + document crc)
_MAX_HEADER = 1 << 20


@dataclass(frozen=True)
class StoreIdentity:
    """What makes two image embeddings comparable: the weights and the settings that change an embedding.

    `revision` is `LoadedModel.fingerprint` (the hub commit of a cached model, else
    the weight files' sizes and mtimes). `max_num_patches` is None except for NaFlex.
    """

    model: str
    revision: str
    dim: int
    decode: str
    max_num_patches: int | None
    dtype: str
    quantization: str
    backend: str = "torch"  # stores written before the OpenVINO backend came from PyTorch

    @property
    def exact(self) -> bool:
        """float32 and full weights: both backends then give the same embeddings (within 1e-6)."""
        return self.dtype == "float32" and self.quantization == "none"

    @classmethod
    def of(cls, tagger: SiglipTagger) -> StoreIdentity:
        """The identity of embeddings `tagger` makes (loads its model)."""
        loaded, settings = tagger.loaded, tagger.settings
        return cls(model=settings.model, revision=loaded.fingerprint, dim=_embed_dim(loaded.model),
                   decode=settings.decode,
                   max_num_patches=settings.max_num_patches if loaded.info.family == "naflex" else None,
                   dtype=loaded.plan.dtype, quantization=loaded.plan.quantization, backend=loaded.plan.backend)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StoreIdentity:
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data or f.default is MISSING})


# Flags that set each identity field, for messages that say how to match a store.
_FLAGS = {"decode": "--decode", "max_num_patches": "--max-num-patches", "dtype": "--dtype",
          "quantization": "--quantization", "backend": "--backend"}


@dataclass
class Chunk:
    """Consecutive rows of a store: `start` is the first row's position in the whole store."""

    start: int
    paths: list[str]
    vectors: np.ndarray  # [k, d] float32, NaN rows where errors[i] is not None
    errors: list[ErrorDict | None]
    elapsed_ms: list[float]

    @property
    def ok(self) -> np.ndarray:
        """Boolean mask of the rows that hold an embedding."""
        return np.array([error is None for error in self.errors], dtype=bool)


# --- writing ---------------------------------------------------------------------------------

class EmbeddingWriter:
    """Appends each image's embedding (or error) as `tag` produces it, a frame every chunk or interval.

    A frame is written when `chunk_rows` rows are buffered or `flush_seconds`
    have passed since the last one, so a killed run loses at most that much.
    Rows of images in `skip` (path keys already in a resumed store) are not written again.
    """

    def __init__(self, path: str | os.PathLike[str], identity: StoreIdentity, *, chunk_rows: int = 1024,
                 flush_seconds: float = 30.0, handle: IO[bytes] | None = None, version: int = FORMAT_VERSION,
                 skip: set[str] | frozenset[str] = frozenset()):
        """`handle`: an existing store of format `version`, positioned after its last frame; else a new store."""
        self.path, self.identity, self.version, self.skip = Path(path), identity, version, skip
        self.chunk_rows, self.flush_seconds = chunk_rows, flush_seconds
        if handle is None:
            header = {"format": FORMAT, "format_version": FORMAT_VERSION, **asdict(identity)}
            handle = _create(self.path, json.dumps(header).encode() + b"\n")
        self._file = handle
        self._rows: list[tuple[str, np.ndarray | None, ErrorDict | None, float]] = []
        self._last_flush = time.monotonic()

    @classmethod
    def for_tagger(cls, path: str | os.PathLike[str], tagger: SiglipTagger, **options: Any) -> EmbeddingWriter:
        """A new store at `path` for `tagger`'s embeddings; refuses an existing file before loading the model."""
        check_new(path)
        return cls(path, StoreIdentity.of(tagger), **options)

    def write(self, path: str, item: ImageEmbedding, record: Record | None = None) -> None:
        if self.skip and path_key(path) in self.skip:
            return
        self._rows.append((path, item.vector, item.error, item.elapsed_ms))
        if len(self._rows) >= self.chunk_rows or time.monotonic() - self._last_flush >= self.flush_seconds:
            self.flush()

    def flush(self) -> None:
        """Write the buffered rows as one frame and make it durable."""
        from safetensors.numpy import save

        if not self._rows:
            return
        vectors = np.full((len(self._rows), self.identity.dim), np.nan, dtype=np.float32)
        for row, (_, vector, error, _) in enumerate(self._rows):
            if error is None:
                vectors[row] = vector
        metadata = {"paths": json.dumps([r[0] for r in self._rows]),
                    "errors": json.dumps([r[2] for r in self._rows]),
                    "elapsed_ms": json.dumps([r[3] for r in self._rows])}
        document = save({"embeddings": vectors}, metadata=metadata)
        self._file.write(_frame_prefix(document, self.version) + document)
        self._sync()
        self._rows.clear()
        self._last_flush = time.monotonic()

    def close(self) -> None:
        if not self._file.closed:
            try:
                self.flush()
            finally:
                self._file.close()

    def __enter__(self) -> EmbeddingWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _sync(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())


def _frame_prefix(document: bytes, version: int) -> bytes:
    if version == 1:
        return _LENGTH.pack(len(document))
    head = struct.pack("<QI", len(document), zlib.crc32(document))
    return head + struct.pack("<I", zlib.crc32(head))


@dataclass
class StoreContents:
    """What an existing store holds, read once when a run resumes it: the images and where good data ends."""

    store: EmbeddingStore
    stored: set[str]  # path keys
    end: int  # file offset after the last good frame


def read_contents(path: str | os.PathLike[str]) -> StoreContents | None:
    """The contents of the store at `path` for a resumed run (None when there is none yet); no model needed."""
    if not os.path.exists(path):
        return None
    store = EmbeddingStore(path)
    stored: set[str] = set()
    end = store.data_start
    for chunk, end in store.frames():  # noqa: B007 - `end` is read after the loop
        stored.update(path_key(name) for name in chunk.paths)
    return StoreContents(store, stored, end)


def writer_for_tag(path: str | os.PathLike[str], tagger: SiglipTagger, *,
                   contents: StoreContents | None = None, embed_first: Sequence[str] = ()) -> EmbeddingWriter:
    """The store sink of a `tag` run; a resumed run (`contents`: the existing store) continues the store.

    Continuing checks the store was made with this model and settings, cuts off
    a torn or damaged end, skips the images it already holds, and first embeds
    `embed_first`: images that the run's output already lists but the store lacks
    (rows still buffered when a run was killed, a frame lost to a full disk). The
    store then holds every image once.
    """
    if contents is None:
        writer = EmbeddingWriter.for_tagger(path, tagger)
    else:
        check_compatible(contents.store, tagger)
        handle = open(contents.store.path, "r+b")
        handle.truncate(contents.end)
        handle.seek(contents.end)
        writer = EmbeddingWriter(contents.store.path, contents.store.identity, handle=handle,
                                 version=contents.store.version, skip=contents.stored)
    if embed_first:
        log.info("embedding %d images that %s lacks (tagged before, but their rows were lost)",
                 len(embed_first), path)
        for item in tagger.iter_image_embeddings(embed_first):
            writer.write(embed_first[item.index], item)
    return writer


def check_new(path: str | os.PathLike[str]) -> None:
    """Raise StoreError when `path` exists: a store is never overwritten (checked before the model loads)."""
    if os.path.lexists(path):
        raise _exists(path)


def _exists(path: str | os.PathLike[str]) -> StoreError:
    return StoreError(f"embedding store {str(path)!r} already exists; a store is never overwritten: "
                      "give a new file name, delete the old store first, or add --resume to continue it")


def _create(path: Path, header: bytes) -> IO[bytes]:
    try:
        return create_with(path, header)
    except FileExistsError:
        raise _exists(path) from None
    except OSError as exc:
        raise StoreError(f"cannot create embedding store {str(path)!r}: {exc.strerror or exc}; "
                         "check that its folder exists and is writable") from None


def _embed_dim(model: Any) -> int:
    return int(model.config.vision_config.hidden_size)


# --- reading ---------------------------------------------------------------------------------

class EmbeddingStore:
    """A store opened for reading; `chunks()` streams it frame by frame.

    `damaged` turns true once a read met damage (the rows before it were still used).
    """

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        self.damaged = False
        try:
            with open(self.path, "rb") as handle:
                line = handle.readline(_MAX_HEADER)
                self.data_start = handle.tell()
        except FileNotFoundError:
            raise StoreError(f"embedding store {str(self.path)!r} does not exist; "
                             "make one with `visual-buffet-siglip tag ... --save-embeddings FILE`") from None
        except OSError as exc:
            raise StoreError(f"cannot read embedding store {str(self.path)!r}: {exc.strerror or exc}") from None
        self.identity = self._parse_header(line)

    def _parse_header(self, line: bytes) -> StoreIdentity:
        not_store = (f"{str(self.path)!r} is not an embedding store written by visual-buffet-siglip "
                     "(`tag ... --save-embeddings FILE` writes one)")
        try:
            header = json.loads(line)
        except (ValueError, RecursionError):
            raise StoreError(not_store) from None
        if not isinstance(header, dict) or header.get("format") != FORMAT:
            raise StoreError(not_store)
        version = header.get("format_version")
        if version not in READABLE_VERSIONS:
            raise StoreError(f"embedding store {str(self.path)!r} has format version "
                             f"{header.get('format_version')!r}; this visual-buffet-siglip reads versions "
                             f"{', '.join(map(str, READABLE_VERSIONS))} (upgrade it, or tag the photos again)")
        self.version = int(version)
        if self.version == 1:
            log.warning("embedding store %s was written by visual-buffet-siglip 0.1.0, without checksums: "
                        "damage in it cannot be detected; tag the photos again with --save-embeddings for a "
                        "store that has them", self.path)
        try:
            return StoreIdentity.from_dict(header)
        except (KeyError, TypeError) as exc:
            raise StoreError(f"embedding store {str(self.path)!r}: header lacks {exc.args[0]!r}") from None

    def chunks(self, rows: int = 1) -> Iterator[Chunk]:
        """The stored rows in order, whole frames joined into chunks of at least `rows` (the last may be short).

        Joining keeps scoring calls few (each has a fixed cost) even for a store
        written in small frames; memory stays about `rows` embeddings.
        """
        pending: list[Chunk] = []
        for frame, _ in self.frames():
            pending.append(frame)
            if sum(len(c.paths) for c in pending) >= rows:
                yield _join(pending)
                pending = []
        if pending:
            yield _join(pending)

    def frames(self) -> Iterator[tuple[Chunk, int]]:
        """(chunk, file offset after it) per good frame, stopping with a warning at a torn end or damage."""
        start = 0
        with open(self.path, "rb") as handle:
            end = os.fstat(handle.fileno()).st_size
            handle.seek(self.data_start)
            while handle.tell() < end:
                try:
                    document = _read_frame(handle, end, self.version)
                    if document is None:
                        log.warning("embedding store %s ends with an incomplete chunk (the tagging run was "
                                    "interrupted); the %d rows before it are used", self.path, start)
                        return
                    chunk = _parse_frame(start, document, self.identity.dim)
                except _Damage as exc:
                    self.damaged = True
                    log.warning("embedding store %s is damaged after row %d (%s): the %d rows before it are "
                                "used, the rest are lost; `tag --resume --save-embeddings` repairs it (the lost "
                                "images are embedded again), or tag the photos again", self.path, start, exc,
                                start)
                    return
                yield chunk, handle.tell()
                start += len(chunk.paths)


class _Damage(Exception):
    """A frame that is not what its writer wrote: a checksum, its length or its content is wrong."""


def _join(chunks: list[Chunk]) -> Chunk:
    if len(chunks) == 1:
        return chunks[0]
    return Chunk(chunks[0].start, [p for c in chunks for p in c.paths], np.concatenate([c.vectors for c in chunks]),
                 [e for c in chunks for e in c.errors], [t for c in chunks for t in c.elapsed_ms])


def _read_frame(handle: IO[bytes], end: int, version: int) -> bytes | None:
    """The next frame's checked safetensors document, or None when the file ends inside the frame."""
    prefix_size = _LENGTH.size if version == 1 else _PREFIX.size
    prefix = handle.read(prefix_size)
    if len(prefix) < prefix_size:
        return None
    if version == 1:
        size, crc = _LENGTH.unpack(prefix)[0], None
    else:
        size, crc, prefix_crc = _PREFIX.unpack(prefix)
        if zlib.crc32(prefix[:12]) != prefix_crc:
            raise _Damage("a frame's length field fails its checksum")
    if size > end - handle.tell():  # checked first: a torn length must not size a huge read
        return None
    document = handle.read(size)
    if crc is not None and zlib.crc32(document) != crc:
        raise _Damage("a frame fails its checksum")
    return document


def _parse_frame(start: int, document: bytes, dim: int) -> Chunk:
    from safetensors import SafetensorError
    from safetensors.numpy import load

    try:
        return _chunk(start, load(document), safetensors_metadata(document), dim)
    except (ValueError, KeyError, TypeError, IndexError, RecursionError, SafetensorError) as exc:
        raise _Damage(str(exc) or type(exc).__name__) from None


def _chunk(start: int, tensors: dict[str, np.ndarray], metadata: dict[str, str], dim: int) -> Chunk:
    vectors = tensors["embeddings"]
    paths, errors = json.loads(metadata["paths"]), json.loads(metadata["errors"])
    elapsed = json.loads(metadata["elapsed_ms"])
    if vectors.dtype != np.float32 or vectors.shape != (len(paths), dim) or not (
            len(paths) == len(errors) == len(elapsed)):
        raise ValueError(f"a chunk of shape {vectors.shape} does not match its {len(paths)} paths "
                         f"and width {dim}")
    chunk = Chunk(start, paths, vectors, errors, elapsed)
    # Stored embeddings are unit vectors: a cheap invariant that damaged bytes almost never satisfy.
    good = vectors if all(e is None for e in errors) else vectors[chunk.ok]
    with np.errstate(over="ignore", invalid="ignore"):  # garbage may overflow; it then fails the check
        squares = np.einsum("ij,ij->i", good, good)
    if not (np.abs(squares - 1.0) < 2e-3).all():
        raise ValueError("it holds rows that are not unit-length embeddings")
    return chunk


# --- identity check --------------------------------------------------------------------------

def check_compatible(store: EmbeddingStore, tagger: SiglipTagger) -> None:
    """Raise StoreError unless `tagger` makes embeddings comparable to `store`'s (same weights, same settings).

    The weights are compared first, before the configured model loads, so a
    store from another model is reported as such even when that model is not
    available here.
    """
    stored = store.identity
    revision = _revision_of(tagger.settings)
    # The store's own model missing here is not a mismatch: loading it below says how to get it.
    if revision != stored.revision and (revision is not None or tagger.settings.model != stored.model):
        here = f"revision {revision}" if revision else "not available here"
        raise StoreError(
            f"embedding store {str(store.path)!r} was made with model {stored.model!r} (revision "
            f"{stored.revision}), but the configured model is {tagger.settings.model!r} ({here}); "
            f"embeddings are only comparable within one model: pass --model {stored.model} (or the "
            "--config you tagged with), or tag the photos again with --save-embeddings")
    current = StoreIdentity.of(tagger)
    problems = [f"{name} {getattr(stored, name)!r} (this run: {getattr(current, name)!r}; "
                f"pass {_FLAGS[name]} {getattr(stored, name)})"
                for name in _FLAGS if getattr(stored, name) != getattr(current, name)
                and not (name == "backend" and stored.exact and current.exact)]
    if problems:
        raise StoreError(f"embedding store {str(store.path)!r} was made with " + ", ".join(problems)
                         + "; these settings change the embeddings, so results would not equal a fresh run")


def _revision_of(settings: ModelSettings) -> str | None:
    """The configured model's fingerprint, from its files before the model loads; None when it is not available.

    Finding the files may download an uncached hub model first (`resolve_source`).
    """
    from .models import ModelLoadError, fingerprint, resolve_source

    try:
        return fingerprint(resolve_source(settings.model))
    except ModelLoadError:
        return None


__all__ = ["EmbeddingStore", "EmbeddingWriter", "StoreIdentity", "StoreContents", "Chunk",
           "read_contents", "writer_for_tag", "check_new", "check_compatible"]
