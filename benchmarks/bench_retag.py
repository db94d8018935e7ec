"""Re-tag 100,000 stored embeddings against the built-in vocabulary, and one text search over them (issue 10).

Random unit vectors of base-model width stand in for a tagged archive; the
tagger is a base-shaped random SigLIP checkpoint (its real logit scale and bias
shape the scores). Times are the `retag` / `search` library calls the CLI
makes, records serialised to JSON lines as the CLI writes them, with the label
embeddings already at hand (the disk label cache keeps them after the first
run; that one-off cost is shown on its own line). Peak memory is the resident-set high-water mark
during each step above what the loaded model already holds.

    python benchmarks/bench_retag.py [--images 100000] [--query "a dog on a beach"] [--rounds 2]

Writes its section into benchmarks/RESULTS.md and prints it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from bench_tagging import checkpoint, rss_mb, write_section  # noqa: E402

from visual_buffet_siglip.retag import RETAG_ROWS  # noqa: E402

HEADING = "## Re-tag and search from stored embeddings (issue 10)"
NEW_QUERIES = ("a red car in the snow", "children playing football", "a bowl of ramen")
CHUNK = 1024  # the writer's default frame size


def _measure(step: Callable[[], Any]) -> tuple[Any, float, float]:
    """(result, seconds, peak resident MB above the resident size before the step)."""
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = rss_mb("VmRSS")
    start = time.perf_counter()
    result = step()
    return result, time.perf_counter() - start, rss_mb("VmHWM") - before


def _write_store(path: Path, tagger: Any, n: int) -> None:
    from visual_buffet_siglip.engine import ImageEmbedding
    from visual_buffet_siglip.store import EmbeddingWriter, StoreIdentity

    rng = np.random.default_rng(0)
    with EmbeddingWriter(path, StoreIdentity.of(tagger), chunk_rows=CHUNK) as writer:
        for start in range(0, n, CHUNK):
            block = rng.standard_normal((min(CHUNK, n - start), tagger.loaded.info.vision_width))
            block = (block / np.linalg.norm(block, axis=1, keepdims=True)).astype(np.float32)
            for i, vector in enumerate(block, start):
                name = f"photos/{i // 1000:03d}/IMG_{i:06d}.jpg"
                writer.write(name, ImageEmbedding(i, name, vector, None, 180.0))


def _retag_all(store: Any, tagger: Any) -> tuple[int, int]:
    from visual_buffet_siglip.retag import retag

    records = tags = 0
    with open(os.devnull, "w", encoding="utf-8") as sink:
        for path, record in retag(store, tagger):
            sink.write(json.dumps({"path": path, **record}) + "\n")
            records += 1
            tags += len(record["tags"])
    return records, tags


def _score_dtype_check(tagger: Any, store: Any, text: np.ndarray) -> float:
    """Largest |float32 - float64| sigmoid difference on one chunk: why `score` accumulates in float64."""
    import torch

    chunk = next(store.chunks())
    model = tagger.loaded.model
    logits32 = torch.from_numpy(chunk.vectors) @ torch.from_numpy(text).T
    fast = torch.sigmoid(logits32 * model.logit_scale.detach().exp() + model.logit_bias.detach()).numpy()
    return float(np.abs(fast - tagger.score(chunk.vectors, text)).max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=100_000)
    parser.add_argument("--query", default="a dog on a beach")
    parser.add_argument("--rounds", type=int, default=2, help="timed re-tag passes (searches: 2 x rounds + 1); "
                        "the best counts, which filters out other processes' load")
    args = parser.parse_args()

    import torch

    from visual_buffet_siglip.config import Settings, builtin_vocabulary
    from visual_buffet_siglip.engine import SiglipTagger
    from visual_buffet_siglip.retag import search
    from visual_buffet_siglip.store import EmbeddingStore

    load = os.getloadavg()[0]
    vocabulary = builtin_vocabulary()
    tagger = SiglipTagger(Settings.from_mapping({"model": str(checkpoint("base")), "device": "cpu", "dtype": "float32",
                                                 "cache_dir": str(HERE / "_work" / "label-cache")}))
    tagger.loaded  # noqa: B018 - model load is not what is measured
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "archive.emb"
        _, write_s, _ = _measure(lambda: _write_store(path, tagger, args.images))
        store = EmbeddingStore(path)
        text, labels_s, _ = _measure(lambda: tagger.embed_texts(vocabulary))
        found = dict(tagger.label_cache.stats)
        retags = [_measure(lambda: _retag_all(store, tagger)) for _ in range(args.rounds)]
        (records, tags), _, _ = retags[0]
        tagger.embed_texts([args.query])  # its encoding is timed in the new-query rows below
        warm = [_measure(lambda: search(store, tagger, args.query, 20)) for _ in range(2 * args.rounds + 1)]
        fresh = time.time_ns()  # the disk label cache keeps queries too: make these ones new
        cold = [_measure(lambda q=q: search(store, tagger, f"{q} {fresh}", 20)) for q in NEW_QUERIES]
        hits = warm[0][0]
        (retag_s, retag_mb), (search_warm_s, search_mb), (search_s, new_query_mb) = (
            (min(m[1] for m in runs), max(m[2] for m in runs)) for runs in (retags, warm, cold))
        f32_diff = _score_dtype_check(tagger, store, text)
        size_mb = path.stat().st_size / 1e6
    assert records == args.images and len(hits) == 20

    width = tagger.loaded.info.vision_width
    section = f"""{HEADING}

`python benchmarks/bench_retag.py --images {args.images} --rounds {args.rounds}` on {platform.machine()}, {os.cpu_count()} cores,
torch {torch.__version__} ({torch.get_num_threads()} threads; 1-min load average {load:.1f} at the start), float32, random base-shaped SigLIP
(width {width}), {args.images:,} random stored embeddings, the built-in vocabulary ({len(vocabulary):,} labels),
default threshold 0.01 / max_tags 50, store written in {CHUNK}-row chunks.

| step | time | peak memory above the loaded model |
|---|---|---|
| write the store ({size_mb:,.0f} MB) | {write_s:.1f} s | - |
| label embeddings: {found["missing"]:,} encoded, {found["disk"]:,} from the disk cache | {labels_s:.1f} s | - |
| **re-tag** {args.images:,} images, records to JSON lines ({tags / records:.1f} tags/image; best of {len(retags)}) | **{retag_s:.1f} s** | {retag_mb:.0f} MB |
| **search** "{args.query}", top 20 (query already encoded; best of {len(warm)}) | **{search_warm_s:.2f} s** | {search_mb:.0f} MB |
| search, a new query (includes encoding it; best of {len(cold)} queries) | {search_s:.2f} s | {new_query_mb:.0f} MB |

Memory does not grow with the store: re-tag scores {RETAG_ROWS:,} rows per call (a [{RETAG_ROWS:,}, {len(vocabulary):,}]
score block), search reads one {CHUNK:,}-row frame at a time ({CHUNK * width * 4 / 1e6:.0f} MB of float32),
and the store itself ({size_mb:,.0f} MB) is never held whole. Scores accumulate in float64: a float32 matmul would
differ by up to {f32_diff:.1e} on the sigmoid (logit scale x dot-product rounding), above the 1e-6 that
re-tag == tag promises, and float64 costs little here. On a busy 2-core machine single timings vary by
2-3x (the load average above says how busy it was); the best of several runs is what this code costs.
"""
    write_section(section, HERE / "RESULTS.md", HEADING)
    print(section)


if __name__ == "__main__":
    main()
