"""The bad-input corpus: every odd file a real photo archive holds gets tags or a typed error naming it.

The corpus is generated here: broken files, exotic pixel modes, extreme sizes,
decompression bombs and names in any script. None may crash a run or change the
other images' confidences.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from conftest import LABELS, make_image, make_settings
from PIL import Image, ImageOps

from visual_buffet_siglip import images
from visual_buffet_siglip.engine import SiglipTagger
from visual_buffet_siglip.errors import ImageError
from visual_buffet_siglip.images import DEFAULT_MAX_PIXELS, MAX_PIXELS_ENV, check_size, load_image, to_8bit
from visual_buffet_siglip.vocabulary import normalize_labels

ROOT = os.geteuid() == 0 if hasattr(os, "geteuid") else False
TAGS = "tags"


# --- corpus builders --------------------------------------------------------------------------

def png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG declaring width x height whose pixel data is a few bytes: a cheap decompression bomb."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


def gray16(path: Path) -> Path:
    values = (np.linspace(0, 65535, 48 * 40).reshape(40, 48)).astype(np.uint16)
    Image.fromarray(values).save(path)
    return path


def cmyk_jpeg(path: Path) -> Path:
    Image.new("CMYK", (48, 40), (0, 255, 255, 0)).save(path)  # red
    return path


def palette_transparent(path: Path) -> Path:
    image = Image.new("P", (40, 40), 0)
    image.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    image.paste(1, (10, 10, 30, 30))
    image.save(path, transparency=0)
    return path


def rgba(path: Path) -> Path:
    pixels = np.zeros((40, 50, 4), np.uint8)
    pixels[..., 2] = 255
    pixels[..., 3] = np.linspace(0, 255, 50, dtype=np.uint8)[None, :]
    Image.fromarray(pixels, "RGBA").save(path)
    return path


def la(path: Path) -> Path:
    Image.merge("LA", (Image.new("L", (30, 30), 40), Image.new("L", (30, 30), 128))).save(path)
    return path


def animated_gif(path: Path) -> Path:
    palette = [0, 0, 0, 255, 0, 0, 0, 0, 255] + [0] * 759
    frames = []
    for colour in (1, 2):  # red first, then blue
        frame = Image.new("P", (32, 24), colour)
        frame.putpalette(palette)
        frames.append(frame)
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
    return path


def exif_rotated(path: Path) -> Path:
    """40x20 stored, left half red, right half blue; orientation 6 means 'rotate 90 clockwise to view'."""
    image = Image.new("RGB", (40, 20), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 20, 20))
    exif = image.getexif()
    exif[0x0112] = 6
    image.save(path, exif=exif.tobytes(), quality=95)
    return path


def truncated_jpeg(path: Path) -> Path:
    make_image(path.with_suffix(".full.jpg"), (64, 64), seed=7)
    data = path.with_suffix(".full.jpg").read_bytes()
    path.with_suffix(".full.jpg").unlink()
    path.write_bytes(data[: len(data) // 2])
    return path


def heic(path: Path) -> Path:
    images.heif_available()  # registers pillow-heif's opener, which also lets Pillow save HEIC
    Image.open(make_image(path.with_suffix(".src.png"), (48, 40), seed=11)).save(path, quality=90)
    return path


def avif(path: Path) -> Path:
    Image.open(make_image(path.with_suffix(".src.png"), (48, 40), seed=12)).save(path)
    return path


def fifo(path: Path) -> Path:
    os.mkfifo(path)  # reading it would block forever: it must be refused, not opened
    return path


def denied(path: Path) -> Path:
    make_image(path, (20, 20), seed=13)
    path.chmod(0)
    return path


def write(data: bytes):
    def build(path: Path) -> Path:
        path.write_bytes(data)
        return path
    return build


def directory(path: Path) -> Path:
    path.mkdir()
    return path


# name -> (builder, expected outcome: TAGS or the error type)
CASES = {
    "empty.jpg": (write(b""), "EmptyFileError"),
    "truncated.jpg": (truncated_jpeg, "ImageDecodeError"),
    "random-bytes.jpg": (write(np.random.default_rng(1).bytes(4096)), "ImageDecodeError"),
    "notes.txt": (write(b"shopping list: milk, eggs\n"), "ImageDecodeError"),
    "a folder.jpg": (directory, "NotAFileError"),
    "missing.jpg": (None, "ImageNotFoundError"),
    "pipe.png": (fifo, "NotAFileError"),
    "bomb-900mp.png": (lambda p: png_header_only(p, 30000, 30000), "ImageTooLargeError"),
    "bomb-dense-100mp.png": (lambda p: png_header_only(p, 10000, 10000), "ImageTooLargeError"),
    "one-pixel.png": (lambda p: make_image(p, (1, 1), seed=3), TAGS),
    "panorama-20000x300.png": (lambda p: make_image(p, (20000, 300), seed=4), TAGS),
    "cmyk.jpg": (cmyk_jpeg, TAGS),
    "gray16.png": (gray16, TAGS),
    "gray16.tif": (gray16, TAGS),
    "palette-transparent.png": (palette_transparent, TAGS),
    "rgba.png": (rgba, TAGS),
    "la.png": (la, TAGS),
    "animated.gif": (animated_gif, TAGS),
    "exif-rotated.jpg": (exif_rotated, TAGS),
    "iphone.heic": (heic, TAGS),
    "photo.avif": (avif, TAGS),
    "фото с моря.png": (lambda p: make_image(p, (50, 40), seed=5), TAGS),
    "写真 二.png": (lambda p: make_image(p, (40, 50), seed=6), TAGS),
    os.fsdecode(b"legacy-\xe9t\xe9 name.png"): (lambda p: make_image(p, (30, 30), seed=8), TAGS),  # not UTF-8
}
if not ROOT:
    CASES["no-permission.png"] = (denied, "ImagePermissionError")

GOOD = ["good-1.png", "good 2.png", "good-3.png"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, Path]:
    """name -> path for every case plus the good images, interleaved in one folder."""
    root = tmp_path_factory.mktemp("corpus")
    paths = {}
    for i, name in enumerate(GOOD):
        paths[name] = make_image(root / name, (60 + 10 * i, 45), seed=20 + i)
    for name, (build, _) in CASES.items():
        paths[name] = build(root / name) if build else root / name
    yield paths
    for name, path in paths.items():  # let pytest clean up the permission-denied file
        if name == "no-permission.png":
            path.chmod(0o644)


def interleaved() -> list[str]:
    """Every case, with the good images spread among the bad ones."""
    names = list(CASES)
    for i, good in enumerate(GOOD):
        names.insert(2 + i * (len(names) // len(GOOD)), good)
    return names


def confidences(record) -> dict[str, float]:
    return {tag["label"]: tag["confidence"] for tag in record["tags"]}


def test_corpus_every_file_gets_tags_or_its_own_typed_error(checkpoints, family, corpus):
    tagger = SiglipTagger(make_settings(checkpoints[family], batch_size=4))
    names = interleaved()
    records = tagger.tag([str(corpus[name]) for name in names])
    assert len(records) == len(names)
    outcomes = {}
    for name, record in zip(names, records):
        expected = TAGS if name in GOOD else CASES[name][1]
        if expected == TAGS:
            assert "error" not in record, (name, record.get("error"))
            assert len(record["tags"]) == len(normalize_labels(LABELS)), name  # threshold 0 keeps every label
            assert all(np.isfinite(tag["confidence"]) for tag in record["tags"])
        else:
            assert record["tags"] == [] and record["error"]["type"] == expected, (name, record)
            assert str(corpus[name]) in record["error"]["message"], "the message names the file"
        outcomes[name] = record["error"]["type"] if "error" in record else f"{len(record['tags'])} tags"
    print("\n" + "\n".join(f"  {name!a:34} {outcome}" for name, outcome in outcomes.items()))

    # the good images score exactly as in a run without the bad ones
    clean = tagger.tag([str(corpus[name]) for name in GOOD])
    for name, alone in zip(GOOD, clean):
        mixed = confidences(records[names.index(name)])
        assert mixed.keys() == confidences(alone).keys()
        assert max(abs(mixed[k] - v) for k, v in confidences(alone).items()) <= 1e-6


def test_cli_run_over_the_corpus_accounts_for_every_file(checkpoints, corpus, tmp_path):
    from visual_buffet_siglip import cli

    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(LABELS[:5]), encoding="utf-8")
    out = tmp_path / "out.jsonl"
    names = interleaved()
    code = cli.main(["tag", *[str(corpus[n]) for n in names], "--format", "jsonl", "-o", str(out), "-q",
                     "--model", str(checkpoints["siglip"]), "--device", "cpu", "--dtype", "float32",
                     "--threshold", "0", "--labels-file", str(labels)])
    assert code == 1  # some images failed, and the run still finished
    records = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    files = [n for n in names if n != "a folder.jpg"]  # on the command line a folder is walked, not an image
    assert [r["path"] for r in records] == [str(corpus[n]) for n in files]  # names not valid UTF-8 round-trip
    assert sum("error" in r for r in records) == sum(n in CASES and CASES[n][1] != TAGS for n in files)


# --- decoding details -------------------------------------------------------------------------

def test_16bit_images_are_scaled_not_clipped(corpus):
    for name in ("gray16.png", "gray16.tif"):
        with Image.open(corpus[name]) as original:
            assert original.mode.startswith("I;16")
            expected = np.rint(np.asarray(original, dtype=np.float64) / 257).astype(np.uint8)
        rgb = np.asarray(load_image(corpus[name]))
        assert (rgb == expected[..., None]).all(), name  # PIL's convert would make most of it 255


@pytest.mark.parametrize("values, mode, expected", [
    (np.array([[0, 32768, 65535]], np.int32), "I", [0, 128, 255]),  # 16-bit values held in mode I
    (np.array([[-10, 0, 10]], np.int32), "I", [0, 128, 255]),  # anything else: its own range
    (np.array([[0.0, 0.5, 1.0]], np.float32), "F", [0, 128, 255]),
    (np.array([[-1.0, np.nan, 3.0]], np.float32), "F", [0, 64, 255]),
    (np.array([[7, 7, 7]], np.int32), "I", [0, 0, 0]),
])
def test_to_8bit_policy(values, mode, expected):
    image = Image.fromarray(values)
    assert image.mode == mode
    assert np.asarray(to_8bit(image)).ravel().tolist() == expected


def test_pixel_modes_become_the_right_rgb(corpus):
    assert np.abs(np.asarray(load_image(corpus["cmyk.jpg"]), int) - [255, 0, 0]).max() <= 2
    palette = load_image(corpus["palette-transparent.png"])
    assert palette.getpixel((0, 0)) == (255, 255, 255) and palette.getpixel((20, 20)) == (0, 255, 0)
    rgba_image = load_image(corpus["rgba.png"])
    assert rgba_image.getpixel((0, 0)) == (255, 255, 255) and rgba_image.getpixel((49, 0)) == (0, 0, 255)
    assert load_image(corpus["la.png"]).getpixel((0, 0)) == (147, 147, 147)  # 40 at alpha 128 over white
    assert load_image(corpus["animated.gif"]).getpixel((5, 5)) == (255, 0, 0)  # the first frame, not blue
    assert load_image(corpus["one-pixel.png"]).size == (1, 1)
    assert load_image(corpus["panorama-20000x300.png"]).size == (20000, 300)


def test_exif_orientation_is_applied(corpus):
    upright = load_image(corpus["exif-rotated.jpg"])
    assert upright.size == (20, 40)
    top, bottom = upright.getpixel((10, 5)), upright.getpixel((10, 35))
    assert top[0] > 200 and top[2] < 60, "the red left half is on top once rotated clockwise"
    assert bottom[2] > 200 and bottom[0] < 60


def test_heic_and_avif_decode(corpus):
    assert load_image(corpus["iphone.heic"]).size == (48, 40)
    assert load_image(corpus["photo.avif"]).size == (48, 40)


def test_heic_without_the_extra_names_it(corpus):
    script = ("import sys; sys.modules['pillow_heif'] = None\n"  # as if pillow-heif were not installed
              "from visual_buffet_siglip.errors import ImageError\n"
              "from visual_buffet_siglip.images import load_image\n"
              "try:\n    load_image(sys.argv[1])\n"
              "except ImageError as exc:\n    print(exc.kind, exc)\n")
    renamed = corpus["iphone.heic"].with_name("iphone-renamed.jpg")  # detected by content, not by name
    renamed.write_bytes(corpus["iphone.heic"].read_bytes())
    for path in (corpus["iphone.heic"], renamed):
        out = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True,
                             timeout=60).stdout
        assert out.startswith("UnsupportedFormatError"), out
        assert str(path) in out and "pip install 'visual-buffet-siglip[heif]'" in out


def test_bytes_and_pil_sources():
    with pytest.raises(ImageError) as caught:
        load_image(b"")
    assert caught.value.kind == "EmptyFileError"
    rotated = Image.new("RGB", (40, 20))
    exif = rotated.getexif()
    exif[0x0112] = 6
    rotated.info["exif"] = exif.tobytes()
    assert load_image(rotated).size == (20, 40)
    assert rotated.size == (40, 20), "the caller's image is not modified"


@pytest.mark.skipif(ROOT, reason="running as root: root reads a chmod 000 file anyway, so the check is "
                                 "meaningless here (the mapping is still tested by the next test)")
def test_permission_denied_file(corpus):
    with pytest.raises(ImageError) as caught:
        load_image(corpus["no-permission.png"])
    assert caught.value.kind == "ImagePermissionError" and "no-permission.png" in str(caught.value)


def test_permission_error_while_opening_is_typed(tmp_path, monkeypatch):
    path = make_image(tmp_path / "locked.png", (8, 8))

    real_open = os.open

    def refuse(file, *args, **kwargs):
        if os.fspath(file) == str(path):
            raise PermissionError(13, "Permission denied")  # what open() does on a chmod 000 file
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(os, "open", refuse)
    with pytest.raises(ImageError) as caught:
        load_image(path)
    assert caught.value.kind == "ImagePermissionError" and str(path) in str(caught.value)


# --- size policy ------------------------------------------------------------------------------

def test_size_policy_allows_a_genuine_200mp_panorama_and_refuses_bombs():
    limit = DEFAULT_MAX_PIXELS
    check_size("pano.jpg", (40000, 5000), 60_000_000, limit)  # 200 MP in 60 MB: a real panorama
    check_size("flat.png", (8000, 8000), 70_000, limit)  # 64 MP: below the large-image checks
    with pytest.raises(ImageError, match=r"big\.png: 20000x15000 is 300 megapixels.*" + MAX_PIXELS_ENV):
        check_size("big.png", (20000, 15000), 900_000_000, limit)
    with pytest.raises(ImageError, match=r"bomb\.png: declares 12000x12000 .*decompression bomb"):
        check_size("bomb.png", (12000, 12000), 10_000, limit)
    check_size("bomb.png", (12000, 12000), 10_000, limit, trust_files=True)  # the user set the limit


def test_pixel_limit_is_configurable_and_pil_does_not_refuse_first(tmp_path, monkeypatch):
    path = make_image(tmp_path / "forty.png", (40, 40))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 700)  # PIL itself would refuse 1,600 pixels (> 2x)
    assert load_image(path).size == (40, 40)
    assert Image.MAX_IMAGE_PIXELS == 700, "PIL's process-wide guard is left as the host set it"
    monkeypatch.setenv(MAX_PIXELS_ENV, "1000")
    with pytest.raises(ImageError, match=r"forty\.png: 40x40 .* over the 0.001 MP limit"):
        load_image(path)
    monkeypatch.setenv(MAX_PIXELS_ENV, "lots")  # invalid: warned about, default used
    assert load_image(path).size == (40, 40)


def test_pil_global_limit_is_never_changed_even_while_tagging(checkpoints, tmp_path, monkeypatch):
    """The host and other plugins share PIL: their guard stays exactly as set, in every thread, at all times."""
    big = make_image(tmp_path / "big.png", (60, 50))  # 3,000 pixels
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # a host with a strict guard
    seen: set[int | None] = set()
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            seen.add(Image.MAX_IMAGE_PIXELS)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        records = SiglipTagger(make_settings(checkpoints["siglip"])).tag([big, big])
    finally:
        stop.set()
        watcher.join()
    assert all(TAGS in record and "error" not in record for record in records), "our 250 MP limit applies"
    assert seen == {1000} and Image.MAX_IMAGE_PIXELS == 1000
    with pytest.raises(Image.DecompressionBombError):  # the host's own opens still get its guard
        Image.open(big)
    monkeypatch.setenv(MAX_PIXELS_ENV, "2000")  # and ours still refuses over its limit
    with pytest.raises(ImageError, match="over the 0.002 MP limit"):
        load_image(big)


def test_opening_matches_pil_for_every_format(corpus):
    """Our opener (PIL's registry without its global check) identifies what Image.open identifies."""
    for name, path in corpus.items():
        if not path.is_file() or not os.access(path, os.R_OK):  # Image.open would wait on the FIFO forever
            continue
        try:
            with Image.open(path) as reference:
                expected = (reference.format, reference.size, reference.mode)
        except Exception:
            continue
        with contextlib.ExitStack() as stack:
            opened, _ = images._open(str(path), name, stack)
            assert (opened.format, opened.size, opened.mode) == expected, name


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="FIFOs are POSIX")
def test_a_file_swapped_for_a_fifo_after_the_check_is_refused_not_waited_on(tmp_path, monkeypatch):
    """The check (stat) and the open are two steps; between them a file can become a FIFO."""
    path = tmp_path / "photo.jpg"
    os.mkfifo(path)
    real_stat = os.stat

    def stale_stat(file, *args, **kwargs):  # what stat said a moment before the swap
        if os.fspath(file) == str(path):
            return os.stat_result((0o100644, 0, 0, 1, 0, 0, 4096, 0, 0, 0))
        return real_stat(file, *args, **kwargs)

    monkeypatch.setattr(os, "stat", stale_stat)
    outcome: list[BaseException | None] = []

    def attempt():
        try:
            load_image(path)
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)

    worker = threading.Thread(target=attempt, daemon=True)
    worker.start()
    worker.join(20)
    if worker.is_alive():  # blocked in open(): a writer unblocks it so the test process can end
        os.close(os.open(path, os.O_WRONLY))
        worker.join(5)
        pytest.fail("opening a FIFO blocked the run")
    [error] = outcome
    assert isinstance(error, ImageError) and error.kind == "NotAFileError" and str(path) in str(error)


def test_bomb_messages_name_file_and_override(corpus):
    for name in ("bomb-900mp.png", "bomb-dense-100mp.png"):
        with pytest.raises(ImageError) as caught:
            load_image(corpus[name])
        assert caught.value.kind == "ImageTooLargeError"
        assert str(corpus[name]) in str(caught.value) and MAX_PIXELS_ENV in str(caught.value)


def test_large_images_are_reduced_in_fast_mode_only(tmp_path, monkeypatch):
    path = make_image(tmp_path / "wide.png", (200, 100))
    monkeypatch.setattr(images, "LARGE_PIXELS", 1000)
    assert load_image(path, draft_size=32).size == (67, 34)  # 1/3: both sides stay >= 32
    assert load_image(path).size == (200, 100)  # exact decoding keeps every pixel


def test_large_images_decode_one_at_a_time(tmp_path, monkeypatch):
    from PIL import ImageFile

    paths = [make_image(tmp_path / f"big{i}.png", (40, 40), seed=i) for i in range(4)]
    monkeypatch.setattr(images, "LARGE_PIXELS", 1000)
    active, peak, lock = [0], [0], threading.Lock()
    real_load = ImageFile.ImageFile.load

    def tracked_load(self):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        time.sleep(0.05)  # long enough for the other threads to arrive
        try:
            return real_load(self)
        finally:
            with lock:
                active[0] -= 1

    monkeypatch.setattr(ImageFile.ImageFile, "load", tracked_load)
    threads = [threading.Thread(target=load_image, args=(p,)) for p in paths]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert peak[0] == 1


def test_rotation_matches_pil_reference(corpus):
    with Image.open(corpus["exif-rotated.jpg"]) as original:
        reference = ImageOps.exif_transpose(original).convert("RGB")
    assert np.array_equal(np.asarray(load_image(corpus["exif-rotated.jpg"])), np.asarray(reference))
