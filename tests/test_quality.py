"""Tag quality on a SigLIP trained here (tests/data/tiny-siglip-shapes, see tools/train_tiny_siglip.py).

Random-weight checkpoints prove our numbers equal transformers'; this one proves
the tagger keeps the *right* tags. Pictures come from the training generator
with seeds training never used, including attribute combinations it never
showed (synthetic_shapes.HELD_OUT), and go through the real tagger and CLI.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import synthetic_shapes as shapes

from visual_buffet_siglip import Settings
from visual_buffet_siglip.cli import main
from visual_buffet_siglip.engine import SiglipTagger
from visual_buffet_siglip.models import model_info

CHECKPOINT = Path(__file__).parent / "data" / "tiny-siglip-shapes"
TEST_SEED = 20_240_916  # never a training or training-evaluation seed
PER_COMBO = 10  # pictures of each combination


def tagger(**settings) -> SiglipTagger:
    values = {"model": str(CHECKPOINT), "device": "cpu", "dtype": "float32", "labels": list(shapes.LABELS),
              "text_cache": False}
    values.update(settings)
    return SiglipTagger(Settings.from_mapping(values))


def write(folder: Path, combos: tuple[shapes.Combo, ...], seed: int) -> list[tuple[Path, shapes.Combo]]:
    """PNG files of `combos` pictures (random sizes), named by index, with their truths."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i, (picture, combo) in enumerate(shapes.take(seed, PER_COMBO * len(combos), combos, size=None)):
        path = folder / f"{i:03d}.png"
        picture.save(path)
        out.append((path, combo))
    return out


@pytest.fixture(scope="module")
def held_out(tmp_path_factory) -> list[tuple[Path, shapes.Combo]]:
    """Pictures of the combinations training never showed."""
    return write(tmp_path_factory.mktemp("held-out"), shapes.HELD_OUT, TEST_SEED)


@pytest.fixture(scope="module")
def seen(tmp_path_factory) -> list[tuple[Path, shapes.Combo]]:
    """New pictures of the combinations training showed."""
    return write(tmp_path_factory.mktemp("seen"), shapes.TRAIN[::4], TEST_SEED + 1)


@pytest.fixture(scope="module")
def fp32() -> SiglipTagger:
    return tagger()


def full_scores(t: SiglipTagger, items) -> np.ndarray:
    """[images, labels] confidences in shapes.LABELS order, every label kept."""
    records = t.tag([path for path, _ in items], threshold=0.0, max_tags=len(shapes.LABELS))
    out = np.zeros((len(items), len(shapes.LABELS)))
    for row, record in enumerate(records):
        assert "error" not in record, record
        for tag in record["tags"]:
            out[row, shapes.LABELS.index(tag["label"])] = tag["confidence"]
    return out


def truth(items) -> np.ndarray:
    return np.array([shapes.LABELS.index(combo.label) for _, combo in items])


def ranks(scores: np.ndarray, true: np.ndarray) -> np.ndarray:
    """0 where the true caption is the top tag, 1 where one label beats it, ..."""
    own = scores[np.arange(len(true)), true]
    return (scores > own[:, None]).sum(axis=1)


def test_checkpoint_is_small_and_loads_as_users_load_it(fp32):
    total = sum(f.stat().st_size for f in CHECKPOINT.iterdir())
    assert total <= 5 * 1024 * 1024
    assert {"model.safetensors", "config.json", "processor_config.json", "spiece.model"} <= \
        {f.name for f in CHECKPOINT.iterdir()}
    assert model_info(str(CHECKPOINT)).family == "siglip"
    assert fp32.plan.dtype == "float32" and fp32.loaded.model.config.vision_config.hidden_size % 64 == 0


# The issue asks for top-1 >= 0.90 and top-3 >= 0.98 on held-out combinations. Through the tagger the
# committed checkpoint (tools/train_tiny_siglip.py defaults) scores on these pictures: held-out top-1 0.99,
# top-3 1.00; seen top-1 1.00, top-3 1.00; both together (ALL_TOP1) 0.99. On 900 other held-out pictures
# held-out top-1 is 0.95 (top-3 1.00), so the held-out bound is the 0.90, with margin on either sample.
TOP1, SEEN_TOP1, TOP3, COLOUR, ALL_TOP1 = 0.90, 0.97, 0.98, 0.98, 0.95


@pytest.mark.parametrize("split", ["held_out", "seen"])
def test_true_caption_ranks_high(fp32, split, request):
    items = request.getfixturevalue(split)
    scores, true = full_scores(fp32, items), truth(items)
    r = ranks(scores, true)
    assert (r == 0).mean() >= (SEEN_TOP1 if split == "seen" else TOP1), f"{split}: top-1 {(r == 0).mean():.3f}"
    assert (r < 3).mean() >= TOP3, f"{split}: top-3 {(r < 3).mean():.3f}"
    top = [shapes.ALL[i] for i in scores.argmax(axis=1)]
    assert np.mean([a.colour == c.colour for a, (_, c) in zip(top, items)]) >= COLOUR


def test_confidences_are_well_separated(fp32, held_out, seen):
    items = held_out + seen
    scores, true = full_scores(fp32, items), truth(items)
    right = scores[np.arange(len(true)), true]
    other_colour = np.array([[label.colour != combo.colour for label in shapes.ALL] for _, combo in items])
    # the default threshold is 0.01: right tags sit far above it (median 0.9997, 10th percentile 0.997
    # measured), wrong-colour ones below it (99th percentile 0.004), most wrong tags far below (median 5e-14)
    assert np.median(right) >= 0.95 and np.quantile(right, 0.1) >= 0.8, (np.median(right), np.quantile(right, 0.1))
    assert np.quantile(scores[other_colour], 0.99) <= 0.01, np.quantile(scores[other_colour], 0.99)
    assert np.median(np.delete(scores, true + np.arange(len(true)) * scores.shape[1])) <= 1e-6


def test_default_threshold_and_max_tags_keep_the_right_tags(fp32, held_out, seen):
    items = held_out + seen
    records = fp32.tag([path for path, _ in items])  # confidence_threshold 0.01, max_tags 50
    kept = [[tag["label"] for tag in record["tags"]] for record in records]
    has_own = np.mean([combo.label in labels for labels, (_, combo) in zip(kept, items)])
    same_colour = np.mean([label.split()[1] == combo.colour for labels, (_, combo) in zip(kept, items)
                           for label in labels])
    assert has_own >= 0.97 and same_colour >= 0.85, (has_own, same_colour)  # measured 1.00, 0.88
    assert all(tag["confidence"] >= 0.01 for record in records for tag in record["tags"])

    capped = tagger(max_tags=1, confidence_threshold=0.0).tag([path for path, _ in items])
    assert all(len(record["tags"]) == 1 for record in capped)
    top = [record["tags"][0]["label"] for record in capped]
    assert top == [labels[0] if labels else label for labels, label in zip(kept, top)]
    assert np.mean([label == combo.label for label, (_, combo) in zip(top, items)]) >= ALL_TOP1


def test_a_strict_threshold_keeps_fewer_tags_more_of_them_right(fp32, held_out, seen):
    items = held_out + seen
    loose = fp32.tag([path for path, _ in items])
    strict = tagger(confidence_threshold=0.3).tag([path for path, _ in items])

    def precision(records):
        kept = [(tag["label"], combo.label) for record, (_, combo) in zip(records, items) for tag in record["tags"]]
        return len(kept), np.mean([label == own for label, own in kept])

    (n_loose, p_loose), (n_strict, p_strict) = precision(loose), precision(strict)
    assert n_strict < n_loose and p_strict > p_loose, (n_loose, p_loose, n_strict, p_strict)
    assert all(tag["confidence"] >= 0.3 for record in strict for tag in record["tags"])


def test_cli_tags_the_pictures_with_their_captions(capsys, fp32, held_out, tmp_path):
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(shapes.LABELS), encoding="utf-8")
    items = held_out[::5]
    code = main(["tag", "--model", str(CHECKPOINT), "--device", "cpu", "--labels-file", str(labels),
                 "--no-text-cache", "--max-tags", "3", "--format", "jsonl", "-q", *[str(p) for p, _ in items]])
    assert code == 0
    rows = {Path(row["path"]).name: row for row in map(json.loads, capsys.readouterr().out.splitlines())}
    # the CLI keeps the tagger's top tags (how often those are right is the tests' above: 18 pictures
    # are too few to bound accuracy without a margin that says nothing)
    expected = [record["tags"] for record in fp32.tag([path for path, _ in items], max_tags=3)]
    got = [rows[path.name]["tags"] for path, _ in items]
    assert [[t["label"] for t in tags] for tags in got] == [[t["label"] for t in tags] for tags in expected]
    assert np.allclose([t["confidence"] for tags in got for t in tags],
                       [t["confidence"] for tags in expected for t in tags], atol=1e-4)


# Measured on these 180 pictures (agreement 1.00, 1.00, 0.99; top-1 0.99, 0.99, 0.99; bench_quality.py has
# more in RESULTS.md); the bounds leave margin:
# variant settings -> (least share of images whose top tag stays float32's, least top-1 accuracy)
SHORTCUT_BOUNDS = {
    "bfloat16": ({"dtype": "bfloat16"}, 0.95, ALL_TOP1),
    "8bit": ({"quantization": "8bit"}, 0.95, ALL_TOP1),
    "4bit": ({"quantization": "4bit"}, 0.95, ALL_TOP1),
}


@pytest.mark.parametrize("variant", SHORTCUT_BOUNDS)
def test_precision_shortcuts_keep_the_top_tag(fp32, held_out, seen, variant):
    settings, agree, accurate = SHORTCUT_BOUNDS[variant]
    items = held_out + seen
    reference = full_scores(fp32, items).argmax(axis=1)
    other = full_scores(tagger(**settings), items).argmax(axis=1)
    assert (other == reference).mean() >= agree, (variant, (other == reference).mean())
    assert (other == truth(items)).mean() >= accurate
