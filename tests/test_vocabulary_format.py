"""The vocabulary file format (per-label thresholds, `off`, keyword paths) and the one tag selection."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from visual_buffet_siglip.config import ConfigError, Settings, builtin_vocabulary
from visual_buffet_siglip.vocabulary import (MAX_FILE_BYTES, TagOptions, Vocabulary, VocabularyEntry,
                                             format_vocabulary, parse_vocabulary, read_vocabulary, select)


def test_columns_parse_with_defaults():
    vocab = parse_vocabulary("# mine\n\nGolden  Retriever\t0.04\tAnimals|Dogs|Golden retriever\n"
                             "blurry photo\tOFF\nsunset\t\tSky| Sunset \nplain\n")
    assert vocab.labels == ("golden retriever", "blurry photo", "sunset", "plain")
    assert vocab.get("golden retriever") == VocabularyEntry("golden retriever", 0.04, False,
                                                            ("Animals", "Dogs", "Golden retriever"))
    assert vocab.get("blurry photo").off and vocab.get("blurry photo").threshold is None
    assert vocab.get("sunset").keyword_path == ("Sky", "Sunset") and vocab.get("sunset").keyword == "Sunset"
    assert vocab.get("plain").keyword == "plain" and vocab.get("unknown") == VocabularyEntry("unknown")


def test_every_bad_line_is_reported_at_once_with_file_and_line():
    text = "ok\n\t0.3\ndog\t1.5\ncat\tmaybe\nbird\t0.1\tA||B\nx\t0.1\tA\textra\nok\t0.2\ncar\tnan\n"
    with pytest.raises(ConfigError) as info:
        parse_vocabulary(text, "v.tsv")
    problems = info.value.problems
    assert [p.split(":")[0] for p in problems] == [f"v.tsv, line {n}" for n in (2, 3, 4, 5, 6, 7, 8)]
    joined = "\n".join(problems)
    assert "no label" in joined and "'1.5'" in joined and "'maybe'" in joined and "empty part" in joined
    assert "at most 3" in joined and "also on line 1" in joined


def test_identical_repeats_are_kept_once():
    assert parse_vocabulary("dog\t0.1\nDOG\t0.1\ncat\ncat\n").labels == ("dog", "cat")


@given(st.lists(st.tuples(st.from_regex(r"[a-z][a-z ]{0,12}[a-z]", fullmatch=True),
                          st.one_of(st.none(), st.just("off"), st.floats(0, 1)),
                          st.one_of(st.none(), st.lists(st.from_regex(r"[A-Za-z][A-Za-z ]{0,8}[a-z]",
                                                                      fullmatch=True), min_size=1, max_size=3))),
                unique_by=lambda e: " ".join(e[0].split()), max_size=8))
def test_format_round_trips(rows):
    entries = tuple(VocabularyEntry(" ".join(label.split()), None if t in (None, "off") else t, t == "off",
                                    None if path is None else tuple(" ".join(p.split()) for p in path))
                    for label, t, path in rows)
    assert parse_vocabulary(format_vocabulary(entries, header="a header")).entries == entries


def test_builtin_vocabulary_parses_with_its_keyword_paths():
    labels = builtin_vocabulary()
    assert len(labels) >= 1000 and Settings.from_mapping({}).options.labels == labels
    assert all(label == label.lower() for label in labels)


def test_plain_labels_file_still_works(tmp_path):
    path = tmp_path / "labels.txt"
    path.write_text("\ufeffCat\n# comment\n\n  red   car \ncat\n", encoding="utf-8")  # a BOM, too
    settings = Settings.from_mapping({"labels_file": str(path)})
    assert settings.options.labels == ("cat", "red car")
    assert settings.options.vocabulary.get("cat") == VocabularyEntry("cat")


def test_labels_file_with_bad_lines_names_file_and_lines(tmp_path):
    path = tmp_path / "v.tsv"
    path.write_text("dog\t2\ncat\nfish\tsome\n", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        Settings.from_mapping({"labels_file": str(path)})
    assert len(info.value.problems) == 2
    assert all(str(path) in p for p in info.value.problems)
    assert "line 1" in info.value.problems[0] and "line 3" in info.value.problems[1]


# --- hostile labels files (issue 13 item 20) ----------------------------------------------------

def test_huge_sparse_labels_file_is_refused_without_reading_it(tmp_path):
    path = tmp_path / "huge.txt"
    with open(path, "wb") as handle:
        handle.truncate(1 << 30)  # 1 GB, sparse: reading it whole took 5.6 GB before
    with pytest.raises(ConfigError, match=r"1,073,741,824 bytes.*right file"):
        read_vocabulary(path)
    assert MAX_FILE_BYTES < 1 << 30


def test_overlong_line_is_an_error(tmp_path):
    path = tmp_path / "long.txt"
    path.write_text("dog\n" + "a" * 100_000 + "\ncat\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"line 2: the line is 100,000 characters long"):
        read_vocabulary(path)


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="needs /dev/zero")
def test_device_and_folder_say_what_they_are(tmp_path):
    for block in ({"labels_file": "/dev/zero"}, {"labels_file": str(tmp_path)}):
        with pytest.raises(ConfigError) as info:
            Settings.from_mapping(block)
        [problem] = info.value.problems
        assert ("character device" in problem or "folder" in problem) and "no such file" not in problem
    with pytest.raises(ConfigError, match="character device"):
        read_vocabulary("/dev/zero")
    with pytest.raises(ConfigError, match="folder"):
        read_vocabulary(tmp_path)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_fifo_labels_file_does_not_hang(tmp_path):
    fifo = tmp_path / "labels.fifo"
    os.mkfifo(fifo)
    with pytest.raises(ConfigError, match="pipe"):
        read_vocabulary(fifo)


def test_invalid_utf8_names_the_line(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("dog\ncaf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"line 2: not UTF-8"):
        read_vocabulary(path)


def test_threshold_key_gets_did_you_mean():
    with pytest.raises(ConfigError) as info:
        Settings.from_mapping({"threshold": 0.02})
    assert "did you mean 'confidence_threshold'" in info.value.problems[0]


# --- selection ----------------------------------------------------------------------------------

@given(st.lists(st.tuples(st.sampled_from([0.0, 0.01, 0.25, 0.5, 0.75, 1.0]),
                          st.one_of(st.none(), st.just("off"), st.sampled_from([0.0, 0.3, 0.6, 1.0]))),
                max_size=12),
       st.sampled_from([0.0, 0.01, 0.5, 1.0]), st.integers(1, 5))
def test_select_applies_own_thresholds_off_global_and_cap(rows, threshold, max_tags):
    labels = [f"label {chr(97 + i)}" for i in range(len(rows))][::-1]  # ties must break by label
    scores = np.array([score for score, _ in rows], dtype=np.float32)
    entries = tuple(VocabularyEntry(label, None if own in (None, "off") else own, own == "off")
                    for label, (_, own) in zip(labels, rows))
    options = TagOptions(Vocabulary(entries), threshold, max_tags)
    expected = sorted(((float(s), e.label) for e, s in zip(entries, scores)
                       if not e.off and s >= (threshold if e.threshold is None else e.threshold)),
                      key=lambda pair: (-pair[0], pair[1]))[:max_tags]
    assert select(labels, scores, options) == [{"label": label, "confidence": conf} for conf, label in expected]


def test_labels_outside_the_vocabulary_use_the_global_threshold():
    options = TagOptions(parse_vocabulary("dog\t0.5\ncat\toff\n"), 0.1, 10)
    got = select(["dog", "cat", "candidate"], np.array([0.4, 0.9, 0.2]), options)
    assert got == [{"label": "candidate", "confidence": 0.2}]
    assert options.threshold_for("cat") is None and math.isinf(options.cutoffs(["cat"])[0])


def test_explore_keeps_off_labels_for_reports():
    options = TagOptions(parse_vocabulary("dog\t0.5\ncat\toff\n"), 0.1, 10).explore(0.001)
    assert [t["label"] for t in select(["dog", "cat"], np.array([0.4, 0.9]), options)] == ["cat", "dog"]


# --- encoding large or long label sets (issue 13 item 20) ---------------------------------------

def test_long_labels_warn_once_that_they_are_truncated(checkpoints, caplog):
    from conftest import make_settings

    from visual_buffet_siglip.engine import SiglipTagger

    tagger = SiglipTagger(make_settings(checkpoints["siglip"]))
    long_labels = [f"{word} " * 80 + "dog" for word in ("red", "blue")]
    with caplog.at_level("WARNING", logger="visual_buffet_siglip"):
        tagger.embed_texts(["cat", *long_labels])
        tagger.embed_texts(long_labels)  # already encoded: no second warning
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "2 label(s) are longer than the model's 64 tokens" in warnings[0]
    assert "'red red" in warnings[0] and "cat" not in warnings[0]


def test_many_labels_show_progress_with_an_estimate(checkpoints, caplog, monkeypatch):
    from conftest import make_settings

    from visual_buffet_siglip import engine

    monkeypatch.setattr(engine, "PROGRESS_LABELS", 20)
    monkeypatch.setattr(engine, "PROGRESS_SECONDS", 0.0)
    monkeypatch.setattr(engine, "TEXT_SAVE_EVERY", 8)
    tagger = engine.SiglipTagger(make_settings(checkpoints["siglip"]))
    with caplog.at_level("INFO", logger="visual_buffet_siglip"):
        tagger.embed_texts([f"label {i}" for i in range(30)])
    messages = [r.getMessage() for r in caplog.records]
    assert any("encoding 30 labels with the text tower" in m for m in messages)
    assert any("encoding labels: 8 of 30 (26%), about" in m and m.endswith(" left") for m in messages)


def test_every_caller_selects_with_the_vocabulary(checkpoints, images, tmp_path):
    """tag, retag, the pluggy hook and a Ray actor's batch call give the same per-label selection."""
    pa = pytest.importorskip("pyarrow")
    from conftest import LABELS, make_settings

    from visual_buffet_siglip import plugin
    from visual_buffet_siglip.distributed import TagBatches, actor_settings, row_to_record
    from visual_buffet_siglip.engine import SiglipTagger
    from visual_buffet_siglip.retag import retag
    from visual_buffet_siglip.store import EmbeddingStore, EmbeddingWriter

    vocabulary = tmp_path / "v.tsv"
    lines = [f"{label}\t{('off', '0.9', '0', '')[i % 4]}\tThings|{label}" for i, label in enumerate(LABELS)]
    vocabulary.write_text("\n".join(lines), encoding="utf-8")
    mapping = make_settings(checkpoints["siglip"], confidence_threshold=0.5, max_tags=5).to_mapping()
    mapping.pop("labels")
    settings = Settings.from_mapping({**mapping, "labels_file": str(vocabulary)})
    paths = [str(p) for p in images]
    tagger = SiglipTagger(settings)
    store = tmp_path / "s.emb"
    with EmbeddingWriter.for_tagger(store, tagger) as writer:
        local = []
        for item, record in tagger.iter_tag(paths):
            writer.write(paths[item.index], item, record)
            local.append(record["tags"])
    own = {label.lower(): ("off", 0.9, 0.0, 0.5)[i % 4] for i, label in enumerate(LABELS)}
    kept = [tag for tags in local for tag in tags]
    assert kept and all(own[tag["label"]] != "off" and tag["confidence"] >= own[tag["label"]] for tag in kept)
    assert any(own[tag["label"]] == 0.0 and tag["confidence"] < 0.5 for tag in kept)  # own threshold below global
    assert [r["tags"] for _, r in retag(EmbeddingStore(store), tagger)] == local
    config = {"plugins": {"siglip": {**settings.to_mapping(), "labels_file": str(vocabulary)}}}
    assert [r["tags"] for r in plugin.visual_buffet_tag(images=paths, config=config)["results"]] == local
    from visual_buffet_siglip.vocabulary import format_vocabulary

    actor = TagBatches(actor_settings(settings), vocabulary=format_vocabulary(settings.options.vocabulary))
    rows = actor(pa.table({"path": paths})).to_pylist()
    assert [row_to_record(row)["tags"] for row in rows] == local
    assert len(vocabulary_entries := settings.options.vocabulary.entries) == len(LABELS)
    assert vocabulary_entries[0].keyword_path == ("Things", LABELS[0].lower())
