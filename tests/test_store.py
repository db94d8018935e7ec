"""The embedding store file: exact round trip, append-as-you-go that survives a kill, clear errors."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace

import numpy as np
import pytest

from visual_buffet_siglip.engine import ImageEmbedding
from visual_buffet_siglip.errors import StoreError
from visual_buffet_siglip.store import EmbeddingStore, EmbeddingWriter, StoreIdentity

IDENTITY = StoreIdentity(model="google/siglip2-base-patch16-224", revision="hub:0123abcd", dim=8,
                         decode="fast", max_num_patches=None, dtype="float32", quantization="none")
ERROR = {"type": "ImageDecodeError", "message": "bad.jpg: cannot decode image (truncated)"}


def items(n: int, dim: int = 8, fail: frozenset[int] = frozenset({2})) -> list[ImageEmbedding]:
    rng = np.random.default_rng(n)
    out = []
    for i in range(n):
        vector = None if i in fail else rng.standard_normal(dim).astype(np.float32)
        vector = None if vector is None else vector / np.linalg.norm(vector)
        out.append(ImageEmbedding(i, f"photos/ä {i}.jpg", vector, ERROR if i in fail else None, 10.0 + i / 7))
    return out


def write_store(path, rows, **options) -> None:
    with EmbeddingWriter(path, IDENTITY, **options) as writer:
        for item in rows:
            writer.write(item.source, item)


def read_rows(path) -> list[tuple]:
    return [(c.start + i, c.paths[i], c.vectors[i], c.errors[i], c.elapsed_ms[i])
            for c in EmbeddingStore(path).chunks() for i in range(len(c.paths))]


@pytest.mark.parametrize("chunk_rows", [1, 2, 1024])
def test_round_trip_is_exact_in_order_across_chunks(tmp_path, chunk_rows):
    rows = items(5)
    write_store(tmp_path / "s.emb", rows, chunk_rows=chunk_rows)
    store = EmbeddingStore(tmp_path / "s.emb")
    assert store.identity == IDENTITY
    back = read_rows(tmp_path / "s.emb")
    assert [r[0] for r in back] == list(range(5))
    for item, (_, path, vector, error, elapsed) in zip(rows, back):
        assert path == item.source and error == item.error and elapsed == item.elapsed_ms
        if item.vector is None:
            assert np.isnan(vector).all()  # failed images keep their row, marked NaN
        else:
            assert vector.dtype == np.float32 and np.array_equal(vector, item.vector)
    assert len(list(store.chunks())) == -(-5 // chunk_rows)


def test_small_frames_are_joined_into_chunks_of_at_least_rows(tmp_path):
    rows = items(5)
    write_store(tmp_path / "s.emb", rows, chunk_rows=2)
    chunks = list(EmbeddingStore(tmp_path / "s.emb").chunks(rows=3))
    assert [(c.start, len(c.paths)) for c in chunks] == [(0, 4), (4, 1)]
    assert [p for c in chunks for p in c.paths] == [item.source for item in rows]
    joined = np.concatenate([c.vectors for c in chunks])
    assert np.array_equal(joined, np.stack([r[2] for r in read_rows(tmp_path / "s.emb")]), equal_nan=True)
    assert [c.ok.tolist() for c in chunks] == [[True, True, False, True], [True]]


def test_header_is_one_json_line_naming_the_model(tmp_path):
    write_store(tmp_path / "s.emb", items(3))
    with open(tmp_path / "s.emb", "rb") as handle:
        header = json.loads(handle.readline())
    assert header["model"] == IDENTITY.model and header["revision"] == IDENTITY.revision
    assert header["format"] == "visual-buffet-siglip/embeddings" and header["dtype"] == "float32"


def test_rows_reach_the_file_before_close(tmp_path):
    path = tmp_path / "s.emb"
    writer = EmbeddingWriter(path, IDENTITY, chunk_rows=2)
    for item in items(3, fail=frozenset()):
        writer.write(item.source, item)
    assert len(read_rows(path)) == 2  # one full chunk is already durable, the third row still buffered
    writer.close()
    assert len(read_rows(path)) == 3


def test_interval_flush_writes_without_a_full_chunk(tmp_path):
    path = tmp_path / "s.emb"
    writer = EmbeddingWriter(path, IDENTITY, chunk_rows=1000, flush_seconds=0.0)
    writer.write("a.jpg", items(1, fail=frozenset())[0])
    assert [r[1] for r in read_rows(path)] == ["a.jpg"]
    writer.close()


def test_every_truncation_keeps_exactly_the_complete_chunks(tmp_path, caplog):
    path = tmp_path / "s.emb"
    write_store(path, items(4), chunk_rows=2)
    data = path.read_bytes()
    header_end = data.index(b"\n") + 1
    first_end = header_end + 16 + int.from_bytes(data[header_end:header_end + 8], "little")
    cut = tmp_path / "cut.emb"
    for size in range(header_end, len(data)):
        cut.write_bytes(data[:size])
        with caplog.at_level(logging.WARNING, logger="visual_buffet_siglip.store"):
            caplog.clear()
            got = [r[1] for r in read_rows(cut)]
        assert got == ([f"photos/ä {i}.jpg" for i in range(2)] if size >= first_end else []), size
        assert ("incomplete chunk" in caplog.text) == (size not in (header_end, first_end)), size


_KILLED_WRITER = """
import sys, numpy as np
from collections import namedtuple
from visual_buffet_siglip.store import EmbeddingWriter, StoreIdentity
identity = StoreIdentity("m", "hub:1", 64, "fast", None, "float32", "none")
ImageEmbedding = namedtuple("ImageEmbedding", "index source vector error elapsed_ms")  # no torch import
writer = EmbeddingWriter(sys.argv[1], identity, chunk_rows=3)
i = 0
while True:
    writer.write(f"{i}.jpg", ImageEmbedding(i, f"{i}.jpg", np.eye(64, dtype=np.float32)[i % 64], None, 1.0))
    i += 1
"""


def test_a_killed_tagging_run_keeps_what_it_wrote(tmp_path):
    path = tmp_path / "s.emb"
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, str(path)])
    try:
        deadline = time.monotonic() + 60
        while (not path.exists() or path.stat().st_size < 200_000) and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    rows = read_rows(path)
    assert len(rows) >= 3 and len(rows) % 3 == 0  # whole chunks only
    assert all(name == f"{i}.jpg" and vector[i % 64] == 1 for i, name, vector, _, _ in rows)


def test_existing_file_is_never_overwritten(tmp_path):
    path = tmp_path / "s.emb"
    path.write_text("precious")
    with pytest.raises(StoreError, match="already exists"):
        EmbeddingWriter(path, IDENTITY)
    assert path.read_text() == "precious"


@pytest.mark.parametrize("content, message", [
    (None, "does not exist"),
    (b"path,tags\na.jpg,dog\n", "is not an embedding store"),
    (b'{"format": "visual-buffet-siglip/embeddings", "format_version": 99}\n', "format version 99"),
])
def test_unusable_files_are_named_with_what_to_do(tmp_path, content, message):
    path = tmp_path / "s.emb"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(StoreError, match=message) as caught:
        EmbeddingStore(path)
    assert str(path) in str(caught.value)


def test_damaged_chunk_is_reported_never_scored(tmp_path, caplog):
    path = tmp_path / "s.emb"
    write_store(path, items(2))
    data = bytearray(path.read_bytes())
    data[-40:] = b"x" * 40  # same length, broken content
    path.write_bytes(bytes(data))
    wide = tmp_path / "wide.emb"
    write_store(wide, items(2))
    header, rest = wide.read_bytes().split(b"\n", 1)
    wide.write_bytes(json.dumps({**json.loads(header), "dim": 9}).encode() + b"\n" + rest)
    for broken in (path, wide):
        store = EmbeddingStore(broken)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="visual_buffet_siglip.store"):
            assert list(store.chunks()) == []
        assert store.damaged and "damaged after row 0" in caplog.text and str(broken) in caplog.text


def test_identity_round_trips_through_the_header(tmp_path):
    naflex = replace(IDENTITY, max_num_patches=256, decode="exact", dtype="bfloat16")
    with EmbeddingWriter(tmp_path / "s.emb", naflex):
        pass
    assert EmbeddingStore(tmp_path / "s.emb").identity == naflex


# --- integrity: checksums, damage reported with the rows kept, old stores, odd names --------------

def frame_offsets(path) -> list[int]:
    return [end for _, end in EmbeddingStore(path).frames()]


def test_a_flipped_bit_in_a_row_is_damage_not_wrong_tags(tmp_path, caplog):
    path = tmp_path / "s.emb"
    write_store(path, items(4, fail=frozenset()), chunk_rows=2)
    data = bytearray(path.read_bytes())
    first_end = frame_offsets(path)[0]
    vector_bytes = items(4, fail=frozenset())[2].vector.tobytes()
    at = data.index(vector_bytes, first_end)  # row 2 lives in the second frame
    data[at] ^= 0x01  # the lowest mantissa bit: still a unit vector, so only a checksum notices
    path.write_bytes(bytes(data))
    store = EmbeddingStore(path)
    with caplog.at_level(logging.WARNING, logger="visual_buffet_siglip.store"):
        rows = [name for chunk in store.chunks() for name in chunk.paths]
    assert rows == ["photos/ä 0.jpg", "photos/ä 1.jpg"]
    assert store.damaged and "damaged" in caplog.text and "2 rows" in caplog.text and str(path) in caplog.text


def test_a_broken_length_field_is_damage_not_a_torn_end(tmp_path, caplog):
    path = tmp_path / "s.emb"
    write_store(path, items(6, fail=frozenset()), chunk_rows=2)
    data = bytearray(path.read_bytes())
    second = frame_offsets(path)[0]
    data[second + 5] ^= 0x40  # the length now points far past the end of the file
    path.write_bytes(bytes(data))
    store = EmbeddingStore(path)
    with caplog.at_level(logging.WARNING, logger="visual_buffet_siglip.store"):
        assert len(read_rows(path)) == 2
        list(store.chunks())
    assert store.damaged and "damaged" in caplog.text and "incomplete" not in caplog.text


def test_a_torn_last_frame_is_not_damage(tmp_path):
    path = tmp_path / "s.emb"
    write_store(path, items(4), chunk_rows=2)
    os.truncate(path, path.stat().st_size - 3)
    store = EmbeddingStore(path)
    assert [len(c.paths) for c in store.chunks()] == [2] and not store.damaged


def write_version_1_store(path, rows) -> None:
    """A store as 0.1.0 wrote it: no checksums."""
    from safetensors.numpy import save

    header = {"format": "visual-buffet-siglip/embeddings", "format_version": 1, **IDENTITY.__dict__}
    vectors = np.stack([item.vector for item in rows])
    metadata = {"paths": json.dumps([item.source for item in rows]), "errors": json.dumps([None] * len(rows)),
                "elapsed_ms": json.dumps([1.0] * len(rows))}
    document = save({"embeddings": vectors}, metadata=metadata)
    path.write_bytes(json.dumps(header).encode() + b"\n" + len(document).to_bytes(8, "little") + document)


def test_a_version_1_store_is_read_with_a_warning(tmp_path, caplog):
    path = tmp_path / "old.emb"
    rows = items(3, fail=frozenset())
    write_version_1_store(path, rows)
    with caplog.at_level(logging.WARNING, logger="visual_buffet_siglip.store"):
        back = read_rows(path)
    assert [r[1] for r in back] == [item.source for item in rows]
    assert "without checksums" in caplog.text


def test_a_garbled_frame_in_an_old_store_is_a_store_error_not_unexpected(tmp_path, caplog):
    path = tmp_path / "old.emb"
    write_version_1_store(path, items(3, fail=frozenset()))
    data = bytearray(path.read_bytes())
    start = data.index(b"\n") + 1 + 8
    data[start:start + 8] = b"\xff" * 8  # the safetensors header size: nonsense
    path.write_bytes(bytes(data))
    store = EmbeddingStore(path)
    with caplog.at_level(logging.WARNING, logger="visual_buffet_siglip.store"):
        assert list(store.chunks()) == []
    assert store.damaged and "0 rows" in caplog.text


def test_names_that_are_not_utf8_round_trip(tmp_path):
    path = tmp_path / "s.emb"
    rows = items(2, fail=frozenset())
    odd = os.fsdecode(b"caf\xe9.jpg")
    write_store(path, [ImageEmbedding(0, odd, rows[0].vector, None, 1.0), rows[1]])
    assert [r[1] for r in read_rows(path)] == [odd, rows[1].source]


def test_a_new_store_appears_whole_or_not_at_all(tmp_path, monkeypatch):
    path = tmp_path / "s.emb"

    def full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(StoreError, match="No space left on device"):
        EmbeddingWriter(path, IDENTITY)
    assert list(tmp_path.iterdir()) == []


def test_a_version_1_store_is_continued_in_its_own_format(tmp_path):
    path = tmp_path / "old.emb"
    rows = items(4, fail=frozenset())
    write_version_1_store(path, rows[:2])
    store = EmbeddingStore(path)
    handle = open(path, "r+b")
    handle.seek(0, os.SEEK_END)
    with EmbeddingWriter(path, store.identity, handle=handle, version=store.version) as writer:
        for item in rows[2:]:
            writer.write(item.source, item)
    assert [r[1] for r in read_rows(path)] == [item.source for item in rows]
    assert not EmbeddingStore(path).damaged
