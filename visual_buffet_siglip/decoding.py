"""Images into model inputs: decoded, resized and preprocessed in input order, paced against the model.

Where the time goes, and what this module does about it:
- decoding: large JPEGs decode at reduced size ("fast" decode: DCT scaling, never
  below twice the model's input side), and fixed-resolution images are resized to
  the model's input with PIL before the processor sees them, which is exactly
  what the processor's own resize would do (bit-identical) minus two full-size
  array copies (`fixed_resize`).
- overlap: decode + preprocessing run in worker threads. Where the model has
  cores to itself (a GPU, or a CPU with cores torch does not use) workers decode
  a bounded window ahead while the model runs. Where torch already uses every
  core (the usual CPU case) a decode thread would only steal cycles from the
  model's own threads, so the next batch is decoded in parallel *between* model
  calls instead ("phased"). `decode_policy` makes that choice; benchmarks/ measures it.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from .errors import ImageError, ImagePreprocessError
from .images import ImageSource, describe, load_image
from .models import LoadedModel
from .records import ErrorDict

log = logging.getLogger(__name__)

MAX_DECODE_WORKERS = 16

Resize = tuple[tuple[int, int], int]  # ((width, height), PIL resample filter)


@dataclass
class Prepared:
    """One image ready for the model (`inputs`) or its error, with the time decoding it took."""

    index: int
    source: ImageSource
    inputs: dict[str, torch.Tensor] | None
    error: ErrorDict | None
    decode_ms: float


@dataclass(frozen=True)
class DecodePolicy:
    """How images are decoded relative to the model.

    mode: "overlap" (workers decode up to `window` images ahead while the model
    runs), "phased" (the next batch is decoded by `workers` threads between model
    calls), or "inline" (decoded one by one in the calling thread).
    """

    mode: str
    workers: int
    window: int
    reason: str


def decode_policy(device: str, cpus: int, torch_threads: int, batch_size: int) -> DecodePolicy:
    """The decode/model overlap for a machine (pure; see the module docstring for why)."""
    batch_size = max(1, batch_size)
    if device != "cpu":
        workers = max(1, min(MAX_DECODE_WORKERS, cpus - 1))
        return DecodePolicy("overlap", workers, max(2 * batch_size, 2 * workers),
                            f"{device}: the model runs off the CPU, so {workers} decode threads "
                            f"({cpus} CPUs, one kept for the main thread) work ahead of it")
    spare = cpus - torch_threads
    if spare >= 1:
        workers = min(MAX_DECODE_WORKERS, spare)
        return DecodePolicy("overlap", workers, max(2 * batch_size, 2 * workers),
                            f"cpu: torch uses {torch_threads} of {cpus} CPUs, so {workers} decode "
                            "threads run beside it on the others")
    if cpus <= 1:
        return DecodePolicy("inline", 0, 1, "cpu: one CPU, so images decode in the calling thread")
    workers = max(1, min(MAX_DECODE_WORKERS, cpus, batch_size))
    return DecodePolicy("phased", workers, batch_size,
                        f"cpu: torch uses all {cpus} CPUs, so a decode thread beside it would only "
                        f"compete; each next batch decodes on {workers} thread{'s' if workers > 1 else ''} "
                        "between model calls")


def prepare(index: int, source: ImageSource, draft: int | None, processor: Any, resize: Resize | None,
            normalise: Callable[[Any], torch.Tensor] | None, max_num_patches: int | None) -> Prepared:
    """One image decoded (at least `draft` pixels a side) and preprocessed, or its error.

    `resize` and `normalise` are the processor's own steps done faster (`fixed_resize`,
    `pixels.fixed_normaliser`); `max_num_patches` is given for NaFlex processors only.
    """
    start = time.perf_counter()
    try:
        image = load_image(source, draft_size=draft)
        if resize is not None and image.size != resize[0]:
            # what the processor's own (PIL) resize does, without its two full-size array copies
            image = image.resize(*resize)
        if normalise is not None and image.mode == "RGB":
            return Prepared(index, source, {"pixel_values": normalise(image)}, None, elapsed_ms(start))
        kwargs: dict[str, Any] = {"return_tensors": "pt"}
        if max_num_patches is not None:
            kwargs["max_num_patches"] = max_num_patches
        inputs = dict(processor(images=[image], **kwargs))
        return Prepared(index, source, inputs, None, elapsed_ms(start))
    except ImageError as exc:
        return Prepared(index, source, None, exc.to_dict(), elapsed_ms(start))
    except Exception as exc:  # a processor failure on one odd image must not sink the run
        log.debug("preprocessing %s failed", describe(source), exc_info=True)
        error = ImagePreprocessError(f"{describe(source)}: cannot preprocess image ({type(exc).__name__}: {exc})")
        return Prepared(index, source, None, error.to_dict(), elapsed_ms(start))


def prepared_in_order(images: Iterable[ImageSource], prepare: Callable[[int, ImageSource], Prepared],
                      policy: DecodePolicy) -> Iterator[Prepared]:
    """`prepare` applied to each image, in input order, at most `policy.window` images in memory."""
    numbered = enumerate(images)
    if policy.workers == 0:
        for index, source in numbered:
            yield prepare(index, source)
        return
    pool = ThreadPoolExecutor(policy.workers, thread_name_prefix="siglip-decode")
    pending: deque[Future[Prepared]] = deque()
    try:
        exhausted = False
        while True:
            # overlap: keep the window full; phased: refill only once the consumer has taken
            # the whole previous batch (it is running the model on it meanwhile)
            if not exhausted and (policy.mode == "overlap" or not pending):
                while len(pending) < policy.window:
                    nxt = next(numbered, None)
                    if nxt is None:
                        exhausted = True
                        break
                    pending.append(pool.submit(prepare, nxt[0], nxt[1]))
            if not pending:
                return
            yield pending.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def fixed_resize(loaded: LoadedModel) -> Resize | None:
    """((width, height), resample) when the processor resizes every image to one size with PIL.

    Then resizing the decoded image ourselves first gives bit-identical pixel
    values (the processor's resize becomes a no-op) and skips its full-size
    PIL -> numpy -> PIL round trip, ~0.1-0.4 s for a 12-24 MP photo. Processors
    with another backend (torchvision) or size rule (NaFlex) are left alone.
    """
    processor = getattr(loaded.processor, "image_processor", None)
    try:
        from transformers.image_processing_backends import PilBackend
    except ImportError:  # pragma: no cover - transformers without the PIL backend class
        return None
    if not isinstance(processor, PilBackend) or loaded.info.family == "naflex":
        return None
    size = getattr(processor, "size", None)
    height, width = getattr(size, "height", None), getattr(size, "width", None)
    if not (getattr(processor, "do_resize", False) and height and width) \
            or getattr(processor, "do_center_crop", False) or getattr(processor, "do_pad", False) \
            or getattr(processor, "resample", None) is None:
        return None
    return (int(width), int(height)), int(processor.resample)  # type: ignore[attr-defined]


def elapsed_ms(start: float) -> float:
    """Milliseconds since `start`, a `time.perf_counter()` reading."""
    return (time.perf_counter() - start) * 1000.0


__all__ = ["DecodePolicy", "Prepared", "decode_policy", "elapsed_ms", "fixed_resize", "prepare", "prepared_in_order"]
