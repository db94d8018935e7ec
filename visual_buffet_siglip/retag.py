"""Re-tag and search an embedding store: the label side only, so no image file is opened and no vision pass runs.

Both go through the tagger's own `embed_texts`, `score` and `record_scores`, the
steps `tag` is built from, so their numbers equal a fresh run's.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from .engine import ImageEmbedding, SiglipTagger
from .errors import UsageError
from .records import Record
from .store import Chunk, EmbeddingStore, check_compatible
from .vocabulary import TagOptions, normalize_label

# Rows re-tagged per scoring call. Each float64 matrix product has a fixed cost (a parallel region
# that must get every core: ~20 ms measured on a busy machine), so small frames (a slow run writes
# one every 30 s) are joined; the writer's frame size keeps the scores small: ~100 MB peak for 1,126
# labels, against ~400 MB at 4,096 rows, for the same speed. A search scores one label, which
# `score` does without the thread pool, so it takes the frames as they are.
RETAG_ROWS = 1024


@dataclass(frozen=True)
class Hit:
    """One search result: the image as it was named when tagged, and its sigmoid score for the query."""

    path: str
    score: float


def retag(store: EmbeddingStore, tagger: SiglipTagger, options: TagOptions | None = None, *,
          labels: Sequence[str] | None = None, threshold: float | None = None, max_tags: int | None = None
          ) -> Iterator[tuple[str, Record]]:
    """(path, record) for every stored image, in store order, as `tag` would give them with these options.

    Without `options`, `labels`, `threshold` and `max_tags` are shorthands applied
    to the tagger's `default_options`, as in `SiglipTagger.iter_tag`. Images that
    failed when tagged stay error records. `inference_time_ms` is the original
    run's, the cost of the vision pass the record stands for. The store is
    checked against the tagger here, before the first record is asked for.
    """
    check_compatible(store, tagger)
    if options is None:
        options = tagger.options(labels=labels, threshold=threshold, max_tags=max_tags)
    return _records(store, tagger, options, tagger.embed_texts(options.labels))


def _records(store: EmbeddingStore, tagger: SiglipTagger, options: TagOptions, text: np.ndarray
             ) -> Iterator[tuple[str, Record]]:
    for chunk in store.chunks(RETAG_ROWS):
        scores = iter(_scores(tagger, chunk, text))
        for row, path in enumerate(chunk.paths):
            error = chunk.errors[row]
            item = ImageEmbedding(chunk.start + row, path, chunk.vectors[row], error, chunk.elapsed_ms[row])
            yield path, tagger.record_scores(item, None if error else next(scores), options)


def search(store: EmbeddingStore, tagger: SiglipTagger, query: str, k: int = 20) -> list[Hit]:
    """The `k` stored images scoring highest for `query` (prompted like a label), best first.

    Streams the store chunk by chunk, keeping only the best `k` so far; ties go
    to the image stored first. Images that failed when tagged are never hits.
    """
    if not normalize_label(query):
        raise UsageError("the search query is empty; give some words, e.g. \"a dog on a beach\"")
    check_compatible(store, tagger)
    text = tagger.embed_texts([query])
    best_scores = np.empty(0, dtype=np.float32)
    best_rows = np.empty(0, dtype=np.int64)
    best_paths: list[str] = []
    for chunk in store.chunks():
        ok = np.flatnonzero(chunk.ok)
        scores = _scores(tagger, chunk, text)[:, 0]
        rows = chunk.start + ok
        pick = _top(scores, rows, k)
        best_scores = np.concatenate([best_scores, scores[pick]])
        best_rows = np.concatenate([best_rows, rows[pick]])
        best_paths += [chunk.paths[ok[i]] for i in pick]
        keep = _top(best_scores, best_rows, k)
        best_scores, best_rows = best_scores[keep], best_rows[keep]
        best_paths = [best_paths[i] for i in keep]
    return [Hit(path, float(score)) for path, score in zip(best_paths, best_scores)]


def _scores(tagger: SiglipTagger, chunk: Chunk, text: np.ndarray) -> np.ndarray:
    """[images, labels] confidences of the chunk's images that have an embedding, in one `score` call."""
    ok = chunk.ok
    return tagger.score(chunk.vectors if ok.all() else chunk.vectors[ok], text)


def _top(scores: np.ndarray, rows: np.ndarray, k: int) -> np.ndarray:
    """Indices of the `k` best: score descending, then row ascending."""
    return np.lexsort((rows, -scores))[:k]


__all__ = ["Hit", "retag", "search"]
