"""Re-tag and search from stored embeddings: equal to a fresh run, no image opened, no vision pass."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import replace

import numpy as np
import pytest
from conftest import LABELS, make_settings

from visual_buffet_siglip import retag as retag_module
from visual_buffet_siglip import scoring
from visual_buffet_siglip.cli import main
from visual_buffet_siglip.commands import run_tagging
from visual_buffet_siglip.engine import SiglipTagger
from visual_buffet_siglip.errors import UsageError
from visual_buffet_siglip.outputs import Sink
from visual_buffet_siglip.retag import retag, search
from visual_buffet_siglip.store import EmbeddingStore, EmbeddingWriter, StoreError, StoreIdentity
from visual_buffet_siglip.vocabulary import normalize_labels

OLD = LABELS[:8]
NEW = LABELS[8:] + ["dog", "a label nobody used before"]


@pytest.fixture
def photos(tmp_path, images) -> list[str]:
    """Copies of the test images plus one corrupt file, so a test may delete them."""
    folder = tmp_path / "photos"
    folder.mkdir()
    paths = [str(shutil.copy(image, folder / image.name)) for image in images]
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff" + b"\x00" * 40)
    return paths[:2] + [str(folder / "broken.jpg")] + paths[2:]


class Collect(Sink):
    def __init__(self):
        self.records: list[dict] = []

    def write(self, path, item, record):
        self.records.append(record)


def tag_into_store(tagger: SiglipTagger, paths: list[str], store_path, labels=OLD, chunk_rows=2) -> list[dict]:
    """What `tag --save-embeddings` does (the writer is one more sink of the run); that run's records."""
    collect = Collect()
    run_tagging(tagger, paths, [EmbeddingWriter.for_tagger(store_path, tagger, chunk_rows=chunk_rows), collect],
                quiet=True, labels=labels)
    return collect.records


def forbid_images(monkeypatch, tagger: SiglipTagger, paths: list[str]) -> None:
    """Delete the photos and make any vision pass fail loudly."""
    for path in paths:
        os.unlink(path)

    def no_vision(*args, **kwargs):
        raise AssertionError("re-tagging ran the vision tower")

    model = tagger.loaded.model
    monkeypatch.setattr(model, "get_image_features", no_vision)
    monkeypatch.setattr(model.vision_model, "forward", no_vision)


def assert_same_records(got: list[dict], expected: list[dict], *, timed: bool = True) -> None:
    """Equal records, confidences within 1e-6; `timed=False` for a fresh run, whose timings differ."""
    skip = {"tags"} if timed else {"tags", "inference_time_ms"}
    assert len(got) == len(expected)
    for ours, fresh in zip(got, expected):
        assert ours.keys() == fresh.keys()
        assert {k: v for k, v in ours.items() if k not in skip} == {k: v for k, v in fresh.items() if k not in skip}
        assert [t["label"] for t in ours["tags"]] == [t["label"] for t in fresh["tags"]]
        diffs = [abs(a["confidence"] - b["confidence"]) for a, b in zip(ours["tags"], fresh["tags"])]
        assert max(diffs, default=0.0) <= 1e-6


def test_retag_with_new_labels_equals_a_fresh_run_without_the_photos(checkpoint, photos, tmp_path, monkeypatch):
    tagger = SiglipTagger(make_settings(checkpoint))
    original = tag_into_store(tagger, photos, tmp_path / "s.emb")
    fresh = tagger.tag(photos, labels=NEW)  # a second full run with the new vocabulary
    assert "error" in fresh[2] and all("error" not in r for i, r in enumerate(fresh) if i != 2)
    forbid_images(monkeypatch, tagger, [p for i, p in enumerate(photos) if i != 2])

    store = EmbeddingStore(tmp_path / "s.emb")
    got = list(retag(store, tagger, labels=NEW))
    assert [path for path, _ in got] == photos
    assert_same_records([record for _, record in got], fresh, timed=False)
    assert len(fresh[0]["tags"]) == len(normalize_labels(NEW))  # threshold 0: every label compared
    # the same labels give back the original records, timings of the vision pass included
    assert_same_records([record for _, record in retag(store, tagger, labels=OLD)], original)
    monkeypatch.setattr(retag_module, "RETAG_ROWS", 1)  # one scoring call per stored frame instead
    assert_same_records([record for _, record in retag(store, tagger, labels=NEW)], [record for _, record in got])


def test_retag_applies_threshold_and_max_tags_like_tag(checkpoints, photos, tmp_path):
    tagger = SiglipTagger(make_settings(checkpoints["siglip"], confidence_threshold=0.05, max_tags=3))
    expected = tag_into_store(tagger, photos, tmp_path / "s.emb", labels=None)
    got = [record for _, record in retag(EmbeddingStore(tmp_path / "s.emb"), tagger)]
    assert_same_records(got, expected)
    assert {len(r["tags"]) for r in got} - {0} and max(len(r["tags"]) for r in got) <= 3
    strict = [record for _, record in retag(EmbeddingStore(tmp_path / "s.emb"), tagger, threshold=0.2, max_tags=1)]
    assert_same_records(strict, tagger.tag(photos, threshold=0.2, max_tags=1), timed=False)


def test_search_ranks_like_scoring_every_image(checkpoints, photos, tmp_path, monkeypatch):
    tagger = SiglipTagger(make_settings(checkpoints["siglip"]))
    tag_into_store(tagger, photos, tmp_path / "s.emb", chunk_rows=1)  # the best-so-far merges across frames
    good = [p for i, p in enumerate(photos) if i != 2]
    brute = tagger.score(tagger.embed_images(good), tagger.embed_texts(["a red car"]))[:, 0]
    order = sorted(range(len(good)), key=lambda i: -brute[i])
    forbid_images(monkeypatch, tagger, good)

    store = EmbeddingStore(tmp_path / "s.emb")
    hits = search(store, tagger, "  A Red   CAR ", k=3)  # lowercased and prompted like a label
    assert [h.path for h in hits] == [good[i] for i in order[:3]]
    assert max(abs(h.score - brute[i]) for h, i in zip(hits, order)) <= 1e-6
    everything = search(store, tagger, "a red car", k=50)
    assert [h.path for h in everything] == [good[i] for i in order]  # the failed image is never a hit
    with pytest.raises(UsageError, match="query is empty"):
        search(store, tagger, "   ")


def test_store_from_another_model_is_refused_naming_both(checkpoints, photos, tmp_path):
    made = SiglipTagger(make_settings(checkpoints["siglip"]))
    tag_into_store(made, photos[:1], tmp_path / "s.emb")
    other = SiglipTagger(make_settings(checkpoints["siglip2"]))
    for run in (lambda s: retag(s, other), lambda s: search(s, other, "dog")):
        with pytest.raises(StoreError) as caught:
            run(EmbeddingStore(tmp_path / "s.emb"))
        message = str(caught.value)
        assert str(checkpoints["siglip"]) in message and str(checkpoints["siglip2"]) in message
        assert str(tmp_path / "s.emb") in message and "--model" in message


def test_settings_that_change_embeddings_must_match(checkpoints, tmp_path):
    tagger = SiglipTagger(make_settings(checkpoints["naflex"], max_num_patches=64))
    identity = StoreIdentity.of(tagger)
    assert identity.max_num_patches == 64 and identity.dim == 32
    with EmbeddingWriter(tmp_path / "s.emb", replace(identity, decode="exact", max_num_patches=128)):
        pass
    with pytest.raises(StoreError) as caught:
        retag(EmbeddingStore(tmp_path / "s.emb"), tagger)
    message = str(caught.value)
    assert "decode 'exact'" in message and "--decode exact" in message
    assert "max_num_patches 128" in message and "--max-num-patches 128" in message
    fixed = SiglipTagger(make_settings(checkpoints["naflex"], max_num_patches=128, decode="exact"))
    assert list(retag(EmbeddingStore(tmp_path / "s.emb"), fixed)) == []


def test_interrupted_tagging_keeps_what_it_computed(checkpoints, photos, tmp_path):
    tagger = SiglipTagger(make_settings(checkpoints["siglip"]))

    class CtrlC(Sink):
        def write(self, path, item, record):
            if item.index == 3:
                raise KeyboardInterrupt

    writer = EmbeddingWriter.for_tagger(tmp_path / "s.emb", tagger, chunk_rows=100)
    with pytest.raises(KeyboardInterrupt):
        run_tagging(tagger, photos, [writer, CtrlC()], quiet=True)
    kept = [path for path, _ in retag(EmbeddingStore(tmp_path / "s.emb"), tagger)]
    assert kept == photos[:4]  # the writer saw image 3 before the interruption


def test_cli_tag_once_then_retag_and_search(checkpoints, photos, tmp_path, capsys):
    ckpt = ["--model", str(checkpoints["siglip"]), "--device", "cpu", "--dtype", "float32", "--threshold", "0"]
    new_labels = tmp_path / "new.txt"
    new_labels.write_text("# a new vocabulary\n" + "\n".join(NEW), encoding="utf-8")
    store = str(tmp_path / "s.emb")
    fresh = str(tmp_path / "fresh.jsonl")
    assert main(["-q", "tag", *photos, "--save-embeddings", store, "--format", "jsonl", "-o", str(tmp_path / "t.jsonl"),
                 *ckpt]) == 1  # one corrupt photo
    assert main(["-q", "tag", *photos, "--labels-file", str(new_labels), "--format", "jsonl", "-o", fresh, *ckpt]) == 1
    capsys.readouterr()

    assert main(["-q", "retag", store, "--labels-file", str(new_labels), "--format", "jsonl", *ckpt]) == 1
    got = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert_same_records(got, [json.loads(line) for line in open(fresh, encoding="utf-8")], timed=False)
    assert [r["path"] for r in got] == photos

    assert main(["-q", "search", store, "a dog on a beach", "-k", "2", "--format", "jsonl", *ckpt]) == 0
    hits = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(hits) == 2 and hits[0]["score"] >= hits[1]["score"] and hits[0]["path"] in photos
    assert main(["-q", "search", store, "a dog on a beach", "-k", "1", *ckpt]) == 0
    assert capsys.readouterr().out.split() == [f"{hits[0]['score']:.4f}", hits[0]["path"]]

    before = open(store, "rb").read()
    assert main(["-q", "tag", *photos[:1], "--save-embeddings", store, *ckpt]) == 2
    assert "already exists" in capsys.readouterr().err and open(store, "rb").read() == before
    other = ["--model", str(checkpoints["naflex"]), "--device", "cpu"]
    assert main(["-q", "retag", store, *other]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "was made with model" in captured.err


def test_embed_images_marks_a_failed_image_with_a_nan_row(checkpoints, photos):
    tagger = SiglipTagger(make_settings(checkpoints["siglip2"]))
    vectors = tagger.embed_images(photos)
    assert vectors.dtype == np.float32 and vectors.shape[0] == len(photos)
    assert np.isnan(vectors[2]).all()
    good = np.delete(vectors, 2, axis=0)
    assert np.array_equal(good, tagger.embed_images(photos[:2] + photos[3:]))  # the others are unaffected
    assert np.allclose(np.linalg.norm(good, axis=1), 1.0, atol=1e-6)
    assert np.isnan(tagger.score(vectors, tagger.embed_texts(["dog"]))[2]).all()


def test_narrow_label_sets_score_like_wide_ones(checkpoints):
    # a search scores 1 label (numpy einsum path), tagging many (float64 BLAS path): same numbers
    tagger = SiglipTagger(make_settings(checkpoints["siglip"]))
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((300, 32)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    text = tagger.embed_texts(LABELS)
    wide = tagger.score(vectors, text)
    for k in (1, scoring.NARROW_SCORING, scoring.NARROW_SCORING + 1):
        narrow = tagger.score(vectors, text[:k])
        assert narrow.dtype == np.float32 and np.abs(narrow - wide[:, :k]).max() <= 1e-7
    assert wide.std() > 1e-2  # the scores really vary


def test_resumed_tag_run_completes_the_store(checkpoints, photos, tmp_path, capsys):
    ckpt = ["--model", str(checkpoints["siglip"]), "--device", "cpu", "--dtype", "float32"]
    output, store = tmp_path / "tags.jsonl", tmp_path / "s.emb"
    assert main(["-q", "tag", *photos, "--format", "jsonl", "-o", str(output), *ckpt]) == 1
    lines = output.read_text(encoding="utf-8").splitlines(keepends=True)
    # a kill: the output has images 0-2 (2 is the broken one), the store only 0-1 and a torn frame
    output.write_text("".join(lines[:3]), encoding="utf-8")
    tag_into_store(SiglipTagger(make_settings(checkpoints["siglip"])), photos, store)
    frames = [end for _, end in EmbeddingStore(store).frames()]
    with open(store, "r+b") as handle:
        handle.truncate(frames[1] - 5)

    assert main(["-q", "tag", *photos, "--format", "jsonl", "-o", str(output), "--resume",
                 "--save-embeddings", str(store), *ckpt]) == 0  # images 3-4, both fine
    tagger = SiglipTagger(make_settings(checkpoints["siglip"]))
    got = list(retag(EmbeddingStore(store), tagger))
    # image 2 was embedded first (the output had it, the store did not), then the rest: each once
    assert [path for path, _ in got] == photos
    assert_same_records([record for _, record in got], tagger.tag(photos), timed=False)
    other = ["--model", str(checkpoints["naflex"]), "--device", "cpu"]
    assert main(["-q", "tag", *photos, "--format", "jsonl", "-o", str(tmp_path / "x.jsonl"), "--resume",
                 "--save-embeddings", str(store), *other]) == 2
    assert "was made with model" in capsys.readouterr().err
