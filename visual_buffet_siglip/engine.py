"""SiglipTagger: label embeddings once, images in pipelined batches, scores exactly as the model computes them.

Tagging is built from three public steps, `embed_images`, `embed_texts` and
`score`, so re-tagging stored embeddings and searching cannot drift from it.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from . import __version__
from .config import MAX_LENGTH, TEMPLATE, Settings, default_settings, normalize_label, normalize_labels
from .hardware import HardwareProfile, Plan, detect
from .hardware import plan as make_plan
from .images import ImageError, ImageSource, describe, load_image
from .models import LoadedModel, load, model_info
from .textcache import LabelEmbeddingCache

log = logging.getLogger(__name__)

TEXT_BATCH = 64


class NonFiniteScoreError(RuntimeError):
    """The model produced NaN/inf (usually float16 overflow); results would be meaningless."""


def prompt_for(label: str) -> str:
    """The fixed prompt, lowercased whole: SigLIP models were trained on lowercased text."""
    return TEMPLATE.format(label=label).lower()


@dataclass
class ImageEmbedding:
    """One image's outcome from the vision stage: an embedding or an error, in input order."""

    index: int
    source: ImageSource
    vector: np.ndarray | None
    error: dict[str, str] | None
    elapsed_ms: float


@dataclass
class _Prepared:
    index: int
    source: ImageSource
    inputs: dict[str, torch.Tensor] | None
    error: dict[str, str] | None
    decode_ms: float


class SiglipTagger:
    """Tags images with a SigLIP model. Thread-safe; the model loads on first use."""

    def __init__(self, settings: Settings | None = None, *, profile: HardwareProfile | None = None):
        self.settings = settings or default_settings()
        self._profile = profile
        self._loaded: LoadedModel | None = None
        self._load_lock = threading.Lock()
        self._model_lock = threading.Lock()
        self._labels = LabelEmbeddingCache()
        self._batch_size: int | None = None

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
                    self._loaded = load(self.settings.model, chosen)
                    self._batch_size = chosen.batch_size
        return self._loaded

    @property
    def batch_size(self) -> int:
        """Current batch size (it shrinks after a CUDA out-of-memory error)."""
        self.loaded  # noqa: B018 - the plan sets it
        assert self._batch_size is not None
        return self._batch_size

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
    def embed_texts(self, labels: Sequence[str]) -> np.ndarray:
        """[m, d] L2-normalised float32 embeddings of `labels` in the fixed prompt, in order."""
        keyed = [normalize_label(label) for label in labels]
        found = self._labels.get(keyed)
        missing = list(dict.fromkeys(label for label in keyed if label not in found))
        if missing:
            fresh = self._encode_texts(missing)
            self._labels.put(fresh)
            found.update(fresh)
        if not keyed:
            return np.zeros((0, self._embed_dim()), dtype=np.float32)
        return np.stack([found[label] for label in keyed])

    def _encode_texts(self, labels: list[str]) -> dict[str, np.ndarray]:
        loaded = self.loaded
        tokenizer = loaded.processor.tokenizer
        out: dict[str, np.ndarray] = {}
        for start in range(0, len(labels), TEXT_BATCH):
            chunk = labels[start:start + TEXT_BATCH]
            tokens = tokenizer([prompt_for(label) for label in chunk], padding="max_length",
                               max_length=MAX_LENGTH, truncation=True, return_tensors="pt")
            inputs = {k: v.to(self._device) for k, v in tokens.items()
                      if k in ("input_ids", "attention_mask", "position_ids")}
            with self._model_lock, torch.inference_mode():
                features = _pooled(loaded.model.get_text_features(**inputs))
            vectors = _normalise(features)
            out.update(zip(chunk, vectors))
        return out

    def _embed_dim(self) -> int:
        config = self.loaded.model.config
        return int(getattr(config.vision_config, "hidden_size", 0))

    # --- images ----------------------------------------------------------------------------
    def _prepare(self, index: int, source: ImageSource, draft: int | None) -> _Prepared:
        start = time.perf_counter()
        try:
            image = load_image(source, draft_size=draft)
            kwargs: dict[str, Any] = {"return_tensors": "pt"}
            if self.loaded.info.family == "naflex":
                kwargs["max_num_patches"] = self.settings.max_num_patches
            inputs = dict(self.loaded.processor(images=[image], **kwargs))
            return _Prepared(index, source, inputs, None, _ms(start))
        except ImageError as exc:
            return _Prepared(index, source, None, exc.to_dict(), _ms(start))
        except Exception as exc:  # a processor failure on one odd image must not sink the run
            log.debug("preprocessing %s failed", describe(source), exc_info=True)
            message = f"{describe(source)}: cannot preprocess image ({type(exc).__name__}: {exc})"
            return _Prepared(index, source, None, {"type": "ImagePreprocessError", "message": message},
                             _ms(start))

    def _prepared(self, images: Iterable[ImageSource]) -> Iterator[_Prepared]:
        """Decode + preprocess in worker threads, a bounded window ahead of the model, in order."""
        draft = self._draft_size()
        window = max(2, 2 * self.batch_size)
        workers = max(1, min(8, (os.cpu_count() or 2) - 1))
        with ThreadPoolExecutor(workers, thread_name_prefix="siglip-decode") as pool:
            pending: deque = deque()
            for index, source in enumerate(images):
                pending.append(pool.submit(self._prepare, index, source, draft))
                if len(pending) >= window:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()

    def iter_image_embeddings(self, images: Iterable[ImageSource]) -> Iterator[ImageEmbedding]:
        """Embeddings (or errors) for `images`, streamed in input order with bounded memory."""
        batch: list[_Prepared] = []
        for item in self._prepared(images):
            batch.append(item)
            if len(batch) >= self.batch_size:
                yield from self._run_batch(batch)
                batch = []
        if batch:
            yield from self._run_batch(batch)

    def _run_batch(self, batch: list[_Prepared]) -> list[ImageEmbedding]:
        good = [item for item in batch if item.inputs is not None]
        start = time.perf_counter()
        vectors = self._vision(good) if good else np.zeros((0, 0), dtype=np.float32)
        share = _ms(start) / max(1, len(good))
        by_index = {item.index: vec for item, vec in zip(good, vectors)}
        return [ImageEmbedding(item.index, item.source, by_index.get(item.index), item.error,
                               item.decode_ms + (share if item.inputs is not None else 0.0))
                for item in batch]

    def _vision(self, items: list[_Prepared]) -> np.ndarray:
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

    def _vision_chunk(self, chunk: list[_Prepared]) -> np.ndarray:
        loaded = self.loaded
        dtype = loaded.model.dtype
        inputs = {}
        for key in chunk[0].inputs:
            tensor = torch.cat([item.inputs[key] for item in chunk]).to(self._device)
            inputs[key] = tensor.to(dtype) if tensor.is_floating_point() else tensor
        with self._model_lock, torch.inference_mode():
            features = _pooled(loaded.model.get_image_features(**inputs))
        return _normalise(features)

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
        model = self.loaded.model
        scale = model.logit_scale.detach().float().cpu().exp()
        bias = model.logit_bias.detach().float().cpu()
        # Dot products accumulate in float64, so a score does not depend on how many images or
        # labels share the call (tagging, re-tagging and search agree to the last bit in practice).
        img = torch.from_numpy(np.ascontiguousarray(image_embeddings, dtype=np.float64))
        txt = torch.from_numpy(np.ascontiguousarray(text_embeddings, dtype=np.float64))
        logits = (img @ txt.T).float() * scale + bias
        return torch.sigmoid(logits).numpy()

    # --- tagging ---------------------------------------------------------------------------
    def iter_tag(self, images: Iterable[ImageSource], *, labels: Sequence[str] | None = None,
                 threshold: float | None = None, max_tags: int | None = None
                 ) -> Iterator[tuple[ImageEmbedding, dict[str, Any]]]:
        """(embedding, result record) per image, streamed in input order."""
        label_list = list(normalize_labels(labels)) if labels is not None else list(self.settings.label_set)
        text = self.embed_texts(label_list)
        for item in self.iter_image_embeddings(images):
            yield item, self.record(item, label_list, text, threshold=threshold, max_tags=max_tags)

    def record(self, item: ImageEmbedding, labels: Sequence[str], text: np.ndarray, *,
               threshold: float | None = None, max_tags: int | None = None) -> dict[str, Any]:
        """The output-contract record for one image embedding against a label set."""
        if item.error is not None:
            return {"tags": [], "error": item.error}
        scores = self.score(item.vector[None, :], text)[0]
        if not np.isfinite(scores).all():
            message = (f"{describe(item.source)}: the model produced non-finite scores "
                       f"(dtype {self.plan.dtype}); set dtype = \"float32\"")
            return {"tags": [], "error": {"type": NonFiniteScoreError.__name__, "message": message}}
        return {
            "tags": select_tags(labels, scores,
                                self.settings.confidence_threshold if threshold is None else threshold,
                                self.settings.max_tags if max_tags is None else max_tags),
            "model": self.settings.model,
            "version": __version__,
            "inference_time_ms": round(item.elapsed_ms, 3),
        }

    def tag(self, images: Iterable[ImageSource], **kwargs: Any) -> list[dict[str, Any]]:
        """One result record per image, in input order (see DESIGN section 3)."""
        return [record for _, record in self.iter_tag(images, **kwargs)]


def select_tags(labels: Sequence[str], scores: np.ndarray, threshold: float, max_tags: int
                ) -> list[dict[str, Any]]:
    """Labels scoring >= threshold, by confidence descending then label, at most max_tags."""
    keep = [(float(s), label) for label, s in zip(labels, scores) if s >= threshold]
    keep.sort(key=lambda pair: (-pair[0], pair[1]))
    return [{"label": label, "confidence": conf} for conf, label in keep[:max_tags]]


def _pooled(output: Any) -> torch.Tensor:
    """transformers 5 returns a model output from get_*_features; older versions a tensor."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def _normalise(features: torch.Tensor) -> np.ndarray:
    features = features.float()
    return (features / features.norm(p=2, dim=-1, keepdim=True)).cpu().numpy()


def _ms(start: float) -> float:
    return (time.perf_counter() - start) * 1000.0
