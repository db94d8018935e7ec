"""Per-image cost through today's host interface vs our batched steady state (issue 6: <= 1.3 x).

The host calls `configure(**settings)` and `tag(path)` once per image. This times
that loop through `host.SiglipPlugin` (with the stand-in host from tests/standin_host)
against `SiglipTagger.tag` on the same images, on the same shared tagger, so both
see the same loaded model and cached label embeddings. Two host orders: a folder
walk (what `visual-buffet tag FOLDER` does; read-ahead batches it) and single
files each from another folder (read-ahead cannot help: batches of one).
Base-shaped random checkpoint, the built-in vocabulary, camera-aspect JPEGs.

    python benchmarks/bench_host.py [--images 36] [--size 1600x1200] [--rounds 3]

Prints a Markdown section for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
TESTS = HERE.parent / "tests"
sys.path[:0] = [str(TESTS), str(TESTS / "standin_host" / "src")]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from bench_tagging import checkpoint  # noqa: E402
from conftest import make_image  # noqa: E402


def _seconds_per_image(run, n: int) -> float:
    start = time.perf_counter()
    run()
    return (time.perf_counter() - start) / n


def _one_per_folder(images: list[Path], root: Path) -> list[Path]:
    """Copies of `images`, each alone in its own folder: nothing for read-ahead to batch."""
    copies = []
    for i, image in enumerate(images):
        folder = root / f"single{i:03d}"
        folder.mkdir()
        copies.append(Path(shutil.copy(image, folder)))
    return copies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=36)
    parser.add_argument("--size", default="1600x1200", help="WIDTHxHEIGHT of the test JPEGs")
    parser.add_argument("--rounds", type=int, default=3, help="timed passes per path; the best counts")
    args = parser.parse_args()
    width, height = map(int, args.size.split("x"))

    from visual_buffet_siglip.config import builtin_vocabulary
    from visual_buffet_siglip.plugin import tagger_for

    work = Path(tempfile.mkdtemp(prefix="bench-host-"))
    (work / "walk").mkdir()
    images = [make_image(work / "walk" / f"photo{i:03d}.jpg", (width, height), seed=i) for i in range(args.images)]
    scattered = _one_per_folder(images, work)
    block = {"model": str(checkpoint("base")), "device": "cpu", "dtype": "float32",
             "cache_dir": str(HERE / "_work" / "label-cache")}  # a rerun skips encoding the labels
    config = work / "config.toml"
    config.write_text("[plugins.siglip]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in block.items()))
    os.environ["VISUAL_BUFFET_CONFIG"] = str(config)

    from visual_buffet_siglip.host import SiglipPlugin

    plugin = SiglipPlugin(work)
    start = time.perf_counter()
    assert plugin.setup(), "setup failed (see the log)"
    setup_s = time.perf_counter() - start
    settings = plugin.settings
    tagger = tagger_for(settings.model_settings)
    labels = settings.options.labels
    assert labels == builtin_vocabulary()
    options = {"threshold": settings.options.confidence_threshold, "limit": settings.options.max_tags}

    def batched() -> None:
        tagger.tag(images, labels=labels, threshold=settings.options.confidence_threshold,
                   max_tags=settings.options.max_tags)

    def through_host(paths: list[Path]):
        def run() -> None:
            host_plugin = SiglipPlugin(work)  # a fresh one: nothing embedded yet, same shared tagger
            for path in paths:
                host_plugin.configure(**options)
                host_plugin.tag(path)
        return run

    tagger.tag(images[:tagger.batch_size])  # warm-up: allocator, kernels, decode threads
    runs = {"batched": batched, "walk": through_host(images), "scattered": through_host(scattered)}
    results: dict[str, float] = {name: float("inf") for name in runs}
    load_before = os.getloadavg()[0]
    for _ in range(args.rounds):  # interleaved, so drift in machine load hits every path alike
        for name, run in runs.items():
            results[name] = min(results[name], _seconds_per_image(run, len(images)))
    load_after = os.getloadavg()[0]
    batch_s, adapter_s, single_s = results["batched"], results["walk"], results["scattered"]
    shutil.rmtree(work)

    print(f"""## Through today's host interface (bench_host.py)

`python benchmarks/bench_host.py --images {args.images} --size {args.size} --rounds {args.rounds}`:
{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch CPU fp32; base-shaped random
SigLIP checkpoint; {len(labels)} labels (built-in vocabulary); {args.images} JPEGs of {width}x{height};
decode = "{settings.model_settings.decode}", batch size {tagger.batch_size} (planner's choice). Best of {args.rounds}
interleaved passes each; load average {load_before:.1f} before, {load_after:.1f} after.

| path | s/image | ratio to batched |
|---|---|---|
| batched `SiglipTagger.tag(images)` (steady state) | {batch_s:.3f} | 1.00 |
| host adapter, `configure(**settings)` + `tag(path)` per image, folder walk | {adapter_s:.3f} | **{adapter_s / batch_s:.2f}** (target <= 1.3) |
| host adapter, single files from different folders (batches of one) | {single_s:.3f} | {single_s / batch_s:.2f} |

`setup()` (model load + the {len(labels)} label embeddings, from the disk cache on a rerun) took {setup_s:.1f} s.""")


if __name__ == "__main__":
    main()
