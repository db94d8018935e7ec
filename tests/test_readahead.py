"""Read-ahead for one-image-at-a-time callers: which images get embedded, in which batches, and when not."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from visual_buffet_siglip.readahead import ImageReadAhead


class FakeTagger:
    """Records the batches it is asked to embed; an 'embedding' just names its source."""

    batch_size = 4

    def __init__(self) -> None:
        self.batches: list[list[str]] = []

    def iter_image_embeddings(self, sources):
        sources = list(sources)
        self.batches.append([Path(s).name for s in sources])
        return iter([SimpleNamespace(source=s) for s in sources])


@pytest.fixture
def folder(tmp_path) -> Path:
    """Ten "photos" plus files read-ahead must never pick: a text file, a dot-file, a subfolder."""
    for i in range(10):
        (tmp_path / f"a{i}.jpg").write_bytes(b"jpeg %d" % i)
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / ".hidden.jpg").write_bytes(b"hidden")
    (tmp_path / "sub.jpg").mkdir()
    return tmp_path


def walk(reader, tagger, paths):
    for path in paths:
        assert reader.embedding(tagger, path).source == str(path)  # each request gets its own image


def test_a_folder_walk_is_embedded_in_growing_batches_each_image_once(folder):
    reader, tagger = ImageReadAhead(), FakeTagger()
    walk(reader, tagger, sorted(folder.glob("a*.jpg")))
    assert tagger.batches == [["a0.jpg"], ["a1.jpg", "a2.jpg"], ["a3.jpg", "a4.jpg", "a5.jpg", "a6.jpg"],
                              ["a7.jpg", "a8.jpg", "a9.jpg"]]


def test_any_order_embeds_each_image_once(folder):
    reader, tagger = ImageReadAhead(), FakeTagger()
    order = [folder / f"a{i}.jpg" for i in (9, 8, 7, 6, 5, 4, 3, 2, 1, 0)]
    walk(reader, tagger, order)
    embedded = [name for batch in tagger.batches for name in batch]
    assert sorted(embedded) == sorted(p.name for p in order) and len(tagger.batches) == 4


def test_retag_is_served_from_memory_until_a_file_changes(folder):
    reader, tagger = ImageReadAhead(), FakeTagger()
    paths = sorted(folder.glob("a*.jpg"))
    walk(reader, tagger, paths)
    tagger.batches.clear()
    walk(reader, tagger, paths)
    assert tagger.batches == []
    paths[5].write_bytes(b"edited, longer content")
    walk(reader, tagger, paths)
    assert tagger.batches == [["a5.jpg"]]


def test_a_new_tagger_starts_from_an_empty_cache(folder):
    reader, first, second = ImageReadAhead(), FakeTagger(), FakeTagger()
    path = folder / "a0.jpg"
    walk(reader, first, [path])
    walk(reader, second, [path])
    assert first.batches[0][0] == second.batches[0][0] == "a0.jpg"


def test_single_images_and_unreadable_paths_are_embedded_alone(folder, tmp_path):
    reader, tagger = ImageReadAhead(), FakeTagger()
    other = tmp_path / "elsewhere"
    other.mkdir()
    (other / "b0.jpg").write_bytes(b"b0")
    missing = folder / "missing.jpg"
    walk(reader, tagger, [folder / "a0.jpg", other / "b0.jpg", folder / "a1.jpg", missing, missing])
    # a folder switch restarts the ramp; a path that cannot be stat'ed is neither cached nor read ahead
    assert tagger.batches == [["a0.jpg"], ["b0.jpg"], ["a1.jpg"], ["missing.jpg"], ["missing.jpg"]]


def test_memory_is_bounded(folder):
    reader, tagger = ImageReadAhead(capacity=3), FakeTagger()
    paths = sorted(folder.glob("a*.jpg"))
    for path in paths:
        walk(reader, tagger, [path])
        assert len(reader._cache) <= 3
    tagger.batches.clear()
    walk(reader, tagger, paths)
    assert tagger.batches  # evicted images are embedded again when asked for
