"""The HTML contact sheet: self-contained output, embedded data, thumbnails,
script injection, file handling, and the threshold explorer in a real
headless Chromium (driven over W3C WebDriver with the standard library).

The browser tests need the Debian packages ``chromium`` and
``chromium-driver``; they fail (never skip) when those are missing.
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import importlib.util
import io
import json
import math
import os
import random
import re
import sys
from importlib import resources
from pathlib import Path

import pytest
from PIL import Image

from visual_buffet_siglip import report as report_mod
from visual_buffet_siglip.report import SLIDER_MAX, SLIDER_MIN, build_report, read_records, write_report

XSS_LABEL = "</script><script>window.__xss=1;alert(1)</script>"
XSS_LABEL2 = '<img src=x onerror="window.__xss=2">'
LABEL_POOL = [
    "dog", "cat", "golden retriever", "beach", "sunset", "tree", "car", "bicycle", "mountain", "snow",
    "city street", "portrait", "food", "flower", "bird", "boat", "building", "night", "sky", "grass",
    "water", "indoor", "outdoor", "person", "child", "table", "window", "road", "forest", "river",
]  # fmt: skip


# --------------------------------------------------------------------------
# helpers


def _load_webdriver():
    """tests/webdriver.py, loaded by path so it works under any import mode."""
    name = "vbs_tests_webdriver"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name("webdriver.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def fake_tags(rng: random.Random, n: int, extra: tuple[str, ...] = ()) -> list[dict]:
    labels = rng.sample(LABEL_POOL, n - len(extra)) + list(extra)
    tags = [{"label": lab, "confidence": round(10 ** rng.uniform(-3, -0.15), 4)} for lab in labels]
    return sorted(tags, key=lambda t: (-t["confidence"], t["label"]))


def extract_data(html: str) -> dict:
    m = re.search(r'<script type="application/json" id="data">(.*?)</script>', html, re.S)
    assert m, "no embedded data block"

    def no_constants(name):
        raise AssertionError(f"non-standard JSON constant {name}")

    return json.loads(m.group(1), parse_constant=no_constants)


def decoded_images(data: dict) -> list[dict]:
    labels = data["labels"]
    return [
        {
            "path": im["path"],
            "tags": [(labels[li], conf) for li, conf in im["tags"]],
            "error": im["error"],
            "thumb": im["thumb"],
            "note": im["note"],
        }
        for im in data["images"]
    ]


def thumb_image(uri: str) -> Image.Image:
    prefix = "data:image/jpeg;base64,"
    assert uri.startswith(prefix)
    im = Image.open(io.BytesIO(base64.b64decode(uri[len(prefix) :], validate=True)))
    assert im.format == "JPEG"
    im.load()
    return im


def expected_kept(records: list[dict], t: float) -> int:
    return sum(1 for r in records for tag in r.get("tags", []) if tag["confidence"] >= t)


def expected_label_counts(records: list[dict], t: float) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in records:
        for tag in r.get("tags", []):
            if tag["confidence"] >= t:
                out[tag["label"]] = out.get(tag["label"], 0) + 1
    return out


@pytest.fixture
def gallery(tmp_path: Path) -> tuple[Path, list[dict]]:
    """Images of several sizes and modes under tmp_path/images, plus records
    for them as the CLI writes them (relative paths), including failures."""
    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    w, h = 2400, 1600
    big = Image.linear_gradient("L").resize((w, h)).convert("RGB")
    big.save(root / "big.jpg", quality=90)
    rgba = Image.new("RGBA", (90, 60), (255, 0, 0, 0))
    rgba.paste((0, 128, 0, 255), (45, 0, 90, 60))
    rgba.save(root / "small.png")
    Image.linear_gradient("L").resize((200, 300)).save(root / "sub" / "gray.png")
    Image.new("RGB", (120, 80), (200, 120, 20)).convert("P", palette=Image.Palette.ADAPTIVE).save(root / "pal.gif")
    Image.linear_gradient("L").resize((64, 64)).convert("I").point(lambda v: v * 256).convert("I;16").save(root / "deep.png")
    Image.new("CMYK", (100, 100), (0, 255, 255, 0)).save(root / "cmyk.jpg")
    # Stored landscape, left red / right blue; EXIF orientation 6 = rotate 90 deg clockwise to display.
    rot = Image.new("RGB", (300, 200), (255, 0, 0))
    rot.paste((0, 0, 255), (150, 0, 300, 200))
    exif = Image.Exif()
    exif[0x0112] = 6
    rot.save(root / "rotated.jpg", exif=exif, quality=95)
    (root / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg" + bytes(range(256)))

    rng = random.Random(8)
    names = ["big.jpg", "small.png", "sub/gray.png", "pal.gif", "deep.png", "cmyk.jpg", "rotated.jpg"]
    records = []
    for i, name in enumerate(names):
        extra = (XSS_LABEL, XSS_LABEL2) if name == "small.png" else ()
        rec = {"path": name, "tags": fake_tags(rng, 6 + 3 * i, extra), "model": "google/siglip2-base-patch16-224"}
        rec.update(version="0.1.0", inference_time_ms=round(rng.uniform(5, 60), 1))
        records.append(rec)
    records.append({"path": "corrupt.jpg", "tags": [], "error": {"type": "ImageDecodeError", "message": "cannot identify image file 'corrupt.jpg'"}})
    records.append({"path": "gone.jpg", "tags": [], "error": {"type": "FileNotFoundError", "message": "no such file: gone.jpg"}})
    # Tagged when it existed, deleted before the report: tags shown, placeholder thumbnail.
    records.append({"path": "deleted-since.jpg", "tags": fake_tags(rng, 5), "model": "google/siglip2-base-patch16-224"})
    # tags exactly at thresholds the tests use: kept (confidence >= threshold)
    records[0]["tags"].append({"label": "at threshold", "confidence": 0.01})
    records[-1]["tags"].append({"label": "at threshold", "confidence": 0.05})
    for rec in records:
        rec["tags"].sort(key=lambda t: (-t["confidence"], t["label"]))
    return root, records


# --------------------------------------------------------------------------
# the document


def test_report_is_self_contained(gallery):
    root, records = gallery
    html = build_report(records, threshold=0.01, images_root=root)
    assert html.startswith("<!DOCTYPE html>")
    assert not re.search(r"https?:", html, re.I), "no http(s) reference may appear anywhere"
    # not even when user text carries URLs: '/' is escaped in the data and the title
    url_records = records + [{"path": "https://cdn.example.com/a.jpg", "tags": [{"label": "http://x//cdn", "confidence": 0.5}]}]
    html2 = build_report(url_records, threshold=0.01, images_root=root, title="run of https://example.com/x")
    for needle in ("http://", "https://", "//cdn"):
        assert needle not in html and needle not in html2
    assert extract_data(html2)["images"][-1]["path"] == "https://cdn.example.com/a.jpg"
    assert 'src="http' not in html
    assert "url(" not in html and "@import" not in html
    markup = re.sub(r'(<script type="application/json" id="data">).*?(</script>)', r"\1\2", html, flags=re.S)
    assert not re.search(r"\s(src|href)\s*=", markup), "no element may reference a file; JS sets data: URIs"
    assert "<link" not in markup.lower()
    assert "Content-Security-Policy" in html and "default-src 'none'" in html
    # every thumbnail is a data URI
    data = extract_data(html)
    thumbs = [im["thumb"] for im in data["images"] if im["thumb"] is not None]
    assert len(thumbs) == 7
    assert all(t.startswith("data:image/jpeg;base64,") for t in thumbs)


def test_embedded_data_matches_records(gallery):
    root, records = gallery
    data = extract_data(build_report(records, threshold=0.02, images_root=root))
    assert data["threshold"] == 0.02
    assert data["slider"] == {"min": SLIDER_MIN, "max": SLIDER_MAX}
    assert data["models"] == ["google/siglip2-base-patch16-224"]
    images = decoded_images(data)
    assert [im["path"] for im in images] == [r["path"] for r in records]
    for im, rec in zip(images, records):
        assert im["tags"] == [(t["label"], t["confidence"]) for t in rec["tags"]]
        assert im["error"] == rec.get("error")
    assert images[-3]["error"] == {"type": "ImageDecodeError", "message": "cannot identify image file 'corrupt.jpg'"}
    assert len(data["labels"]) == len(set(data["labels"]))


def test_tags_are_sorted_deduplicated_and_finite():
    records = [
        {
            "path": "x.jpg",
            "tags": [
                {"label": "b", "confidence": 0.2},
                {"label": "a", "confidence": 0.2},
                {"label": "c", "confidence": 0.5},
                {"label": "b", "confidence": 0.3},
                {"label": "nan", "confidence": float("nan")},
                {"label": "inf", "confidence": float("inf")},
                {"label": "text", "confidence": "0.4"},
                {"label": "bool", "confidence": True},
                "garbage",
            ],
        }
    ]
    data = extract_data(build_report(records, threshold=0.01))
    assert decoded_images(data)[0]["tags"] == [("c", 0.5), ("b", 0.3), ("a", 0.2)]


def test_thumbnails(gallery):
    root, records = gallery
    data = extract_data(build_report(records, threshold=0.01, images_root=root, thumb_px=160))
    by_path = {im["path"]: im for im in decoded_images(data)}
    for path in ["big.jpg", "small.png", "sub/gray.png", "pal.gif", "deep.png", "cmyk.jpg", "rotated.jpg"]:
        im = thumb_image(by_path[path]["thumb"])
        assert im.mode == "RGB", path
        assert max(im.size) <= 160, path
    assert thumb_image(by_path["big.jpg"]["thumb"]).size == (160, 107)
    # EXIF orientation applied: portrait, red on top, blue at the bottom.
    rot = thumb_image(by_path["rotated.jpg"]["thumb"])
    assert rot.size == (107, 160)
    top, bottom = rot.getpixel((53, 20)), rot.getpixel((53, 140))
    assert top[0] > 200 and top[2] < 60, top
    assert bottom[2] > 200 and bottom[0] < 60, bottom
    # transparency composited on white, not black
    small = thumb_image(by_path["small.png"]["thumb"])
    assert min(small.getpixel((5, small.size[1] // 2))) > 230
    # 16-bit greyscale scaled, not clipped to white
    deep = thumb_image(by_path["deep.png"]["thumb"])
    assert deep.getpixel((32, 2))[0] < 60 and deep.getpixel((32, 61))[0] > 190
    # CMYK red stays red
    r, g, b = thumb_image(by_path["cmyk.jpg"]["thumb"]).getpixel((50, 50))
    assert r > 200 and g < 60 and b < 60


def test_missing_and_corrupt_images_get_placeholders(gallery):
    root, records = gallery
    data = extract_data(build_report(records, threshold=0.01, images_root=root))
    by_path = {im["path"]: im for im in decoded_images(data)}
    for path in ["corrupt.jpg", "gone.jpg", "deleted-since.jpg"]:
        assert by_path[path]["thumb"] is None
        assert by_path[path]["note"]
    assert by_path["gone.jpg"]["note"] == "file not found"
    assert "no preview" in by_path["corrupt.jpg"]["note"]
    assert len(by_path["deleted-since.jpg"]["tags"]) == 6


def test_large_jpeg_is_draft_decoded(tmp_path, monkeypatch):
    from PIL import JpegImagePlugin

    Image.new("RGB", (4000, 3000), (10, 200, 30)).save(tmp_path / "huge.jpg")
    decoded_sizes = []
    orig = JpegImagePlugin.JpegImageFile.draft

    def spy(self, mode, size):
        result = orig(self, mode, size)
        decoded_sizes.append(self.size)
        return result

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    data = extract_data(build_report([{"path": "huge.jpg", "tags": []}], threshold=0.01, images_root=tmp_path))
    assert decoded_sizes and decoded_sizes[0] == (500, 375)  # 1/8 scale, still >= 2 x 160
    assert thumb_image(data["images"][0]["thumb"]).size == (160, 120)


def test_script_injection_cannot_break_out(tmp_path):
    records = [
        {"path": "evil</script><script>alert(2)</script>.jpg", "tags": [{"label": XSS_LABEL, "confidence": 0.5}]},
        {"path": "x.jpg", "tags": [], "error": {"type": "</script><b>", "message": "<!--<script>"}},
    ]
    html = build_report(records, threshold=0.01, images_root=tmp_path, title="</title><script>alert(3)</script>")
    # exactly the three scripts of the template open and close
    assert len(re.findall(r"<script", html, re.I)) == 3
    assert len(re.findall(r"</script", html, re.I)) == 3
    assert "<!--" not in html
    assert "<script>alert" not in html
    data = extract_data(html)
    assert data["labels"] == [XSS_LABEL]
    assert data["images"][0]["path"] == records[0]["path"]
    assert data["images"][1]["error"] == {"type": "</script><b>", "message": "<!--<script>"}
    assert data["title"] == "</title><script>alert(3)</script>"
    assert "<title>&lt;&#47;title&gt;&lt;script&gt;alert(3)&lt;&#47;script&gt;</title>" in html


def _csp_sources(html: str) -> dict[str, list[str]]:
    m = re.search(r'<meta http-equiv="Content-Security-Policy" content="([^"]*)">', html)
    assert m, "no CSP meta element"
    policy = {}
    for directive in m.group(1).split(";"):
        name, *sources = directive.split()
        policy[name] = sources
    return policy


def _sha256_source(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode("ascii") + "'"


def test_csp_allows_only_the_pages_own_script_and_style(gallery):
    root, records = gallery
    html = build_report(records, threshold=0.01, images_root=root)
    policy = _csp_sources(html)
    assert "unsafe-inline" not in html and "unsafe-eval" not in html
    assert policy["default-src"] == ["'none'"] and policy["img-src"] == ["data:"]
    assert policy["base-uri"] == ["'none'"]
    # the meta element comes before any script or style, so it governs all of them
    assert html.index("Content-Security-Policy") < min(html.index("<script"), html.index("<style"))
    scripts = re.findall(r"<script>(.*?)</script>", html, re.S)
    styles = re.findall(r"<style>(.*?)</style>", html, re.S)
    assert len(scripts) == 2 and len(styles) == 1
    assert sorted(policy["script-src"]) == sorted(_sha256_source(text) for text in scripts)
    assert policy["style-src"] == [_sha256_source(styles[0])]
    # the policy does not depend on the data: the same hashes for another report
    assert _csp_sources(build_report([], threshold=0.3, title="other"))["script-src"] == policy["script-src"]


def test_page_assets_are_package_data(gallery):
    """The page is edited as HTML, CSS and JS files, shipped as package data and inlined verbatim."""
    from visual_buffet_siglip.config import tomllib

    assets = resources.files("visual_buffet_siglip").joinpath("report_assets")
    names = sorted(entry.name for entry in assets.iterdir())
    assert names == ["errors.js", "report.css", "report.html", "report.js"]
    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text(encoding="utf-8"))
    globs = pyproject["tool"]["setuptools"]["package-data"]["visual_buffet_siglip"]
    assert all(any(fnmatch.fnmatch(f"report_assets/{name}", glob) for glob in globs) for name in names)
    root, records = gallery
    html = build_report(records, threshold=0.01, images_root=root)
    for name in ("errors.js", "report.js", "report.css"):
        assert assets.joinpath(name).read_text("utf-8") in html, name
    assert "<!DOCTYPE" not in Path(report_mod.__file__).read_text(encoding="utf-8"), "the page lives in report_assets/"


def test_vocabulary_gives_the_page_its_starting_settings(tmp_path, capsys):
    """`report --labels-file`: every vocabulary label is in the page (fired or not) with its own settings."""
    from visual_buffet_siglip.cli import main

    results = tmp_path / "run.jsonl"
    results.write_text(json.dumps({"path": "a.jpg", "tags": [{"label": "dog", "confidence": 0.3},
                                                              {"label": "stray", "confidence": 0.2}]}) + "\n",
                       encoding="utf-8")
    vocab = tmp_path / "vocab.tsv"
    vocab.write_text("beach\t0.04\tNature|Coast|Beach\nblurry photo\toff\ndog\t\tAnimals|Dogs\n", encoding="utf-8")
    out = tmp_path / "r.html"
    assert main(["report", str(results), "-o", str(out), "--labels-file", str(vocab), "--max-tags", "3"]) == 0
    capsys.readouterr()
    data = extract_data(out.read_text(encoding="utf-8"))
    assert data["labels"] == ["beach", "blurry photo", "dog", "stray"]  # the vocabulary's order, then the rest
    assert data["vocab"] == {"thresholds": [0.04, None, None, None], "off": [False, True, False, False],
                             "paths": ["Nature|Coast|Beach", None, "Animals|Dogs", None]}
    assert data["maxTags"] == 3
    assert decoded_images(data)[0]["tags"] == [("dog", 0.3), ("stray", 0.2)]
    without = extract_data(build_report([{"path": "a.jpg", "tags": []}], threshold=0.01))
    assert without["labels"] == [] and without["maxTags"] is None

    vocab.write_text("beach\t2\n", encoding="utf-8")
    assert main(["report", str(results), "-o", str(out), "--labels-file", str(vocab)]) == 2
    assert f"{vocab}, line 1" in capsys.readouterr().err


def test_report_sink_keeps_every_label_down_to_the_lowest_threshold(tmp_path):
    """`tag --report`: off labels, labels under the global threshold or cap, and a threshold under 0.001 all reach
    the page, which starts from the run's own selection."""
    import numpy as np

    from visual_buffet_siglip.report import ReportSink
    from visual_buffet_siglip.vocabulary import TagOptions, parse_vocabulary, select

    vocab = parse_vocabulary("a\t0.0002\nb\toff\nc\nd\n")

    class Tagger:  # the three calls ReportSink makes of a SiglipTagger
        def options(self, threshold=None):
            return TagOptions(vocab, threshold, 1)

        def embed_texts(self, labels):
            return labels

        def record(self, item, text, options):
            return {"tags": select(text, np.asarray(item), options)}

    sink = ReportSink(Tagger(), tmp_path / "r.html", threshold=0.05)
    sink.write("x.jpg", [0.0003, 0.9, 0.01, 0.0001], {})
    sink.close()
    data = extract_data((tmp_path / "r.html").read_text(encoding="utf-8"))
    assert decoded_images(data)[0]["tags"] == [("b", 0.9), ("c", 0.01), ("a", 0.0003)]
    assert data["vocab"] == {"thresholds": [0.0002, None, None, None], "off": [False, True, False, False],
                             "paths": [None] * 4}
    assert data["threshold"] == 0.05 and data["maxTags"] == 1


def test_report_with_only_errors_and_empty_report(tmp_path):
    records = [
        {"path": "a.jpg", "tags": [], "error": {"type": "ImageDecodeError", "message": "truncated"}},
        {"path": "b.jpg", "tags": [], "error": "plain string error"},
    ]
    data = extract_data(build_report(records, threshold=0.01, images_root=tmp_path))
    assert [im["error"] for im in data["images"]] == [
        {"type": "ImageDecodeError", "message": "truncated"},
        {"type": "Error", "message": "plain string error"},
    ]
    assert data["labels"] == []
    empty = extract_data(build_report([], threshold=0.01))
    assert empty["images"] == [] and empty["labels"] == []


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan"), float("inf"), "0.1", None, True])
def test_threshold_is_validated(bad):
    with pytest.raises(ValueError, match="threshold"):
        build_report([], threshold=bad)


def test_relative_paths_resolve_against_images_root_or_cwd(tmp_path, monkeypatch):
    (tmp_path / "pics").mkdir()
    Image.new("RGB", (40, 30), (1, 2, 3)).save(tmp_path / "pics" / "a.png")
    rec_rel = {"path": "pics/a.png", "tags": []}
    rec_abs = {"path": str(tmp_path / "pics" / "a.png"), "tags": []}
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    images = extract_data(build_report([rec_rel, rec_abs], threshold=0.01))["images"]
    assert images[0]["thumb"] is None and images[1]["thumb"] is not None
    images = extract_data(build_report([rec_rel], threshold=0.01, images_root=tmp_path))["images"]
    assert images[0]["thumb"] is not None
    monkeypatch.chdir(tmp_path)
    images = extract_data(build_report([rec_rel], threshold=0.01))["images"]
    assert images[0]["thumb"] is not None


def test_read_records(tmp_path):
    f = tmp_path / "results.jsonl"
    lines = [json.dumps({"path": "a.jpg", "tags": [{"label": "dog", "confidence": 0.07}]}), "", "   ", json.dumps({"path": "b.jpg", "tags": []})]
    f.write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert [r["path"] for r in read_records(f)] == ["a.jpg", "b.jpg"]

    f.write_text(lines[0] + "\n\n" + '{"path": "c.jpg", "tags": [\n', encoding="utf-8")
    with pytest.raises(ValueError, match=re.escape(f"{f}:3")):
        read_records(f)
    f.write_text(lines[0] + "\n[1, 2]\n", encoding="utf-8")
    with pytest.raises(ValueError, match=re.escape(f"{f}:2")):
        read_records(f)


def test_write_report_is_atomic(tmp_path, gallery, monkeypatch):
    root, records = gallery
    out = tmp_path / "out" / "report.html"
    assert write_report(records, out, threshold=0.01, images_root=root) == out
    first = out.read_text(encoding="utf-8")
    assert extract_data(first)["title"] == "visual-buffet-siglip report"
    assert sorted(p.name for p in out.parent.iterdir()) == ["report.html"]
    mode = out.stat().st_mode & 0o777
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o666 & ~umask

    write_report(records[:2], out, threshold=0.05, images_root=root, title="second")
    assert extract_data(out.read_text(encoding="utf-8"))["title"] == "second"

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(report_mod.os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        write_report(records, out, threshold=0.01, images_root=root, title="third")
    assert extract_data(out.read_text(encoding="utf-8"))["title"] == "second"
    assert sorted(p.name for p in out.parent.iterdir()) == ["report.html"]


# --------------------------------------------------------------------------
# in a real browser


@pytest.fixture(scope="module")
def browser():
    wd = _load_webdriver()
    try:
        b = wd.Browser(width=1280, height=900)
    except (wd.WebDriverError, OSError) as exc:
        pytest.fail(
            f"the report's browser tests need headless Chromium and chromedriver "
            f"(install them with `apt-get install chromium chromium-driver`): {exc}",
            pytrace=False,
        )
    yield b
    b.quit()


def open_report(browser, path: Path) -> None:
    browser.get(path.resolve().as_uri())
    browser.wait_for("window.reportState && document.readyState === 'complete'")
    browser.next_frames(2)


def assert_no_page_errors(browser) -> None:
    assert browser.execute("return window.__reportErrors") == []
    log = browser.browser_log()
    if log is not None:  # the legacy log endpoint; chromedriver offers it
        severe = [e for e in log if e.get("level") == "SEVERE"]
        assert severe == [], severe


def move_slider(browser, value: int) -> float:
    """Set the range input and dispatch 'input', as a user drag does; wait
    for the update frame; return the threshold the page now uses."""
    browser.execute(
        "var s = document.getElementById('threshold');"
        "s.value = String(arguments[0]);"
        "s.dispatchEvent(new Event('input', {bubbles: true}));",
        value,
    )
    browser.next_frames(2)
    return browser.execute("return window.reportState.threshold")


VISIBLE_JS = """
var tags = document.querySelectorAll('#cards .tag'), unhidden = 0, laidOut = 0;
for (var i = 0; i < tags.length; i++) {
  if (!tags[i].hidden) unhidden++;
  if (tags[i].getClientRects().length > 0) laidOut++;
}
return [unhidden, laidOut, tags.length, window.reportState.visibleTagCount()];
"""


def test_threshold_explorer_in_browser(browser, gallery, tmp_path):
    root, records = gallery
    out = write_report(records, tmp_path / "site" / "report.html", threshold=0.01, images_root=root)
    open_report(browser, out)
    assert_no_page_errors(browser)
    assert browser.execute("return window.__xss") is None
    assert browser.execute("return document.getElementById('threshold').type") == "range"

    browser.execute("window.reportState.renderAll()")
    n_tags = sum(len(r["tags"]) for r in records)
    assert browser.execute("return window.reportState.renderedCount()") == len(records)
    assert browser.execute("return document.querySelectorAll('#cards .card').length") == len(records)
    unhidden, laid_out, all_tags, api = browser.execute(VISIBLE_JS)
    assert all_tags == n_tags
    assert unhidden == laid_out == api == expected_kept(records, 0.01)

    # Thumbnails are data: images; the three without one show a placeholder;
    # errors are shown with their type and message.
    srcs = browser.execute("return Array.from(document.querySelectorAll('#cards img')).map(function (i) { return i.src; })")
    assert len(srcs) == 7 and all(s.startswith("data:image/jpeg;base64,") for s in srcs)
    assert browser.execute("return document.querySelectorAll('#cards .placeholder').length") == 3
    err_text = browser.execute("return Array.from(document.querySelectorAll('.card.error')).map(function (c) { return c.textContent; })")
    assert len(err_text) == 2
    assert "ImageDecodeError" in err_text[0] and "cannot identify image file" in err_text[0] and "corrupt.jpg" in err_text[0]
    # hostile labels are shown as text, never parsed as markup
    shown = browser.execute("return Array.from(document.querySelectorAll('.tag .tl')).map(function (e) { return e.textContent; })")
    assert XSS_LABEL in shown and XSS_LABEL2 in shown
    assert browser.execute("return window.__xss") is None

    for value in (120, 640):
        t = move_slider(browser, value)
        lo, hi = math.log10(SLIDER_MIN), math.log10(SLIDER_MAX)
        assert t == pytest.approx(10 ** (lo + (hi - lo) * value / 1000), rel=1e-9)
        unhidden, laid_out, all_tags, api = browser.execute(VISIBLE_JS)
        want = expected_kept(records, t)
        assert all_tags == n_tags
        assert unhidden == laid_out == api == want, (t, unhidden, laid_out, api, want)
        # per card: "keeps k of n tags"
        kept = browser.execute("return Array.from(document.querySelectorAll('#cards .card:not(.error) .kept')).map(function (e) { return e.textContent; })")
        ok_records = [r for r in records if not r.get("error")]
        assert kept == [f"keeps {sum(1 for x in r['tags'] if x['confidence'] >= t)} of {len(r['tags'])} tags" for r in ok_records]
        # per-label view
        assert browser.execute("return window.reportState.labelCounts()") == expected_label_counts(records, t)
        rows = browser.execute("return Array.from(document.querySelectorAll('#labels .lrow')).map(function (r) { return r.getAttribute('data-label'); })")
        counts = expected_label_counts(records, t)
        recorded = {tag["label"] for r in records for tag in r["tags"]}  # every label stays listed, to be tuned
        assert rows == sorted(recorded, key=lambda lab: (-counts.get(lab, 0), lab))[:40]
        assert t > 0.01 or value == 120

    # the numeric box follows, and typing in it moves the slider
    browser.execute(
        "var b = document.getElementById('threshold-value'); b.value = '0.05';"
        "b.dispatchEvent(new Event('change', {bubbles: true}));"
    )
    browser.next_frames(2)
    assert browser.execute("return window.reportState.threshold") == 0.05
    assert browser.execute(VISIBLE_JS)[0] == expected_kept(records, 0.05)
    assert_no_page_errors(browser)


def test_csp_blocks_a_script_the_escaping_missed(browser, gallery, tmp_path):
    """A second wall: even markup that got into the page past the escaping cannot run script."""
    root, records = gallery
    out = write_report(records, tmp_path / "report.html", threshold=0.01, images_root=root)
    html = out.read_text(encoding="utf-8")
    injected = ('<script>window.__injected = 1;</script>'
                '<img alt="" src="data:image/png;base64,AAAA" onerror="window.__injected = 2">')
    out.write_text(html.replace("</body>", injected + "</body>"), encoding="utf-8")
    open_report(browser, out)
    browser.next_frames(2)
    assert browser.execute("return window.__injected") is None
    violations = browser.execute("return window.__reportErrors")
    assert violations and all(v.startswith("CSP violation: script-src") for v in violations), violations
    log = browser.browser_log()
    if log is not None:  # chromium reports the violation on the console too
        assert any("Content Security Policy" in entry.get("message", "") for entry in log), log
    # the page's own script is allowed and did its work
    assert browser.execute("return window.reportState.imageCount()") == len(records)


def test_ten_thousand_images_stay_responsive(browser, tmp_path):
    rng = random.Random(10_000)
    records = [{"path": f"run/{i:05d}.jpg", "tags": fake_tags(rng, 30)} for i in range(10_000)]
    for i in range(0, 10_000, 97):
        records[i] = {"path": f"run/{i:05d}.jpg", "tags": [], "error": {"type": "ImageDecodeError", "message": "bad"}}
    out = write_report(records, tmp_path / "big.html", threshold=0.01, images_root=tmp_path)
    open_report(browser, out)
    assert_no_page_errors(browser)
    assert browser.execute("return window.reportState.imageCount()") == 10_000
    rendered = browser.execute("return window.reportState.renderedCount()")
    assert 0 < rendered < 500, "cards must be built lazily"

    # a slider move touches only rendered cards: measure the whole update
    ms = browser.execute(
        "var s = document.getElementById('threshold'), t0 = performance.now();"
        "s.value = '500'; s.dispatchEvent(new Event('input', {bubbles: true}));"
        "window.reportState.flush(); return performance.now() - t0;"
    )
    assert ms < 1000, f"threshold update took {ms:.0f} ms"
    t = browser.execute("return window.reportState.threshold")
    assert browser.execute("return window.reportState.labelCounts()") == expected_label_counts(records, t)
    rendered = browser.execute("return window.reportState.renderedCount()")
    assert browser.execute(VISIBLE_JS)[0] == expected_kept(records[:rendered], t)

    # scrolling to the end builds more cards, consistent with the threshold
    browser.execute("window.scrollTo(0, document.documentElement.scrollHeight)")
    browser.wait_for(f"window.reportState.renderedCount() > {rendered}", timeout=10)
    browser.next_frames(2)
    rendered = browser.execute("return window.reportState.renderedCount()")
    assert rendered < 10_000
    assert browser.execute(VISIBLE_JS)[0] == expected_kept(records[:rendered], t)
    assert_no_page_errors(browser)


# --------------------------------------------------------------------------
# tuning the vocabulary in the page, then retag with what it downloads

TUNE_LABELS = ["dog", "cat", "golden retriever", "beach", "mountain", "red car", "blue sky", "tree",
               "old house", "person", "city street", "night", "sunset", "food", "pizza", "flower"]


def shown_tags(browser) -> list[list[str]]:
    """Per card without error, the labels of the tags the page shows, top to bottom."""
    browser.execute("window.reportState.renderAll()")
    browser.next_frames(2)
    return browser.execute(
        "return Array.from(document.querySelectorAll('#cards .card:not(.error)')).map(function (c) {"
        "  return Array.from(c.querySelectorAll('.tag')).filter(function (t) { return t.getClientRects().length; })"
        "    .map(function (t) { return t.querySelector('.tl').textContent; }); });"
    )


def row(label: str, control: str) -> str:
    return f'#labels .lrow[data-label="{label}"] .{control}'


def test_tuned_vocabulary_download_retags_to_what_the_page_showed(browser, checkpoints, images, tmp_path, capsys):
    from visual_buffet_siglip.cli import main
    from visual_buffet_siglip.vocabulary import read_vocabulary

    keys = _load_webdriver().KEYS
    # The run's vocabulary: keyword paths, one label with its own threshold, one off.
    run_vocab = tmp_path / "run-vocabulary.tsv"
    own = {"pizza": "0.3", "night": "off"}
    paths = {"dog": "Animals|Dogs", "golden retriever": "Animals|Dogs|Golden retriever", "beach": "Nature|Coast|Beach"}
    run_vocab.write_text("".join(f"{label}\t{own.get(label, '')}\t{paths.get(label, '')}".rstrip("\t") + "\n"
                                 for label in TUNE_LABELS), encoding="utf-8")
    common = ["--model", str(checkpoints["siglip"]), "--device", "cpu", "--dtype", "float32",
              "--threshold", "0.2", "--max-tags", "6"]
    store, report, tagged = tmp_path / "run.emb", tmp_path / "report.html", tmp_path / "run.jsonl"
    paths_in = [str(p) for p in images]
    assert main(["-q", "tag", *paths_in, "--labels-file", str(run_vocab), "--save-embeddings", str(store),
                 "--report", str(report), "--format", "jsonl", "-o", str(tagged), *common]) == 0
    run_records = [json.loads(line) for line in tagged.read_text(encoding="utf-8").splitlines()]

    open_report(browser, report)
    assert_no_page_errors(browser)
    # The page starts from the run's own selection: exactly the tags the run wrote.
    assert shown_tags(browser) == [[t["label"] for t in r["tags"]] for r in run_records]
    assert browser.execute("return window.reportState.labelSettings('night')")["off"] is True
    assert browser.execute("return window.reportState.labelSettings('pizza')")["threshold"] == 0.3
    assert any(len(r["tags"]) == 6 for r in run_records), "max_tags must matter in this run"

    # Pick labels whose change shows on the cards (the random model's scores decide which).
    data = extract_data(report.read_text(encoding="utf-8"))
    scores: dict[str, list[float]] = {}
    for im in data["images"]:
        for li, conf in im["tags"]:
            scores.setdefault(data["labels"][li], []).append(conf)
    shown_before = {label for tags in shown_tags(browser) for label in tags}
    free = [lab for lab in TUNE_LABELS if lab not in own]
    lowered = max(free, key=lambda lab: sum(0.05 <= c < 0.2 for c in scores.get(lab, [])))
    raised = next(lab for lab in free if lab != lowered and lab in shown_before)
    switched_off = next(lab for lab in free if lab not in (lowered, raised) and lab in shown_before)

    # A user: types a threshold, moves a label's slider with the keyboard, clicks an off switch.
    browser.send_keys(row(lowered, "lval"), keys["select all"] + "0.05" + keys["enter"])
    browser.send_keys(row(raised, "lthr"), keys["end"])  # the slider's top: 0.5
    browser.click(row(switched_off, "loff"))
    browser.next_frames(2)
    assert browser.execute(f"return window.reportState.labelSettings({lowered!r})")["threshold"] == 0.05
    assert browser.execute(f"return window.reportState.labelSettings({raised!r})")["threshold"] == 0.5
    assert browser.execute(f"return window.reportState.labelSettings({switched_off!r})")["off"] is True
    page = shown_tags(browser)
    assert page != [[t["label"] for t in r["tags"]] for r in run_records], "the tuning must change the cards"
    assert switched_off not in {label for tags in page for label in tags}
    # the counts follow too
    counts = browser.execute("return window.reportState.labelCounts()")
    assert counts == {lab: n for lab in TUNE_LABELS if (n := sum(lab in tags for tags in page))}
    assert_no_page_errors(browser)

    # Download vocabulary: a real download through the button.
    target = browser.download_dir / "vocabulary.tsv"
    target.unlink(missing_ok=True)
    browser.click("#download-vocabulary")
    downloaded = browser.wait_for_download("vocabulary.tsv")
    vocabulary = read_vocabulary(downloaded)
    assert vocabulary.labels == tuple(TUNE_LABELS)
    entries = {entry.label: entry for entry in vocabulary.entries}
    assert entries[lowered].threshold == 0.05 and entries[raised].threshold == 0.5
    assert entries[switched_off].off and entries["night"].off and entries["pizza"].threshold == 0.3
    assert {lab: "|".join(e.keyword_path) for lab, e in entries.items() if e.keyword_path} == paths
    assert sum(e.threshold is None and not e.off for e in entries.values()) == len(TUNE_LABELS) - 5

    # retag from the stored embeddings with the downloaded file keeps exactly what the page showed.
    capsys.readouterr()
    assert main(["-q", "retag", str(store), "--labels-file", str(downloaded), "--format", "jsonl", *common]) == 0
    retagged = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["path"] for r in retagged] == paths_in
    assert [[t["label"] for t in r["tags"]] for r in retagged] == page


def test_filter_finds_labels_that_never_fired(browser, tmp_path):
    """Every vocabulary label can be tuned: the filter lists those without a score too, by label or path."""
    from visual_buffet_siglip.vocabulary import parse_vocabulary

    vocabulary = parse_vocabulary("dog\t\tAnimals|Dogs\npuppy\t\tAnimals|Dogs|Puppy\ncat\t\tAnimals|Cats\n"
                                  "beach\t0.2\tNature|Coast|Beach\n")
    records = [{"path": "a.jpg", "tags": [{"label": "dog", "confidence": 0.3}, {"label": "beach", "confidence": 0.1}]}]
    out = write_report(records, tmp_path / "f.html", threshold=0.01, images_root=tmp_path, vocabulary=vocabulary)
    open_report(browser, out)
    listed = ("return Array.from(document.querySelectorAll('#labels .lrow'))"
              ".map(function (r) { return r.getAttribute('data-label'); })")
    assert browser.execute(listed) == ["dog", "beach"]  # scored, or set in the vocabulary
    browser.send_keys("#labels-filter", "dogs")
    browser.next_frames(2)
    assert browser.execute(listed) == ["dog", "puppy"]  # puppy never fired; found by its keyword path
    browser.click(row("puppy", "loff"))
    browser.next_frames(2)
    text = browser.execute("return window.reportState.vocabularyText()")
    assert [line for line in text.splitlines() if not line.startswith("#")] == [
        "dog\t\tAnimals|Dogs", "puppy\toff\tAnimals|Dogs|Puppy", "cat\t\tAnimals|Cats",
        "beach\t0.2\tNature|Coast|Beach"]
    keys = _load_webdriver().KEYS
    browser.send_keys("#labels-filter", keys["select all"] + keys["backspace"])  # no filter
    browser.next_frames(2)
    assert browser.execute(listed) == ["dog", "beach", "puppy"]  # puppy now has a setting of its own
    # A global threshold moved on the page is written on every label without its own, so retag agrees.
    browser.execute("window.reportState.setThreshold(0.03)")
    text = browser.execute("return window.reportState.vocabularyText()")
    assert [line for line in text.splitlines() if not line.startswith("#")] == [
        "dog\t0.03\tAnimals|Dogs", "puppy\toff\tAnimals|Dogs|Puppy", "cat\t0.03\tAnimals|Cats",
        "beach\t0.2\tNature|Coast|Beach"]
    assert_no_page_errors(browser)


def test_report_selects_from_the_scores_tagging_computed():
    """`tag --report` scores each image once: `record` reuses the scores `iter_tag` kept for the same labels."""
    import numpy as np

    from visual_buffet_siglip.engine import ImageEmbedding, SiglipTagger
    from visual_buffet_siglip.vocabulary import TagOptions, Vocabulary

    tagger = SiglipTagger()

    def score(*args):
        raise AssertionError("scored again")

    tagger.score = score
    options = TagOptions(Vocabulary.from_labels(["cat", "dog"]), 0.001, 5)
    item = ImageEmbedding(0, "x.jpg", np.zeros(4, np.float32), None, 2.0, ("cat", "dog"),
                          np.array([0.25, 0.5], np.float32))
    record = tagger.record(item, np.zeros((2, 4), np.float32), options)
    assert [(tag["label"], tag["confidence"]) for tag in record["tags"]] == [("dog", 0.5), ("cat", 0.25)]
    item.labels = ("cat", "bird")  # scores of other labels: scored again
    with pytest.raises(AssertionError, match="scored again"):
        tagger.record(item, np.zeros((2, 4), np.float32), options)
