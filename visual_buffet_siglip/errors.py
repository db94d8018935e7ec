"""The package's exceptions, in one place, each named for what went wrong rather than for who reports it.

Two families:
- a run that cannot start or go on as asked: `UsageError`, `ConfigError`,
  `ModelLoadError`, `StoreError`, `InUseError` (the CLI prints their message and
  exits 2; see `cli.main`);
- one image that cannot be tagged: `ImageError` and its kinds, `NonFiniteScoreError`.
  They never stop a run: each becomes that image's error record
  (`records.error_record`), whose `type` is the class name.
`XmpError` is one XMP sidecar left unchanged: logged, the run goes on.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .records import ErrorDict

__all__ = ["UsageError", "ConfigError", "ModelLoadError", "StoreError", "InUseError", "ImageError",
           "ImageNotFoundError", "ImagePermissionError", "NotAFileError", "ImageDecodeError", "EmptyFileError",
           "ImageTooLargeError", "UnsupportedFormatError", "ImagePreprocessError", "NonFiniteScoreError",
           "XmpError"]


PLUGIN_NAME = "siglip"  # the host section, [plugins.siglip], that configuration errors name


# --- a run that cannot go on as asked -------------------------------------------------------------

class UsageError(Exception):
    """A request that cannot be carried out as given: a mistaken option, a refused output, a missing extra."""


class ConfigError(ValueError):
    """Invalid settings; `problems` lists every one found, each a full sentence."""

    def __init__(self, problems: list[str] | str):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("; ".join(self.problems) if len(self.problems) < 2 else (
            f"{len(self.problems)} problems in [plugins.{PLUGIN_NAME}]:\n  - "
            + "\n  - ".join(self.problems)))


class ModelLoadError(RuntimeError):
    """The model could not be found or loaded; the message says how to fix it."""


class StoreError(Exception):
    """A store that cannot be used as asked: missing, not a store, already there, or from another model."""


class InUseError(Exception):
    """Another process writes this output now."""


# --- one image that cannot be tagged --------------------------------------------------------------

class ImageError(Exception):
    """An image that cannot be tagged. `kind` (the class name) is the error type reported in results."""

    @property
    def kind(self) -> str:
        return type(self).__name__

    def to_dict(self) -> ErrorDict:
        """The `error` member of this image's record."""
        return {"type": self.kind, "message": str(self)}


class ImageNotFoundError(ImageError):
    """The path does not exist (or vanished mid-run)."""


class ImagePermissionError(ImageError):
    """The file exists but cannot be read."""


class NotAFileError(ImageError):
    """A directory, pipe or device where an image file was expected."""


class ImageDecodeError(ImageError):
    """Not an image, or a damaged one."""


class EmptyFileError(ImageDecodeError):
    """A zero-byte file: usually an interrupted copy or sync."""


class ImageTooLargeError(ImageError):
    """Over the pixel limit, or a likely decompression bomb."""


class UnsupportedFormatError(ImageError):
    """A format that needs an optional extra (HEIC/HEIF without pillow-heif)."""


class ImagePreprocessError(ImageError):
    """A decoded image the model's processor failed on (an odd mode or size)."""


class NonFiniteScoreError(RuntimeError):
    """The model produced NaN/inf (usually float16 overflow); results would be meaningless."""


# --- one sidecar ----------------------------------------------------------------------------------

class XmpError(Exception):
    """A sidecar that cannot be merged safely; it is left untouched."""
