"""`retag --xmp` over 10,000 stored embeddings: new sidecars, an unchanged rerun, a vocabulary change (issue 14).

A tiny random SigLIP checkpoint and random stored embeddings stand in for a
tagged archive (what is measured is the XMP side: keyword selection, parsing,
merging and atomic writes, not the model); each "image" is an empty file, since
`retag` never opens one and the XMP sink only checks it is there. Each step is
one in-process `visual-buffet-siglip retag STORE --xmp -o results.jsonl` call, as a
user runs it, including loading the model and reading the label cache, run
twice back to back: with the tree merge alone (as before the fast path) and as
shipped.

    python benchmarks/bench_xmp.py [--images 10000]

Writes its section into benchmarks/RESULTS.md and prints it.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from bench_retag import _measure, _write_store  # noqa: E402
from bench_tagging import checkpoint, write_section  # noqa: E402

HEADING = "## XMP sidecars from stored embeddings: `retag --xmp` (issue 14)"


@contextlib.contextmanager
def _inside(folder: str) -> Iterator[None]:
    """Run in `folder` (stored paths are relative, as a user's usually are); contextlib.chdir is 3.11+."""
    before = os.getcwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(before)


def _retag(config: Path, *extra: str) -> None:
    from visual_buffet_siglip.cli import main

    # results to a file of ours (an -o device is refused), replaced by each run
    code = main(["-q", "retag", "archive.emb", "--config", str(config), "--format", "jsonl", "-o", "results.jsonl",
                 *extra])
    assert code == 0, f"retag exited {code}"


@contextlib.contextmanager
def _merging(way: str) -> Iterator[None]:
    """`merge` as shipped ("now"), or only the tree merge every sidecar took before the fast path ("before")."""
    from visual_buffet_siglip import xmp

    shipped = xmp.merge
    if way == "before":
        xmp.merge = xmp._merge_tree  # type: ignore[assignment]  # same arguments as the sink passes
    try:
        yield
    finally:
        xmp.merge = shipped  # type: ignore[assignment]


def _digest(folder: Path) -> dict[Path, bytes]:
    return {path: path.read_bytes() for path in folder.rglob("*.xmp")}


WAYS = ("before", "now")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=10_000)
    args = parser.parse_args()

    import torch

    from visual_buffet_siglip.config import Settings, builtin_vocabulary, load_settings
    from visual_buffet_siglip.engine import SiglipTagger

    load = os.getloadavg()[0]
    times: dict[tuple[str, str], float] = {}
    memory: dict[tuple[str, str], float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "siglip.toml"
        config.write_text(f'model = "{checkpoint("tiny")}"\ndevice = "cpu"\ndtype = "float32"\n'
                          f'cache_dir = "{Path(tmp) / "cache"}"\n', encoding="utf-8")
        tagger = SiglipTagger(load_settings(config))
        tuned = Path(tmp) / "tuned.tsv"  # the report's download: some labels off, some with their own threshold
        tuned.write_text("".join(f"{label}\t{'off' if n % 3 == 0 else '0.02' if n % 3 == 1 else ''}\n"
                                 for n, label in enumerate(builtin_vocabulary())), encoding="utf-8")
        for way in WAYS:  # one archive each, identical
            os.makedirs(Path(tmp) / way)
            with _inside(str(Path(tmp) / way)):
                _write_store(Path("archive.emb"), tagger, args.images)
                for i in range(args.images):
                    image = Path(f"photos/{i // 1000:03d}/IMG_{i:06d}.jpg")
                    image.parent.mkdir(parents=True, exist_ok=True)
                    image.touch()
        with _inside(str(Path(tmp) / "now")):
            _retag(config)  # encodes both label sets once (the disk cache keeps them), as a user's earlier run did
            _retag(config, "--labels-file", str(tuned))
            _, plain_s, _ = _measure(lambda: _retag(config))
        steps = {"new": ("--xmp",), "again": ("--xmp",), "tuned": ("--xmp", "--labels-file", str(tuned))}
        sidecars: dict[str, dict[Path, bytes]] = {}
        changed: dict[str, dict[Path, bytes]] = {}
        for step, extra in steps.items():  # each step run both ways back to back, under the same load
            for way in WAYS:
                with _inside(str(Path(tmp) / way)), _merging(way):
                    _, times[step, way], memory[step, way] = _measure(lambda extra=extra: _retag(config, *extra))
                    (sidecars if step == "new" else changed)[way] = _digest(Path("photos"))
            if step == "again":
                assert changed["before"] == sidecars["before"] and changed["now"] == sidecars["now"]
        size_kb = sum(len(data) for data in sidecars["now"].values()) / len(sidecars["now"]) / 1024
    assert len(sidecars["now"]) == args.images
    assert sidecars["now"] == sidecars["before"] and changed["now"] == changed["before"], "different bytes"
    rewritten = sum(1 for path, data in changed["now"].items() if sidecars["now"][path] != data)

    def row(step: str, what: str, mb: bool = False) -> str:
        before, now = times[step, "before"], times[step, "now"]
        peak = f" | {memory[step, 'before']:.0f} / {memory[step, 'now']:.0f} MB" if mb else " | -"
        return f"| {what} | {before:.1f} s | **{now:.1f} s** | {before / now:.1f}x{peak} |"

    settings = Settings.from_mapping({})
    section = f"""{HEADING}

`python benchmarks/bench_xmp.py --images {args.images}` on {platform.machine()}, {os.cpu_count()} cores, torch
{torch.__version__} (1-min load average {load:.1f} at the start); tiny random SigLIP, {args.images:,} random stored
embeddings, the built-in vocabulary ({len(builtin_vocabulary()):,} labels with keyword paths), threshold
{settings.options.confidence_threshold}, xmp_max_keywords {settings.xmp_max_keywords}; each step is a whole
`retag ... -o results.jsonl` run (model load and label cache included), run both ways back to back on
two identical archives: "before", every sidecar through the tree merge (defusedxml + minidom, the
only path before the fast path), and "now", sidecars holding only our record through the fast
path; both wrote the same bytes (asserted). `retag` without XMP (the baseline): {plain_s:.1f} s.

| step | before | now | speed-up | peak memory before / now |
|---|---|---|---|---|
{row("new", f"`retag --xmp`, {args.images:,} new sidecars ({size_kb:.1f} KB each)", True)}
{row("again", "`retag --xmp` again: nothing changed, 0 bytes written")}
{row("tuned", f"`retag --xmp --labels-file tuned.tsv` (a third of the labels off): {rewritten:,} sidecars "
              "rewritten", True)}

A sidecar that holds only our record (every sidecar here) is built as text, byte for byte what
the tree merge writes (tests/test_xmp.py compares the two on generated keywords); a rerun compares
that text with the file and writes nothing, and after a vocabulary change a cheap ElementTree parse
(defusedxml, still no DTDs or entities) plus a rebuild proves the file is ours alone before it is
replaced. What is left is mostly the atomic write (temporary file, fsync, rename) of each sidecar
that changes. Sidecars that also hold a user's data (darktable history, keywords, ratings) still
go through the tree merge at the "before" speed, rerun or not. Single timings depend on the other
jobs sharing this 2-core machine (the load average above); the two ways ran back to back.
"""
    write_section(section, HERE / "RESULTS.md", HEADING)
    print(section)


if __name__ == "__main__":
    main()
