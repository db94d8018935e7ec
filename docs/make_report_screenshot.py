"""Regenerate docs/report.png: a report over 12 synthetic pictures tagged by the SigLIP trained on
them (tests/data/tiny-siglip-shapes, captions as the vocabulary), rendered by headless Chromium at 1280x900.

    PYTHONPATH=. python docs/make_report_screenshot.py

Needs Pillow and the Debian packages chromium and chromium-driver.
"""

from __future__ import annotations

import importlib.util
import sys
import tempfile
from pathlib import Path

from visual_buffet_siglip.report import write_report

HERE = Path(__file__).resolve().parent
spec = importlib.util.spec_from_file_location("webdriver", HERE.parent / "tests" / "webdriver.py")
webdriver = importlib.util.module_from_spec(spec)
sys.modules["webdriver"] = webdriver
spec.loader.exec_module(webdriver)

CHECKPOINT = HERE.parent / "tests" / "data" / "tiny-siglip-shapes"
SEED = 12


def tagged(root: Path) -> list[dict]:
    """12 new pictures (640x480 JPEGs) of the synthetic shapes, tagged by the model trained on them."""
    sys.path.insert(0, str(HERE.parent / "tests"))
    import synthetic_shapes as shapes

    from visual_buffet_siglip import Settings
    from visual_buffet_siglip.engine import SiglipTagger

    paths = []
    for i, (picture, combo) in enumerate(shapes.take(SEED, 12, shapes.ALL, (640, 480))):
        path = root / f"{i + 1:02d}_{combo.label.replace(' ', '_')}.jpg"
        picture.save(path, quality=90)
        paths.append(path)
    tagger = SiglipTagger(Settings.from_mapping({"model": str(CHECKPOINT), "device": "cpu", "text_cache": False,
                                                 "labels": list(shapes.LABELS), "confidence_threshold": 0.001}))
    records = tagger.tag(paths)
    for path, record in zip(paths, records):
        record["path"] = path.name
        record["model"] = "tests/data/tiny-siglip-shapes"
    return records


def main(out: Path = HERE / "report.png") -> Path:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        records = tagged(root)
        (root / "scan_0042.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
        records.insert(3, {"path": "scan_0042.jpg", "tags": [], "error": {
            "type": "ImageDecodeError", "message": "image file is truncated (41 bytes not processed)"}})  # fmt: skip
        report = write_report(records, root / "report.html", threshold=0.01, images_root=root,
                              title="Synthetic shapes, tagged by the SigLIP trained on them")
        with webdriver.Browser(width=1280, height=900) as b:
            # make the viewport itself 1280x900
            iw, ih = b.execute("return [window.innerWidth, window.innerHeight]")
            b.set_window_size(1280 + 1280 - iw, 900 + 900 - ih)
            b.get(report.as_uri())
            b.wait_for("window.reportState && document.readyState === 'complete'")
            b.next_frames(3)
            errors = b.execute("return window.__reportErrors")
            if errors:
                raise SystemExit(f"page errors: {errors}")
            out.write_bytes(b.screenshot())
    print(out)
    return out


if __name__ == "__main__":
    main()
