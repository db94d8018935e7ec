"""Regenerate docs/report.png: a report over 12 generated images with
plausible fake tags, rendered by headless Chromium at 1280x900.

    PYTHONPATH=. python docs/make_report_screenshot.py

Needs Pillow and the Debian packages chromium and chromium-driver.
"""

from __future__ import annotations

import importlib.util
import random
import sys
import tempfile
from pathlib import Path

from PIL import Image, ImageDraw

from visual_buffet_siglip.report import write_report

HERE = Path(__file__).resolve().parent
spec = importlib.util.spec_from_file_location("webdriver", HERE.parent / "tests" / "webdriver.py")
webdriver = importlib.util.module_from_spec(spec)
sys.modules["webdriver"] = webdriver
spec.loader.exec_module(webdriver)

# name: (sky top, sky bottom, ground, shape, shape colour, top tags)
SCENES = {
    "beach_sunset.jpg": ((255, 140, 60), (255, 210, 150), (40, 110, 180), "sun", (255, 240, 120),
                         [("sunset", 0.31), ("beach", 0.22), ("sea", 0.17), ("sky", 0.09), ("dusk", 0.052)]),
    "pine_forest.jpg": ((150, 200, 240), (210, 235, 250), (60, 120, 50), "trees", (20, 90, 40),
                        [("forest", 0.27), ("pine tree", 0.19), ("hiking trail", 0.041), ("nature", 0.038)]),
    "city_night.jpg": ((10, 15, 50), (40, 40, 90), (25, 25, 35), "towers", (255, 210, 80),
                       [("city at night", 0.29), ("skyline", 0.21), ("skyscraper", 0.12), ("lights", 0.044)]),
    "snowy_peak.jpg": ((90, 150, 230), (200, 225, 250), (235, 240, 248), "mountain", (120, 130, 150),
                       [("mountain", 0.34), ("snow", 0.25), ("alps", 0.061), ("winter", 0.047), ("glacier", 0.019)]),
    "red_car.jpg": ((190, 210, 230), (230, 235, 240), (90, 90, 95), "car", (210, 30, 40),
                    [("red car", 0.26), ("car", 0.18), ("street", 0.07), ("sports car", 0.034)]),
    "lavender.jpg": ((170, 200, 250), (230, 230, 250), (120, 90, 170), "rows", (160, 110, 210),
                     [("lavender field", 0.33), ("flower", 0.14), ("provence", 0.052), ("purple", 0.031)]),
    "desert.jpg": ((250, 200, 120), (255, 235, 190), (220, 170, 100), "dunes", (200, 140, 70),
                   [("desert", 0.36), ("sand dune", 0.23), ("sahara", 0.044), ("hot", 0.012)]),
    "lake_boat.jpg": ((120, 180, 230), (200, 230, 245), (30, 100, 140), "boat", (240, 240, 240),
                      [("lake", 0.24), ("sailboat", 0.2), ("boat", 0.15), ("summer", 0.021)]),
    "autumn_park.jpg": ((200, 220, 240), (240, 240, 230), (150, 110, 60), "trees", (220, 110, 30),
                        [("autumn", 0.3), ("park", 0.16), ("fall foliage", 0.12), ("tree", 0.08)]),
    "aurora.jpg": ((5, 20, 40), (30, 120, 90), (20, 30, 40), "mountain", (15, 25, 35),
                   [("aurora borealis", 0.38), ("night sky", 0.22), ("iceland", 0.026), ("stars", 0.018)]),
    "tulips.jpg": ((140, 190, 250), (220, 235, 255), (70, 150, 60), "rows", (240, 60, 90),
                   [("tulips", 0.32), ("flower", 0.17), ("netherlands", 0.049), ("spring", 0.029)]),
    "harbour.jpg": ((150, 190, 230), (230, 220, 210), (40, 80, 120), "towers", (200, 100, 80),
                    [("harbour", 0.25), ("boat", 0.11), ("old town", 0.066), ("waterfront", 0.05)]),
}  # fmt: skip
FILLER = [
    "outdoor", "landscape", "photo", "travel", "blue", "colorful", "daytime", "wallpaper", "scenery", "horizon",
    "cloud", "water", "tree", "building", "road", "grass", "light", "vacation", "painting", "illustration",
]  # fmt: skip


def paint(path: Path, sky0, sky1, ground, shape, colour, rng: random.Random) -> None:
    w, h = 640, 427
    im = Image.new("RGB", (w, h))
    d = ImageDraw.Draw(im)
    horizon = int(h * 0.62)
    for y in range(horizon):
        f = y / horizon
        d.line([(0, y), (w, y)], fill=tuple(int(a + (b - a) * f) for a, b in zip(sky0, sky1)))
    d.rectangle([0, horizon, w, h], fill=ground)
    if shape == "sun":
        d.ellipse([380, 150, 500, 270], fill=colour)
    elif shape == "trees":
        for x in range(-20, w, 55):
            top = horizon - rng.randint(90, 180)
            d.polygon([(x, horizon + 10), (x + 30, top), (x + 60, horizon + 10)], fill=colour)
    elif shape == "towers":
        for x in range(10, w, 70):
            top = horizon - rng.randint(80, 220)
            d.rectangle([x, top, x + 50, horizon], fill=tuple(c // 3 for c in sky0) if sum(sky0) < 200 else colour)
            for wy in range(top + 10, horizon - 10, 22):
                d.rectangle([x + 10, wy, x + 20, wy + 10], fill=(255, 220, 120))
    elif shape == "mountain":
        d.polygon([(60, horizon), (300, 90), (560, horizon)], fill=colour)
        d.polygon([(240, 160), (300, 90), (360, 160)], fill=(245, 248, 255))
    elif shape == "car":
        d.rounded_rectangle([170, 250, 470, 330], 25, fill=colour)
        d.rounded_rectangle([230, 200, 400, 260], 20, fill=colour)
        for cx in (230, 410):
            d.ellipse([cx - 30, 300, cx + 30, 360], fill=(25, 25, 25))
    elif shape == "rows":
        for y in range(horizon + 8, h, 22):
            d.line([(0, y), (w, y + 30)], fill=colour, width=9)
    elif shape == "dunes":
        for i in range(3):
            d.pieslice([-200 + i * 280, horizon - 90, 300 + i * 280, horizon + 180], 180, 360, fill=colour)
    elif shape == "boat":
        d.polygon([(250, 300), (420, 300), (390, 330), (280, 330)], fill=(120, 60, 30))
        d.polygon([(330, 120), (330, 295), (420, 295)], fill=colour)
    im.save(path, quality=88)


def main(out: Path = HERE / "report.png") -> Path:
    rng = random.Random(12)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        records = []
        for name, (s0, s1, ground, shape, colour, top) in SCENES.items():
            paint(root / name, s0, s1, ground, shape, colour, rng)
            tags = [{"label": lab, "confidence": c} for lab, c in top]
            tags += [{"label": lab, "confidence": round(10 ** rng.uniform(-3, -1.7), 4)} for lab in rng.sample(FILLER, 14)]
            tags.sort(key=lambda t: (-t["confidence"], t["label"]))
            records.append({"path": name, "tags": tags, "model": "google/siglip2-so400m-patch14-384",
                            "version": "0.1.0", "inference_time_ms": round(rng.uniform(30, 50), 1)})  # fmt: skip
        (root / "scan_0042.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
        records.insert(3, {"path": "scan_0042.jpg", "tags": [], "error": {
            "type": "ImageDecodeError", "message": "image file is truncated (41 bytes not processed)"}})  # fmt: skip
        report = write_report(records, root / "report.html", threshold=0.01, images_root=root, title="Holiday photos")
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
