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


@pytest.mark.parametrize("split", ["held_out", "seen"])
def test_true_caption_is_the_top_tag(fp32, split, request):
    items = request.getfixturevalue(split)
    r = ranks(full_scores(fp32, items), truth(items))
    assert (r == 0).mean() >= 0.90, f"{split}: top-1 {(r == 0).mean():.3f}"
    assert (r < 3).mean() >= 0.98, f"{split}: top-3 {(r < 3).mean():.3f}"


def test_confidences_are_well_separated(fp32, held_out, seen):
    items = held_out + seen
    scores, true = full_scores(fp32, items), truth(items)
    right = scores[np.arange(len(true)), true]
    wrong = np.delete(scores, true + np.arange(len(true)) * scores.shape[1])
    # the default threshold is 0.01: right tags sit far above it, wrong ones far below
    assert np.median(right) >= 0.3 and np.quantile(right, 0.05) >= 0.03
    assert np.quantile(wrong, 0.99) <= 0.002 and np.median(wrong) <= 1e-4


def test_default_threshold_and_max_tags_keep_the_right_tags(fp32, held_out, seen):
    items = held_out + seen
    records = fp32.tag([path for path, _ in items])  # confidence_threshold 0.01, max_tags 50
    kept = [[tag["label"] for tag in record["tags"]] for record in records]
    has_own = np.mean([combo.label in labels for labels, (_, combo) in zip(kept, items)])
    extras = np.mean([len(labels) - (combo.label in labels) for labels, (_, combo) in zip(kept, items)])
    assert has_own >= 0.97 and extras <= 1.0, (has_own, extras)
    assert all(tag["confidence"] >= 0.01 for record in records for tag in record["tags"])

    capped = tagger(max_tags=1, confidence_threshold=0.0).tag([path for path, _ in items])
    top = [record["tags"][0]["label"] for record in capped]
    assert all(len(record["tags"]) == 1 for record in capped)
    assert np.mean([label == combo.label for label, (_, combo) in zip(top, items)]) >= 0.90
    assert top == [labels[0] for labels in kept if labels] or not all(kept)


def test_a_strict_threshold_keeps_mostly_right_tags(held_out, seen):
    items = held_out + seen
    strict = tagger(confidence_threshold=0.2).tag([path for path, _ in items])
    kept = [(tag["label"], combo.label) for record, (_, combo) in zip(strict, items) for tag in record["tags"]]
    assert kept and np.mean([label == own for label, own in kept]) >= 0.97
    assert len(kept) >= 0.6 * len(items)


def test_cli_tags_the_pictures_with_their_captions(capsys, held_out, tmp_path):
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(shapes.LABELS), encoding="utf-8")
    items = held_out[::6]
    code = main(["tag", "--model", str(CHECKPOINT), "--device", "cpu", "--labels-file", str(labels),
                 "--no-text-cache", "--max-tags", "3", "--format", "jsonl", "-q", *[str(p) for p, _ in items]])
    assert code == 0
    rows = {Path(row["path"]).name: row for row in map(json.loads, capsys.readouterr().out.splitlines())}
    hits = [rows[path.name]["tags"][0]["label"] == combo.label for path, combo in items]
    assert np.mean(hits) >= 0.8 and all(len(row["tags"]) <= 3 for row in rows.values())
