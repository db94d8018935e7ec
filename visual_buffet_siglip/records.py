"""The result record of one image, typed: what every output (jsonl, sidecars, Parquet, XMP, report) receives.

The JSON shape is the output contract the host and users parse, key order included:
a tagged image is {"tags", "model", "version", "inference_time_ms"}, an image
that failed is {"tags": [], "error": {"type", "message"}}; the CLI puts "path"
first (`outputs.path_record`). Both records are `final`, so `"error" in record`
tells mypy which one it holds. Error records are built by `error_record` only.
"""

from __future__ import annotations

from typing import TypedDict, final

__all__ = ["TagDict", "ErrorDict", "ResultRecord", "ErrorRecord", "Record", "error_record"]


class TagDict(TypedDict):
    """One label that reached its threshold, with its sigmoid confidence."""

    label: str
    confidence: float


class ErrorDict(TypedDict):
    """Why an image has no tags: the error's class name (see `errors`) and a message naming the image."""

    type: str
    message: str


@final
class ResultRecord(TypedDict):
    """A tagged image: its tags (best first), the model and package version, and its share of the run's time."""

    tags: list[TagDict]
    model: str
    version: str
    inference_time_ms: float


@final
class ErrorRecord(TypedDict):
    """An image that could not be tagged: no tags, and the error."""

    tags: list[TagDict]
    error: ErrorDict


Record = ResultRecord | ErrorRecord


def error_record(kind: str, message: str) -> ErrorRecord:
    """The record of an image that failed with error type `kind` (a class name) and `message`."""
    return {"tags": [], "error": {"type": kind, "message": message}}
