"""Every GPU claim of this project, measured in one run (issue 18).

    python benchmarks/gpu_check.py                        # on a CUDA machine: under 8 minutes on one GPU
    python benchmarks/gpu_check.py --quick                # base shape only, fewer images
    python benchmarks/gpu_check.py --device cpu --quick   # CPU mode (CI): the checks that need no CUDA, < 60 s

Checks, each a table row with a verdict where there is a claim to hold:
- equivalence: our float32 confidences on the device against transformers' own
  float32 forward on the CPU, <= 1e-5, on the SigLIP, SigLIP 2 and NaFlex tiny
  checkpoints (NaFlex at max_num_patches 256 and 1024); on CUDA once more with
  TF32 off, to tell TF32 convolutions apart from real differences;
- half precision: bfloat16 and float16 deviation from that reference;
- attention: sdpa and flash_attention_2 (where flash-attn imports) against eager;
- bitsandbytes 8-bit and 4-bit on CUDA (where installed), the pooling head kept whole;
- out of memory: an oversized batch is halved and retried, no image lost (CUDA:
  a real OOM under a capped allocator; CPU: a simulated one);
- memory: `memory.predict` against torch.cuda.max_memory_allocated per batch size,
  for text encoding and for batches (CPU: the prediction alone), plus the planner's
  batch for so400m-384 at float16 on 4-80 GB cards;
- speed: steady-state images/s of `iter_tag` over JPEGs against the vision tower
  alone on ready pixels, at the auto batch size, base and so400m shapes, decode
  overlapping the model on this machine's cores.

Needs only what is installed plus this package (`pip install --no-deps .`, or run
from the checkout). Checkpoints come from tests/checkpoints.py (random weights of
the real shapes), which needs sentencepiece (SigLIP) and tokenizers (SigLIP 2,
NaFlex): a family whose tokenizer library is missing is skipped, with the reason.
Writes gpu_check.json and gpu_check.md into --out (default benchmarks/_work/gpu_check)
and prints the table; exit status 1 when a claim fails or a check errs.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO / "tests"))  # checkpoints.py (no pytest needed)
if (REPO / "visual_buffet_siglip").is_dir():
    sys.path.insert(0, str(REPO))  # the checkout under test wins over an installed copy
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

FAMILIES = ("siglip", "siglip2", "naflex")
LABELS = ["dog", "cat", "golden retriever", "beach", "mountain", "red car", "blue sky", "tree", "old house",
          "person", "city street", "night", "sunset", "food", "pizza", "flower"]
EXACT = 1e-5  # float32 on any device against the CPU reference
SHAPE_MODELS = {"base": "google/siglip-base-patch16-224", "so400m": "google/siglip-so400m-patch14-384"}


# --- bookkeeping -----------------------------------------------------------------------------------

@dataclass
class Section:
    title: str
    columns: list[str]
    rows: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass
class Run:
    """What every check shares: the device, the work folder, the clock, and what was skipped."""

    device: str
    quick: bool
    work: Path
    budget_s: float
    started: float = field(default_factory=time.monotonic)
    sections: dict[str, Section] = field(default_factory=dict)
    skipped: list[dict[str, str]] = field(default_factory=list)
    errors: list[dict[str, str]] = field(default_factory=list)
    checkpoints: dict[str, Path] = field(default_factory=dict)

    @property
    def cuda(self) -> bool:
        return self.device.startswith("cuda")

    def left(self) -> float:
        return self.budget_s - (time.monotonic() - self.started)

    def skip(self, check: str, reason: str) -> None:
        self.skipped.append({"check": check, "reason": reason})
        print(f"  skipped {check}: {reason}", file=sys.stderr)

    def section(self, key: str, title: str, columns: list[str]) -> Section:
        return self.sections.setdefault(key, Section(title, columns))

    def guarded(self, check: str, fn: Callable[[], None], needs_s: float = 0.0) -> None:
        """Run one check; an exception becomes an error entry, never the end of the run."""
        if self.left() < needs_s:
            self.skip(check, f"time budget: {self.left():.0f} s left, it needs ~{needs_s:.0f} s")
            return
        start = time.monotonic()
        print(f"{check} ...", file=sys.stderr)
        try:
            fn()
        except Exception as exc:  # report and go on: one broken check must not hide the others
            self.errors.append({"check": check, "error": f"{type(exc).__name__}: {exc}",
                                "trace": traceback.format_exc(limit=6)})
            print(f"  ERROR in {check}: {type(exc).__name__}: {exc}", file=sys.stderr)
        finally:
            print(f"  {time.monotonic() - start:.1f} s", file=sys.stderr)


# --- inputs ----------------------------------------------------------------------------------------

def checkpoint(run: Run, family: str, shape: str = "tiny") -> Path | None:
    """A random checkpoint of `family` and `shape`, built once per work folder; None when it cannot be built."""
    key = f"{family}-{shape}"
    if key in run.checkpoints:
        return run.checkpoints[key]
    folder = run.work / "checkpoints" / key
    if not (folder / "model.safetensors").is_file():
        try:
            from checkpoints import build_checkpoint
        except ImportError as exc:
            run.skip(f"checkpoint {key}", f"tests/checkpoints.py is not importable ({exc})")
            return None
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=_mkdir(folder.parent)))
        try:
            build_checkpoint(family, tmp, shape=shape)
        except ImportError as exc:  # sentencepiece (SigLIP) or tokenizers (SigLIP 2) missing
            run.skip(f"checkpoint {key}", f"cannot build its tokenizer: {exc}")
            return None
        tmp.rename(folder)
    run.checkpoints[key] = folder
    return folder


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def lossless_images(run: Run) -> list[Path]:
    """Small PNGs of different sizes and aspect ratios (exact pixels for the equivalence checks)."""
    import numpy as np
    from PIL import Image

    folder = _mkdir(run.work / "png")
    out = []
    for i, (w, h) in enumerate([(64, 48), (37, 120), (200, 90), (33, 33)]):
        path = folder / f"img{i}.png"
        if not path.is_file():
            rng = np.random.default_rng(i)
            yy, xx = np.mgrid[0:h, 0:w]
            base = np.stack([(xx * rng.uniform(0.2, 2) + yy * rng.uniform(0.2, 2) + rng.uniform(0, 255)) % 256
                             for _ in range(3)], axis=-1)
            Image.fromarray(((base + rng.integers(0, 40, (h, w, 3))) % 256).astype(np.uint8)).save(path)
        out.append(path)
    return out


def photos(run: Run, count: int, size: tuple[int, int]) -> list[Path]:
    """`count` photo-like JPEGs of `size` (quality 90), generated once."""
    import numpy as np
    from PIL import Image, ImageFilter

    folder = _mkdir(run.work / f"jpeg-{size[0]}x{size[1]}")
    out = []
    for i in range(count):
        path = folder / f"photo{i}.jpg"
        if not path.is_file():
            rng = np.random.default_rng(100 + i)
            small = rng.integers(0, 256, (size[1] // 32 + 1, size[0] // 32 + 1, 3), dtype=np.uint8)
            picture = Image.fromarray(small).resize(size, Image.Resampling.BICUBIC).filter(ImageFilter.GaussianBlur(2))
            noisy = np.asarray(picture, np.int16) + rng.integers(-12, 12, (size[1], size[0], 3))
            Image.fromarray(noisy.clip(0, 255).astype(np.uint8)).save(path, format="JPEG", quality=90)
        out.append(path)
    return out


def settings(model: Path, device: str, **overrides: Any) -> Any:
    from visual_buffet_siglip.config import Settings

    values = {"model": str(model), "labels": LABELS, "confidence_threshold": 0.0, "max_tags": 1000,
              "device": device, "dtype": "float32", "text_cache": False,
              "backend": "torch", **overrides}  # PyTorch's paths are what this checks, on CPU too
    return Settings.from_mapping(values)


def reference(model: Path, images: list[Path], **processor_kwargs: Any) -> Any:
    """transformers itself, float32 on the CPU: sigmoid(model(**processor(...)).logits_per_image)."""
    import torch
    from PIL import Image
    from transformers import AutoModel, AutoProcessor

    net = AutoModel.from_pretrained(model, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(model)
    prompts = [f"This is a photo of {label}.".lower() for label in LABELS]
    inputs = processor(text=prompts, images=[Image.open(p) for p in images], padding="max_length",
                       max_length=64, return_tensors="pt", **processor_kwargs)
    with torch.no_grad():
        return torch.sigmoid(net(**inputs).logits_per_image).numpy()


def scores(tagger: Any, images: list[Path]) -> Any:
    return tagger.score(tagger.embed_images(images), tagger.embed_texts(LABELS))


def _deviation(ours: Any, ref: Any) -> dict[str, Any]:
    import numpy as np

    diff = np.abs(ours - ref)
    return {"max_abs": float(diff.max()), "mean_abs": float(diff.mean()), "finite": bool(np.isfinite(ours).all())}


def _synchronize() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


# --- checks ----------------------------------------------------------------------------------------

def _families(run: Run) -> list[tuple[str, Path]]:
    found = [(family, checkpoint(run, family)) for family in FAMILIES]
    return [(family, path) for family, path in found if path is not None]


def check_equivalence(run: Run) -> None:
    import torch

    from visual_buffet_siglip.engine import SiglipTagger

    table = run.section("equivalence", f"float32 on {run.device} vs transformers float32 on the CPU "
                        f"(<= {EXACT:g})", ["family", "max_num_patches", "variant", "max_abs", "pass"])
    images = lossless_images(run)
    for family, path in _families(run):
        for patches in ((256, 1024) if family == "naflex" else (None,)):
            extra = {} if patches is None else {"max_num_patches": patches}
            ref = reference(path, images, **extra)
            variants: list[tuple[str, bool | None]] = [("defaults", None)]
            if run.cuda:
                variants.append(("TF32 off", False))
            for name, tf32 in variants:
                saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
                if tf32 is not None:
                    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
                try:
                    ours = scores(SiglipTagger(settings(path, run.device, **extra)), images)
                finally:
                    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
                dev = _deviation(ours, ref)
                table.rows.append({"family": family, "max_num_patches": patches or "-", "variant": name,
                                   "max_abs": dev["max_abs"], "pass": dev["max_abs"] <= EXACT})
    table.notes.append(f"TF32 defaults here: matmul {torch.backends.cuda.matmul.allow_tf32}, "
                       f"cuDNN convolutions {torch.backends.cudnn.allow_tf32}")


def check_half(run: Run) -> None:
    from visual_buffet_siglip.engine import SiglipTagger

    table = run.section("half", f"half precision on {run.device} vs the float32 CPU reference",
                        ["family", "dtype", "max_abs", "mean_abs", "finite"])
    images = lossless_images(run)
    for family, path in _families(run):
        ref = reference(path, images)
        for dtype in ("bfloat16", "float16"):
            if run.cuda and dtype == "bfloat16" and not _bf16_cuda():
                run.skip(f"half {family} bfloat16", "this GPU has no bfloat16 (compute capability < 8.0)")
                continue
            dev = _deviation(scores(SiglipTagger(settings(path, run.device, dtype=dtype)), images), ref)
            table.rows.append({"family": family, "dtype": dtype, **dev})


def _bf16_cuda() -> bool:
    import torch

    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 8


def check_attention(run: Run) -> None:
    from visual_buffet_siglip.engine import SiglipTagger

    table = run.section("attention", f"attention kernels on {run.device} vs eager at the same dtype",
                        ["family", "attention", "dtype", "max_abs", "pass"])
    images = lossless_images(run)
    flash = _flash_problem(run)
    if flash:
        run.skip("attention flash_attention_2", flash)
    for family, path in _families(run):
        eager32 = scores(SiglipTagger(settings(path, run.device, attention="eager")), images)
        sdpa = _deviation(scores(SiglipTagger(settings(path, run.device, attention="sdpa")), images), eager32)
        table.rows.append({"family": family, "attention": "sdpa", "dtype": "float32", "max_abs": sdpa["max_abs"],
                           "pass": sdpa["max_abs"] <= EXACT})
        if flash or family == "naflex":  # transformers: Siglip2 NaFlex does not support flash-attn
            continue
        half = "bfloat16" if _bf16_cuda() else "float16"
        eager = scores(SiglipTagger(settings(path, run.device, attention="eager", dtype=half)), images)
        fa = _deviation(scores(SiglipTagger(settings(path, run.device, attention="flash_attention_2", dtype=half)),
                               images), eager)
        table.rows.append({"family": family, "attention": "flash_attention_2", "dtype": half,
                           "max_abs": fa["max_abs"], "pass": fa["max_abs"] <= 0.01})


def _flash_problem(run: Run) -> str | None:
    if not run.cuda:
        return "flash-attn needs CUDA"
    try:
        import flash_attn  # noqa: F401
    except Exception as exc:  # not installed, or built for another torch
        return f"flash-attn does not import ({type(exc).__name__}: {exc})"
    if not _bf16_cuda():
        return "flash-attn 2 needs compute capability >= 8.0"
    return None


def check_quantization(run: Run) -> None:
    import torch

    from visual_buffet_siglip.engine import SiglipTagger

    if not run.cuda:
        run.skip("bitsandbytes", "this check runs bitsandbytes on CUDA; tests/test_quantization.py covers the CPU")
        return
    try:
        import bitsandbytes  # noqa: F401
    except Exception as exc:
        run.skip("bitsandbytes", f"bitsandbytes does not import ({type(exc).__name__}: {exc})")
        return
    table = run.section("quantization", "bitsandbytes on CUDA vs the float32 CPU reference",
                        ["family", "quantization", "max_abs", "head kept whole", "finite"])
    images = lossless_images(run)
    for family, path in _families(run):
        ref = reference(path, images)
        for quant in ("8bit", "4bit"):
            tagger = SiglipTagger(settings(path, run.device, quantization=quant, dtype="float16"))
            dev = _deviation(scores(tagger, images), ref)
            head = tagger.loaded.model.vision_model.head
            whole = all(type(m) is torch.nn.Linear for m in (head.mlp.fc1, head.mlp.fc2, head.attention.out_proj))
            table.rows.append({"family": family, "quantization": quant, "max_abs": dev["max_abs"],
                               "head kept whole": whole, "finite": dev["finite"]})


def check_oom(run: Run) -> None:
    import numpy as np
    import torch

    from visual_buffet_siglip.engine import SiglipTagger

    table = run.section("oom", "out of memory: the batch halves and retries, no image lost",
                        ["kind", "images", "batch before", "batch after", "embedded", "max_abs vs batch 1", "pass"])
    path = checkpoint(run, "siglip", "tiny" if not run.cuda else "base")
    if path is None:
        return
    images = lossless_images(run) * (4 if not run.cuda else 16)
    one = SiglipTagger(settings(path, run.device, batch_size=1)).embed_images(images)
    tagger = SiglipTagger(settings(path, run.device, batch_size=64))
    model = tagger.loaded.model
    if run.cuda:  # a real OOM: cap the allocator a little above what the weights hold
        from visual_buffet_siglip.memory import per_image_bytes
        from visual_buffet_siglip.modelfacts import vision_tokens

        info = tagger.loaded.info
        room = 6 * per_image_bytes(info, vision_tokens(info), "float32")  # a batch of ~6 fits, 64 does not
        gc.collect()  # the batch-1 tagger's weights must not count as room
        torch.cuda.empty_cache()
        total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
        torch.cuda.set_per_process_memory_fraction((torch.cuda.memory_reserved() + room) / total)
        kind = "real (allocator capped)"
    else:
        real = model.get_image_features

        def limited(**inputs: Any) -> Any:
            if inputs["pixel_values"].shape[0] > 8:
                raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
            return real(**inputs)

        model.get_image_features = limited
        kind = "simulated"
    try:
        embeddings = tagger.embed_images(images)
    finally:
        if run.cuda:
            torch.cuda.set_per_process_memory_fraction(1.0)
            torch.cuda.empty_cache()
    embedded = int((~np.isnan(embeddings).any(axis=1)).sum())
    diff = float(np.abs(embeddings - one).max())
    table.rows.append({"kind": kind, "images": len(images), "batch before": 64, "batch after": tagger.batch_size,
                       "embedded": embedded, "max_abs vs batch 1": diff,
                       "pass": embedded == len(images) and tagger.batch_size < 64 and diff <= 1e-4})


def check_memory(run: Run) -> None:
    table = run.section("memory", "peak accelerator memory: memory.predict vs torch.cuda.max_memory_allocated",
                        ["model", "dtype", "phase", "batch", "tokens", "predicted GB", "measured GB", "ratio",
                         "within margin"])
    table.notes.append("within margin: the measured peak is at most the prediction plus the planner's "
                       "headroom (batches fill 80% of free memory), so planned batches do not run out of memory")
    planner = run.section("planner", "the planner: so400m-384 at float16 (vision tower only on the card)",
                          ["card", "free GB", "batch", "text tower encodes on", "predicted peak / free"])
    _planner_table(planner)
    if not run.cuda:
        from visual_buffet_siglip.memory import predict
        from visual_buffet_siglip.modelfacts import REGISTRY, vision_tokens

        for shape, model_id in SHAPE_MODELS.items():  # the prediction alone: no allocator to read on the CPU
            info = REGISTRY[model_id]
            for batch in (1, 8, 64):
                estimate = predict(info, "float16", "none", batch, "sdpa", vision_tokens(info), text_here=True)
                table.rows.append({"model": shape, "dtype": "float16", "phase": "tagging", "batch": batch,
                                   "tokens": vision_tokens(info), "predicted GB": estimate.tagging / 2**30,
                                   "measured GB": None, "ratio": None})
        table.notes.append("CPU mode: predictions only (tests/test_memory.py checks activations on the CPU)")
        return
    dtype = "bfloat16" if _bf16_cuda() else "float16"
    shapes = [("siglip", "base", (256,))] + ([] if run.quick else [("siglip", "so400m", (256,)),
                                                                    ("naflex", "base", (256, 1024))])
    for family, shape, patch_counts in shapes:
        if run.left() < 60:
            run.skip(f"memory {family}-{shape}", "time budget")
            continue
        path = checkpoint(run, family, shape)
        if path is not None:
            for patches in patch_counts:
                _measure_memory(run, table, path, f"{family}-{shape}", dtype, patches)


def _planner_table(planner: Section) -> None:
    from visual_buffet_siglip.config import ModelSettings as Settings
    from visual_buffet_siglip.memory import predict
    from visual_buffet_siglip.modelfacts import REGISTRY, vision_tokens
    from visual_buffet_siglip.planner import plan
    from visual_buffet_siglip.simulate import parse_simulation

    info = REGISTRY[SHAPE_MODELS["so400m"]]
    for vram in (4, 6, 8, 12, 16, 24, 40, 80):
        profile = parse_simulation(f"cuda:vram_gb={vram},cc=7.5")
        chosen = plan(profile, Settings(dtype="float16"), info)
        peak = predict(info, "float16", "none", chosen.batch_size, chosen.attention, vision_tokens(info),
                       text_here=chosen.text_device != "cpu").peak_total / 2**30
        free = profile.cuda[0].free_gb
        planner.rows.append({"card": f"{vram} GB", "free GB": free, "batch": chosen.batch_size,
                             "text tower encodes on": chosen.text_device, "predicted peak / free": peak / free})


def _measure_memory(run: Run, table: Section, path: Path, name: str, dtype: str, patches: int) -> None:
    import torch

    from visual_buffet_siglip.engine import SiglipTagger
    from visual_buffet_siglip.memory import HEADROOM, predict
    from visual_buffet_siglip.modelfacts import vision_tokens

    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    tagger = SiglipTagger(settings(path, run.device, dtype=dtype, max_num_patches=patches, batch_size=1024))
    info, plan = tagger.loaded.info, tagger.plan
    tokens = vision_tokens(info, patches)

    def predicted(batch: int) -> Any:
        return predict(info, dtype, "none", batch, plan.attention, tokens, text_here=plan.text_device != "cpu")

    def row(phase: str, batch: int, want: int, measured: int | None = None, holds: bool = True) -> None:
        measured = torch.cuda.max_memory_allocated() if measured is None else measured
        table.rows.append({"model": name, "dtype": dtype, "phase": phase, "batch": batch, "tokens": tokens,
                           "predicted GB": want / 2**30, "measured GB": measured / 2**30, "ratio": measured / want,
                           "within margin": holds and measured <= want / (1 - HEADROOM)})

    row("loaded (resident)", 0, predicted(0).resident - predicted(0).workspace)
    torch.cuda.reset_peak_memory_stats()
    tagger.embed_texts([f"{label} {i}" for i in range(4) for label in LABELS])  # 64 new labels: one text batch
    _synchronize()
    row("encoding labels", 0, predicted(0).encoding)
    text_home = {p.device.type for p in tagger.loaded.model.text_model.parameters()}
    row("after encoding (text tower back in RAM)", 0, predicted(0).resident, torch.cuda.memory_allocated(),
        holds=text_home == {"cpu"} or plan.text_device == "cpu")
    item = tagger._prepare(0, photos(run, 1, (1024, 768))[0], tagger._draft_size())
    free = torch.cuda.mem_get_info()[0]
    for batch in (1, 4, 16, 64, 256, 1024):
        if predicted(batch).tagging - predicted(0).resident > 0.6 * free or run.left() < 30:
            break
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        tagger._vision_chunk([item] * batch)
        _synchronize()
        row("tagging", batch, predicted(batch).tagging)
    del tagger
    torch.cuda.empty_cache()


def check_speed(run: Run) -> None:
    import torch

    from visual_buffet_siglip.engine import SiglipTagger
    from visual_buffet_siglip.hardware import cpu_cores

    table = run.section("speed", f"steady state on {run.device}: iter_tag over JPEGs vs the vision tower alone",
                        ["model", "dtype", "batch", "decode", "images", "ours img/s", "bound img/s", "ours / bound"])
    shapes = ["tiny"] if not run.cuda else ["base"] + ([] if run.quick else ["so400m"])
    size = (1920, 1080) if run.cuda else (320, 240)
    paths = photos(run, 8 if run.quick else 32, size)
    for shape in shapes:
        if run.left() < 45:
            run.skip(f"speed {shape}", "time budget")
            continue
        path = checkpoint(run, "siglip", shape)
        if path is None:
            continue
        dtype = "float32" if not run.cuda else ("bfloat16" if _bf16_cuda() else "float16")
        tagger = SiglipTagger(settings(path, run.device, dtype=dtype, batch_size="auto"))
        batch, policy = tagger.batch_size, tagger.decode_policy
        count = max(2 * batch, 64 if run.quick else 256)
        stream = [paths[i % len(paths)] for i in range(count)]
        for _ in tagger.iter_tag(stream[:batch], labels=LABELS):  # warm-up: labels, kernels, allocator
            pass
        _synchronize()
        start = time.perf_counter()
        for _ in tagger.iter_tag(stream, labels=LABELS):
            pass
        _synchronize()
        ours = count / (time.perf_counter() - start)
        item = tagger._prepare(0, paths[0], tagger._draft_size())
        pixels = item.inputs["pixel_values"].repeat(batch, 1, 1, 1).to(tagger.plan.device).to(
            tagger.loaded.model.dtype)
        model = tagger.loaded.model
        with torch.inference_mode():
            model.get_image_features(pixel_values=pixels)
            _synchronize()
            start = time.perf_counter()
            for _ in range(count // batch):
                model.get_image_features(pixel_values=pixels)
            _synchronize()
        bound = (count // batch) * batch / (time.perf_counter() - start)
        table.rows.append({"model": shape, "dtype": dtype, "batch": batch,
                           "decode": f"{policy.mode} x{policy.workers} ({cpu_cores()} cores)", "images": count,
                           "ours img/s": ours, "bound img/s": bound, "ours / bound": ours / bound})
        del tagger, model, pixels
        if run.cuda:
            torch.cuda.empty_cache()


# --- report ----------------------------------------------------------------------------------------

def machine(device: str) -> dict[str, Any]:
    import torch
    import transformers

    from visual_buffet_siglip.hardware import cpu_cores

    info: dict[str, Any] = {"python": platform.python_version(), "machine": platform.machine(),
                            "cores": cpu_cores(), "torch": torch.__version__, "transformers": transformers.__version__,
                            "device": device}
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        info.update(gpu=props.name, gpu_memory_gb=round(props.total_memory / 2**30, 1),
                    capability=".".join(map(str, torch.cuda.get_device_capability())), cuda=torch.version.cuda)
    return info


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "**NO**"
    if isinstance(value, float):
        return f"{value:.2e}" if 0 < abs(value) < 1e-2 else f"{value:.3g}" if abs(value) < 100 else f"{value:,.0f}"
    return str(value)


def markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    where = m.get("gpu", "CPU") + (f" ({m['gpu_memory_gb']} GB, cc {m['capability']}, CUDA {m['cuda']})"
                                   if "gpu" in m else "")
    lines = [f"`python benchmarks/gpu_check.py {' '.join(result['argv'])}` on {where}, {m['cores']} cores, "
             f"torch {m['torch']}, transformers {m['transformers']}: {result['elapsed_s']:.0f} s, "
             f"{'all claims hold' if result['ok'] else '**some claims fail**'}.", ""]
    for section in result["sections"].values():
        lines += [f"**{section['title']}**", "", "| " + " | ".join(section["columns"]) + " |",
                  "|" + "---|" * len(section["columns"])]
        lines += ["| " + " | ".join(_cell(row.get(c)) for c in section["columns"]) + " |" for row in section["rows"]]
        lines += [""] + [f"{note}" for note in section["notes"]] + ([""] if section["notes"] else [])
    if result["skipped"]:
        lines += ["Skipped:", ""] + [f"- {s['check']}: {s['reason']}" for s in result["skipped"]] + [""]
    if result["errors"]:
        lines += ["Errors:", ""] + [f"- {e['check']}: {e['error']}" for e in result["errors"]] + [""]
    return "\n".join(lines)


def failures(run: Run) -> list[str]:
    bad = [f"{key}: {row}" for key, section in run.sections.items() for row in section.rows
           if False in (row.get("pass"), row.get("finite"), row.get("head kept whole"), row.get("within margin"))]
    return bad + [f"{e['check']}: {e['error']}" for e in run.errors]


CHECKS: dict[str, tuple[Callable[[Run], None], float]] = {  # name -> (check, seconds it needs at least)
    "equivalence": (check_equivalence, 0), "half": (check_half, 20), "attention": (check_attention, 20),
    "bitsandbytes": (check_quantization, 30), "oom": (check_oom, 20), "memory": (check_memory, 30),
    "speed": (check_speed, 30),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda when available)")
    parser.add_argument("--quick", action="store_true", help="base shape only, fewer images")
    parser.add_argument("--out", type=Path, default=HERE / "_work" / "gpu_check", help="where the JSON, table "
                        "and cached checkpoints go")
    parser.add_argument("--budget", type=float, default=None, help="seconds before remaining checks are "
                        "skipped (default 420 on CUDA, 120 on the CPU)")
    parser.add_argument("--only", type=lambda text: text.split(","), default=None,
                        help=f"a comma-separated subset of: {', '.join(CHECKS)}")
    args = parser.parse_args(argv)
    unknown = set(args.only or ()) - set(CHECKS)
    if unknown:
        parser.error(f"--only: unknown check(s) {', '.join(sorted(unknown))}; choose from {', '.join(CHECKS)}")
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {device}: torch {torch.__version__} sees no CUDA GPU; use --device cpu")
    run = Run(device, args.quick, _mkdir(args.out), args.budget or (420.0 if device.startswith("cuda") else 120.0))
    for name in args.only or list(CHECKS):
        check, needs_s = CHECKS[name]
        run.guarded(name, lambda check=check: check(run), needs_s)
    bad = failures(run)
    result = {"argv": sys.argv[1:] if argv is None else list(argv), "machine": machine(device),
              "elapsed_s": time.monotonic() - run.started, "ok": not bad, "failures": bad,
              "sections": {k: {"title": s.title, "columns": s.columns, "rows": s.rows, "notes": s.notes}
                           for k, s in run.sections.items()},
              "skipped": run.skipped, "errors": run.errors}
    (run.work / "gpu_check.json").write_text(json.dumps(result, indent=2, default=str) + "\n", encoding="utf-8")
    table = markdown(result)
    (run.work / "gpu_check.md").write_text(table, encoding="utf-8")
    print(table)
    return 0 if not bad else 1


if __name__ == "__main__":
    sys.exit(main())
