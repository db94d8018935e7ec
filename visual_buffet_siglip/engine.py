"""SiglipTagger: label embeddings once, images in pipelined batches, scores exactly as the model computes them.

Tagging is built from three public steps, `embed_images`, `embed_texts` and
`score`, so re-tagging stored embeddings and searching cannot drift from it.

Where the time goes, and what this module does about it:
- text: each label is encoded once per model, ever. Embeddings live in memory
  and in an on-disk safetensors cache (`textcache`), so a second process reads
  ~1,000 labels in milliseconds instead of running the text tower over them.
- images: decoded and preprocessed in worker threads, paced against the model
  (`decoding` says how, and why).
- scoring: one float64 matrix product per batch against the label matrix
  converted once per run (`scoring`); results do not depend on how images are batched.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import torch

from . import __version__
from .config import MAX_LENGTH, TEMPLATE, ModelSettings, Settings, tagger_parts
from .decoding import DecodePolicy, Prepared, decode_policy, elapsed_ms, fixed_resize, prepare, prepared_in_order
from .errors import NonFiniteScoreError
from .hardware import HardwareProfile, cpu_cores, detect
from .images import ImageSource, describe
from .models import LoadedModel, load, model_info
from .pixels import fixed_normaliser
from .plan import Plan
from .planner import plan as make_plan
from .records import ErrorDict, Record, error_record
from .residency import text_tower_on
from .scoring import Scorer
from .textcache import DiskLabelStore, LabelEmbeddingCache, cache_root, library_versions, weights_digest
from .vocabulary import TagOptions, normalize_label, select

log = logging.getLogger(__name__)

TEXT_BATCH = 64
TEXT_SAVE_EVERY = 512  # labels encoded between two writes of the disk cache
PROGRESS_LABELS = 2048  # encoding this many labels takes long enough to show progress
PROGRESS_SECONDS = 10.0


def prompt_for(label: str) -> str:
    """The fixed prompt, lowercased whole: SigLIP models were trained on lowercased text."""
    return TEMPLATE.format(label=label).lower()


@dataclass
class ImageEmbedding:
    """One image's outcome from the vision stage: an embedding or an error, in input order.

    `iter_tag` also keeps the image's confidences for the `labels` it scored, so
    another output of the run (the report) selects from them instead of scoring again.
    """

    index: int
    source: ImageSource
    vector: np.ndarray | None
    error: ErrorDict | None
    elapsed_ms: float
    labels: tuple[str, ...] = ()
    scores: np.ndarray | None = None


class SiglipTagger:
    """Tags images with a SigLIP model. Thread-safe; the model loads on first use.

    Built from `ModelSettings` (what shapes the model); which tags a call keeps is
    that call's `TagOptions`. A whole config's `Settings` may be given instead: its
    options then serve the calls that pass none (otherwise `TagOptions()` does).
    """

    def __init__(self, settings: ModelSettings | Settings | None = None, *,
                 profile: HardwareProfile | None = None):
        self.settings, self.default_options = tagger_parts(settings)
        self._profile = profile
        self._loaded: LoadedModel | None = None
        self._load_lock = threading.Lock()
        self._model_lock = threading.Lock()
        self._text_lock = threading.Lock()
        self._labels: LabelEmbeddingCache | None = None
        self._batch_size: int | None = None
        self._policy: DecodePolicy | None = None
        self._resize: tuple[tuple[int, int], int] | None = None
        self._openvino: Any = None  # openvino_backend.OpenVINOTowers when the plan's backend is OpenVINO
        self._normalise: Any = None  # pixels.fixed_normaliser: the processor's arithmetic, without its overhead

    # --- model -----------------------------------------------------------------------------
    @property
    def plan(self) -> Plan:
        return self.loaded.plan

    @property
    def loaded(self) -> LoadedModel:
        """The model and processor, loaded once (first caller loads, others wait)."""
        if self._loaded is None:
            with self._load_lock:
                if self._loaded is None:
                    profile = self._profile or detect()
                    chosen = make_plan(profile, self.settings, model_info(self.settings.model))
                    for warning in chosen.warnings:
                        log.warning("%s", warning)
                    loaded = load(self.settings.model, chosen)
                    self._batch_size = chosen.batch_size
                    self._resize = fixed_resize(loaded)
                    self._normalise = fixed_normaliser(loaded.processor) if self._resize else None
                    if chosen.backend == "openvino":
                        from .openvino_backend import OpenVINOTowers

                        self._openvino = OpenVINOTowers(loaded, cache_root(self.settings.cache_dir))
                    self._loaded = loaded
        return self._loaded

    @property
    def batch_size(self) -> int:
        """Current batch size (it shrinks after a CUDA out-of-memory error)."""
        self.loaded  # noqa: B018 - the plan sets it
        assert self._batch_size is not None
        return self._batch_size

    @property
    def decode_policy(self) -> DecodePolicy:
        """How decoding overlaps the model on this machine (set `_policy` to override)."""
        if self._policy is None:
            device = torch.device(self.plan.device).type
            self._policy = decode_policy(device, cpu_cores(), torch.get_num_threads(), self.batch_size)
            log.debug("decode policy: %s", self._policy.reason)
        return self._policy

    @property
    def _device(self) -> torch.device:
        return torch.device(self.plan.device)

    def _draft_size(self) -> int | None:
        """Smallest decode size for "fast" JPEG decoding: twice the model's input side."""
        if self.settings.decode == "exact":
            return None
        info = self.loaded.info
        side = info.image_size or int(info.patch_size * self.settings.max_num_patches ** 0.5)
        return 2 * side

    # --- text ------------------------------------------------------------------------------
    @property
    def label_cache(self) -> LabelEmbeddingCache:
        """This model's label embeddings: memory, plus the disk cache unless `text_cache = false`."""
        if self._labels is None:
            with self._text_lock:
                if self._labels is None:
                    disk = None
                    if self.settings.text_cache:
                        disk = DiskLabelStore(cache_root(self.settings.cache_dir), self.text_cache_key())
                    self._labels = LabelEmbeddingCache(disk)
        return self._labels

    def text_cache_key(self) -> dict[str, Any]:
        """Everything that changes a label's embedding (the disk cache's key)."""
        loaded = self.loaded
        plan = loaded.plan
        return {
            "model": loaded.fingerprint,
            "weights": weights_digest(loaded.source),
            "template": TEMPLATE, "lowercase": True, "padding": "max_length", "max_length": MAX_LENGTH,
            "backend": plan.backend,
            "dtype": plan.dtype, "quantization": plan.quantization, "attention": plan.attention,
            "device": torch.device(plan.text_device).type,  # where the text tower encodes
            **library_versions(),
        }

    def embed_texts(self, labels: Sequence[str]) -> np.ndarray:
        """[m, d] L2-normalised float32 embeddings of `labels` in the fixed prompt, in order."""
        keyed = [normalize_label(label) for label in labels]
        cache = self.label_cache
        found = cache.get(keyed)
        missing = [label for label in dict.fromkeys(keyed) if label not in found]
        if missing:
            # one thread encodes; others waiting for the same labels reuse them
            with self._text_lock, text_tower_on(self.loaded.model, self.plan.text_device):
                found.update(cache.get(missing, count=False))
                missing = [label for label in missing if label not in found]
                # saved as it goes, so a run killed while encoding a big vocabulary keeps most of it
                progress = _TextProgress(len(missing))
                truncated: list[str] = []
                for start in range(0, len(missing), TEXT_SAVE_EVERY):
                    chunk = missing[start:start + TEXT_SAVE_EVERY]
                    truncated += self._too_long(chunk)
                    fresh = self._encode_texts(chunk)
                    cache.put(fresh)
                    found.update(fresh)
                    progress.update(len(fresh))
                if truncated:
                    log.warning("%d label(s) are longer than the model's %d tokens in the prompt and were cut "
                                "there, so their end is ignored: %s", len(truncated), MAX_LENGTH,
                                ", ".join(repr(label[:60] + ("..." if len(label) > 60 else ""))
                                          for label in truncated[:3]) + (", ..." if len(truncated) > 3 else ""))
        if not keyed:
            return np.zeros((0, self._embed_dim()), dtype=np.float32)
        return np.stack([found[label] for label in keyed])

    def _too_long(self, labels: list[str]) -> list[str]:
        """The labels whose prompt is longer than MAX_LENGTH tokens (the model sees it cut there)."""
        tokenizer = self.loaded.processor.tokenizer
        ids = tokenizer([prompt_for(label) for label in labels], padding=False, truncation=False)["input_ids"]
        return [label for label, row in zip(labels, ids) if len(row) > MAX_LENGTH]

    def _encode_texts(self, labels: list[str]) -> dict[str, np.ndarray]:
        loaded = self.loaded
        tokenizer = loaded.processor.tokenizer
        out: dict[str, np.ndarray] = {}
        for start in range(0, len(labels), TEXT_BATCH):
            chunk = labels[start:start + TEXT_BATCH]
            tokens = tokenizer([prompt_for(label) for label in chunk], padding="max_length",
                               max_length=MAX_LENGTH, truncation=True, return_tensors="pt")
            inputs = {k: v.to(self.plan.text_device) for k, v in tokens.items()
                      if k in ("input_ids", "attention_mask", "position_ids")}
            with self._model_lock, torch.inference_mode():
                features = self._features("text", inputs)
            vectors = _normalise(features)
            out.update(zip(chunk, vectors))
        return out

    def _embed_dim(self) -> int:
        config = self.loaded.model.config
        return int(getattr(config.vision_config, "hidden_size", 0))

    # --- images ----------------------------------------------------------------------------
    def _prepare(self, index: int, source: ImageSource, draft: int | None) -> Prepared:
        """One image as this model's inputs, or its error (`decoding.prepare`)."""
        loaded = self.loaded
        patches = self.settings.max_num_patches if loaded.info.family == "naflex" else None
        return prepare(index, source, draft, loaded.processor, self._resize, self._normalise, patches)

    def _prepared(self, images: Iterable[ImageSource]) -> Iterator[Prepared]:
        """Decoded + preprocessed images in input order, at most a bounded window in memory."""
        draft = self._draft_size()
        yield from prepared_in_order(images, lambda index, source: self._prepare(index, source, draft),
                                     self.decode_policy)

    def iter_image_embeddings(self, images: Iterable[ImageSource]) -> Iterator[ImageEmbedding]:
        """Embeddings (or errors) for `images`, streamed in input order with bounded memory."""
        for batch in self._batches(images):
            yield from batch

    def _batches(self, images: Iterable[ImageSource]) -> Iterator[list[ImageEmbedding]]:
        batch: list[Prepared] = []
        for item in self._prepared(images):
            batch.append(item)
            if len(batch) >= self.batch_size:
                yield self._run_batch(batch)
                batch = []
        if batch:
            yield self._run_batch(batch)

    def _run_batch(self, batch: list[Prepared]) -> list[ImageEmbedding]:
        good = [item for item in batch if item.inputs is not None]
        start = time.perf_counter()
        vectors = self._vision(good) if good else np.zeros((0, 0), dtype=np.float32)
        share = elapsed_ms(start) / max(1, len(good))
        by_index = {item.index: vec for item, vec in zip(good, vectors)}
        return [ImageEmbedding(item.index, item.source, by_index.get(item.index), item.error,
                               item.decode_ms + (share if item.inputs is not None else 0.0))
                for item in batch]

    def _vision(self, items: list[Prepared]) -> np.ndarray:
        """Vision tower on `items`; halves the batch on CUDA out-of-memory, never drops an image."""
        size = self.batch_size
        parts = []
        for start in range(0, len(items), size):
            chunk = items[start:start + size]
            try:
                parts.append(self._vision_chunk(chunk))
            except torch.OutOfMemoryError:
                if size == 1:
                    raise
                self._batch_size = max(1, size // 2)
                log.warning("out of memory at batch size %d; retrying with %d for the rest of the run",
                            size, self._batch_size)
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                return np.concatenate(parts + [self._vision(items[start:])])
        return np.concatenate(parts)

    def _vision_chunk(self, chunk: list[Prepared]) -> np.ndarray:
        loaded = self.loaded
        dtype = loaded.model.dtype
        inputs = {}
        batch = [cast("dict[str, torch.Tensor]", item.inputs) for item in chunk]  # decoded images only
        for key in batch[0]:
            tensor = torch.cat([item_inputs[key] for item_inputs in batch]).to(self._device)
            inputs[key] = tensor.to(dtype) if tensor.is_floating_point() else tensor
        with self._model_lock, torch.inference_mode():
            features = self._features("vision", inputs)
        return _normalise(features)

    def _features(self, tower: str, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Pooled features of one tower, from the plan's backend."""
        if self._openvino is not None:
            return self._openvino.features(tower, inputs)
        model = self.loaded.model
        return _pooled((model.get_image_features if tower == "vision" else model.get_text_features)(**inputs))

    def embed_images(self, images: Iterable[ImageSource]) -> np.ndarray:
        """[n, d] L2-normalised float32 image embeddings; rows of images that failed are NaN.

        Use `iter_image_embeddings` (or `tag`) to learn why an image failed.
        """
        results = list(self.iter_image_embeddings(images))
        dim = next((r.vector.shape[0] for r in results if r.vector is not None), self._embed_dim())
        out = np.full((len(results), dim), np.nan, dtype=np.float32)
        for row, result in enumerate(results):
            if result.vector is not None:
                out[row] = result.vector
        return out

    # --- scoring ---------------------------------------------------------------------------
    def score(self, image_embeddings: np.ndarray, text_embeddings: np.ndarray) -> np.ndarray:
        """[n, m] sigmoid confidences, with the model's own logit scale and bias, in float32."""
        return Scorer(self.loaded.model, text_embeddings)(image_embeddings)

    # --- tagging ---------------------------------------------------------------------------
    def options(self, *, labels: Sequence[str] | None = None, threshold: float | None = None,
                max_tags: int | None = None) -> TagOptions:
        """`default_options` with these shorthands applied (`TagOptions.override`)."""
        return self.default_options.override(labels=labels, threshold=threshold, max_tags=max_tags)

    def iter_tag(self, images: Iterable[ImageSource], options: TagOptions | None = None, *,
                 labels: Sequence[str] | None = None, threshold: float | None = None, max_tags: int | None = None
                 ) -> Iterator[tuple[ImageEmbedding, Record]]:
        """(embedding, result record) per image, streamed in input order.

        `options` say which tags to keep; without them, `labels`, `threshold` and
        `max_tags` are shorthands applied to `default_options`. Each embedding
        keeps the image's scores for the options' labels (`ImageEmbedding.scores`).
        """
        if options is None:
            options = self.options(labels=labels, threshold=threshold, max_tags=max_tags)
        scorer = Scorer(self.loaded.model, self.embed_texts(options.labels))
        scored = options.labels
        for batch in self._batches(images):
            good = [(item.index, item.vector) for item in batch if item.vector is not None]
            rows = dict(zip((index for index, _ in good),
                            scorer(np.stack([vector for _, vector in good])))) if good else {}
            for item in batch:
                item.labels, item.scores = scored, rows.get(item.index)
                yield item, self.record_scores(item, item.scores, options)

    def record(self, item: ImageEmbedding, text: np.ndarray, options: TagOptions,
               labels: Sequence[str] | None = None) -> Record:
        """The output-contract record for one image embedding against `text`, the embedded `labels`.

        `labels` default to the options' own; a caller may score more (the host's candidates).
        Scores `iter_tag` already computed for these labels are reused, not computed again.
        """
        labels = options.labels if labels is None else labels
        if item.error is not None or item.vector is None:
            scores = None
        elif item.scores is not None and item.labels == tuple(labels):
            scores = item.scores
        else:
            scores = self.score(item.vector[None, :], text)[0]
        return self.record_scores(item, scores, options, labels)

    def record_scores(self, item: ImageEmbedding, scores: np.ndarray | None, options: TagOptions,
                      labels: Sequence[str] | None = None) -> Record:
        """`record` from this image's row of `score` (re-tagging scores many images per call)."""
        if item.error is not None:
            return error_record(item.error["type"], item.error["message"])
        assert scores is not None, "an image without an error has scores"
        if not np.isfinite(scores).all():
            return error_record(NonFiniteScoreError.__name__,
                                f"{describe(item.source)}: the model produced non-finite scores "
                                f"(dtype {self.plan.dtype}); set dtype = \"float32\"")
        return {
            "tags": select(options.labels if labels is None else labels, scores, options),
            "model": self.settings.model,
            "version": __version__,
            "inference_time_ms": round(item.elapsed_ms, 3),
        }

    def tag(self, images: Iterable[ImageSource], options: TagOptions | None = None,
            **shorthands: Any) -> list[Record]:
        """One result record per image, in input order: tags, model, version and time, or `tags: []` and the error.

        Arguments as `iter_tag`'s.
        """
        return [record for _, record in self.iter_tag(images, options, **shorthands)]


class _TextProgress:
    """Logs how far encoding a large vocabulary is, with an estimate, every PROGRESS_SECONDS."""

    def __init__(self, total: int):
        self.total, self.done = total, 0
        self.start = self.last = time.perf_counter()
        self.enabled = total >= PROGRESS_LABELS
        if self.enabled:
            log.info("encoding %d labels with the text tower (once per model; cached for later runs)", total)

    def update(self, count: int) -> None:
        self.done += count
        now = time.perf_counter()
        if not self.enabled or self.done >= self.total or now - self.last < PROGRESS_SECONDS:
            return
        self.last = now
        left = (now - self.start) / self.done * (self.total - self.done)
        log.info("encoding labels: %d of %d (%d%%), about %s left", self.done, self.total,
                 100 * self.done // self.total, _duration(left))


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min"


def _pooled(output: Any) -> torch.Tensor:
    """transformers 5 returns a model output from get_*_features; older versions a tensor."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def _normalise(features: torch.Tensor) -> np.ndarray:
    features = features.float()
    return (features / features.norm(p=2, dim=-1, keepdim=True)).cpu().numpy()


__all__ = ["SiglipTagger", "ImageEmbedding", "prompt_for"]
