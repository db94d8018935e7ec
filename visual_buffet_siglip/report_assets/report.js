// The report's page: cards, the threshold explorer and the per-label tuning.
// Data comes from the JSON block #data; nothing is fetched. Kept tags follow
// the same rule as tagging (vocabulary.select): a label is kept when it is
// not off and its confidence reaches its own threshold, else the global one;
// at most maxTags per image, by confidence.
(function () {
  "use strict";
  var D = JSON.parse(document.getElementById("data").textContent);
  var images = D.images, labels = D.labels, N = images.length, L = labels.length;
  var V = D.vocab, MAX_TAGS = D.maxTags === null ? Infinity : D.maxTags;
  var LMIN = Math.log10(D.slider.min), LMAX = Math.log10(D.slider.max);
  var SLIDER_STEPS = 1000, CHUNK = 48, MARGIN = 1500, LABEL_ROWS = 40;
  var HIST_LO = -3, HIST_HI = 0, HIST_BINS = 60;
  document.documentElement.style.setProperty("--thumb", D.thumbPx + "px");

  // Flat arrays of every tag of the run, image by image, for counting without touching the DOM.
  var total = 0, i, j;
  for (i = 0; i < N; i++) total += images[i].tags.length;
  var allConf = new Float64Array(total), allLab = new Int32Array(total), imgStart = new Int32Array(N + 1);
  var recorded = new Int32Array(L);
  var k = 0, nErrors = 0;
  for (i = 0; i < N; i++) {
    var tg = images[i].tags;
    if (images[i].error) nErrors++;
    imgStart[i] = k;
    for (j = 0; j < tg.length; j++) { allConf[k] = tg[j][1]; allLab[k] = tg[j][0]; recorded[tg[j][0]]++; k++; }
  }
  imgStart[N] = k;
  var bins = new Float64Array(HIST_BINS), below = 0;
  for (k = 0; k < total; k++) {
    var c = allConf[k];
    if (!(c > 0)) { below++; continue; }
    var b = Math.floor((Math.log10(c) - HIST_LO) / (HIST_HI - HIST_LO) * HIST_BINS);
    if (b < 0) { below++; continue; }
    bins[Math.min(HIST_BINS - 1, b)]++;
  }

  // Per-label settings, starting from the vocabulary the run used: own threshold (null: the global one), off.
  var own = V.thresholds.slice(), off = new Uint8Array(L), cut = new Float64Array(L);
  for (i = 0; i < L; i++) off[i] = V.off[i] ? 1 : 0;
  function updateCuts() {
    for (var a = 0; a < L; a++) cut[a] = off[a] ? Infinity : own[a] === null ? state.threshold : own[a];
  }

  var state = { threshold: D.threshold, labelRows: LABEL_ROWS, filter: "" };
  var cards = [];          // rendered cards, in order: {i, kept, tagEls, keptEl, noneEl}
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
  function short(t) { return String(Number(t.toPrecision(3))); }
  function oneLine(s) { return String(s).split(/\s+/).join(" ").trim(); }
  function barPct(c) {  // log scale 0.001 .. 1 -> 0 .. 100
    if (!(c > 0)) return 0;
    return Math.max(2, Math.min(100, (Math.log10(c) - HIST_LO) / (HIST_HI - HIST_LO) * 100));
  }
  function sliderToT(v) { return Math.pow(10, LMIN + (LMAX - LMIN) * (v / SLIDER_STEPS)); }
  function tToSlider(t) {
    if (!(t > 0)) return 0;
    var v = Math.round((Math.log10(t) - LMIN) / (LMAX - LMIN) * SLIDER_STEPS);
    return Math.max(0, Math.min(SLIDER_STEPS, v));
  }
  function validT(t) { return typeof t === "number" && isFinite(t) && t >= 0 && t <= 1; }

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
  if (MAX_TAGS !== Infinity) metaItem("at most ", MAX_TAGS + " tags an image");
  document.getElementById("footer").textContent =
    "Tags are kept when confidence \u2265 the label's own threshold, else the global one, and the label is " +
    "not off. Bars use a log scale from 0.001 to 1. Labels shown in red fire on at least half of the images.";

  // ---- cards
  var container = document.getElementById("cards");
  function updateCard(card) {
    var tags = images[card.i].tags, n = 0;
    for (var a = 0; a < tags.length; a++) {
      var keep = n < MAX_TAGS && tags[a][1] >= cut[tags[a][0]];
      if (keep) n++;
      if (card.tagEls[a].hidden === keep) card.tagEls[a].hidden = !keep;
    }
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
    var card = { i: i, kept: 0, tagEls: [], keptEl: null, noneEl: null };
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
      card.noneEl = el("div", "none", im.tags.length ? "no tags at these thresholds" : "no tags recorded");
      list.appendChild(card.noneEl);
      body.appendChild(list);
    }
    root.appendChild(body);
    updateCard(card);
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

  // ---- per-label view: counts, and each label's own threshold and off switch
  var labelBox = document.getElementById("labels"), moreBtn = document.getElementById("labels-more");
  var rowEls = [], order = [], lastCounts = null;
  function computeCounts() {
    var counts = new Int32Array(L), kept = 0, withTags = 0;
    for (var a = 0; a < N; a++) {
      var n = 0;
      for (var q = imgStart[a]; q < imgStart[a + 1] && n < MAX_TAGS; q++) {
        if (allConf[q] >= cut[allLab[q]]) { counts[allLab[q]]++; n++; }
      }
      kept += n;
      if (n) withTags++;
    }
    return { counts: counts, kept: kept, withTags: withTags };
  }
  function makeRow(li) {
    var name = labels[li], r = { row: el("div", "lrow") };
    r.row.setAttribute("role", "listitem");
    r.row.setAttribute("data-label", name);
    var nm = el("span", "lname", name);
    nm.title = V.paths[li] ? name + " \u2192 " + V.paths[li] : name;
    var bar = el("span", "lbar");
    r.fill = el("span");
    bar.appendChild(r.fill);
    r.num = el("span", "lnum");
    r.range = el("input", "lthr");
    r.range.type = "range"; r.range.min = "0"; r.range.max = String(SLIDER_STEPS); r.range.step = "1";
    r.range.setAttribute("aria-label", "threshold for " + name + ", log scale");
    r.val = el("input", "lval");
    r.val.type = "number"; r.val.min = "0"; r.val.max = "1"; r.val.step = "any";
    r.val.setAttribute("aria-label", "threshold value for " + name + "; empty follows the global threshold");
    r.off = el("input", "loff");
    r.off.type = "checkbox";
    r.off.setAttribute("aria-label", "off: never tag " + name);
    r.off.title = "off: scored, never a tag";
    r.reset = el("button", "lreset", "\u21ba");
    r.reset.type = "button";
    r.reset.title = "follow the global threshold";
    r.reset.setAttribute("aria-label", "follow the global threshold for " + name);
    [nm, bar, r.num, r.range, r.val, r.off, r.reset].forEach(function (e) { r.row.appendChild(e); });
    r.range.addEventListener("input", function () { setOwn(li, Number(short(sliderToT(Number(r.range.value))))); });
    r.val.addEventListener("change", function () {
      var text = r.val.value.trim();
      if (!setOwn(li, text === "" ? null : Number(text))) syncRow(li);
    });
    r.off.addEventListener("change", function () { setOff(li, r.off.checked); });
    r.reset.addEventListener("click", function () { setOwn(li, null); });
    rowEls[li] = r;
    return r;
  }
  function syncRow(li) {
    var r = rowEls[li], res = lastCounts;
    if (!r || !res) return;
    var n = res.counts[li], okImages = N - nErrors, follows = own[li] === null;
    var t = follows ? state.threshold : own[li];
    r.row.className = "lrow" + (follows ? " follows" : "") + (off[li] ? " is-off" : "") +
      (okImages > 1 && n * 2 >= okImages ? " everywhere" : "");
    r.fill.style.width = (state.topCount ? n / state.topCount * 100 : 0).toFixed(1) + "%";
    var pct = okImages ? Math.round(n / okImages * 100) : 0;
    r.num.textContent = n + " \u00b7 " + pct + "%";
    r.num.title = n + " of " + okImages + " images without errors";
    if (document.activeElement !== r.range) r.range.value = String(tToSlider(t));
    if (document.activeElement !== r.val) r.val.value = short(t);
    r.off.checked = !!off[li];
    r.reset.hidden = follows;
  }
  function listed(a) {  // labels with a score or a setting; with a filter, every label of the vocabulary matching it
    var f = state.filter;
    if (!f) return recorded[a] || off[a] || own[a] !== null;
    return labels[a].toLowerCase().indexOf(f) >= 0 || (V.paths[a] || "").toLowerCase().indexOf(f) >= 0;
  }
  function sortLabels(res) {
    order = [];
    for (var a = 0; a < L; a++) if (listed(a)) order.push(a);
    order.sort(function (x, y) {
      return res.counts[y] - res.counts[x] || (labels[x] < labels[y] ? -1 : labels[x] > labels[y] ? 1 : 0);
    });
  }
  function drawLabels(res, resort) {
    // Rows keep their place while one of their controls has focus (re-sorting would take the focus away).
    if (resort && !labelBox.contains(document.activeElement)) {
      sortLabels(res);
      var frag = document.createDocumentFragment(), rows = Math.min(order.length, state.labelRows);
      for (var a = 0; a < rows; a++) frag.appendChild((rowEls[order[a]] || makeRow(order[a])).row);
      labelBox.textContent = "";
      if (!rows) labelBox.appendChild(el("div", "empty-note", state.filter ? "No label matches." : "No label was recorded."));
      labelBox.appendChild(frag);
      state.shown = order.slice(0, rows);
    }
    var shown = state.shown || [], firing = 0;
    state.topCount = 0;
    for (a = 0; a < shown.length; a++) state.topCount = Math.max(state.topCount, res.counts[shown[a]]);
    for (a = 0; a < shown.length; a++) syncRow(shown[a]);
    for (a = 0; a < order.length; a++) if (res.counts[order[a]]) firing++;
    document.getElementById("labels-note").textContent =
      "(" + firing + " of " + order.length + (order.length === 1 ? " fires)" : " fire)");
    if (order.length > state.labelRows) {
      moreBtn.hidden = false; moreBtn.textContent = "show all " + order.length;
    } else if (state.labelRows > LABEL_ROWS && order.length > LABEL_ROWS) {
      moreBtn.hidden = false; moreBtn.textContent = "show top " + LABEL_ROWS;
    } else {
      moreBtn.hidden = true;
    }
  }
  document.getElementById("labels-filter").addEventListener("input", function (ev) {
    state.filter = ev.target.value.trim().toLowerCase();
    if (lastCounts) drawLabels(lastCounts, true);
  });
  moreBtn.addEventListener("click", function () {
    state.labelRows = state.labelRows > LABEL_ROWS ? LABEL_ROWS : L;
    if (lastCounts) drawLabels(lastCounts, true);
  });
  function labelIndex(name) { return labels.indexOf(name); }
  function setOwn(li, t) {
    if (li < 0 || (t !== null && !validT(t))) return false;
    own[li] = t;
    scheduleApply(false);
    return true;
  }
  function setOff(li, value) {
    if (li < 0) return false;
    off[li] = value ? 1 : 0;
    scheduleApply(false);
    return true;
  }

  // ---- the vocabulary file (the format of vocabulary.py), with what is set on this page
  function vocabularyText() {
    var changed = state.threshold !== D.threshold;
    var lines = [
      "# Vocabulary tuned in the report \"" + oneLine(D.title) + "\" (" + N + " images).",
      "# label<TAB>threshold<TAB>keyword path; threshold: 0 to 1, off (scored, never a tag) or empty (confidence_threshold).",
      "# Use it with: visual-buffet-siglip retag STORE --labels-file vocabulary.tsv"
    ];
    if (changed) {
      lines.push("# The page's global threshold " + state.threshold + " (the run's was " + D.threshold +
                 ") is written on every label without one of its own.");
    }
    if (MAX_TAGS !== Infinity) lines.push("# The page kept at most " + MAX_TAGS + " tags an image (max_tags).");
    var seen = {};
    for (var a = 0; a < L; a++) {
      var name = oneLine(labels[a]).toLowerCase();
      if (!name || name.charAt(0) === "#" || seen["=" + name]) continue;  // not representable, or a repeat
      seen["=" + name] = true;
      var thr = off[a] ? "off" : own[a] !== null ? String(own[a]) : changed ? String(state.threshold) : "";
      var path = V.paths[a] ? oneLine(V.paths[a]) : "";
      lines.push([name, thr, path].join("\t").replace(/\t+$/, ""));
    }
    return lines.join("\n") + "\n";
  }
  function downloadVocabulary() {
    var blob = new Blob([vocabularyText()], { type: "text/tab-separated-values;charset=utf-8" });
    var a = el("a"), link = URL.createObjectURL(blob);
    a.href = link;
    a.download = "vocabulary.tsv";
    document.body.appendChild(a);
    a.click();
    a.remove();
    setTimeout(function () { URL.revokeObjectURL(link); }, 60000);
  }
  document.getElementById("download-vocabulary").addEventListener("click", downloadVocabulary);

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
  function apply(resort) {
    updateCuts();
    for (var a = 0; a < cards.length; a++) updateCard(cards[a]);
    var res = computeCounts();
    lastCounts = res;
    stats.textContent = "";
    stats.appendChild(el("b", null, String(res.kept)));
    stats.appendChild(document.createTextNode(" tags kept on "));
    stats.appendChild(el("b", null, String(res.withTags)));
    stats.appendChild(document.createTextNode(" of " + N + " images"));
    drawLabels(res, resort);
    drawHist();
  }
  var applyScheduled = false, resortPending = false;
  function scheduleApply(resort) {
    resortPending = resortPending || resort;
    if (applyScheduled) return;
    applyScheduled = true;
    requestAnimationFrame(flush);
  }
  function setThreshold(t, fromSlider) {
    t = Number(t);
    if (!validT(t)) return false;
    state.threshold = t;
    if (!fromSlider) slider.value = String(tToSlider(t));
    if (document.activeElement !== numBox) numBox.value = short(t);
    scheduleApply(true);
    return true;
  }
  slider.addEventListener("input", function () { setThreshold(sliderToT(Number(slider.value)), true); });
  numBox.addEventListener("change", function () {
    if (!setThreshold(numBox.value, false)) numBox.value = short(state.threshold);
  });
  window.addEventListener("resize", function () { drawHist(); });

  function flush() {
    if (!applyScheduled) return;
    var resort = resortPending;
    applyScheduled = resortPending = false;
    apply(resort);
  }
  window.reportState = {
    get threshold() { return state.threshold; },
    setThreshold: function (t) { var ok = setThreshold(t, false); flush(); return ok; },
    setLabelThreshold: function (label, t) { var ok = setOwn(labelIndex(label), t); flush(); return ok; },
    setLabelOff: function (label, value) { var ok = setOff(labelIndex(label), value); flush(); return ok; },
    labelSettings: function (label) {
      var li = labelIndex(label);
      return li < 0 ? null : { threshold: own[li], off: !!off[li], path: V.paths[li] };
    },
    vocabularyText: vocabularyText,
    downloadVocabulary: downloadVocabulary,
    flush: flush,
    renderAll: function () { renderUpTo(N); },
    renderedCount: function () { return cards.length; },
    imageCount: function () { return N; },
    visibleTagCount: function () { return container.querySelectorAll(".tag:not([hidden])").length; },
    labelCounts: function () {
      updateCuts();
      var res = computeCounts(), out = {};
      for (var a = 0; a < L; a++) if (res.counts[a]) out[labels[a]] = res.counts[a];
      return out;
    },
    sliderToThreshold: sliderToT
  };

  slider.value = String(tToSlider(state.threshold));
  numBox.value = short(state.threshold);
  updateCuts();
  renderUpTo(CHUNK);
  apply(true);
  scheduleFill();
})();
