"""What each precision and speed shortcut does to the tags of a *trained* model (issue 16).

    PYTHONPATH=. python benchmarks/bench_quality.py        # ~1-2 minutes on 2 cores

Random-weight models cannot say whether a shortcut keeps the right tags: all
their labels score alike. This runs the SigLIP trained on synthetic shapes
(tests/data/tiny-siglip-shapes) through the real tagger on pictures it never
saw (new seeds; half of them attribute combinations it never saw), saved as
1600x1200 JPEGs so `decode = "fast"` has something to shortcut, and compares
every variant against float32 with exact decoding: accuracy of the top tag and
top 3 against the truth, the share of images whose top tag or top-3 set
changes, and the largest confidence change among tags at or above the default
threshold (0.01) in either run.

A variant is a name and the `[plugins.siglip]` settings it changes
(`VARIANTS`); a new backend is one more row. Writes its section into
benchmarks/RESULTS.md and prints it.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

import numpy as np
import synthetic_shapes as shapes
from bench_tagging import (  # also: the repository on sys.path, the hub offline
    WORK,
    write_section,
)

HEADING = "## Precision and decode shortcuts on a trained model (issue 16)"
CHECKPOINT = HERE.parent / "tests" / "data" / "tiny-siglip-shapes"
THRESHOLD = 0.01
SEED = 7_700_001
SIZE = (1600, 1200)

# PyTorch named: "auto" would pick OpenVINO on the CPU wherever it is installed
REFERENCE = {"dtype": "float32", "decode": "exact", "quantization": "none", "backend": "torch"}
# name -> the settings that differ from REFERENCE; a new backend or precision is one more row
VARIANTS: dict[str, dict[str, Any]] = {
    'decode = "fast"': {"decode": "fast"},
    'dtype = "bfloat16"': {"dtype": "bfloat16"},
    'dtype = "float16"': {"dtype": "float16"},
    'quantization = "8bit"': {"quantization": "8bit"},
    'quantization = "4bit" (nf4)': {"quantization": "4bit"},
    '4bit + bfloat16 compute': {"quantization": "4bit", "dtype": "bfloat16"},
    'backend = "openvino" (float32)': {"backend": "openvino"},
    'backend = "openvino" + 8bit (int8 weights)': {"backend": "openvino", "quantization": "8bit"},
}


def pictures(per_combo: int) -> tuple[list[Path], list[shapes.Combo]]:
    """JPEGs (quality 90) of every combination, the held-out ones included, made once per generator version."""
    generator = hashlib.sha256(Path(shapes.__file__).read_bytes()).hexdigest()[:12]
    folder = WORK / f"shapes-{SIZE[0]}x{SIZE[1]}-{SEED}-{per_combo}-{generator}"
    folder.mkdir(parents=True, exist_ok=True)
    paths, combos = [], []
    for i, (picture, combo) in enumerate(shapes.take(SEED, per_combo * len(shapes.ALL), shapes.ALL, SIZE)):
        path = folder / f"{i:04d}.jpg"
        if not path.is_file():
            picture.save(path, quality=90)
        paths.append(path)
        combos.append(combo)
    return paths, combos


def scores(settings: dict[str, Any], paths: list[Path]) -> tuple[np.ndarray, float]:
    """[images, labels] confidences in shapes.LABELS order through the real tagger, and seconds per image."""
    from visual_buffet_siglip import Settings
    from visual_buffet_siglip.engine import SiglipTagger

    tagger = SiglipTagger(Settings.from_mapping({
        "model": str(CHECKPOINT), "device": "cpu", "labels": list(shapes.LABELS), "text_cache": False,
        **REFERENCE, **settings}))
    tagger.embed_texts(list(shapes.LABELS))  # load and encode labels outside the timing
    start = time.perf_counter()
    records = tagger.tag(paths, threshold=0.0, max_tags=len(shapes.LABELS))
    seconds = (time.perf_counter() - start) / len(paths)
    out = np.zeros((len(paths), len(shapes.LABELS)))
    for row, record in enumerate(records):
        if "error" in record:
            raise RuntimeError(f"{paths[row]}: {record['error']}")
        for tag in record["tags"]:
            out[row, shapes.LABELS.index(tag["label"])] = tag["confidence"]
    return out, seconds


def compare(reference: np.ndarray, other: np.ndarray, truth: np.ndarray, held: np.ndarray) -> dict[str, float]:
    """Accuracy of `other` (all pictures, and those of held-out combinations), and how far it moved."""
    order_ref, order = np.argsort(-reference, axis=1), np.argsort(-other, axis=1)
    top3_ref, top3 = np.sort(order_ref[:, :3], axis=1), np.sort(order[:, :3], axis=1)
    shown = (reference >= THRESHOLD) | (other >= THRESHOLD)
    return {
        "top1": float((order[:, 0] == truth).mean()),
        "top3": float((order[:, :3] == truth[:, None]).any(axis=1).mean()),
        "held_top1": float((order[held, 0] == truth[held]).mean()),
        "top1_changed": float((order[:, 0] != order_ref[:, 0]).mean()),
        "top3_changed": float((top3 != top3_ref).any(axis=1).mean()),
        "max_change": float(np.abs(other - reference)[shown].max()) if shown.any() else 0.0,
    }


def table(rows: dict[str, dict[str, float]], n: int, load: tuple[float, ...]) -> str:
    from transformers import AutoConfig

    side = AutoConfig.from_pretrained(CHECKPOINT).vision_config.image_size
    lines = [HEADING, "",
             (f"`python benchmarks/bench_quality.py`: the SigLIP trained here (tests/data/tiny-siglip-shapes, "
             f"{side} px input) on {n} unseen {SIZE[0]}x{SIZE[1]} JPEGs of all {len(shapes.ALL)} captions "
             f"({len(shapes.HELD_OUT)} of them combinations training never showed: the held-out column), "
             "through `SiglipTagger` on the CPU, against float32 with "
             f'`decode = "exact"`. Max change: the largest confidence difference among tags >= {THRESHOLD} in '
             f"either run. Time: seconds per image on 2 cores (load average {load[0]:.1f}); decoding dominates "
             "with a model this small, so it measures decode shortcuts, not precisions."), "",
             ("| variant | top-1 | top-3 | top-1, held-out | top tag changed | top-3 set changed | max change "
             "| time / image |"),
             "|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['top1']:.1%} | {r['top3']:.1%} | {r['held_top1']:.1%} | {r['top1_changed']:.1%} | "
                     f"{r['top3_changed']:.1%} | {r['max_change']:.4f} | {r['seconds'] * 1000:.0f} ms |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-combo", type=int, default=6, help="pictures per caption (default 6: 270 images)")
    parser.add_argument("--only", action="append", help="run only this variant (repeatable)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    args = parser.parse_args(argv)
    paths, combos = pictures(args.per_combo)
    truth = np.array([shapes.LABELS.index(c.label) for c in combos])
    held = np.array([c in shapes.HELD_OUT for c in combos])
    reference, seconds = scores({}, paths)
    rows = {"float32, exact decode (reference)": {**compare(reference, reference, truth, held), "seconds": seconds}}
    for name, settings in VARIANTS.items():
        if args.only and name not in args.only:
            continue
        other, seconds = scores(settings, paths)
        rows[name] = {**compare(reference, other, truth, held), "seconds": seconds}
        print(name, rows[name], flush=True)
    text = table(rows, len(paths), os.getloadavg())
    print(text)
    if not args.no_write and not args.only:
        write_section(text, HERE / "RESULTS.md", HEADING)
    return 0


if __name__ == "__main__":
    sys.exit(main())
