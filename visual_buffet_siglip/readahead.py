"""Batching a one-image-at-a-time caller cannot ask for: embed the images it will ask for next.

Today's Visual Buffet host calls `tag(path)` once per image, usually walking a
folder. A vision batch of one costs several times more per image than a full
batch (on CPUs as on GPUs), so when a caller keeps asking for images of one
folder, the image it asks for is embedded together with the folder's next
not-yet-embedded images (by name, wrapping around), and those are served from
memory when asked for. Embeddings do not depend on labels or thresholds, so a
re-tag with other settings is served from memory too.

The read-ahead ramps up like a kernel's file read-ahead: none for a folder's first
image, then 1, 3, 7... extra images up to the tagger's batch size, so a caller that
takes only a few images of a big folder wastes at most about as many embeddings as
it asked for. Cached entries are keyed by absolute path, size and mtime (an edited
file is embedded again), belong to one tagger (a model change empties the cache),
and are bounded in number (least recently used go first).
"""

from __future__ import annotations

import bisect
import os
import threading
import weakref
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING

from .images import IMAGE_SUFFIXES

if TYPE_CHECKING:
    from .engine import ImageEmbedding, SiglipTagger

_Key = tuple[str, int, int]


class ImageReadAhead:
    """Image embeddings for single-path requests, embedded in batches with the folder's next images."""

    def __init__(self, capacity: int = 4096):
        self.capacity = capacity
        self._cache: OrderedDict[_Key, ImageEmbedding] = OrderedDict()
        self._owner: weakref.ref[SiglipTagger] | None = None
        self._folder: str | None = None
        self._streak = 0
        self._listing: tuple[str, int, list[str]] | None = None  # a 100,000-file folder is listed once
        self._lock = threading.Lock()

    def embedding(self, tagger: SiglipTagger, path: str | os.PathLike[str]) -> ImageEmbedding:
        """`path`'s embedding (or its error), from memory or embedded now with what follows it."""
        with self._lock:
            if self._owner is None or self._owner() is not tagger:
                self._cache.clear()
                self._owner = weakref.ref(tagger)
            folder = os.path.dirname(os.path.abspath(path))
            self._streak = self._streak + 1 if folder == self._folder else 1
            self._folder = folder
            key = _key(path)
            if key is not None and key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
            extra = min(tagger.batch_size - 1, self._streak - 1) if key is not None else 0
            batch = [(key, os.fspath(path)), *self._upcoming(Path(folder), Path(path).name, extra)]
            items = list(tagger.iter_image_embeddings([source for _, source in batch]))
            for (item_key, _), item in zip(batch, items):
                if item_key is not None:
                    self._cache[item_key] = item
            while len(self._cache) > self.capacity:
                self._cache.popitem(last=False)
            return items[0]

    def _upcoming(self, folder: Path, name: str, count: int) -> list[tuple[_Key, str]]:
        """Up to `count` images of `folder` after `name` (by name, wrapping) that are not in memory."""
        if count <= 0:
            return []
        names = self._names(folder)
        start = bisect.bisect_right(names, name)
        found = []
        for candidate in names[start:] + names[:start]:
            key = _key(folder / candidate)
            if candidate != name and key is not None and key not in self._cache:
                found.append((key, str(folder / candidate)))
                if len(found) == count:
                    break
        return found


    def _names(self, folder: Path) -> list[str]:
        """The folder's image names, sorted; listed again only when the folder changes (its mtime)."""
        try:
            changed = os.stat(folder).st_mtime_ns
            if self._listing is None or self._listing[:2] != (str(folder), changed):
                names = sorted(entry.name for entry in os.scandir(folder) if not entry.name.startswith(".")
                               and Path(entry.name).suffix.lower() in IMAGE_SUFFIXES and entry.is_file())
                self._listing = (str(folder), changed, names)
        except OSError:
            return []
        return self._listing[2]


def _key(path: str | os.PathLike[str]) -> _Key | None:
    """What identifies a file's content cheaply; None when it cannot be stat'ed (it is embedded alone)."""
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return os.path.abspath(path), stat.st_size, stat.st_mtime_ns


__all__ = ["ImageReadAhead"]
