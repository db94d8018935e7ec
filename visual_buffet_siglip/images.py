"""Safe image decoding: every failure becomes a typed, per-file error, never a crashed run.

Decoding matches what transformers' processors do to an ordinary 8-bit PIL
image (transparency composited onto white, then RGB), after applying the EXIF
orientation a photo viewer would show. What transformers would get wrong we fix
first: 16-bit and float images are scaled to 8 bits (PIL's own convert clips
them to white), and only the first frame of an animation is used.

Size policy (real archives hold 200-megapixel panoramas *and* decompression bombs):
- images over `max_pixels()` (250 MP unless VISUAL_BUFFET_SIGLIP_MAX_PIXELS says
  otherwise) are refused from their header, before any pixel is decoded;
- images over LARGE_PIXELS (89.5 MP, PIL's own warning size) must carry at least
  one byte of file per MAX_PIXELS_PER_BYTE pixels, else they are refused as a
  likely bomb (setting VISUAL_BUFFET_SIGLIP_MAX_PIXELS trusts the files and
  lifts this check);
- images over LARGE_PIXELS decode one at a time (a lock), so parallel decode
  threads never hold several huge rasters at once, and with `draft_size` they
  are reduced right after decoding (JPEGs already decode reduced via DCT scaling).
PIL's global MAX_IMAGE_PIXELS is never touched (the host and other plugins in the
process keep their own bomb guard): our opener identifies files through PIL's
format registry without PIL's global check, and applies our limit per call.

Opening never blocks: a file swapped for a FIFO after the check is opened
non-blocking and refused from the opened descriptor. The errors (`ImageError`
and its kinds) live in `errors`.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import os
import re
import stat
import struct
import threading
from pathlib import Path
from typing import IO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import (EmptyFileError, ImageDecodeError, ImageError, ImageNotFoundError, ImagePermissionError,
                     ImageTooLargeError, NotAFileError, UnsupportedFormatError)

log = logging.getLogger(__name__)

ImageSource = str | os.PathLike | bytes | Image.Image

MAX_PIXELS_ENV = "VISUAL_BUFFET_SIGLIP_MAX_PIXELS"
DEFAULT_MAX_PIXELS = 250_000_000
LARGE_PIXELS = 89_478_485  # PIL's default MAX_IMAGE_PIXELS
MAX_PIXELS_PER_BYTE = 1000  # real photos carry ~0.05-0.5 pixels per byte; flat graphics ~100
# What a folder scan treats as images (named files are always tried, whatever their suffix).
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".jpe", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff",
                            ".heic", ".heif", ".avif", ".hif"})
HEIF_EXTRA = "pip install 'visual-buffet-siglip[heif]'"

_large_decode = threading.Lock()


def describe(source: ImageSource) -> str:
    """How to name an image source in messages and records."""
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    if isinstance(source, bytes):
        return f"<{len(source)} bytes>"
    return f"<PIL image {getattr(source, 'filename', '') or id(source)}>"


# --- size policy ------------------------------------------------------------------------------

def max_pixels() -> tuple[int, bool]:
    """(pixel limit, whether the user set it): VISUAL_BUFFET_SIGLIP_MAX_PIXELS or 250 MP."""
    raw = os.environ.get(MAX_PIXELS_ENV, "").strip()
    if not raw:
        return DEFAULT_MAX_PIXELS, False
    try:
        value = int(raw.replace("_", ""))
    except ValueError:
        value = 0
    if value < 1:
        _warn_bad_limit(raw)
        return DEFAULT_MAX_PIXELS, False
    return value, True


@functools.lru_cache(maxsize=8)
def _warn_bad_limit(raw: str) -> None:
    log.warning("%s=%r is not a positive whole number of pixels; using the default %d. "
                "Fix: e.g. %s=400000000 to allow images up to 400 MP",
                MAX_PIXELS_ENV, raw, DEFAULT_MAX_PIXELS, MAX_PIXELS_ENV)


def check_size(name: str, size: tuple[int, int], file_bytes: int | None, limit: int,
               trust_files: bool = False) -> None:
    """Refuse an image from its header alone: over `limit` pixels, or a likely decompression bomb."""
    width, height = size
    pixels = width * height
    how = (f"if it is genuine, set {MAX_PIXELS_ENV} to a larger number of pixels "
           f"(e.g. {MAX_PIXELS_ENV}={max(pixels + 1, 2 * limit)})")
    if pixels > limit:
        raise ImageTooLargeError(f"{name}: {width}x{height} is {_mp(pixels)} megapixels, over the "
                                 f"{_mp(limit)} MP limit; refused before decoding. Resize it, or {how}")
    if not trust_files and file_bytes is not None and pixels > LARGE_PIXELS \
            and pixels > file_bytes * MAX_PIXELS_PER_BYTE:
        raise ImageTooLargeError(f"{name}: declares {width}x{height} ({_mp(pixels)} MP) in a file of only "
                                 f"{file_bytes} bytes; refused as a likely decompression bomb. Check the file; "
                                 f"{how}")


def _mp(pixels: int) -> str:
    return f"{pixels / 1e6:.3g}"


# --- formats ----------------------------------------------------------------------------------

_HEIF_BRANDS = {b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"hevm", b"hevs", b"mif1", b"msf1"}
_AVIF_BRANDS = {b"avif", b"avis"}


@functools.lru_cache(maxsize=1)
def heif_available() -> bool:
    """Register pillow-heif's HEIC/HEIF opener (the `heif` extra) once; False when not installed."""
    try:
        import pillow_heif
    except ImportError:
        return False
    pillow_heif.register_heif_opener()
    from PIL import features

    avif_opener = getattr(pillow_heif, "register_avif_opener", None)  # pillow-heif < 1.0 only
    if avif_opener is not None and not features.check("avif"):
        avif_opener()
    return True


def _unidentified(name: str, handle: IO[bytes]) -> ImageError:
    """Why PIL could not identify a file: a missing HEIF/AVIF decoder, or not an image at all."""
    handle.seek(0)
    head = handle.read(16)
    if head[4:8] == b"ftyp":
        brand = head[8:12]
        if brand in _AVIF_BRANDS:
            return UnsupportedFormatError(
                f"{name}: AVIF image, but this Pillow cannot read AVIF. Fix: pip install -U 'pillow>=11.3' "
                f"(its wheels read AVIF) or, with older Pillow, {HEIF_EXTRA} (pillow-heif < 1.0)")
        if brand in _HEIF_BRANDS:
            if not heif_available():
                return UnsupportedFormatError(
                    f"{name}: HEIC/HEIF image; reading it needs the optional `heif` extra: {HEIF_EXTRA}")
            return ImageDecodeError(f"{name}: HEIC/HEIF image that pillow-heif cannot decode (damaged?)")
    return ImageDecodeError(f"{name}: not an image format Pillow can read (the file starts with {head[:8]!r}); "
                            "check that it really is an image")


def _open(source: ImageSource, name: str, stack: contextlib.ExitStack) -> tuple[Image.Image, int | None]:
    """The opened (not yet decoded) image and its file size; the file closes when `stack` exits.

    The image object is left open: once loaded it holds its pixels and needs no file.
    """
    if isinstance(source, Image.Image):
        return source, None
    heif_available()
    if isinstance(source, bytes):
        handle: IO[bytes] = io.BytesIO(source)
        size = len(source)
    else:
        path = Path(source)
        try:
            info = path.stat()  # before opening: a device or socket is never opened at all
        except FileNotFoundError:
            raise ImageNotFoundError(f"{name}: no such file (moved or deleted?)") from None
        except PermissionError:
            raise ImagePermissionError(f"{name}: permission denied; check the permissions of the file "
                                       "and its folders") from None
        _require_regular(name, info)
        handle = stack.enter_context(_open_regular(path, name))
        size = os.fstat(handle.fileno()).st_size
    if size == 0:
        raise EmptyFileError(f"{name}: the file is empty (0 bytes), often an interrupted copy; "
                             "copy it again from the original")
    try:
        return _identify(handle), size
    except UnidentifiedImageError:
        raise _unidentified(name, handle) from None


def _require_regular(name: str, info: os.stat_result) -> None:
    if stat.S_ISDIR(info.st_mode):
        raise NotAFileError(f"{name}: is a directory, not an image file")
    if not stat.S_ISREG(info.st_mode):
        raise NotAFileError(f"{name}: not a regular file (a device, pipe or socket); pass image files only")


def _open_regular(path: Path, name: str) -> IO[bytes]:
    """`path` opened for reading, refused unless the opened file itself is a regular file.

    Non-blocking: a file swapped for a FIFO since it was checked would otherwise
    block the open (and the run) until something writes to it.
    """
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise ImageNotFoundError(f"{name}: no such file (moved or deleted?)") from None
    except PermissionError:
        raise ImagePermissionError(f"{name}: permission denied; check the file's read permission") from None
    except OSError as exc:  # ENXIO: a socket; EISDIR where directories cannot be opened
        raise NotAFileError(f"{name}: cannot be opened as a file ({exc.strerror or exc})") from None
    try:
        _require_regular(name, os.fstat(fd))
        if flags & getattr(os, "O_NONBLOCK", 0):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _identify(handle: IO[bytes]) -> Image.Image:
    """`Image.open` without PIL's process-wide MAX_IMAGE_PIXELS check: the same format registry,
    the same order (preinit's common formats, then every plugin), the same errors.

    Our own limit (check_size) applies to the header right after, per call, so the host's and
    other plugins' bomb guard stays as they set it and no thread ever sees it changed.
    """
    prefix = handle.read(16)
    tried: set[str] = set()
    for register in (Image.preinit, Image.init):
        register()
        for format_id in [f for f in Image.ID if f not in tried]:
            tried.add(format_id)
            factory, accept = Image.OPEN[format_id]
            accepted = not accept or accept(prefix)
            if not accepted or isinstance(accepted, str):  # a str: PIL's "looks like it, but unsupported"
                continue
            handle.seek(0)
            try:
                return factory(handle, "")
            except (SyntaxError, IndexError, TypeError, struct.error):  # not this format after all
                continue
    raise UnidentifiedImageError("cannot identify image file")


# --- pixels -----------------------------------------------------------------------------------

def to_8bit(image: Image.Image) -> Image.Image:
    """16-bit and float images scaled to 8-bit L; other modes unchanged.

    I;16*: 0..65535 -> 0..255. I: the same when its values fit 16 bits (how older
    Pillow opens 16-bit PNGs), else its own min..max. F: 0..1 -> 0..255 when its
    values lie there, else min..max. NaN becomes 0.
    """
    mode = image.mode
    if not (mode.startswith("I;16") or mode in ("I", "F")):
        return image
    values = np.nan_to_num(np.asarray(image, dtype=np.float64))
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if mode.startswith("I;16") or (mode == "I" and low >= 0 and high <= 65535):
        scaled = values / 257.0
    elif mode == "F" and low >= 0 and high <= 1:
        scaled = values * 255.0
    else:
        scaled = (values - low) * (255.0 / (high - low)) if high > low else np.zeros_like(values)
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), mode="L")


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB exactly as transformers converts it: transparency composited onto white."""
    if image.mode == "RGB":
        return image
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _reduce(image: Image.Image, draft_size: int | None) -> Image.Image:
    """A huge decoded raster shrunk by an integer factor, both sides staying >= draft_size."""
    if not draft_size or image.width * image.height <= LARGE_PIXELS:
        return image
    factor = min(image.size) // draft_size
    return image.reduce(factor) if factor >= 2 else image


def load_image(source: ImageSource, *, draft_size: int | None = None) -> Image.Image:
    """Decode `source` to an upright 8-bit RGB image, or raise an ImageError naming it.

    `draft_size`: let large images decode reduced (JPEG DCT scaling by 1/2, 1/4 or
    1/8; other formats above LARGE_PIXELS by an integer factor) as long as both
    sides stay >= draft_size.
    """
    name = describe(source)
    limit, trusted = max_pixels()
    try:
        with contextlib.ExitStack() as stack:
            image, file_bytes = _open(source, name, stack)
            check_size(name, image.size, file_bytes, limit, trusted)
            if draft_size and image.format == "JPEG":
                image.draft("RGB", (draft_size, draft_size))
            huge = image.width * image.height > LARGE_PIXELS
            with _large_decode if huge else contextlib.nullcontext():
                image.load()
                if image is not source:
                    ImageOps.exif_transpose(image, in_place=True)
                else:
                    image = ImageOps.exif_transpose(image)  # never modify the caller's image
                return _reduce(to_rgb(to_8bit(image)), draft_size)
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:  # PIL's guard fired first
        # (the warning is raised only where warnings are errors; PIL refuses 2x its limit either way)
        found = re.search(r"\((\d+) pixels\)", str(exc))
        size = f"{_mp(int(found.group(1)))} megapixels" if found else "huge"
        raise ImageTooLargeError(f"{name}: {size}, over the {_mp(limit)} MP limit; refused before decoding "
                                 f"as a possible decompression bomb. Resize it, or if it is genuine, set "
                                 f"{MAX_PIXELS_ENV} to a larger number of pixels") from None
    except MemoryError:
        raise ImageTooLargeError(f"{name}: not enough memory to decode it; free memory or resize the image") from None
    except PermissionError:
        raise ImagePermissionError(f"{name}: permission denied; check the file's read permission") from None
    except Exception as exc:  # any decoder failure is this file's problem, never the run's
        detail = str(exc) or type(exc).__name__
        raise ImageDecodeError(f"{name}: cannot decode image ({detail}); the file may be truncated or damaged") \
            from None


__all__ = ["ImageSource", "load_image", "describe", "max_pixels", "check_size", "heif_available", "to_8bit",
           "to_rgb", "IMAGE_SUFFIXES", "MAX_PIXELS_ENV", "DEFAULT_MAX_PIXELS", "LARGE_PIXELS"]
