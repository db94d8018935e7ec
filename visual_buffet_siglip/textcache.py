"""Label embeddings, kept per label so a new or extended label set encodes only what is new."""

from __future__ import annotations

import threading
from collections.abc import Iterable

import numpy as np


class LabelEmbeddingCache:
    """Normalised float32 label embeddings for one model, keyed by label."""

    def __init__(self) -> None:
        self._memory: dict[str, np.ndarray] = {}
        self._lock = threading.Lock()

    def get(self, labels: Iterable[str]) -> dict[str, np.ndarray]:
        """The cached embeddings among `labels`."""
        with self._lock:
            return {label: self._memory[label] for label in labels if label in self._memory}

    def put(self, embeddings: dict[str, np.ndarray]) -> None:
        """Remember freshly encoded embeddings."""
        with self._lock:
            self._memory.update(embeddings)
