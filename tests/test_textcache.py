"""The on-disk label-embedding cache: hits, misses, invalidation, corruption, concurrency, location."""

from __future__ import annotations

import logging
import multiprocessing
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
from conftest import LABELS, make_settings

from visual_buffet_siglip import textcache
from visual_buffet_siglip.engine import SiglipTagger
from visual_buffet_siglip.textcache import CACHE_ENV, DiskLabelStore, LabelEmbeddingCache, cache_root
from visual_buffet_siglip.vocabulary import normalize_labels

LABELS_N = list(normalize_labels(LABELS))


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """A fresh cache root for this test."""
    root = tmp_path / "cache"
    monkeypatch.setenv(CACHE_ENV, str(root))
    return root


def cached_tagger(checkpoint, **overrides) -> SiglipTagger:
    return SiglipTagger(make_settings(checkpoint, text_cache=True, **overrides))


def files(root: Path) -> list[Path]:
    return sorted((root / textcache.SUBDIR).glob("*.safetensors"))


# --- hit and miss -------------------------------------------------------------------------------

def test_second_tagger_reads_the_disk_instead_of_encoding(checkpoint, cache, encoded):
    first = cached_tagger(checkpoint)
    cold = first.embed_texts(LABELS_N)
    assert sorted(encoded) == sorted(LABELS_N)
    assert first.label_cache.stats == {"memory": 0, "disk": 0, "missing": len(LABELS_N)}
    assert len(files(cache)) == 1

    encoded.clear()
    second = cached_tagger(checkpoint)  # a new tagger: an empty memory layer, like a new process
    warm = second.embed_texts(LABELS_N)
    assert encoded == []
    assert second.label_cache.stats["disk"] == len(LABELS_N)
    assert np.array_equal(cold, warm)  # bit for bit: the disk keeps float32 exactly

    second.embed_texts(LABELS_N)
    assert second.label_cache.stats["memory"] == len(LABELS_N)  # then from memory


def test_cached_and_uncached_tagging_agree(checkpoint, images, cache):
    cached_tagger(checkpoint).embed_texts(LABELS_N)  # fill the disk cache
    warm = cached_tagger(checkpoint).tag(images)
    plain = SiglipTagger(make_settings(checkpoint)).tag(images)
    assert warm == [dict(r, inference_time_ms=w["inference_time_ms"]) for r, w in zip(plain, warm)]


def test_an_extended_label_set_encodes_only_the_new_labels(checkpoints, cache, encoded):
    cached_tagger(checkpoints["siglip"]).embed_texts(LABELS_N[:10])
    encoded.clear()
    tagger = cached_tagger(checkpoints["siglip"])
    tagger.embed_texts(LABELS_N + ["lighthouse", "Red Car"])  # "red car" is known, in another case
    assert sorted(encoded) == sorted(LABELS_N[10:] + ["lighthouse"])
    assert len(files(cache)) == 1  # merged into the same file

    encoded.clear()
    cached_tagger(checkpoints["siglip"]).embed_texts(["lighthouse", *LABELS_N])
    assert encoded == []


def test_text_cache_false_writes_nothing(checkpoints, cache, encoded):
    SiglipTagger(make_settings(checkpoints["siglip"], text_cache=False)).embed_texts(LABELS_N)
    assert not (cache / textcache.SUBDIR).exists()  # (OpenVINO keeps its converted models beside it)
    encoded.clear()
    SiglipTagger(make_settings(checkpoints["siglip"], text_cache=False)).embed_texts(LABELS_N)
    assert sorted(encoded) == sorted(LABELS_N)


# --- invalidation -------------------------------------------------------------------------------

def test_another_model_does_not_reuse_embeddings(checkpoints, cache, encoded):
    cached_tagger(checkpoints["siglip"]).embed_texts(LABELS_N)
    encoded.clear()
    cached_tagger(checkpoints["siglip2"]).embed_texts(LABELS_N)
    assert sorted(encoded) == sorted(LABELS_N)
    assert len(files(cache)) == 2


def test_changed_weights_in_the_same_folder_invalidate(checkpoints, tmp_path, cache, encoded):
    folder = tmp_path / "model"
    shutil.copytree(checkpoints["siglip"], folder)  # copy2 keeps sizes and mtimes: the same weights
    cached_tagger(checkpoints["siglip"]).embed_texts(LABELS_N)
    encoded.clear()
    cached_tagger(folder).embed_texts(LABELS_N)
    assert encoded == []  # identical files are the same model, wherever they live

    from safetensors.numpy import load_file, save_file

    weights = folder / "model.safetensors"
    stat = weights.stat()
    tensors = load_file(weights)
    name = next(k for k in tensors if "text" in k and tensors[k].ndim == 2)
    tensors[name] = tensors[name] + np.float32(0.01)
    save_file(tensors, weights, metadata={"format": "pt"})
    import os

    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # even with the old mtime
    changed = cached_tagger(folder)
    changed.embed_texts(LABELS_N)
    assert sorted(encoded) == sorted(LABELS_N)


def test_dtype_change_invalidates(checkpoints, cache, encoded):
    cached_tagger(checkpoints["siglip"]).embed_texts(LABELS_N)
    encoded.clear()
    bf16 = cached_tagger(checkpoints["siglip"], dtype="bfloat16")
    bf16.embed_texts(LABELS_N)
    assert sorted(encoded) == sorted(LABELS_N)
    assert len(files(cache)) == 2


def test_key_covers_what_changes_an_embedding(checkpoints, cache):
    key = cached_tagger(checkpoints["siglip"]).text_cache_key()
    for field in ("model", "weights", "template", "max_length", "dtype", "quantization", "attention",
                  "device", "torch", "transformers", "tokenizers"):
        assert field in key, field
    assert key["template"] == "This is a photo of {label}." and key["max_length"] == 64
    other = dict(key, transformers="0.0.0")
    assert textcache.key_digest(other) != textcache.key_digest(key)


# --- corruption ---------------------------------------------------------------------------------

@pytest.mark.parametrize("damage", ["truncate", "garbage", "flip", "empty", "foreign"])
def test_a_corrupt_file_is_reported_ignored_and_rebuilt(checkpoints, cache, encoded, caplog, damage):
    checkpoint = checkpoints["siglip"]
    cold = cached_tagger(checkpoint).embed_texts(LABELS_N)
    [path] = files(cache)
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[:len(data) // 2])
    elif damage == "garbage":
        path.write_bytes(b"\x00not a safetensors file at all" * 10)
    elif damage == "flip":  # same size, one embedding byte changed: only the checksum notices
        flipped = bytearray(data)
        flipped[-5] ^= 0xFF
        path.write_bytes(bytes(flipped))
    elif damage == "empty":
        path.write_bytes(b"")
    else:  # a valid file written for another key
        other = textcache.encode({"dog": np.ones(4, np.float32)}, {"model": "something else"})
        path.write_bytes(other)

    encoded.clear()
    with caplog.at_level(logging.WARNING, logger="visual_buffet_siglip.textcache"):
        again = cached_tagger(checkpoint).embed_texts(LABELS_N)
    assert sorted(encoded) == sorted(LABELS_N)
    assert np.abs(again - cold).max() <= 1e-6
    assert str(path) in caplog.text and "unusable" in caplog.text

    encoded.clear()  # the file was rewritten and is good again
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="visual_buffet_siglip.textcache"):
        cached_tagger(checkpoint).embed_texts(LABELS_N)
    assert encoded == [] and "unusable" not in caplog.text


def test_an_unwritable_cache_falls_back_to_memory(checkpoints, tmp_path, monkeypatch, caplog, encoded):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the cache folder should be")
    monkeypatch.setenv(CACHE_ENV, str(blocker))
    tagger = cached_tagger(checkpoints["siglip"])
    with caplog.at_level(logging.WARNING, logger="visual_buffet_siglip.textcache"):
        vectors = tagger.embed_texts(LABELS_N)
        tagger.embed_texts(["lighthouse"])
    assert vectors.shape[0] == len(LABELS_N)
    assert caplog.text.count("disk cache off") == 1  # said once, not per label set


# --- concurrency --------------------------------------------------------------------------------

def _writer(root: str, worker: int, rounds: int) -> None:
    store = DiskLabelStore(Path(root), {"model": "concurrency-test"})
    rng = np.random.default_rng(worker)
    for i in range(rounds):
        store.add({f"w{worker}-label{i}": rng.standard_normal(16).astype(np.float32),
                   "shared": np.ones(16, np.float32)})


def test_concurrent_processes_keep_each_others_labels(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), w, 25)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    stored = DiskLabelStore(tmp_path, {"model": "concurrency-test"}).load()
    assert set(stored) == {"shared"} | {f"w{w}-label{i}" for w in range(4) for i in range(25)}
    assert not list((tmp_path / textcache.SUBDIR).glob(".*.tmp"))  # no temp file left behind


def test_concurrent_threads_encode_each_label_once(checkpoint, cache, encoded):
    tagger = cached_tagger(checkpoint)
    tagger.loaded  # noqa: B018
    results: list[np.ndarray] = []
    threads = [threading.Thread(target=lambda: results.append(tagger.embed_texts(LABELS_N))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(encoded) == sorted(LABELS_N)
    assert all(np.array_equal(r, results[0]) for r in results)


def test_memory_layer_rereads_a_file_another_process_extended(tmp_path):
    key = {"model": "reread"}
    mine = LabelEmbeddingCache(DiskLabelStore(tmp_path, key))
    mine.put({"dog": np.ones(4, np.float32)})
    DiskLabelStore(tmp_path, key).add({"cat": np.full(4, 2.0, np.float32)})  # "another process"
    found = mine.get(["dog", "cat"])
    assert set(found) == {"dog", "cat"} and mine.stats["disk"] == 1


# --- location -----------------------------------------------------------------------------------

def test_cache_root_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "env"))
    assert cache_root(str(tmp_path / "setting")) == tmp_path / "env"
    monkeypatch.delenv(CACHE_ENV)
    assert cache_root(str(tmp_path / "setting")) == tmp_path / "setting"
    monkeypatch.setattr(textcache.sys, "platform", "linux")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "visual-buffet-siglip"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")  # the XDG spec: relative paths are invalid
    assert cache_root() == Path.home() / ".cache" / "visual-buffet-siglip"
    monkeypatch.setattr(textcache.sys, "platform", "darwin")
    assert cache_root() == Path.home() / "Library" / "Caches" / "visual-buffet-siglip"
    monkeypatch.setattr(textcache.sys, "platform", "win32")
    monkeypatch.setenv("LOCALAPPDATA", str(tmp_path / "local"))
    assert cache_root() == tmp_path / "local" / "visual-buffet-siglip" / "Cache"


def test_cache_dir_setting_is_used(checkpoints, tmp_path, monkeypatch):
    monkeypatch.delenv(CACHE_ENV)
    folder = tmp_path / "my-cache"
    cached_tagger(checkpoints["siglip"], cache_dir=str(folder)).embed_texts(["dog"])
    assert len(files(folder)) == 1


def test_cli_no_text_cache_flag():
    from visual_buffet_siglip.cli import build_parser
    from visual_buffet_siglip.commands import settings_from_args

    args = build_parser().parse_args(["tag", "x.jpg", "--no-text-cache"])
    assert settings_from_args(args).model_settings.text_cache is False
    args = build_parser().parse_args(["tag", "x.jpg"])
    assert settings_from_args(args).model_settings.text_cache is True
