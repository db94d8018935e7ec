"""Safe image decoding: every failure becomes a typed, per-file error, never a crashed run.

Decoding matches what transformers' processors do to a PIL image (transparency
composited onto white, then RGB), after applying the EXIF orientation a photo
viewer would show. `draft_size` enables JPEG reduced-size decoding (DCT
scaling), which never goes below the requested size on either side.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import Union

from PIL import Image, ImageOps, UnidentifiedImageError

ImageSource = Union[str, os.PathLike, bytes, Image.Image]


class ImageError(Exception):
    """An image that cannot be tagged. `kind` is the error type reported in results."""

    kind = "ImageError"

    def to_dict(self) -> dict[str, str]:
        return {"type": self.kind, "message": str(self)}


class ImageNotFoundError(ImageError):
    kind = "ImageNotFoundError"


class ImagePermissionError(ImageError):
    kind = "ImagePermissionError"


class NotAFileError(ImageError):
    kind = "NotAFileError"


class ImageDecodeError(ImageError):
    kind = "ImageDecodeError"


class ImageTooLargeError(ImageError):
    kind = "ImageTooLargeError"


class UnsupportedFormatError(ImageError):
    kind = "UnsupportedFormatError"


def describe(source: ImageSource) -> str:
    """How to name an image source in messages and records."""
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    if isinstance(source, bytes):
        return f"<{len(source)} bytes>"
    return f"<PIL image {getattr(source, 'filename', '') or id(source)}>"


_HEIF_SUFFIXES = (".heic", ".heif", ".avif", ".hif")


def _heif_available() -> bool:
    try:
        from pillow_heif import register_heif_opener
    except ImportError:
        return False
    register_heif_opener()
    return True


def _open(source: ImageSource, name: str) -> Image.Image:
    if isinstance(source, Image.Image):
        return source
    if isinstance(source, bytes):
        return Image.open(io.BytesIO(source))
    path = Path(source)
    if path.suffix.lower() in _HEIF_SUFFIXES and not _heif_available():
        raise UnsupportedFormatError(
            f"{name}: HEIC/HEIF/AVIF images need the optional extra: pip install 'visual-buffet-siglip[heif]'")
    try:
        if path.is_dir():
            raise NotAFileError(f"{name}: is a directory, not an image file")
        return Image.open(path)
    except FileNotFoundError:
        raise ImageNotFoundError(f"{name}: no such file") from None
    except PermissionError:
        raise ImagePermissionError(f"{name}: permission denied; check the file's read permission") from None
    except IsADirectoryError:
        raise NotAFileError(f"{name}: is a directory, not an image file") from None


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB exactly as transformers converts it: transparency composited onto white."""
    if image.mode == "RGB":
        return image
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def load_image(source: ImageSource, *, draft_size: int | None = None) -> Image.Image:
    """Decode `source` to an upright RGB image, or raise an ImageError naming it.

    `draft_size`: for JPEGs, let the decoder scale down by 1/2, 1/4 or 1/8 as long
    as both sides stay >= draft_size (much faster for large photos).
    """
    name = describe(source)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = _open(source, name)
            if draft_size and image.format == "JPEG":
                image.draft("RGB", (draft_size, draft_size))
            image.load()
            image = ImageOps.exif_transpose(image)
            return to_rgb(image)
    except ImageError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeError(
            f"{name}: {exc} Refused as a possible decompression bomb; resize the image "
            "if it is genuine") from None
    except UnidentifiedImageError:
        raise ImageDecodeError(f"{name}: not a recognised image format (or the file is empty)") from None
    except PermissionError:
        raise ImagePermissionError(f"{name}: permission denied; check the file's read permission") from None
    except (OSError, SyntaxError, ValueError, EOFError, MemoryError) as exc:
        raise ImageDecodeError(f"{name}: cannot decode image ({exc})") from None
