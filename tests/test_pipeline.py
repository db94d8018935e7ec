"""Pipelined decoding: every policy gives the same results in order, memory stays bounded, fast paths are exact."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from conftest import make_image, make_settings, reference_scores

from visual_buffet_siglip.decoding import DecodePolicy, decode_policy
from visual_buffet_siglip.engine import SiglipTagger
from visual_buffet_siglip.images import load_image

POLICIES = [DecodePolicy("inline", 0, 1, "test"), DecodePolicy("phased", 2, 3, "test"),
            DecodePolicy("overlap", 1, 6, "test"), DecodePolicy("overlap", 3, 6, "test")]


@pytest.fixture(scope="module")
def mixed(tmp_path_factory, images):
    """Lossless images, a large JPEG, a missing file and a broken one, in one list."""
    root = tmp_path_factory.mktemp("mixed")
    broken = root / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    big = make_image(root / "big.jpg", (1200, 900), seed=7)
    return [images[0], broken, big, images[1], root / "missing.png", images[2], images[3], big]


# --- the policy ---------------------------------------------------------------------------------

def test_policy_for_a_cpu_where_torch_uses_every_core_is_phased():
    policy = decode_policy("cpu", cpus=2, torch_threads=2, batch_size=8)
    assert (policy.mode, policy.workers, policy.window) == ("phased", 2, 8)
    assert "compete" in policy.reason


def test_policy_overlaps_where_there_are_spare_cores_or_an_accelerator():
    spare = decode_policy("cpu", cpus=16, torch_threads=8, batch_size=8)
    assert (spare.mode, spare.workers) == ("overlap", 8)
    gpu = decode_policy("cuda", cpus=16, torch_threads=16, batch_size=32)
    assert (gpu.mode, gpu.workers, gpu.window) == ("overlap", 15, 64)
    assert decode_policy("mps", cpus=1, torch_threads=1, batch_size=4).workers == 1


def test_policy_on_one_cpu_decodes_inline():
    assert decode_policy("cpu", cpus=1, torch_threads=1, batch_size=4).mode == "inline"


def test_policy_workers_are_bounded():
    assert decode_policy("cuda", cpus=256, torch_threads=256, batch_size=64).workers == 16
    assert decode_policy("cpu", cpus=64, torch_threads=64, batch_size=2).workers == 2  # one batch at a time


# --- same results whatever the policy -----------------------------------------------------------

@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: f"{p.mode}-{p.workers}")
def test_every_policy_gives_the_same_records_in_order(checkpoints, mixed, policy):
    baseline = SiglipTagger(make_settings(checkpoints["siglip"], batch_size=3))
    baseline._policy = POLICIES[0]
    expected = baseline.tag(mixed)
    tagger = SiglipTagger(make_settings(checkpoints["siglip"], batch_size=3))
    tagger._policy = policy
    items = list(tagger.iter_tag(mixed))
    assert [item.index for item, _ in items] == list(range(len(mixed)))
    assert [item.source for item, _ in items] == mixed
    got = [record for _, record in items]
    assert [("error" in r) for r in got] == [False, True, False, False, True, False, False, False]
    strip = lambda records: [{k: v for k, v in r.items() if k != "inference_time_ms"} for r in records]  # noqa: E731
    assert strip(got) == strip(expected)


def test_default_policy_matches_the_reference(checkpoint, images):
    tagger = SiglipTagger(make_settings(checkpoint))
    labels = list(tagger.default_options.labels)
    assert tagger.decode_policy.mode in ("inline", "phased", "overlap")
    scores = tagger.score(tagger.embed_images(images), tagger.embed_texts(labels))
    assert np.abs(scores - reference_scores(checkpoint, images, labels)).max() <= 1e-5


# --- bounded memory -----------------------------------------------------------------------------

@pytest.mark.parametrize("policy", POLICIES[1:], ids=lambda p: f"{p.mode}-{p.workers}")
def test_the_input_is_pulled_a_bounded_window_ahead(checkpoints, images, policy):
    tagger = SiglipTagger(make_settings(checkpoints["siglip"], batch_size=4))
    tagger._policy = policy
    pulled = 0

    def endless():
        nonlocal pulled
        while True:
            pulled += 1
            yield images[pulled % len(images)]

    ahead = []
    for done, _ in enumerate(tagger.iter_image_embeddings(endless()), start=1):
        ahead.append(pulled - done)
        if done == 60:
            break
    # never more than the decode window plus the batch being assembled
    assert max(ahead) <= policy.window + tagger.batch_size


def test_stopping_early_does_not_hang(checkpoints, images):
    tagger = SiglipTagger(make_settings(checkpoints["siglip"], batch_size=2))
    tagger._policy = POLICIES[3]
    stream = tagger.iter_tag(images * 50)
    next(stream)
    stream.close()  # the decode pool shuts down, cancelling what it had queued
    assert [t.name for t in threading.enumerate() if t.name.startswith("siglip-decode")] == []


# --- thread safety ------------------------------------------------------------------------------

def test_threads_sharing_a_tagger_get_the_same_results(checkpoints, images):
    tagger = SiglipTagger(make_settings(checkpoints["siglip"], batch_size=2))
    expected = tagger.tag(images)
    out: dict[int, list] = {}

    def work(i):
        out[i] = tagger.tag(list(images) if i % 2 else list(reversed(images)))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    def scores(records):
        return np.array([[t["confidence"] for t in sorted(r["tags"], key=lambda t: t["label"])] for r in records])

    for i, records in out.items():  # reversed input batches differently: equal up to float rounding
        want = expected if i % 2 else list(reversed(expected))
        assert np.abs(scores(records) - scores(want)).max() <= 1e-6


# --- the fast paths -----------------------------------------------------------------------------

def test_resizing_before_the_processor_is_bit_identical(checkpoints, tmp_path):
    tagger = SiglipTagger(make_settings(checkpoints["siglip"], decode="exact"))
    assert tagger.loaded and tagger._resize is not None
    path = make_image(tmp_path / "wide.png", (403, 157), seed=3)
    ours = tagger._prepare(0, path, None).inputs["pixel_values"]
    theirs = tagger.loaded.processor(images=[load_image(path)], return_tensors="pt")["pixel_values"]
    assert ours.dtype == theirs.dtype and np.array_equal(ours.numpy(), theirs.numpy())


def test_naflex_is_left_to_its_processor(checkpoints):
    tagger = SiglipTagger(make_settings(checkpoints["naflex"]))
    tagger.loaded  # noqa: B018
    assert tagger._resize is None


def test_fast_decode_reads_large_jpegs_reduced_and_barely_moves_pixels(checkpoints, tmp_path):
    big = make_image(tmp_path / "big.jpg", (2000, 1500), seed=5)
    fast = SiglipTagger(make_settings(checkpoints["siglip"], decode="fast"))
    exact = SiglipTagger(make_settings(checkpoints["siglip"], decode="exact"))
    draft = fast._draft_size()
    assert draft == 2 * fast.loaded.info.image_size and exact._draft_size() is None
    reduced = load_image(big, draft_size=draft)
    assert min(reduced.size) >= draft and reduced.size[0] < 2000  # DCT-scaled, never below 2x the input
    a = fast._prepare(0, big, fast._draft_size()).inputs["pixel_values"].numpy()
    b = exact._prepare(0, big, None).inputs["pixel_values"].numpy()
    # normalised pixels live in [-1, 1] (one 8-bit level = 0.0078); this picture is mostly per-pixel noise,
    # the worst case for a reduced decode: a few levels at most, under two on average (photos: see RESULTS.md)
    assert np.abs(a - b).max() < 0.15 and np.abs(a - b).mean() < 0.02


def test_exact_decode_matches_the_reference_on_jpegs(checkpoints, tmp_path):
    big = make_image(tmp_path / "big.jpg", (1000, 700), seed=6)
    tagger = SiglipTagger(make_settings(checkpoints["siglip"], decode="exact"))
    labels = list(tagger.default_options.labels)
    scores = tagger.score(tagger.embed_images([big]), tagger.embed_texts(labels))
    assert np.abs(scores - reference_scores(checkpoints["siglip"], [big], labels)).max() <= 1e-5
