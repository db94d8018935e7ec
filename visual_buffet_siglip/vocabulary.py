"""A vocabulary with per-label settings, and the one function that turns scores into tags.

File format (a `labels_file`, the built-in vocabulary, the report's download):
one label a line, blank lines and `#` comment lines ignored; a line may also
carry, tab-separated, a threshold and a keyword path:

    golden retriever<TAB>0.04<TAB>Animals|Dogs|Golden retriever
    blurry photo<TAB>off
    sunset

The threshold is a number from 0 to 1, `off` (the label is scored, so it stays
in reports, stores and `search`, but is never emitted as a tag or keyword) or
empty (the global `confidence_threshold`). The keyword path names where the
label sits in a photo manager's keyword tree; its last part is the keyword.

`select` applies per-label thresholds, `off`, the global threshold and
`max_tags`; `tag`, `retag`, the pluggy hook, the host adapter, Ray and every
sidecar call it, so they cannot disagree about which tags an image gets.
"""

from __future__ import annotations

import math
import os
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from functools import lru_cache
from importlib import resources
from typing import TYPE_CHECKING

import numpy as np

from .errors import ConfigError

if TYPE_CHECKING:
    from .records import TagDict

DEFAULT_THRESHOLD = 0.01  # SigLIP's sigmoid scores are low: 0.005-0.05 is a sensible range
DEFAULT_MAX_TAGS = 50

def normalize_label(label: str) -> str:
    """Strip, collapse whitespace and lowercase: how every label is keyed and shown."""
    return " ".join(label.split()).lower()


def normalize_labels(labels: Iterable[str]) -> tuple[str, ...]:
    """Normalised, de-duplicated labels in first-seen order; empty ones dropped."""
    seen: dict[str, None] = {}
    for label in labels:
        norm = normalize_label(label)
        if norm:
            seen.setdefault(norm, None)
    return tuple(seen)


__all__ = ["OFF", "MAX_FILE_BYTES", "MAX_LINE_CHARS", "VocabularyEntry", "Vocabulary", "TagOptions",
           "parse_vocabulary", "read_vocabulary", "format_vocabulary", "builtin", "select"]

OFF = "off"
PATH_SEPARATOR = "|"
MAX_FILE_BYTES = 32 * 1024 * 1024  # ~300,000 labels with thresholds and paths; a 1 GB file is a mistake
MAX_LINE_CHARS = 4096  # the model reads 64 tokens of a label; a longer line is not a label


@dataclass(frozen=True)
class VocabularyEntry:
    """One label and its own settings: `threshold` None means the global one; `off` means never emitted."""

    label: str
    threshold: float | None = None
    off: bool = False
    keyword_path: tuple[str, ...] | None = None

    @property
    def keyword(self) -> str:
        """The leaf keyword a photo manager shows: the path's last part, else the label itself."""
        return self.keyword_path[-1] if self.keyword_path else self.label


@dataclass(frozen=True)
class Vocabulary:
    """Entries in file order, one per (normalised, unique) label."""

    entries: tuple[VocabularyEntry, ...]
    _by_label: dict[str, VocabularyEntry] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._by_label.update((entry.label, entry) for entry in self.entries)

    @classmethod
    def from_labels(cls, labels: Iterable[str]) -> Vocabulary:
        """Plain labels (normalised, de-duplicated) with no settings of their own."""
        seen: dict[str, None] = {}
        for label in labels:
            if norm := normalize_label(label):
                seen.setdefault(norm, None)
        return cls(tuple(VocabularyEntry(label) for label in seen))

    @property
    def labels(self) -> tuple[str, ...]:
        return tuple(entry.label for entry in self.entries)

    def get(self, label: str) -> VocabularyEntry:
        """The entry for `label`; a label outside the vocabulary (a host's candidate) gets a plain one."""
        return self._by_label.get(label) or VocabularyEntry(label)

    def __len__(self) -> int:
        return len(self.entries)


# --- parsing ----------------------------------------------------------------------------------

def parse_vocabulary(text: str, source: str = "<labels>") -> Vocabulary:
    """A vocabulary from the file format above; every bad line is reported at once (ConfigError).

    A label given twice with the same settings is kept once (plain label lists
    often repeat); with different settings it is an error naming both lines.
    """
    entries: dict[str, tuple[int, VocabularyEntry]] = {}
    problems: list[str] = []
    for number, line in enumerate(text.lstrip("\ufeff").splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        entry, problem = _parse_line(line)
        if problem:
            problems.append(f"{source}, line {number}: {problem}")
            continue
        assert entry is not None
        first = entries.setdefault(entry.label, (number, entry))
        if first[1] != entry:
            problems.append(f"{source}, line {number}: {entry.label!r} is also on line {first[0]} with other "
                            "settings; keep one of them")
    if problems:
        raise ConfigError(problems)
    return Vocabulary(tuple(entry for _, entry in entries.values()))


def _parse_line(line: str) -> tuple[VocabularyEntry | None, str | None]:
    if len(line) > MAX_LINE_CHARS:
        return None, f"the line is {len(line):,} characters long (at most {MAX_LINE_CHARS:,}); is this a labels file?"
    columns = line.split("\t")
    if len(columns) > 3:
        return None, (f"{len(columns)} tab-separated columns; expected at most 3: "
                      "label<TAB>threshold<TAB>keyword path")
    label = normalize_label(columns[0])
    if not label:
        return None, "no label before the tab"
    threshold, off = None, False
    raw = columns[1].strip() if len(columns) > 1 else ""
    if raw.lower() == OFF:
        off = True
    elif raw:
        try:
            threshold = float(raw)
        except ValueError:
            threshold = math.nan
        if not (math.isfinite(threshold) and 0.0 <= threshold <= 1.0):
            return None, f"threshold {raw!r} for {label!r}: expected a number from 0 to 1, 'off' or nothing"
    path = None
    if len(columns) > 2 and columns[2].strip():
        path = tuple(" ".join(part.split()) for part in columns[2].split(PATH_SEPARATOR))
        if not all(path):
            return None, (f"keyword path {columns[2].strip()!r} for {label!r} has an empty part; "
                          "write it like Animals|Dogs|Golden retriever")
    return VocabularyEntry(label, threshold, off, path), None


def read_vocabulary(path: str | os.PathLike[str]) -> Vocabulary:
    """A vocabulary file, refused with a clear error when it is not a small UTF-8 text file.

    The file is opened without blocking and checked on the opened descriptor, so
    a device (/dev/zero), a pipe or a folder says what it is and a 1 GB file is
    refused before anything is read. A UTF-8 byte-order mark is ignored.
    """
    name = os.fspath(path)
    try:
        fd = os.open(name, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except FileNotFoundError:
        raise ConfigError(f"labels file {name!r} does not exist") from None
    except IsADirectoryError:
        raise ConfigError(f"labels file {name!r} is a folder; give a text file with one label a line") from None
    except OSError as exc:
        raise ConfigError(f"labels file {name!r}: cannot open it ({exc.strerror or exc})") from None
    try:
        info = os.fstat(fd)
        kind = file_kind(info.st_mode)
        if kind != "file":
            raise ConfigError(f"labels file {name!r} is {kind}, not a text file; give a text file with one "
                              "label a line")
        if info.st_size > MAX_FILE_BYTES:
            raise ConfigError(f"labels file {name!r} is {info.st_size:,} bytes; at most {MAX_FILE_BYTES:,} "
                              "are read (about 300,000 labels): is it the right file?")
        with os.fdopen(os.dup(fd), "rb") as handle:
            data = handle.read(MAX_FILE_BYTES + 1)
    finally:
        os.close(fd)
    if len(data) > MAX_FILE_BYTES:  # it grew after the check
        raise ConfigError(f"labels file {name!r} is larger than {MAX_FILE_BYTES:,} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise ConfigError(f"labels file {name!r}, line {line}: not UTF-8 text (byte {exc.start}); "
                          "save it as UTF-8") from None
    return parse_vocabulary(text, name)


def file_kind(mode: int) -> str:
    """What a stat mode is, in words, for messages about a path that should be a regular file."""
    for test, kind in ((stat.S_ISREG, "file"), (stat.S_ISDIR, "a folder"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a pipe (FIFO)"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return kind
    return "not a regular file"


def format_vocabulary(vocabulary: Vocabulary | Iterable[VocabularyEntry], header: str = "") -> str:
    """The file format above, shortest form per line (`parse_vocabulary` reads it back equal)."""
    entries = vocabulary.entries if isinstance(vocabulary, Vocabulary) else tuple(vocabulary)
    lines = [f"# {line}".rstrip() for line in header.splitlines()]
    for entry in entries:
        threshold = OFF if entry.off else "" if entry.threshold is None else repr(entry.threshold)
        path = PATH_SEPARATOR.join(entry.keyword_path) if entry.keyword_path else ""
        lines.append("\t".join([entry.label, threshold, path]).rstrip("\t"))
    return "\n".join(lines) + "\n"


@lru_cache(maxsize=1)
def builtin() -> Vocabulary:
    """The curated built-in vocabulary shipped in `data/vocabulary.txt` (read once)."""
    text = resources.files("visual_buffet_siglip").joinpath("data/vocabulary.txt").read_text("utf-8")
    return parse_vocabulary(text, "the built-in vocabulary (data/vocabulary.txt)")


# --- selection --------------------------------------------------------------------------------

@dataclass(frozen=True)
class TagOptions:
    """What one tagging call selects: the vocabulary (labels, per-label settings), global threshold, cap.

    `TagOptions()` is the defaults: the built-in vocabulary, `DEFAULT_THRESHOLD`,
    `DEFAULT_MAX_TAGS`. A config block's are `Settings.from_mapping(...).options`.
    """

    vocabulary: Vocabulary = field(default_factory=builtin)
    confidence_threshold: float = DEFAULT_THRESHOLD
    max_tags: int = DEFAULT_MAX_TAGS
    _cut: dict[tuple[str, ...], np.ndarray] = field(default_factory=dict, init=False, repr=False, compare=False)

    def override(self, *, labels: Sequence[str] | None = None, threshold: float | None = None,
                 max_tags: int | None = None) -> TagOptions:
        """These options with plain `labels` replacing the vocabulary and the others replacing their own."""
        if labels is None and threshold is None and max_tags is None:
            return self
        return TagOptions(self.vocabulary if labels is None else Vocabulary.from_labels(labels),
                          self.confidence_threshold if threshold is None else float(threshold),
                          self.max_tags if max_tags is None else int(max_tags))

    @property
    def labels(self) -> tuple[str, ...]:
        return self.vocabulary.labels

    def threshold_for(self, label: str) -> float | None:
        """The threshold `label` must reach to be emitted; None when it is off."""
        entry = self.vocabulary.get(label)
        if entry.off:
            return None
        return self.confidence_threshold if entry.threshold is None else entry.threshold

    def cutoffs(self, labels: Sequence[str]) -> np.ndarray:
        """Per-label thresholds aligned with `labels` (inf when off), built once per label list."""
        key = tuple(labels)
        cut = self._cut.get(key)
        if cut is None:
            found = (self.threshold_for(label) for label in key)
            cut = np.fromiter((math.inf if t is None else t for t in found), dtype=np.float64, count=len(key))
            if len(self._cut) > 8:  # a host in discovery mode sends a new list per image
                self._cut.clear()
            self._cut[key] = cut
        return cut

    def explore(self, floor: float, max_tags: int | None = None) -> TagOptions:
        """Options that keep every label, off ones included, down to `floor` (a report's raw material)."""
        plain = Vocabulary(tuple(replace(entry, threshold=None, off=False) for entry in self.vocabulary.entries))
        return TagOptions(plain, floor, self.max_tags if max_tags is None else max_tags)


def select(labels: Sequence[str], scores: np.ndarray, options: TagOptions) -> list[TagDict]:
    """Tags of one image: labels reaching their threshold, by confidence descending then label, capped.

    A label's threshold is its own, else the global one; `off` labels never
    appear. `labels` are the score columns (normally `options.labels`; the host
    adds candidate labels, which use the global threshold).
    """
    # compared in the scores' precision, as a scalar threshold is (a float32 0.01 passes a 0.01 threshold)
    cut = options.cutoffs(labels).astype(scores.dtype, copy=False)
    keep = [(float(scores[i]), labels[int(i)]) for i in np.flatnonzero(scores >= cut)]
    keep.sort(key=lambda pair: (-pair[0], pair[1]))
    return [{"label": label, "confidence": conf} for conf, label in keep[:options.max_tags]]

