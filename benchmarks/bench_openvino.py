"""PyTorch against OpenVINO on the CPU, side by side in one process (issue 15).

    python benchmarks/bench_openvino.py              # base shape, 342 labels (~10 minutes on a busy 2-core machine)
    python benchmarks/bench_openvino.py --so400m     # also the so400m-384 shape (conversion alone ~80 s)

For each shape (random weights of the real checkpoint's shape, tests/checkpoints.py),
one child process holds every configuration at once:

    PyTorch float32 (the bound today), PyTorch bfloat16, OpenVINO float32,
    OpenVINO bfloat16, OpenVINO int8 weights (NNCF), float32 activations

and times each, round by round (so a shared machine's drifting load hits them
alike): *vision only* is the tower on already-preprocessed pixel tensors
(`SiglipTagger._vision`, the batch size of the plan); *end to end* is
`iter_tag` over photo-like JPEGs of 0.5-24 MP (decode, resize, normalise,
vision, scores, tag selection) with the labels already embedded. Reported:
medians per image and ratios against the PyTorch float32 vision time of the
same round. Precision: each configuration's confidences against PyTorch
float32's on the same JPEGs (max |diff|, agreement of each image's top-5 and
of its tags above the default threshold 0.01). Cold start: a fresh process to
its first tagged image with an empty cache (conversion included), then again
with the cache the first one wrote. Where the time goes: decode, resize and
normalise measured per image for the same JPEGs.

Writes its section into benchmarks/RESULTS.md and prints it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_tagging import (
    WORK,
    _load,
    checkpoint,
    jpegs,
    labels_file,
    machine,
    run_child,
    write_section,
)

HEADING = "## OpenVINO backend on CPU (issue 15)"
LABELS = 342
THRESHOLD = 0.01
CONFIGS = {  # name -> settings
    "PyTorch float32": {"backend": "torch", "dtype": "float32"},
    "OpenVINO float32": {"backend": "openvino", "dtype": "float32"},
    "PyTorch bfloat16": {"backend": "torch", "dtype": "bfloat16"},
    "OpenVINO bfloat16": {"backend": "openvino", "dtype": "bfloat16"},
    "OpenVINO int8 weights": {"backend": "openvino", "dtype": "float32", "quantization": "8bit"},
}
BOUND = "PyTorch float32"


def _tagger(model: Path, labels: Path, **settings: Any):
    from visual_buffet_siglip import Settings
    from visual_buffet_siglip.engine import SiglipTagger

    return SiglipTagger(Settings.from_mapping({"model": str(model), "labels_file": str(labels), "device": "cpu",
                                               "confidence_threshold": 0.0, "max_tags": 1000, **settings}))


def _scores(records: list[dict[str, Any]], labels: list[str]) -> Any:
    import numpy as np

    index = {label: i for i, label in enumerate(labels)}
    out = np.zeros((len(records), len(labels)))
    for row, record in enumerate(records):
        for tag in record["tags"]:
            out[row, index[tag["label"]]] = tag["confidence"]
    return out


def agreement(reference: Any, other: Any) -> dict[str, float]:
    """Max |confidence diff|, share of images with the same top-5 (as sets), share with the same tags >= 0.01."""
    import numpy as np

    top = [set(np.argsort(-r)[:5]) == set(np.argsort(-o)[:5]) for r, o in zip(reference, other)]
    above = [set(np.flatnonzero(r >= THRESHOLD)) == set(np.flatnonzero(o >= THRESHOLD))
             for r, o in zip(reference, other)]
    return {"max_diff": float(np.abs(reference - other).max()), "top5": float(np.mean(top)),
            "above": float(np.mean(above))}


def native_bf16() -> bool:
    """Whether OpenVINO finds bfloat16 kernels on this CPU (AMX / AVX512-BF16); else bf16 is emulated or ignored."""
    import openvino as ov

    return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def child_side_by_side(opts: dict[str, Any]) -> dict[str, Any]:
    """Every configuration in this one process: vision-only and end-to-end rounds, then precision."""
    import logging

    logging.basicConfig(level=logging.INFO, format="  %(message)s", stream=sys.stderr)
    paths = [str(p) for p in opts["images"]]
    labels_path = Path(opts["labels"])
    # Without native bf16, PyTorch emulates it (many times slower) and OpenVINO runs float32: nothing to learn.
    configs = {name: settings for name, settings in CONFIGS.items()
               if native_bf16() or settings["dtype"] != "bfloat16"}
    taggers = {name: _tagger(Path(opts["model"]), labels_path, **settings) for name, settings in configs.items()}
    labels = list(taggers[BOUND].default_options.labels)
    per_round = [paths[i % len(paths)] for i in range(opts["per_round"])]
    prepared: dict[str, list[Any]] = {}
    records: dict[str, list[dict[str, Any]]] = {}
    setup: dict[str, float] = {}
    for name, tagger in taggers.items():
        print(f"  {name}: labels, first batch, precision run ...", file=sys.stderr, flush=True)
        start = time.perf_counter()
        tagger.embed_texts(labels)
        draft = tagger._draft_size()
        prepared[name] = [tagger._prepare(i, p, draft) for i, p in enumerate(per_round)]
        tagger._vision(prepared[name][:1])  # compiles OpenVINO's vision tower
        setup[name] = time.perf_counter() - start
        records[name] = tagger.tag(paths, labels=labels)

    def vision(name: str) -> float:
        start = time.perf_counter()
        taggers[name]._vision(prepared[name])
        return time.perf_counter() - start

    def end_to_end(name: str) -> float:
        start = time.perf_counter()
        for _ in taggers[name].iter_tag(per_round, labels=labels):
            pass
        return time.perf_counter() - start

    times: dict[str, dict[str, list[float]]] = {name: {"vision": [], "e2e": []} for name in taggers}
    for r in range(opts["rounds"] + 1):  # round 0 warms up
        print(f"  round {r} of {opts['rounds']}", file=sys.stderr, flush=True)
        for name in taggers:
            v, e = vision(name), end_to_end(name)
            if r:
                times[name]["vision"].append(v)
                times[name]["e2e"].append(e)
    reference = _scores(records[BOUND], labels)
    precision = {name: agreement(reference, _scores(records[name], labels)) for name in taggers if name != BOUND}
    plans = {name: {"backend": t.plan.backend, "dtype": t.plan.dtype, "quantization": t.plan.quantization,
                    "batch": t.batch_size, "reason": t.plan.reason("backend"), "dtype_reason": t.plan.reason("dtype")}
             for name, t in taggers.items()}
    return {"times": times, "n": len(per_round), "precision": precision, "plans": plans, "setup_s": setup,
            "skipped": [name for name in CONFIGS if name not in configs],
            "breakdown": breakdown(taggers["OpenVINO float32"], paths)}


def breakdown(tagger: Any, paths: list[str]) -> dict[str, float]:
    """Mean ms per image of each preprocessing step, as the engine does them (fast decode)."""
    from visual_buffet_siglip.images import load_image

    draft = tagger._draft_size()
    steps = {"decode": 0.0, "resize": 0.0, "normalise": 0.0, "processor": 0.0}
    for path in paths:
        start = time.perf_counter()
        image = load_image(path, draft_size=draft)
        decoded = time.perf_counter()
        if tagger._resize is not None:
            image = image.resize(*tagger._resize)
        resized = time.perf_counter()
        if tagger._normalise is not None:
            tagger._normalise(image)
        normalised = time.perf_counter()
        tagger.loaded.processor(images=[image], return_tensors="pt")
        steps["decode"] += decoded - start
        steps["resize"] += resized - decoded
        steps["normalise"] += normalised - resized
        steps["processor"] += time.perf_counter() - normalised
    return {k: 1000 * v / len(paths) for k, v in steps.items()}


def child_cold(opts: dict[str, Any]) -> dict[str, Any]:
    """Process start (measured by the parent) to the first tagged image."""
    tagger = _tagger(Path(opts["model"]), Path(opts["labels"]), **opts["settings"])
    next(tagger.iter_tag([opts["images"][0]]))
    return {}


def cold_starts(opts: dict[str, Any]) -> dict[str, list[float]]:
    """[empty cache, warm cache] seconds to the first tagged image, per backend (float32)."""
    out = {}
    for backend in ("torch", "openvino"):
        cache = Path(tempfile.mkdtemp(prefix="cold-", dir=WORK))
        child = dict(opts, settings={"backend": backend, "dtype": "float32"})
        out[backend] = [run_child("cold", child, cache, __file__)["process_s"] for _ in range(2)]
    return out


# --- the report ----------------------------------------------------------------------------------

def _med(values: list[float], n: int) -> float:
    return statistics.median(values) / n


def table(shape: str, res: dict[str, Any]) -> list[str]:
    n, times = res["n"], res["times"]
    bound = [v / n for v in times[BOUND]["vision"]]

    def ratio(series: list[float]) -> float:  # per round, against that round's bound; median
        return statistics.median(b / (s / n) for b, s in zip(bound, series))

    out = [f"### {shape}: {n} JPEGs a round, {len(bound)} rounds, batch {res['plans'][BOUND]['batch']}", "",
           ("| configuration | vision s/img | speed vs PyTorch f32 vision | end to end s/img | speed vs PyTorch f32 "
            "vision | e2e / own vision | max conf diff vs f32 | top-5 agree | tags >= 0.01 agree |"),
           "|---|---|---|---|---|---|---|---|---|"]
    for name, t in times.items():
        p = res["precision"].get(name)
        prec = (f"{p['max_diff']:.2e} | {p['top5']:.0%} | {p['above']:.0%}" if p else "reference | - | -")
        out.append(f"| {name} | {_med(t['vision'], n):.3f} | {ratio(t['vision']):.2f}x | {_med(t['e2e'], n):.3f} | "
                   f"{ratio(t['e2e']):.2f}x | {statistics.median(e / v for e, v in zip(t['e2e'], t['vision'])):.2f} | "
                   f"{prec} |")
    if res["skipped"]:
        out += [(f"| {name} | not run: this CPU has no native bfloat16 (OpenVINO would run float32, PyTorch "
                 "emulates it) | | | | | | | |") for name in res["skipped"]]
    b = res["breakdown"]
    out += ["", (f"Preprocessing per image (OpenVINO float32 tagger, fast decode): decode {b['decode']:.1f} ms, "
                 f"resize {b['resize']:.1f} ms, normalise (lookup table) {b['normalise']:.1f} ms, where the "
                 f"image processor took {b.get('processor', float('nan')):.1f} ms."), ""]
    return out


def report(info: dict[str, Any], results: dict[str, Any], cold: dict[str, Any], loads: tuple[float, float]) -> str:
    from visual_buffet_siglip.versions import installed_version

    openvino, nncf = (installed_version(name) or "-" for name in ("openvino", "nncf"))
    out = [HEADING, "", (f"`python benchmarks/bench_openvino.py{' --so400m' if 'so400m' in results else ''}` "
           f"on {info['cpu']} ({info['cpus']} CPUs, SIMD {', '.join(info['simd']) or 'none listed'}), torch "
           f"{info['torch']}, OpenVINO {openvino}, NNCF {nncf}; load average "
           f"{loads[0]:.1f} at start, {loads[1]:.1f} at the end (a shared machine: ratios are per round, side by "
           f"side in one process). {LABELS} labels, random weights of the real shapes."), ""]
    for shape, res in results.items():
        out += table(shape, res)
    if cold:
        out += ["### Cold start (base, float32): a new process to its first tagged image", "",
                "| backend | empty caches | warm caches |", "|---|---|---|"]
        out += [f"| {b} | {c[0]:.1f} s | {c[1]:.1f} s |" for b, c in cold.items()] + [""]
    first = next(iter(results.values()))
    if first["skipped"]:
        out += [("bfloat16 rows are missing because this CPU has no bfloat16 kernels (OpenVINO lists no BF16 "
                "capability; PyTorch would emulate it many times slower). Issue 15 measured OpenVINO's bf16 at "
                "4.4-5.2x PyTorch float32 on an AMX CPU, with embeddings at 1-cos 2.5e-5 to 3e-5 of float32, "
                "the same movement as PyTorch's bfloat16 (1-cos 2.8e-5), which moves confidences by 0.01-0.03 "
                "where a trained model's best tags sit (the CPU precision section). Hence `dtype = \"auto\"` "
                "keeps float32 with OpenVINO too: exact, and already faster than the PyTorch bound; bfloat16 is "
                "opt-in."), ""]
    out += ["Plans: " + "; ".join(f"{k}: {v['backend']} {v['dtype']}/{v['quantization']}"
                                  for k, v in first["plans"].items()), ""]
    return "\n".join(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--so400m", action="store_true", help="also the so400m-384 shape (slow to convert)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--per-round", type=int, default=16)
    parser.add_argument("--no-cold", action="store_true", help="skip the cold-start processes")
    parser.add_argument("--child")
    parser.add_argument("--opts")
    parser.add_argument("--result")
    args = parser.parse_args()
    if args.child:
        result = {"side": child_side_by_side, "cold": child_cold}[args.child](json.loads(args.opts))
        Path(args.result).write_text(json.dumps(result))
        return 0
    WORK.mkdir(parents=True, exist_ok=True)
    loads = [_load()]
    images, labels = jpegs(), labels_file(LABELS)
    cache = WORK / "openvino-cache"  # conversions and label embeddings kept between runs (cold start empties its own)
    results = {}
    for shape in ("base", "so400m") if args.so400m else ("base",):
        opts = {"model": checkpoint(shape), "labels": labels, "images": images, "rounds": args.rounds,
                "per_round": args.per_round}
        results[shape] = run_child("side", opts, cache, __file__)
    cold = {} if args.no_cold else cold_starts({"model": checkpoint("base"), "labels": labels, "images": images})
    loads.append(_load())
    text = report(machine(), results, cold, (loads[0], loads[1]))
    write_section(text, HERE / "RESULTS.md", HEADING)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
