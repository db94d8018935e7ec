"""Tagging speed side by side: ours, the vision-tower bound, the naive path, cold start, memory (issue 4).

    python benchmarks/bench_tagging.py            # quick: base shape, 340 labels, ~5-8 minutes on 2 cores
    python benchmarks/bench_tagging.py --full     # base + so400m shapes, whole vocabulary, 2,000-image memory run

Builds random-weight checkpoints of the real `google/siglip-base-patch16-224` and
`google/siglip-so400m-patch14-384` shapes (tests/checkpoints.py; same layers,
widths, patch and image sizes, so the same compute), generates photo-like JPEGs
from 0.5 to 24 megapixels, and takes labels from the built-in vocabulary
(quick mode: 340 of them, evenly spaced; the naive path's cost grows with the
label count and ours does not, so fewer labels is the conservative choice).

Every measurement runs in its own fresh process, so cold starts are real cold
starts and peak RSS belongs to one configuration:
- ours: `SiglipTagger.iter_tag` over JPEG paths (decode, preprocess, vision,
  scores, tag selection), in steady state (labels embedded, model warm);
- bound: the vision tower alone (`get_image_features`) on the very same
  preprocessed pixel tensors, same dtype, same batch size;
  ours and the bound alternate round by round and the ratio is taken per round
  (median reported), because a shared machine's load drifts;
- naive: what the host's SigLIP plugin and transformers' zero-shot pipeline
  do: decode, then a full forward of processor(text=all prompts, images=[one])
  per image, the text tower re-encoding every label for every image;
- cold start: a new process to its first tagged image, with an empty
  label-embedding cache and then with the cache the first run wrote;
- memory: RSS sampled while tagging a long stream of images.

Writes its section into benchmarks/RESULTS.md (other benchmarks own the other sections) and prints it.
The other benchmarks share its helpers: random checkpoints, photos, labels, the
fresh-process runner, memory readings, the machine summary and the section writer.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

HEADING = "## Tagging speed (issue 4)"
WORK = HERE / "_work" / "tagging"
SHAPES = {  # benchmark shape (a tests/checkpoints.py shape) -> the real checkpoint it mirrors
    "base": "google/siglip-base-patch16-224",
    "so400m": "google/siglip-so400m-patch14-384",
}
# (width, height): a web image, full HD, 8 MP, a 12 MP phone photo, a 24 MP camera photo
SIZES = [(800, 600), (1920, 1080), (3264, 2448), (4032, 3024), (6000, 4000)]
QUICK_LABELS = 340


# --- inputs --------------------------------------------------------------------------------------

def checkpoint(shape: str, family: str = "siglip") -> Path:
    """A random-weight `family` checkpoint of `shape` (tests/checkpoints.py), built once for every benchmark.

    Built atomically: a half-built one is never used.
    """
    folder = WORK / f"{family}-{shape}-random"
    if (folder / "model.safetensors").is_file():
        return folder
    from checkpoints import build_checkpoint

    WORK.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{family}-{shape}-", dir=WORK))
    print(f"building a random {family} checkpoint of the {SHAPES.get(shape, shape)} shape in {folder} ...",
          file=sys.stderr)
    build_checkpoint(family, tmp, shape=shape)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder


def photo(width: int, height: int, seed: int):
    """A photo-like picture: smooth lighting, overlapping shapes, mid-scale texture and sensor noise.

    Saved at JPEG quality 90 it carries ~2 bits per pixel, like phone and camera JPEGs (2-4).
    """
    import numpy as np
    from PIL import Image, ImageDraw, ImageFilter

    rng = np.random.default_rng(seed)
    sw, sh = max(8, width // 16), max(8, height // 16)
    yy, xx = np.mgrid[0:sh, 0:sw] / max(sw, sh)
    light = np.stack([rng.uniform(40, 200) + rng.uniform(-80, 80) * xx + rng.uniform(-80, 80) * yy
                      for _ in range(3)], -1)
    small = Image.fromarray(np.clip(light, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(small)
    for _ in range(40):
        x0, y0, r = rng.uniform(0, sw), rng.uniform(0, sh), rng.uniform(1, sw / 4)
        box = [x0, y0, x0 + r, y0 + r * rng.uniform(0.3, 2)]
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
    scene = small.filter(ImageFilter.GaussianBlur(0.6)).resize((width, height), Image.BICUBIC)
    texture = rng.normal(0, 1, (height // 4 + 1, width // 4 + 1)).astype(np.float32)
    texture = Image.fromarray((texture * 20 + 128).clip(0, 255).astype(np.uint8)).resize((width, height),
                                                                                          Image.BILINEAR)
    pixels = (np.asarray(scene, np.float32) + (np.asarray(texture, np.float32) - 128)[..., None]
              + rng.normal(0, 3, (height, width, 1)).astype(np.float32))
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


def jpegs() -> list[Path]:
    """Two photos of each size (one landscape, one portrait), generated once."""
    folder = WORK / "images"
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i, (w, h) in enumerate(SIZES):
        for j, (width, height) in enumerate(((w, h), (h, w))):
            path = folder / f"photo{i}{j}_{width}x{height}.jpg"
            if not path.is_file():
                tmp = path.with_suffix(".tmp")
                photo(width, height, seed=10 * i + j).save(tmp, format="JPEG", quality=90)
                tmp.rename(path)
            out.append(path)
    return out


def labels_file(count: int | None) -> Path:
    """The built-in vocabulary, or `count` labels evenly spaced through it, as a labels file."""
    from visual_buffet_siglip.config import builtin_vocabulary

    vocabulary = list(builtin_vocabulary())
    chosen = vocabulary if not count or count >= len(vocabulary) else \
        [vocabulary[i * len(vocabulary) // count] for i in range(count)]
    path = WORK / f"labels-{len(chosen)}.txt"
    path.write_text("\n".join(chosen) + "\n", encoding="utf-8")
    return path


# --- measurements (each in a fresh child process) -------------------------------------------------

def rss_mb(field: str = "VmRSS") -> float:
    """A memory figure of this process from /proc/self/status (VmRSS: resident now, VmHWM: its peak); NaN elsewhere."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def _peak_rss_mb() -> float:
    try:
        import resource
    except ImportError:  # Windows
        return float("nan")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def _tagger(opts: dict[str, Any], **extra: Any):
    from visual_buffet_siglip import Settings
    from visual_buffet_siglip.engine import SiglipTagger

    values = {"model": opts["model"], "device": "cpu", "dtype": opts.get("dtype", "auto"),
              "labels_file": opts["labels"], "text_cache": opts.get("text_cache", True),
              "decode": opts.get("decode", "fast")}
    if opts.get("batch_size"):
        values["batch_size"] = opts["batch_size"]
    values.update(extra)
    return SiglipTagger(Settings.from_mapping(values))


def child_cold(opts: dict[str, Any]) -> dict[str, Any]:
    """A new process to its first tagged image: import, load, label embeddings, one image."""
    start = time.perf_counter()
    import torch  # noqa: F401 - part of what a cold start pays

    from visual_buffet_siglip.engine import SiglipTagger  # noqa: F401
    imported = time.perf_counter()
    tagger = _tagger(opts)
    tagger.loaded  # noqa: B018
    loaded = time.perf_counter()
    tagger.embed_texts(tagger.default_options.labels)
    texted = time.perf_counter()
    tagger.tag([opts["image"]])
    done = time.perf_counter()
    return {"import_s": imported - start, "load_s": loaded - imported, "text_s": texted - loaded,
            "first_image_s": done - texted, "total_s": done - start, "stats": tagger.label_cache.stats,
            "labels": len(tagger.default_options.labels), "peak_rss_mb": _peak_rss_mb()}


def child_steady(opts: dict[str, Any]) -> dict[str, Any]:
    """Steady state: ours against the vision-tower bound, batch by batch; then decode variants, round by round."""
    import itertools

    import torch

    from visual_buffet_siglip.decoding import DecodePolicy

    tagger = _tagger(opts)
    labels = list(tagger.default_options.labels)
    started = time.perf_counter()
    tagger.embed_texts(labels)
    text_s = time.perf_counter() - started
    paths = [str(p) for p in opts["images"]]
    model, batch = tagger.loaded.model, tagger.batch_size
    dtype = model.dtype
    draft = tagger._draft_size()
    pixels = [tagger._prepare(i, p, draft).inputs["pixel_values"] for i, p in enumerate(paths)]
    auto, fast = tagger.decode_policy, tagger.settings

    def bound(first: int, count: int) -> float:
        """Seconds for the vision tower alone on images first..first+count of the cycle, in batches."""
        order = [pixels[(first + i) % len(pixels)] for i in range(count)]
        start = time.perf_counter()
        with torch.inference_mode():
            for s in range(0, count, batch):
                model.get_image_features(pixel_values=torch.cat(order[s:s + batch]).to(dtype))
        return time.perf_counter() - start

    # 1. Pairs: one batch of ours (a long-running iter_tag, as in a real run), then the same images through the
    #    bound, and so on. Pairs a few seconds apart see the same machine load. With the phased or inline
    #    policy nothing runs between two pulls, so the bound's timing is not disturbed; with the overlap
    #    policy (spare cores, GPUs) decode threads would keep working, so whole rounds are timed instead.
    pairs: list[tuple[float, float]] = []
    if auto.mode != "overlap":
        stream = tagger.iter_tag(itertools.cycle(paths), labels=labels)
        done = 0
        for k in range(opts["pairs"] + 2):  # two batches of warm-up
            start = time.perf_counter()
            for _ in range(batch):
                next(stream)
            ours_s = time.perf_counter() - start
            bound_s = bound(done, batch)
            done += batch
            if k >= 2:
                pairs.append((ours_s, bound_s))
        stream.close()

    # 2. Rounds: every variant (and ours again) as a fresh run over `per_round` images, alternating with the bound.
    variants: dict[str, tuple[Any, Any]] = {"ours": (auto, fast)}  # name -> (decode policy, settings)
    for spec in opts.get("variants", []):
        if spec == "exact":
            variants["ours, decode = exact"] = (auto, dataclasses.replace(fast, decode="exact"))
            continue
        mode, _, workers = spec.partition("-")
        n = int(workers or 0)
        policy = DecodePolicy(mode, n, batch if mode == "phased" else max(2 * batch, 2 * n), "benchmark")
        if (policy.mode, policy.workers) != (auto.mode, auto.workers):
            variants[f"ours, {mode}" + (f" x{n}" if n else "")] = (policy, fast)
    per_round = [paths[i % len(paths)] for i in range(opts["per_round"])]

    def ours(policy: Any, settings: Any) -> float:
        tagger._policy, tagger.settings = policy, settings
        start = time.perf_counter()
        for _ in tagger.iter_tag(per_round, labels=labels):
            pass
        return time.perf_counter() - start

    times: dict[str, list[float]] = {"bound": [], **{name: [] for name in variants}}
    for r in range(opts["rounds"] + 1):  # round 0 is warm-up
        row = {"bound": bound(0, len(per_round))}
        row.update((name, ours(*variant)) for name, variant in variants.items())
        for name, seconds in row.items():
            if r:
                times[name].append(seconds)
    if not pairs:  # the overlap policy: the rounds are the steady-state measurement
        pairs = list(zip(times["ours"], times["bound"]))
        pair_images = len(per_round)
    else:
        pair_images = batch
    return {"pairs": pairs, "pair_images": pair_images, "times": times, "images_per_round": len(per_round),
            "batch": batch, "dtype": str(dtype).split(".")[-1],
            "policy": f"{auto.mode} x{auto.workers}: {auto.reason}", "text_s": text_s,
            "stats": tagger.label_cache.stats, "peak_rss_mb": _peak_rss_mb(), "rss_mb": rss_mb()}


def child_naive(opts: dict[str, Any]) -> dict[str, Any]:
    """The naive path: decode, then one full forward with every label's prompt, per image."""
    import torch
    from PIL import Image
    from transformers import AutoModel, AutoProcessor

    from visual_buffet_siglip.config import parse_label_lines
    from visual_buffet_siglip.engine import prompt_for

    dtype = {"auto": torch.float32}.get(opts.get("dtype", "auto")) or getattr(torch, opts["dtype"])
    model = AutoModel.from_pretrained(opts["model"], dtype=dtype).eval()
    processor = AutoProcessor.from_pretrained(opts["model"])
    prompts = [prompt_for(label) for label in parse_label_lines(Path(opts["labels"]).read_text("utf-8"))]
    times = []
    for path in opts["images"][:opts["count"]]:
        t = time.perf_counter()
        image = Image.open(path).convert("RGB")
        inputs = processor(text=prompts, images=[image], padding="max_length", max_length=64, return_tensors="pt")
        inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
        with torch.inference_mode():
            torch.sigmoid(model(**inputs).logits_per_image.float())
        times.append(time.perf_counter() - t)
    return {"times": times, "labels": len(prompts), "peak_rss_mb": _peak_rss_mb()}


def child_memory(opts: dict[str, Any]) -> dict[str, Any]:
    """RSS while tagging a long stream of images (records consumed as they come, as the CLI does)."""
    tagger = _tagger(opts)
    tagger.embed_texts(tagger.default_options.labels)
    paths = [str(p) for p in opts["images"]]
    total, every = opts["count"], max(1, opts["count"] // 40)
    stream = (paths[i % len(paths)] for i in range(total))
    samples = []
    start = time.perf_counter()
    for k, _ in enumerate(tagger.iter_tag(stream)):
        if k % every == 0 or k == total - 1:
            samples.append((k + 1, round(rss_mb(), 1)))
    return {"samples": samples, "seconds": time.perf_counter() - start, "peak_rss_mb": _peak_rss_mb()}


CHILDREN = {"cold": child_cold, "steady": child_steady, "naive": child_naive, "memory": child_memory}


def run_child(kind: str, opts: dict[str, Any], cache: Path, script: str = __file__) -> dict[str, Any]:
    """Run `script --child kind` in a fresh process with `cache` as its label cache; its result and `process_s`.

    `process_s` is the child's whole life, interpreter start included (a real cold start).
    """
    pythonpath = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, VISUAL_BUFFET_SIGLIP_CACHE=str(cache), PYTHONPATH=pythonpath)
    with tempfile.NamedTemporaryFile("r", suffix=".json", dir=WORK, delete=False) as out:
        result_path = out.name
    try:
        started = time.perf_counter()
        subprocess.run([sys.executable, script, "--child", kind, "--opts", json.dumps(opts, default=str),
                        "--result", result_path], check=True, env=env)
        result = json.loads(Path(result_path).read_text() or "{}")
        result["process_s"] = time.perf_counter() - started
        return result
    finally:
        os.unlink(result_path)


# --- the report ----------------------------------------------------------------------------------

def machine() -> dict[str, Any]:
    import PIL
    import torch
    import transformers
    from PIL import features

    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    except OSError:
        pass
    simd = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_int8") if f in flags]
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30 if hasattr(os, "sysconf") else 0
    return {"cpu": model, "cpus": os.cpu_count(), "simd": simd, "ram_gb": ram, "python": platform.python_version(),
            "torch": torch.__version__, "threads": torch.get_num_threads(), "transformers": transformers.__version__,
            "pillow": PIL.__version__, "turbo": bool(features.check_feature("libjpeg_turbo")),
            "os": f"{platform.system()} {platform.release()}"}


def _load() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


def _per_image(seconds: list[float], n: int) -> float:
    return statistics.median(seconds) / n


def headline(steady: dict[str, Any]) -> dict[str, float]:
    """Ours and the bound per image (medians of the pairs) and ours / bound (median of the per-pair ratios)."""
    pairs, n = steady["pairs"], steady["pair_images"]
    return {"ours": _per_image([o for o, _ in pairs], n), "bound": _per_image([b for _, b in pairs], n),
            "ratio": statistics.median(o / b for o, b in pairs),
            "total_ratio": sum(o for o, _ in pairs) / sum(b for _, b in pairs), "pairs": len(pairs)}


def variant_rows(steady: dict[str, Any]) -> dict[str, dict[str, float]]:
    n, times = steady["images_per_round"], steady["times"]
    return {name: {"s_per_image": _per_image(seconds, n),
                   "ratio": statistics.median(o / b for o, b in zip(seconds, times["bound"]))}
            for name, seconds in times.items()}


def _fmt_s(seconds: float) -> str:
    return f"{seconds:.3f} s" if seconds < 10 else f"{seconds:.1f} s"


def memory_summary(samples: list[list[float]]) -> dict[str, float]:
    """Median RSS early (10-30% in, after warm-up) and late (last 30%), the maximum, and the late - early drift."""
    total = samples[-1][0]
    early = statistics.median(rss for k, rss in samples if 0.1 * total <= k <= 0.3 * total)
    late = statistics.median(rss for k, rss in samples if k >= 0.7 * total)
    return {"early": early, "late": late, "peak": max(rss for _, rss in samples), "drift": late - early,
            "per_1000": 1000 * (late - early) / (0.6 * total), "images": total}


def report(args: argparse.Namespace, info: dict[str, Any], results: dict[str, Any], loads: tuple[float, float]
           ) -> str:
    busy = " (a shared machine: other jobs were running)" if max(loads) > 1.5 else ""
    lines = [HEADING, "",
             f"`python benchmarks/bench_tagging.py{' --full' if args.full else ''}` on {info['cpu']} "
             f"({info['cpus']} CPUs; {', '.join(info['simd']) or 'no AVX2'}), {info['ram_gb']:.0f} GB RAM, "
             f"{info['os']}; Python {info['python']}, torch {info['torch']} ({info['threads']} threads), "
             f"transformers {info['transformers']}, Pillow {info['pillow']}"
             f"{' with libjpeg-turbo' if info['turbo'] else ''}. 1-minute load average {loads[0]:.1f} at the start "
             f"and {loads[1]:.1f} at the end{busy}.", "",
             f"Random-weight checkpoints of the real shapes; {len(SIZES) * 2} photo-like JPEGs (quality 90, "
             f"{', '.join(f'{w * h / 1e6:.1f}' for w, h in SIZES)} MP, landscape and portrait) cycled; labels from "
             "the built-in vocabulary. Default settings otherwise (`decode = \"fast\"`, dtype auto = float32 on "
             "CPU, batch size from the planner).", ""]
    for shape, res in results.items():
        st = res["steady"]
        h = headline(st)
        naive = statistics.mean(res["naive"]["times"])
        n_naive = len(res["naive"]["times"])
        lines += [f"### {SHAPES[shape]} shape, {res['labels']} labels", "",
                  f"Batch {st['batch']}, {st['dtype']}, decode policy {st['policy']}.", "",
                  f"Ours and the bound alternate {'batch by batch' if st['pair_images'] == st['batch'] else 'round by round'} "
                  f"({h['pairs']} pairs of {st['pair_images']} images); s/image are medians, the ratio is the "
                  "median of the per-pair ratios (all pairs pooled in brackets).", "",
                  "| path | s / image | images / s | vs vision-tower bound |", "|---|---|---|---|",
                  f"| vision tower only (bound) | {h['bound']:.3f} | {1 / h['bound']:.2f} | 1.00 |",
                  f"| **ours** (tag, steady state) | {h['ours']:.3f} | {1 / h['ours']:.2f} | "
                  f"**{h['ratio']:.3f}** ({h['total_ratio']:.3f}) |",
                  f"| naive: full forward per image, text re-encoded ({n_naive} image{'s' if n_naive > 1 else ''}) "
                  f"| {naive:.1f} | {1 / naive:.3f} | {naive / h['bound']:.0f} |", "",
                  f"Ours is **{naive / h['ours']:.0f}x faster than the naive path** per image.", ""]
        rows = variant_rows(st)
        if len(rows) > 2:
            lines += [f"Decode variants, each a fresh run over {st['images_per_round']} images alternating with the "
                      f"bound on the same images ({len(st['times']['bound'])} rounds; ratio = median of the "
                      "per-round ratios):", "", "| variant | vs bound |", "|---|---|"]
            for name, row in rows.items():
                if name != "bound":
                    label = f"ours (default: {st['policy'].split(':')[0]})" if name == "ours" else name
                    lines.append(f"| {label} | {row['ratio']:.3f} |")
            lines += ["", "Phased: the next batch is decoded on every core between model calls. Overlap xN: N "
                      "decode threads work ahead while the model runs. Inline: decoded one by one in the calling "
                      "thread. Exact: full-size JPEG decoding.", ""]
        if "cold" in res:
            c0, c1 = res["cold"]
            lines += ["| cold start, new process to first tagged image | import | load model | label embeddings "
                      "| first image | total | peak RSS |", "|---|---|---|---|---|---|---|"]
            for name, c in (("empty label cache (first run, or `text_cache = false`)", c0),
                            ("label cache on disk (every later run)", c1)):
                lines.append(f"| {name} | {_fmt_s(c['import_s'])} | {_fmt_s(c['load_s'])} | {_fmt_s(c['text_s'])} "
                             f"| {_fmt_s(c['first_image_s'])} | {_fmt_s(c['total_s'])} | {c['peak_rss_mb']:.0f} MB |")
            lines += ["", f"Second-process text stage: **{c0['text_s'] / c1['text_s']:.0f}x faster** "
                          f"({c0['labels']} labels read from disk instead of encoded).", ""]
        if "memory" in res:
            m = memory_summary(res["memory"]["samples"])
            lines += [f"Memory over a {m['images']:,}-image run ({res['memory']['seconds'] / m['images']:.3f} "
                      f"s/image, records consumed as they come): median RSS {m['early']:.0f} MB early (10-30% in), "
                      f"{m['late']:.0f} MB late (last 30%), {m['peak']:.0f} MB at most.", ""]
        peaks = [f"{r['dtype']}: {r['peak_rss_mb']:.0f} MB" for r in [st, *res.get("extra", [])]]
        lines += [f"Peak RSS of a process tagging in steady state: {'; '.join(peaks)}.", ""]
        for extra in res.get("extra", []):
            e = headline(extra)
            lines += [f"With dtype = {extra['dtype']} (opt-in; see the CPU precision study for what it costs in "
                      f"accuracy): bound {e['bound']:.3f} s/image, ours {e['ours']:.3f} s/image "
                      f"({e['ratio']:.3f}x the bound).", ""]
    if "base" in results:
        lines += targets(results["base"])
        lines += notes(results)
    return "\n".join(lines).rstrip() + "\n"


def notes(results: dict[str, Any]) -> list[str]:
    """What the numbers mean: the few sentences a reader needs to trust them."""
    base = results["base"]
    h = headline(base["steady"])
    out = ["### Notes", "",
           f"- What separates ours from the bound ({(h['ratio'] - 1) * 100:.0f}%) is JPEG decoding and "
           "preprocessing: with reduced-size decoding about 5-55 ms of one core per photo (0.5-24 MP, "
           "bench_precision.py), run on both cores between model calls, plus scoring and tag selection "
           "(under 1 ms). The label side costs nothing per image.",
           "- On this 2-core machine torch already keeps both cores busy, so decode threads running beside "
           "the model compete with it (the overlap rows); decoding the next batch on both cores between "
           "model calls (phased, the default here) is fastest. Full-size decoding (decode = exact) costs "
           "3.5-4.5x more per large photo and pushes ours well past the bound: the bound is reachable only "
           "with reduced-size decoding. With spare cores or a GPU the policy switches to overlap."]
    for extra in base.get("extra", []):
        e = headline(extra)
        out.append(f"- At {extra['dtype']} the vision tower is {h['bound'] / e['bound']:.1f}x faster on this "
                   f"CPU (AMX), so the same decoding weighs more: ours is {e['ratio']:.2f}x its bound there. "
                   "bfloat16 is not the CPU default because it moves confidences by more than 0.005 "
                   "(see the precision section below).")
    if "so400m" in results:
        so = results["so400m"]
        out.append(f"- The so400m-384 shape's vision tower is {headline(so['steady'])['bound'] / h['bound']:.0f}x "
                   f"the base one's, so with {so['labels']} labels the naive path is only "
                   f"{statistics.mean(so['naive']['times']) / headline(so['steady'])['ours']:.0f}x slower than "
                   "ours; its text stage still dominates the naive cost and the first run, and grows with the "
                   "label count. The planner picks batch 1 for it on 2 cores (measured by hand: batch 2 and 4 are no "
                   "faster per image).")
    naive = base["naive"]
    out.append(f"- The naive path re-encodes all {naive['labels']} prompts for every image; its cost grows "
               "linearly with the label count while ours does not.")
    return out + [""]


def targets(res: dict[str, Any]) -> list[str]:
    h = headline(res["steady"])
    naive = statistics.mean(res["naive"]["times"])
    rows = [("steady state <= 1.15x the vision-tower bound", f"{h['ratio']:.3f}x", h["ratio"] <= 1.15),
            (">= 50x faster than the naive path", f"{naive / h['ours']:.0f}x", naive / h["ours"] >= 50)]
    if "cold" in res:
        c0, c1 = res["cold"]
        rows.append(("second-process text stage >= 20x faster than encoding", f"{c0['text_s'] / c1['text_s']:.0f}x",
                     c0["text_s"] / c1["text_s"] >= 20))
    if "memory" in res:
        m = memory_summary(res["memory"]["samples"])
        rows.append((f"memory flat over a {m['images']:,}-image run",
                     f"{m['drift']:+.0f} MB late vs early ({m['per_1000']:+.1f} MB / 1,000 images)",
                     abs(m["drift"]) < 50))
    out = ["### Targets (base shape)", "", "| target | measured | met |", "|---|---|---|"]
    out += [f"| {name} | {value} | {'yes' if ok else '**no**'} |" for name, value, ok in rows]
    return out + [""]


def write_section(text: str, results_md: Path, heading: str = HEADING) -> None:
    """Replace the section under `heading` in RESULTS.md, keeping every other section."""
    old = results_md.read_text(encoding="utf-8") if results_md.exists() else "# Benchmark results\n"
    if heading in old:
        head, rest = old.split(heading, 1)
        tail = rest[rest.find("\n## "):] if "\n## " in rest else ""
        new = head + text + tail
    else:
        new = old.rstrip() + "\n\n" + text
    results_md.write_text(new, encoding="utf-8")


# --- main ----------------------------------------------------------------------------------------

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--full", action="store_true", help="base and so400m, whole vocabulary, 2,000-image memory run")
    parser.add_argument("--shapes", help="comma-separated: base, so400m (default: base; --full: both)")
    parser.add_argument("--labels", type=int, help=f"how many vocabulary labels (default {QUICK_LABELS}; --full: all)")
    parser.add_argument("--pairs", type=int, help="ours/bound batch pairs (default 15; --full 40)")
    parser.add_argument("--rounds", type=int, help="rounds of the decode-variant comparison (default 3; --full 5)")
    parser.add_argument("--report-only", action="store_true", help="re-render the last run's results")
    parser.add_argument("--per-round", type=int, help="images per decode-variant round (default 24)")
    parser.add_argument("--memory-images", type=int, help="length of the memory run (default 300; --full 2000)")
    parser.add_argument("--naive-images", type=int, help="images through the naive path (default 1; --full 2)")
    parser.add_argument("--variants", default="exact,phased-2,overlap-1,overlap-2,inline",
                        help="extra decode variants to time against the default (empty for none)")
    parser.add_argument("--dtypes", default=None,
                        help="extra dtypes to time on the base shape (default: none; --full: bfloat16)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    parser.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    parser.add_argument("--opts", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        result = CHILDREN[args.child](json.loads(args.opts))
        Path(args.result).write_text(json.dumps(result))
        return 0

    WORK.mkdir(parents=True, exist_ok=True)
    shapes = (args.shapes or ("base,so400m" if args.full else "base")).split(",")
    label_count = args.labels if args.labels is not None else (0 if args.full else QUICK_LABELS)
    rounds = args.rounds or (5 if args.full else 3)
    pairs = args.pairs or (40 if args.full else 15)
    if args.report_only:
        last = json.loads((WORK / "last-run.json").read_text())
        text = report(args, last["machine"], last["results"], tuple(last["loads"]))
        if not args.no_write:
            write_section(text, HERE / "RESULTS.md")
        print(text)
        return 0
    memory_images = args.memory_images or (2000 if args.full else 300)
    naive_images = args.naive_images or (2 if args.full else 1)
    extra_dtypes = [d for d in (args.dtypes if args.dtypes is not None else ("bfloat16" if args.full else "")
                                ).split(",") if d]
    variants = [v for v in args.variants.split(",") if v]
    loads = [_load()]
    info = machine()
    images = jpegs()
    results: dict[str, Any] = {}
    for shape in shapes:
        model = checkpoint(shape)
        big = shape != "base"
        labels = labels_file(min(label_count or 10**6, QUICK_LABELS) if big else label_count)
        opts = {"model": str(model), "labels": str(labels), "images": [str(p) for p in images]}
        cache = WORK / f"cache-{shape}"
        shutil.rmtree(cache, ignore_errors=True)
        res: dict[str, Any] = {"labels": sum(1 for line in labels.read_text().splitlines() if line.strip())}
        print(f"[{shape}] cold start, empty label cache ...", file=sys.stderr)
        twelve_mp = str(next(p for p in images if "4032x3024" in p.name))
        cold = [run_child("cold", dict(opts, image=twelve_mp), cache)]
        print(f"[{shape}] cold start, label cache on disk ...", file=sys.stderr)
        cold.append(run_child("cold", dict(opts, image=twelve_mp), cache))
        res["cold"] = cold
        print(f"[{shape}] steady state vs the vision-tower bound ...", file=sys.stderr)
        per_round = 4 if big else (args.per_round or 24)
        res["steady"] = run_child("steady", dict(opts, rounds=1 if big else rounds, per_round=per_round,
                                                 pairs=2 if big else pairs, variants=[] if big else variants),
                                  cache)
        if not big:
            for dtype in extra_dtypes:
                print(f"[{shape}] steady state at {dtype} ...", file=sys.stderr)
                res.setdefault("extra", []).append(run_child("steady", dict(opts, dtype=dtype, rounds=1,
                                                                           per_round=per_round, pairs=pairs),
                                                             cache))
        print(f"[{shape}] naive path ...", file=sys.stderr)
        count = 1 if big else naive_images
        res["naive"] = run_child("naive", dict(opts, images=[twelve_mp] * count, count=count), cache)
        if not big:
            print(f"[{shape}] memory over {memory_images} images ...", file=sys.stderr)
            res["memory"] = run_child("memory", dict(opts, count=memory_images), cache)
        results[shape] = res
    loads.append(_load())
    text = report(args, info, results, (loads[0], loads[1]))
    (WORK / "last-run.json").write_text(json.dumps({"machine": info, "results": results, "loads": loads}, indent=1))
    if not args.no_write:
        write_section(text, HERE / "RESULTS.md")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
