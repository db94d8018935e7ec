"""Self-contained HTML contact sheet with a threshold explorer.

``build_report`` turns result records (as the CLI writes them to jsonl, one
dict per image) into one HTML document that needs nothing else: CSS and JS are
inline, thumbnails are small JPEG data URIs, and a Content-Security-Policy
forbids the page from loading anything at all. The data is embedded once as
JSON and rendered by the page's script:

* a card per image: thumbnail, file name, tags as bars (log scale) with values,
  or the error type and message for images that failed;
* a threshold slider (log scale, 0.001 - 0.5) that live-filters every card and
  shows per card how many tags it keeps;
* a histogram of all tag confidences of the run on a log axis, with the
  threshold marked;
* a per-label table: how many images each label fires on at the current
  threshold, most frequent first, to spot labels that fire everywhere.

The explorer is only useful when the records keep tags down to a low floor:
the CLI run that makes a report tags with threshold 0.001 and passes the
configured threshold here, where the slider starts.

Cards are built lazily while scrolling and slider updates are coalesced to one
per animation frame, touching only rendered cards, so runs of 10,000 images
stay responsive.

Hooks for tests and tooling: each rendered tag element has class ``tag``;
tags under the threshold keep their element but carry the ``hidden``
attribute; the slider is ``<input type="range" id="threshold">``;
``window.reportState`` exposes ``threshold``, ``setThreshold(t)``,
``renderAll()``, ``renderedCount()``, ``visibleTagCount()`` and
``labelCounts()``; uncaught page errors are collected in
``window.__reportErrors``.

Only the standard library and Pillow are used here.
"""

from __future__ import annotations

import base64
import io
import json
import math
import os
import re
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from .fileio import write_atomic
from .outputs import json_text

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


def _norm_error(err: Any) -> dict[str, str] | None:
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


def build_report(
    records: Iterable[Mapping],
    *,
    threshold: float,
    images_root: Path | None = None,
    title: str = DEFAULT_TITLE,
    thumb_px: int = 160,
    workers: int | None = None,
) -> str:
    """Return one self-contained HTML document for ``records``.

    ``threshold`` is where the slider starts (0..1). Relative record paths are
    resolved against ``images_root`` (default: the current directory).
    Thumbnails are JPEG data URIs with max side ``thumb_px``; an image that is
    missing or cannot be decoded gets a placeholder. ``workers`` threads make
    the thumbnails (default: up to 8).
    """
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold):
        raise ValueError(f"threshold must be a number in [0, 1], got {threshold!r}")
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold!r}")
    if not isinstance(thumb_px, int) or isinstance(thumb_px, bool) or not 16 <= thumb_px <= 1024:
        raise ValueError(f"thumb_px must be an int in 16..1024, got {thumb_px!r}")
    root = Path.cwd() if images_root is None else Path(images_root)
    title = DEFAULT_TITLE if title is None else str(title)

    label_index: dict[str, int] = {}
    labels: list[str] = []
    images: list[dict[str, Any]] = []
    models: dict[str, None] = {}
    versions: dict[str, None] = {}
    for rec in records:
        if not isinstance(rec, Mapping):
            raise TypeError(f"each record must be a mapping, got {type(rec).__name__}")
        path = rec.get("path")
        path = "" if path is None else str(path)
        error = _norm_error(rec.get("error"))
        tags = []
        for label, conf in _norm_tags(rec.get("tags")):
            li = label_index.get(label)
            if li is None:
                li = label_index[label] = len(labels)
                labels.append(label)
            tags.append([li, conf])
        entry: dict[str, Any] = {"path": path, "name": _display_name(path), "tags": tags, "error": error}
        ms = rec.get("inference_time_ms")
        if isinstance(ms, (int, float)) and not isinstance(ms, bool) and math.isfinite(ms):
            entry["ms"] = ms
        if rec.get("model"):
            models[str(rec["model"])] = None
        if rec.get("version"):
            versions[str(rec["version"])] = None
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
        "labels": labels,
        "images": images,
    }
    fields = {"TITLE": _html_text(title), "THUMB_PX": str(thumb_px), "DATA": _embed_json(data)}
    # One pass, so text substituted for one field is never scanned for another.
    return re.sub(r"@@([A-Z_]+)@@", lambda m: fields[m.group(1)], _TEMPLATE)


def write_report(
    records: Iterable[Mapping],
    output: Path,
    *,
    threshold: float,
    images_root: Path | None = None,
    title: str | None = None,
) -> Path:
    """Build the report and write it to ``output`` atomically (a temporary
    file in the same directory, then ``os.replace``). Returns ``output``."""
    output = Path(output)
    html = build_report(
        records, threshold=threshold, images_root=images_root, title=DEFAULT_TITLE if title is None else title
    )
    output.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(output, html)
    return output


# --------------------------------------------------------------------------
# the page. No URL of any scheme but data: may appear here (tests check).

_TEMPLATE = r"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<script>
window.__reportErrors = [];
window.addEventListener("error", function (e) {
  window.__reportErrors.push(String(e.message || e.type) + (e.filename ? " @" + e.lineno + ":" + e.colno : ""));
});
window.addEventListener("unhandledrejection", function (e) {
  window.__reportErrors.push("unhandled rejection: " + String(e.reason));
});
</script>
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="generator" content="visual-buffet-siglip">
<title>@@TITLE@@</title>
<style>
:root {
  --bg: #f5f6f8; --panel: #ffffff; --ink: #1d2330; --muted: #687083; --line: #dfe3ea;
  --accent: #2f6fdb; --accent-soft: #dbe6fa; --dim: #b9c0cc; --err: #b42318; --err-bg: #fdecea;
  --thumb: @@THUMB_PX@@px;
}
* { box-sizing: border-box; }
html, body { margin: 0; }
body { background: var(--bg); color: var(--ink); font: 14px/1.4 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
[hidden] { display: none !important; }
header.top { padding: 18px 24px 8px; }
header.top h1 { margin: 0 0 4px; font-size: 20px; font-weight: 650; }
.meta { color: var(--muted); font-size: 13px; }
.meta b { color: var(--ink); font-weight: 600; }
.controls { position: sticky; top: 0; z-index: 10; display: flex; flex-wrap: wrap; align-items: center; gap: 10px 18px;
  padding: 10px 24px; background: rgba(255,255,255,0.96); border-bottom: 1px solid var(--line); box-shadow: 0 1px 3px rgba(20,30,50,0.06); }
.controls label { font-weight: 600; }
.range { display: inline-flex; flex-direction: column; width: min(420px, 60vw); }
#threshold { width: 100%; margin: 0; accent-color: var(--accent); }
.range .ends { position: relative; height: 13px; font-size: 10.5px; color: var(--muted); }
.range .ends span { position: absolute; transform: translateX(-50%); }
#threshold-value { width: 88px; font: inherit; padding: 3px 6px; border: 1px solid var(--line); border-radius: 6px; }
.controls .stats { color: var(--muted); }
.controls .stats b { color: var(--ink); }
.overview { display: grid; grid-template-columns: minmax(0, 3fr) minmax(0, 2fr); gap: 16px; padding: 16px 24px 4px; }
@media (max-width: 900px) { .overview { grid-template-columns: 1fr; } }
.panel { background: var(--panel); border: 1px solid var(--line); border-radius: 10px; padding: 12px 14px; }
.panel h2 { margin: 0 0 8px; font-size: 14px; font-weight: 650; }
.panel h2 small { color: var(--muted); font-weight: 400; }
#hist { display: block; width: 100%; height: 230px; }
.labels-wrap { height: 230px; overflow-y: auto; }
.lrow { display: grid; grid-template-columns: minmax(0, 1fr) 110px 64px; align-items: center; gap: 8px; padding: 1px 0; font-size: 13px; }
.lrow .lname { overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
.lrow .lbar { height: 8px; background: var(--accent-soft); border-radius: 4px; overflow: hidden; }
.lrow .lbar span { display: block; height: 100%; background: var(--accent); }
.lrow .lnum { text-align: right; font-variant-numeric: tabular-nums; color: var(--muted); }
.lrow.everywhere .lname { color: var(--err); font-weight: 600; }
.lrow.everywhere .lbar span { background: var(--err); }
.panel-head { display: flex; align-items: baseline; justify-content: space-between; gap: 8px; }
.lmore { flex: none; font: inherit; font-size: 12px; border: 1px solid var(--line); background: var(--panel); border-radius: 6px; padding: 2px 8px; cursor: pointer; }
.empty-note { color: var(--muted); font-size: 13px; }
#cards { display: grid; grid-template-columns: repeat(auto-fill, minmax(232px, 1fr)); gap: 14px; padding: 16px 24px 24px; align-items: start; }
.card { background: var(--panel); border: 1px solid var(--line); border-radius: 10px; overflow: hidden; }
.card .thumb { height: calc(var(--thumb) + 12px); display: flex; align-items: center; justify-content: center; background: #eceff3; }
.card .thumb img { max-width: 100%; max-height: var(--thumb); display: block; }
.card .placeholder { width: calc(var(--thumb) * 0.8); height: calc(var(--thumb) * 0.6); display: flex; align-items: center; justify-content: center;
  text-align: center; padding: 6px; border: 2px dashed var(--dim); border-radius: 8px; color: var(--muted); font-size: 12px; }
.card .body { padding: 8px 10px 10px; }
.card .name { font-weight: 600; overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
.card .kept { color: var(--muted); font-size: 12px; margin-bottom: 4px; }
.card .tags { max-height: 236px; overflow-y: auto; }
.tag { display: grid; grid-template-columns: minmax(0, 1fr) 64px 44px; align-items: center; gap: 6px; font-size: 12.5px; padding: 1px 0; }
.tag .tl { overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
.tag .tb { height: 7px; background: var(--accent-soft); border-radius: 4px; overflow: hidden; }
.tag .tb span { display: block; height: 100%; background: var(--accent); border-radius: 4px; }
.tag .tv { text-align: right; font-variant-numeric: tabular-nums; color: var(--muted); }
.card.error { border-color: #f1b8b2; }
.card .err { background: var(--err-bg); color: var(--err); border-radius: 6px; padding: 6px 8px; font-size: 12.5px; overflow-wrap: anywhere; }
.card .err b { display: block; }
.card .none { color: var(--muted); font-size: 12.5px; font-style: italic; }
#sentinel { height: 1px; }
footer { color: var(--muted); font-size: 12px; padding: 0 24px 24px; }
</style>
</head>
<body>
<header class="top">
  <h1 id="title"></h1>
  <div class="meta" id="meta"></div>
</header>
<div class="controls">
  <label for="threshold">Threshold</label>
  <span class="range">
    <input type="range" id="threshold" min="0" max="1000" step="1" value="0" aria-describedby="threshold-value">
    <span class="ends"><span>0.001</span><span>0.01</span><span>0.1</span><span>0.5</span></span>
  </span>
  <input type="number" id="threshold-value" min="0" max="1" step="any" aria-label="threshold value">
  <span class="stats" id="stats"></span>
</div>
<section class="overview">
  <div class="panel">
    <h2>Tag confidences <small id="hist-note"></small></h2>
    <canvas id="hist" role="img" aria-label="histogram of tag confidences, log scale"></canvas>
  </div>
  <div class="panel">
    <div class="panel-head">
      <h2>Labels at this threshold <small id="labels-note"></small></h2>
      <button type="button" class="lmore" id="labels-more" hidden></button>
    </div>
    <div class="labels-wrap"><div id="labels"></div></div>
  </div>
</section>
<main id="cards"></main>
<div id="sentinel"></div>
<footer id="footer"></footer>
<script type="application/json" id="data">@@DATA@@</script>
<script>
(function () {
  "use strict";
  var D = JSON.parse(document.getElementById("data").textContent);
  var images = D.images, labels = D.labels, N = images.length;
  var LMIN = Math.log10(D.slider.min), LMAX = Math.log10(D.slider.max);
  var SLIDER_STEPS = 1000, CHUNK = 48, MARGIN = 1500, LABEL_ROWS = 40;
  var HIST_LO = -3, HIST_HI = 0, HIST_BINS = 60;

  // Flat arrays of every tag of the run, for counting without touching the DOM.
  var total = 0, i, j;
  for (i = 0; i < N; i++) total += images[i].tags.length;
  var allConf = new Float64Array(total), allLab = new Int32Array(total), allImg = new Int32Array(total);
  var k = 0, nErrors = 0;
  for (i = 0; i < N; i++) {
    var tg = images[i].tags;
    if (images[i].error) nErrors++;
    for (j = 0; j < tg.length; j++) { allConf[k] = tg[j][1]; allLab[k] = tg[j][0]; allImg[k] = i; k++; }
  }
  var bins = new Float64Array(HIST_BINS), below = 0;
  for (k = 0; k < total; k++) {
    var c = allConf[k];
    if (!(c > 0)) { below++; continue; }
    var b = Math.floor((Math.log10(c) - HIST_LO) / (HIST_HI - HIST_LO) * HIST_BINS);
    if (b < 0) { below++; continue; }
    bins[Math.min(HIST_BINS - 1, b)]++;
  }

  var state = { threshold: D.threshold, labelRows: LABEL_ROWS };
  var cards = [];          // rendered cards, in order: {i, kept, tagEls, keptEl}
  var nextIndex = 0;       // first image without a card yet

  function el(tag, cls, text) {
    var e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined) e.textContent = text;
    return e;
  }
  function fmt(c) {
    if (c >= 0.1) return c.toFixed(2);
    if (c >= 0.01) return c.toFixed(3);
    return c.toFixed(4);
  }
  function barPct(c) {  // log scale 0.001 .. 1 -> 0 .. 100
    if (!(c > 0)) return 0;
    return Math.max(2, Math.min(100, (Math.log10(c) - HIST_LO) / (HIST_HI - HIST_LO) * 100));
  }
  function keptCount(tags, t) {  // tags are sorted by confidence, descending
    var lo = 0, hi = tags.length;
    while (lo < hi) { var mid = (lo + hi) >> 1; if (tags[mid][1] >= t) lo = mid + 1; else hi = mid; }
    return lo;
  }
  function sliderToT(v) { return Math.pow(10, LMIN + (LMAX - LMIN) * (v / SLIDER_STEPS)); }
  function tToSlider(t) {
    if (!(t > 0)) return 0;
    var v = Math.round((Math.log10(t) - LMIN) / (LMAX - LMIN) * SLIDER_STEPS);
    return Math.max(0, Math.min(SLIDER_STEPS, v));
  }

  // ---- header
  document.getElementById("title").textContent = D.title;
  document.title = D.title;
  var meta = document.getElementById("meta");
  function metaItem(label, value) {
    if (meta.childNodes.length) meta.appendChild(document.createTextNode(" \u00b7 "));
    meta.appendChild(document.createTextNode(label));
    meta.appendChild(el("b", null, value));
  }
  metaItem("", N + (N === 1 ? " image" : " images"));
  if (nErrors) metaItem("", nErrors + (nErrors === 1 ? " error" : " errors"));
  metaItem("", total + " tags recorded");
  if (D.models.length) metaItem("model ", D.models.join(", "));
  if (D.versions.length) metaItem("version ", D.versions.join(", "));
  document.getElementById("footer").textContent =
    "Tags are kept when confidence \u2265 threshold. Bars use a log scale from 0.001 to 1. " +
    "Labels shown in red fire on at least half of the images.";

  // ---- cards
  var container = document.getElementById("cards");
  function setKept(card, n) {
    var tags = images[card.i].tags, a, lo = Math.min(card.kept, n), hi = Math.max(card.kept, n);
    for (a = lo; a < hi; a++) card.tagEls[a].hidden = a >= n;
    card.kept = n;
    if (card.keptEl) card.keptEl.textContent = "keeps " + n + " of " + tags.length + " tags";
    if (card.noneEl) card.noneEl.hidden = n > 0;
  }
  function buildCard(i) {
    var im = images[i];
    var root = el("article", im.error ? "card error" : "card");
    root.setAttribute("data-index", String(i));
    var th = el("div", "thumb");
    if (typeof im.thumb === "string" && im.thumb.indexOf("data:image/") === 0) {
      var img = el("img");
      img.alt = im.name;
      img.decoding = "async";
      img.src = im.thumb;
      th.appendChild(img);
    } else {
      th.appendChild(el("div", "placeholder", im.note || "no preview"));
    }
    root.appendChild(th);
    var body = el("div", "body");
    var name = el("div", "name", im.name || "(no path)");
    name.title = im.path;
    body.appendChild(name);
    var card = { i: i, kept: im.tags.length, tagEls: [], keptEl: null, noneEl: null };
    if (im.error) {
      var err = el("div", "err");
      err.appendChild(el("b", null, im.error.type));
      err.appendChild(document.createTextNode(im.error.message));
      body.appendChild(err);
    } else {
      card.keptEl = el("div", "kept");
      body.appendChild(card.keptEl);
      var list = el("div", "tags");
      for (var j = 0; j < im.tags.length; j++) {
        var c = im.tags[j][1], row = el("div", "tag");
        var lname = labels[im.tags[j][0]];
        row.appendChild(el("span", "tl", lname));
        var bar = el("span", "tb"), fill = el("span");
        fill.style.width = barPct(c).toFixed(1) + "%";
        bar.appendChild(fill);
        row.appendChild(bar);
        row.appendChild(el("span", "tv", fmt(c)));
        row.title = lname + ": " + c;
        list.appendChild(row);
        card.tagEls.push(row);
      }
      card.noneEl = el("div", "none", im.tags.length ? "no tags at this threshold" : "no tags recorded");
      list.appendChild(card.noneEl);
      body.appendChild(list);
    }
    root.appendChild(body);
    setKept(card, keptCount(im.tags, state.threshold));
    return { card: card, root: root };
  }
  function renderUpTo(end) {
    end = Math.min(N, end);
    if (nextIndex >= end) return;
    var frag = document.createDocumentFragment();
    for (; nextIndex < end; nextIndex++) {
      var b = buildCard(nextIndex);
      cards.push(b.card);
      frag.appendChild(b.root);
    }
    container.appendChild(frag);
  }
  var sentinel = document.getElementById("sentinel");
  var fillScheduled = false;
  function fill() {
    fillScheduled = false;
    if (nextIndex >= N) return;
    if (sentinel.getBoundingClientRect().top < window.innerHeight + MARGIN) {
      renderUpTo(nextIndex + CHUNK);
      scheduleFill();
    }
  }
  function scheduleFill() {
    if (fillScheduled || nextIndex >= N) return;
    fillScheduled = true;
    requestAnimationFrame(fill);
  }
  if ("IntersectionObserver" in window) {
    new IntersectionObserver(function (entries) {
      for (var e = 0; e < entries.length; e++) if (entries[e].isIntersecting) scheduleFill();
    }, { rootMargin: MARGIN + "px 0px" }).observe(sentinel);
  }
  window.addEventListener("scroll", scheduleFill, { passive: true });
  window.addEventListener("resize", scheduleFill);

  // ---- histogram
  var canvas = document.getElementById("hist");
  function drawHist() {
    var dpr = window.devicePixelRatio || 1, w = canvas.clientWidth || 600, h = canvas.clientHeight || 230;
    if (canvas.width !== Math.round(w * dpr) || canvas.height !== Math.round(h * dpr)) {
      canvas.width = Math.round(w * dpr); canvas.height = Math.round(h * dpr);
    }
    var g = canvas.getContext("2d");
    g.setTransform(dpr, 0, 0, dpr, 0, 0);
    g.clearRect(0, 0, w, h);
    var padL = 44, padR = 10, padT = 10, padB = 26, pw = w - padL - padR, ph = h - padT - padB;
    var maxBin = 0, b;
    for (b = 0; b < HIST_BINS; b++) maxBin = Math.max(maxBin, bins[b]);
    var css = getComputedStyle(document.documentElement);
    var accent = css.getPropertyValue("--accent").trim() || "#2f6fdb";
    var dim = css.getPropertyValue("--dim").trim() || "#b9c0cc";
    var ink = css.getPropertyValue("--ink").trim() || "#1d2330";
    var muted = css.getPropertyValue("--muted").trim() || "#687083";
    var line = css.getPropertyValue("--line").trim() || "#dfe3ea";
    function xOf(logc) { return padL + (logc - HIST_LO) / (HIST_HI - HIST_LO) * pw; }
    g.font = "11px system-ui, sans-serif";
    g.textBaseline = "middle";
    // y grid
    g.strokeStyle = line; g.fillStyle = muted; g.lineWidth = 1; g.textAlign = "right";
    // y axis: a "nice" integer step (1, 2, 5 x 10^k), top rounded up to it
    var step = 1;
    if (maxBin > 4) {
      var raw = maxBin / 4, mag = Math.pow(10, Math.floor(Math.log10(raw))), f = raw / mag;
      step = (f <= 1 ? 1 : f <= 2 ? 2 : f <= 5 ? 5 : 10) * mag;
    }
    var yTop = Math.max(step, Math.ceil(maxBin / step) * step);
    for (var yv = 0; yv <= yTop + 1e-9; yv += step) {
      var yy = padT + ph - ph * yv / yTop;
      g.beginPath(); g.moveTo(padL, Math.round(yy) + 0.5); g.lineTo(padL + pw, Math.round(yy) + 0.5); g.stroke();
      g.fillText(String(yv), padL - 6, yy);
    }
    maxBin = yTop;
    // bars
    var lt = state.threshold > 0 ? Math.log10(state.threshold) : -Infinity;
    var bw = pw / HIST_BINS;
    for (b = 0; b < HIST_BINS; b++) {
      if (!bins[b]) continue;
      var bh = maxBin ? bins[b] / maxBin * ph : 0;
      var left = HIST_LO + (HIST_HI - HIST_LO) * b / HIST_BINS;
      g.fillStyle = left + (HIST_HI - HIST_LO) / HIST_BINS / 2 >= lt ? accent : dim;
      g.fillRect(padL + b * bw + 0.5, padT + ph - bh, Math.max(1, bw - 1), bh);
    }
    // x axis
    g.strokeStyle = ink; g.beginPath(); g.moveTo(padL, padT + ph + 0.5); g.lineTo(padL + pw, padT + ph + 0.5); g.stroke();
    g.fillStyle = muted; g.textAlign = "center"; g.textBaseline = "top";
    var xt = [0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1];
    for (var q = 0; q < xt.length; q++) {
      var x = xOf(Math.log10(xt[q]));
      g.beginPath(); g.moveTo(x + 0.5, padT + ph); g.lineTo(x + 0.5, padT + ph + 4); g.stroke();
      g.fillText(String(xt[q]), x, padT + ph + 6);
    }
    // threshold marker
    if (lt >= HIST_LO && lt <= HIST_HI) {
      var tx = Math.round(xOf(lt)) + 0.5;
      g.strokeStyle = "#d9480f"; g.lineWidth = 2;
      g.beginPath(); g.moveTo(tx, padT - 4); g.lineTo(tx, padT + ph); g.stroke();
      g.fillStyle = "#d9480f"; g.textBaseline = "top";
      g.textAlign = tx > padL + pw - 80 ? "right" : "left";
      g.fillText(" " + fmt(state.threshold) + " ", tx, padT);
    }
    document.getElementById("hist-note").textContent =
      "(" + total + " tags, log scale" + (below ? ", " + below + " under 0.001 not drawn" : "") + ")";
  }

  // ---- per-label view
  var labelBox = document.getElementById("labels"), moreBtn = document.getElementById("labels-more");
  var lastCounts = null;
  function computeCounts(t) {
    var counts = new Int32Array(labels.length), perImage = new Int32Array(N), kept = 0;
    for (var a = 0; a < total; a++) if (allConf[a] >= t) { counts[allLab[a]]++; perImage[allImg[a]]++; kept++; }
    var withTags = 0;
    for (var b = 0; b < N; b++) if (perImage[b]) withTags++;
    return { counts: counts, kept: kept, withTags: withTags };
  }
  function drawLabels(res) {
    var order = [];
    for (var a = 0; a < labels.length; a++) if (res.counts[a] > 0) order.push(a);
    order.sort(function (x, y) { return res.counts[y] - res.counts[x] || (labels[x] < labels[y] ? -1 : labels[x] > labels[y] ? 1 : 0); });
    var okImages = N - nErrors, frag = document.createDocumentFragment(), rows = Math.min(order.length, state.labelRows);
    var top = order.length ? res.counts[order[0]] : 0;
    for (a = 0; a < rows; a++) {
      var li = order[a], n = res.counts[li];
      var row = el("div", "lrow" + (okImages > 1 && n * 2 >= okImages ? " everywhere" : ""));
      row.setAttribute("data-label", labels[li]);
      var nm = el("span", "lname", labels[li]); nm.title = labels[li];
      row.appendChild(nm);
      var bar = el("span", "lbar"), fill = el("span");
      fill.style.width = (top ? n / top * 100 : 0).toFixed(1) + "%";
      bar.appendChild(fill); row.appendChild(bar);
      var pct = okImages ? Math.round(n / okImages * 100) : 0;
      var num = el("span", "lnum", n + " \u00b7 " + pct + "%");
      num.title = n + " of " + okImages + " images without errors";
      row.appendChild(num);
      frag.appendChild(row);
    }
    labelBox.textContent = "";
    if (!rows) labelBox.appendChild(el("div", "empty-note", "No label reaches this threshold."));
    labelBox.appendChild(frag);
    document.getElementById("labels-note").textContent = "(" + order.length + (order.length === 1 ? " label fires)" : " labels fire)");
    if (order.length > state.labelRows) {
      moreBtn.hidden = false; moreBtn.textContent = "show all " + order.length;
    } else if (state.labelRows > LABEL_ROWS && order.length > LABEL_ROWS) {
      moreBtn.hidden = false; moreBtn.textContent = "show top " + LABEL_ROWS;
    } else {
      moreBtn.hidden = true;
    }
  }
  moreBtn.addEventListener("click", function () {
    state.labelRows = state.labelRows > LABEL_ROWS ? LABEL_ROWS : labels.length;
    if (lastCounts) drawLabels(lastCounts);
  });

  // ---- threshold
  var slider = document.getElementById("threshold"), numBox = document.getElementById("threshold-value");
  slider.max = String(SLIDER_STEPS);
  var ends = document.querySelectorAll(".range .ends span");
  for (var e = 0; e < ends.length; e++) {
    // thumb travel is the track width less the thumb (about 16px)
    var frac = tToSlider(Number(ends[e].textContent)) / SLIDER_STEPS;
    ends[e].style.left = "calc(8px + (100% - 16px) * " + frac.toFixed(4) + ")";
  }
  var stats = document.getElementById("stats");
  function apply() {
    var t = state.threshold;
    for (var a = 0; a < cards.length; a++) setKept(cards[a], keptCount(images[cards[a].i].tags, t));
    var res = computeCounts(t);
    lastCounts = res;
    stats.textContent = "";
    stats.appendChild(el("b", null, String(res.kept)));
    stats.appendChild(document.createTextNode(" tags kept on "));
    stats.appendChild(el("b", null, String(res.withTags)));
    stats.appendChild(document.createTextNode(" of " + N + " images"));
    drawLabels(res);
    drawHist();
  }
  var applyScheduled = false;
  function scheduleApply() {
    if (applyScheduled) return;
    applyScheduled = true;
    requestAnimationFrame(flush);
  }
  function setThreshold(t, fromSlider) {
    t = Number(t);
    if (!isFinite(t) || t < 0 || t > 1) return false;
    state.threshold = t;
    if (!fromSlider) slider.value = String(tToSlider(t));
    if (document.activeElement !== numBox) numBox.value = String(Number(t.toPrecision(3)));
    scheduleApply();
    return true;
  }
  slider.addEventListener("input", function () { setThreshold(sliderToT(Number(slider.value)), true); });
  numBox.addEventListener("change", function () {
    if (!setThreshold(numBox.value, false)) numBox.value = String(Number(state.threshold.toPrecision(3)));
  });
  window.addEventListener("resize", function () { drawHist(); });

  function flush() { if (applyScheduled) { applyScheduled = false; apply(); } }
  window.reportState = {
    get threshold() { return state.threshold; },
    setThreshold: function (t) { var ok = setThreshold(t, false); flush(); return ok; },
    flush: flush,
    renderAll: function () { renderUpTo(N); },
    renderedCount: function () { return cards.length; },
    imageCount: function () { return N; },
    visibleTagCount: function () { return container.querySelectorAll(".tag:not([hidden])").length; },
    labelCounts: function () {
      var res = computeCounts(state.threshold), out = {};
      for (var a = 0; a < labels.length; a++) if (res.counts[a]) out[labels[a]] = res.counts[a];
      return out;
    },
    sliderToThreshold: sliderToT
  };

  slider.value = String(tToSlider(state.threshold));
  numBox.value = String(Number(state.threshold.toPrecision(3)));
  renderUpTo(CHUNK);
  apply();
  scheduleFill();
})();
</script>
</body>
</html>
"""


REPORT_FLOOR = SLIDER_MIN


class ReportSink:
    """Collects a `tag` run's outcomes, re-scored down to the slider's floor, into an HTML report.

    Re-scoring costs one small matrix product per image: the label embeddings
    are already in the tagger's memory.
    """

    def __init__(self, tagger: Any, output: Path, *, threshold: float):
        self.tagger, self.output, self.threshold = tagger, output, threshold
        self.records: list[dict] = []

    def write(self, path: str, item: Any, record: Mapping) -> None:
        labels = list(self.tagger.settings.label_set)
        low = self.tagger.record(item, labels, self.tagger.embed_texts(labels),
                                 threshold=min(REPORT_FLOOR, self.threshold))
        self.records.append({"path": path, **low})

    def close(self) -> None:
        if self.records:  # a run that failed before its first image keeps the previous report
            write_report(self.records, self.output, threshold=self.threshold, images_root=Path.cwd())

