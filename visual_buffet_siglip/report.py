"""Self-contained HTML contact sheet with a threshold explorer.

``build_report`` turns result records (as the CLI writes them to jsonl, one
dict per image; checked, since a file may hold anything) into one HTML
document that needs nothing else: CSS and JS are inline, thumbnails are small
JPEG data URIs, and a Content-Security-Policy forbids the page from loading
anything at all and allows only its own script and style, by their SHA-256
hashes, so an injected ``<script>`` would not run even if the escaping failed. The page's HTML, CSS and JS are package data
under ``report_assets/``, edited and linted as what they are. The data is
embedded once as JSON and rendered by the page's script:

* a card per image: thumbnail, file name, tags as bars (log scale) with values,
  or the error type and message for images that failed;
* a threshold slider (log scale, 0.001 - 0.5) that live-filters every card and
  shows per card how many tags it keeps;
* a histogram of all tag confidences of the run on a log axis, with the
  threshold marked;
* a per-label table: how many images each label fires on, most frequent
  first, to spot labels that fire everywhere; each label has its own
  threshold (log-scale slider and number box) and an ``off`` switch, starting
  from the vocabulary the run used, and every card and count follows live;
* "Download vocabulary": the labels with what was set on the page, in the
  vocabulary file format (``vocabulary.py``) that ``retag --labels-file`` reads.

Kept tags follow the same rule as tagging (``vocabulary.select``): per-label
thresholds, ``off``, the global threshold and ``max_tags``.

The explorer is only useful when the records keep tags down to a low floor:
``ReportSink`` (``tag --report``) keeps every label down to 0.001 (or the
lowest threshold in play), off ones included and uncapped, and passes the
run's vocabulary, threshold and ``max_tags`` here, where the page starts.

Cards are built lazily while scrolling and slider updates are coalesced to one
per animation frame, touching only rendered cards, so runs of 10,000 images
stay responsive.

Hooks for tests and tooling: each rendered tag element has class ``tag``;
tags under the threshold keep their element but carry the ``hidden``
attribute; the slider is ``<input type="range" id="threshold">``;
``window.reportState`` exposes ``threshold``, ``setThreshold(t)``,
``setLabelThreshold(label, t or null)``, ``setLabelOff(label, bool)``,
``labelSettings(label)``, ``vocabularyText()``, ``renderAll()``,
``renderedCount()``, ``visibleTagCount()`` and ``labelCounts()``; uncaught
page errors and CSP violations are collected in ``window.__reportErrors``.

Only the standard library and Pillow are used here.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import math
import os
import re
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .fileio import write_atomic
from .outputs import json_text
from .records import ErrorDict, Record

if TYPE_CHECKING:
    from .engine import ImageEmbedding, SiglipTagger
    from .vocabulary import Vocabulary

__all__ = ["DEFAULT_TITLE", "SLIDER_MAX", "SLIDER_MIN", "build_report", "read_records", "write_report"]

DEFAULT_TITLE = "visual-buffet-siglip report"
SLIDER_MIN = 0.001
SLIDER_MAX = 0.5
_JPEG_QUALITY = 70


# --------------------------------------------------------------------------
# records


def read_records(jsonl_path: Path) -> list[dict]:
    """Read a jsonl results file: one JSON object a line, blank lines skipped.

    A line that is not valid JSON, or not a JSON object, raises ``ValueError``
    naming the file and the (1-based) line number.
    """
    jsonl_path = Path(jsonl_path)
    records: list[dict] = []
    with jsonl_path.open("r", encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{jsonl_path}:{lineno}: malformed JSON line: {exc.msg} (column {exc.colno})") from exc
            if not isinstance(obj, dict):
                raise ValueError(f"{jsonl_path}:{lineno}: expected a JSON object per line, got {type(obj).__name__}")
            records.append(obj)
    return records


@dataclass(frozen=True)
class _Card:
    """What the page shows of one record: tags best first, one per label, finite; or the error."""

    path: str
    tags: list[tuple[str, float]]
    error: ErrorDict | None
    ms: float | None = None
    model: str | None = None
    version: str | None = None


def _card(path: str, record: Record) -> _Card:
    """A record as tagging made it: its tags are already selected (one per label, best first, finite)."""
    if "error" in record:
        return _Card(path, [], record["error"])
    return _Card(path, [(tag["label"], tag["confidence"]) for tag in record["tags"]], None,
                 record.get("inference_time_ms"), record.get("model"), record.get("version"))


def _checked_card(rec: Any) -> _Card:
    """A record read from a file or handed over by a caller, checked: anything unusable is dropped."""
    if not isinstance(rec, Mapping):
        raise TypeError(f"each record must be a mapping, got {type(rec).__name__}")
    path = rec.get("path")
    ms = rec.get("inference_time_ms")
    valid_ms = isinstance(ms, (int, float)) and not isinstance(ms, bool) and math.isfinite(ms)
    return _Card("" if path is None else str(path), _norm_tags(rec.get("tags")), _norm_error(rec.get("error")),
                 ms if valid_ms else None, str(rec["model"]) if rec.get("model") else None,
                 str(rec["version"]) if rec.get("version") else None)


def _norm_error(err: Any) -> ErrorDict | None:
    if err is None or err is False:
        return None
    if isinstance(err, Mapping):
        etype = err.get("type") or "Error"
        msg = err.get("message")
        return {"type": str(etype), "message": "" if msg is None else str(msg)}
    return {"type": "Error", "message": str(err)}


def _norm_tags(tags: Any) -> list[tuple[str, float]]:
    """Valid (label, confidence) pairs, one per label (highest kept), sorted
    by confidence descending, ties by label. Non-finite or non-numeric
    confidences are dropped: they cannot be placed on a log axis and would
    make the embedded JSON invalid."""
    best: dict[str, float] = {}
    if not isinstance(tags, (list, tuple)):
        return []
    for tag in tags:
        if isinstance(tag, Mapping):
            label, conf = tag.get("label"), tag.get("confidence")
        elif isinstance(tag, (list, tuple)) and len(tag) == 2:
            label, conf = tag
        else:
            continue
        if label is None or isinstance(conf, bool) or not isinstance(conf, (int, float)):
            continue
        conf = float(conf)
        if not math.isfinite(conf):
            continue
        label = str(label)
        if label not in best or conf > best[label]:
            best[label] = conf
    return sorted(best.items(), key=lambda lc: (-lc[1], lc[0]))


def _display_name(path: str) -> str:
    name = path.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]
    return name or path


# --------------------------------------------------------------------------
# thumbnails


def _thumbnail(path: Path, thumb_px: int) -> tuple[str | None, str | None]:
    """(data URI, None) or (None, short reason). Never raises."""
    try:
        from PIL import Image

        from .images import load_image

        if not path.is_file():
            return None, "file not found"
        # decoded exactly as for tagging (orientation, transparency), JPEGs at reduced scale
        im = load_image(path, draft_size=thumb_px * 2)
        im.thumbnail((thumb_px, thumb_px), Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=_JPEG_QUALITY, optimize=True)
        return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii"), None
    except Exception as exc:  # any decode problem -> placeholder, never an exception
        return None, f"no preview ({type(exc).__name__})"


def _resolve(path: str, root: Path) -> Path:
    p = Path(path)
    return p if p.is_absolute() else root / p


# --------------------------------------------------------------------------
# building


def _embed_json(obj: Any) -> str:
    """JSON safe to place inside <script type="application/json">: no '<' (so
    no '</script' or '<!--'), no '>' or '&', and every '/' escaped, which also
    means no 'http://' or '//' can appear in the file, whatever the data."""
    text = json_text(obj, allow_nan=False, separators=(",", ":"))  # file names that are not UTF-8: escaped
    return (
        text.replace("<", "\\u003c")
        .replace(">", "\\u003e")
        .replace("&", "\\u0026")
        .replace("/", "\\/")
        .replace("\u2028", "\\u2028")
        .replace("\u2029", "\\u2029")
    )


def _html_text(s: str) -> str:
    # '/' too, so that no URL-looking text (e.g. 'http://') appears in the file.
    return (
        s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;").replace("/", "&#47;")
    )


@cache
def _asset(name: str) -> str:
    """One file of the page (report_assets/), as shipped in the package."""
    return resources.files("visual_buffet_siglip").joinpath("report_assets").joinpath(name).read_text("utf-8")


def _csp_hash(text: str) -> str:
    """A CSP source expression allowing exactly this inline script or style."""
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode("ascii") + "'"


def _content_security_policy() -> str:
    """The page's policy: nothing loaded from anywhere, only its own inline script and style run."""
    scripts = " ".join(_csp_hash(_asset(name)) for name in ("errors.js", "report.js"))
    return (f"default-src 'none'; img-src data:; style-src {_csp_hash(_asset('report.css'))}; "
            f"script-src {scripts}; base-uri 'none'; form-action 'none'")


def _vocabulary_columns(labels: list[str], vocabulary: Vocabulary | None) -> dict[str, list[Any]]:
    """Per-label own threshold (None: the global one), off and keyword path, aligned with ``labels``."""
    entries = [vocabulary.get(label) if vocabulary is not None else None for label in labels]
    return {
        "thresholds": [None if entry is None or entry.off else entry.threshold for entry in entries],
        "off": [bool(entry is not None and entry.off) for entry in entries],
        "paths": ["|".join(entry.keyword_path) if entry is not None and entry.keyword_path else None
                  for entry in entries],
    }


def build_report(
    records: Iterable[Mapping],
    *,
    threshold: float,
    images_root: Path | None = None,
    title: str = DEFAULT_TITLE,
    thumb_px: int = 160,
    workers: int | None = None,
    vocabulary: Vocabulary | None = None,
    max_tags: int | None = None,
) -> str:
    """Return one self-contained HTML document for ``records``.

    ``threshold`` is where the slider starts (0..1). ``vocabulary`` (the one
    the run used) gives each label its starting own threshold, ``off`` switch
    and keyword path, and its labels all go into the page's download, fired or
    not; ``max_tags`` caps the tags kept per image, as tagging does (None: no
    cap). Relative record paths are resolved against ``images_root`` (default: the current directory).
    Thumbnails are JPEG data URIs with max side ``thumb_px``; an image that is
    missing or cannot be decoded gets a placeholder. ``workers`` threads make
    the thumbnails (default: up to 8).
    """
    return _page((_checked_card(rec) for rec in records), threshold=threshold, images_root=images_root, title=title,
                 thumb_px=thumb_px, workers=workers, vocabulary=vocabulary, max_tags=max_tags)


def _page(cards: Iterable[_Card], *, threshold: float, images_root: Path | None, title: str, thumb_px: int = 160,
          workers: int | None = None, vocabulary: Vocabulary | None, max_tags: int | None) -> str:
    """`build_report` from cards; those of a `tag --report` run come from typed records, unchecked."""
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold):
        raise ValueError(f"threshold must be a number in [0, 1], got {threshold!r}")
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold!r}")
    if not isinstance(thumb_px, int) or isinstance(thumb_px, bool) or not 16 <= thumb_px <= 1024:
        raise ValueError(f"thumb_px must be an int in 16..1024, got {thumb_px!r}")
    if max_tags is not None and (isinstance(max_tags, bool) or not isinstance(max_tags, int) or max_tags < 1):
        raise ValueError(f"max_tags must be an int >= 1 or None, got {max_tags!r}")
    root = Path.cwd() if images_root is None else Path(images_root)
    title = DEFAULT_TITLE if title is None else str(title)

    labels: list[str] = list(vocabulary.labels) if vocabulary is not None else []
    label_index: dict[str, int] = {label: i for i, label in enumerate(labels)}
    images: list[dict[str, Any]] = []
    models: dict[str, None] = {}
    versions: dict[str, None] = {}
    for card in cards:
        tags = []
        for label, conf in card.tags:
            li = label_index.get(label)
            if li is None:
                li = label_index[label] = len(labels)
                labels.append(label)
            tags.append([li, conf])
        entry: dict[str, Any] = {"path": card.path, "name": _display_name(card.path), "tags": tags,
                                 "error": card.error}
        if card.ms is not None:
            entry["ms"] = card.ms
        if card.model:
            models[card.model] = None
        if card.version:
            versions[card.version] = None
        images.append(entry)

    # Thumbnails: one per distinct file, made in threads (Pillow releases the
    # GIL while decoding and resizing).
    unique: dict[Path, None] = {}
    for entry in images:
        if entry["path"]:
            unique[_resolve(entry["path"], root)] = None
    n_workers = workers if workers is not None else min(8, os.cpu_count() or 1)
    paths = list(unique)
    if n_workers > 1 and len(paths) > 1:
        with ThreadPoolExecutor(max_workers=n_workers) as pool:
            thumbs = dict(zip(paths, pool.map(lambda p: _thumbnail(p, thumb_px), paths)))
    else:
        thumbs = {p: _thumbnail(p, thumb_px) for p in paths}
    for entry in images:
        if entry["path"]:
            entry["thumb"], entry["note"] = thumbs[_resolve(entry["path"], root)]
        else:
            entry["thumb"], entry["note"] = None, "no path"

    data = {
        "title": title,
        "threshold": float(threshold),
        "slider": {"min": SLIDER_MIN, "max": SLIDER_MAX},
        "thumbPx": thumb_px,
        "models": list(models),
        "versions": list(versions),
        "maxTags": max_tags,
        "labels": labels,
        "vocab": _vocabulary_columns(labels, vocabulary),
        "images": images,
    }
    fields = {"CSP": _content_security_policy(), "TITLE": _html_text(title), "DATA": _embed_json(data),
              "ERRORS_JS": _asset("errors.js"), "CSS": _asset("report.css"), "REPORT_JS": _asset("report.js")}
    # One pass, so text substituted for one field is never scanned for another.
    return re.sub(r"@@([A-Z_]+)@@", lambda m: fields[m.group(1)], _asset("report.html"))


def write_report(
    records: Iterable[Mapping],
    output: Path,
    *,
    threshold: float,
    images_root: Path | None = None,
    title: str | None = None,
    vocabulary: Vocabulary | None = None,
    max_tags: int | None = None,
) -> Path:
    """Build the report and write it to ``output`` atomically (a temporary
    file in the same directory, then ``os.replace``). Returns ``output``."""
    html = build_report(
        records, threshold=threshold, images_root=images_root, title=DEFAULT_TITLE if title is None else title,
        vocabulary=vocabulary, max_tags=max_tags,
    )
    return _save(html, Path(output))


def _save(html: str, output: Path) -> Path:
    output.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(output, html)
    return output


REPORT_FLOOR = SLIDER_MIN


class ReportSink:
    """Collects a `tag` run's outcomes, selected again down to the slider's floor, into an HTML report.

    The page starts from the run's own selection (its vocabulary's per-label
    thresholds and off switches, the global threshold, max_tags), so it first
    shows exactly the tags the run wrote. For that it needs every label down to
    the lowest threshold in play, off ones included and uncapped: selected again
    from the scores tagging computed (`SiglipTagger.record` reuses them), so no
    image is scored twice.
    """

    def __init__(self, tagger: SiglipTagger, output: Path, *, threshold: float):
        self.tagger, self.output, self.threshold = tagger, output, threshold
        self.options = tagger.options(threshold=threshold)
        own = [entry.threshold for entry in self.options.vocabulary.entries if entry.threshold is not None]
        self.explore = self.options.explore(min([REPORT_FLOOR, threshold, *own]),
                                            max_tags=max(1, len(self.options.labels)))
        self.cards: list[_Card] = []
        self._text: Any = None  # the explored labels' embeddings, looked up at the first image

    def write(self, path: str, item: ImageEmbedding, record: Record) -> None:
        if self._text is None:  # once per run, not per image: the labels do not change
            self._text = self.tagger.embed_texts(self.explore.labels)
        self.cards.append(_card(path, self.tagger.record(item, self._text, self.explore)))

    def close(self) -> None:
        if self.cards:  # a run that failed before its first image keeps the previous report
            _save(_page(self.cards, threshold=self.threshold, images_root=Path.cwd(), title=DEFAULT_TITLE,
                        vocabulary=self.options.vocabulary, max_tags=self.options.max_tags), self.output)

