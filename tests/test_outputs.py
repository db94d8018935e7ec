"""Interrupted runs lose nothing: flushed jsonl, --resume after a kill, atomic sidecars."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import make_image

from visual_buffet_siglip import cli, outputs
from visual_buffet_siglip.outputs import read_done, sidecar_path

N_IMAGES = 8
BLOCKED = 5  # the run hangs on img05.png until it is killed

HANG_ON_ONE_IMAGE = """
import sys, threading
import visual_buffet_siglip.decoding as decoding
from visual_buffet_siglip import cli

real = decoding.load_image

def load_image(source, **kwargs):
    if str(source).endswith(sys.argv[1]):
        threading.Event().wait()  # like a stalled network share: hangs until the process is killed
    return real(source, **kwargs)

decoding.load_image = load_image
sys.exit(cli.main(sys.argv[2:]))
"""


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("photos")
    for i in range(N_IMAGES):
        make_image(root / f"img{i:02d}.png", (40 + i, 36), seed=40 + i)
    return root


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def tags_by_path(records: list[dict]) -> dict[str, list]:
    return {record["path"]: record["tags"] for record in records}


def test_killed_run_resumes_with_exactly_one_line_per_image(folder, model_args, tmp_path):
    out = tmp_path / "tags.jsonl"
    argv = ["tag", str(folder), "--format", "jsonl", "--output", str(out), *model_args]
    process = subprocess.Popen([sys.executable, "-c", HANG_ON_ONE_IMAGE, f"img{BLOCKED:02d}.png", *argv],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not (out.exists() and out.read_text(encoding="utf-8").count("\n") >= BLOCKED):
            assert process.poll() is None, process.stderr.read().decode()
            assert time.monotonic() < deadline, "the images before the stalled one were never written"
            time.sleep(0.05)
    finally:
        process.kill()
        process.wait()
        process.stderr.close()
    # each record was flushed the moment it was known: all of them are on disk despite SIGKILL
    assert [Path(r["path"]).name for r in lines(out)] == [f"img{i:02d}.png" for i in range(BLOCKED)]

    assert cli.main([*argv, "--resume"]) == 0
    records = lines(out)
    assert sorted(Path(r["path"]).name for r in records) == [f"img{i:02d}.png" for i in range(N_IMAGES)]

    fresh = tmp_path / "fresh.jsonl"
    assert cli.main(["tag", str(folder), "--format", "jsonl", "--output", str(fresh), *model_args]) == 0
    assert tags_by_path(records) == tags_by_path(lines(fresh)), "a resumed run gives the same results"

    assert cli.main([*argv, "--resume"]) == 0  # nothing left: nothing appended
    assert len(lines(out)) == N_IMAGES


def test_resume_repairs_a_line_cut_off_mid_write(folder, model_args, tmp_path):
    out = tmp_path / "tags.jsonl"
    argv = ["tag", str(folder / "img00.png"), str(folder / "img01.png"), str(folder / "img02.png"),
            "--format", "jsonl", "--output", str(out), *model_args]
    assert cli.main(argv) == 0
    text = out.read_text(encoding="utf-8").splitlines(keepends=True)
    out.write_text(text[0] + text[1][: len(text[1]) // 2], encoding="utf-8")  # killed while writing line 2
    assert read_done(out) == {outputs.path_key(str(folder / "img00.png"))}
    assert out.read_text(encoding="utf-8") == text[0], "the partial line is removed, the file stays jsonl"
    assert cli.main([*argv, "--resume"]) == 0
    assert [Path(r["path"]).name for r in lines(out)] == ["img00.png", "img01.png", "img02.png"]


def test_a_whole_last_record_without_newline_is_kept(tmp_path):
    out = tmp_path / "tags.jsonl"
    out.write_text('{"path": "a.png", "tags": []}\n{"path": "b.png", "tags": []}', encoding="utf-8")
    assert read_done(out) == {outputs.path_key("a.png"), outputs.path_key("b.png")}
    assert out.read_text(encoding="utf-8").endswith('"tags": []}\n')


def test_resume_matches_the_same_image_named_differently(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "tags.jsonl"
    out.write_text(json.dumps({"path": "./photos/a.png", "tags": []}) + "\n", encoding="utf-8")
    remaining = outputs.remaining_paths(["photos/a.png", str(tmp_path / "photos" / "b.png")], str(out), "jsonl")
    assert remaining == [str(tmp_path / "photos" / "b.png")]


def test_resume_starts_fresh_when_the_file_does_not_exist(folder, model_args, tmp_path):
    out = tmp_path / "new.jsonl"
    assert cli.main(["tag", str(folder / "img03.png"), "--format", "jsonl", "-o", str(out), "--resume",
                     *model_args]) == 0
    assert len(lines(out)) == 1


@pytest.mark.parametrize("extra", [["--format", "json", "-o", "x.json"], ["--format", "jsonl"]])
def test_resume_needs_a_jsonl_output_file(folder, model_args, tmp_path, monkeypatch, capsys, extra):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["tag", str(folder / "img00.png"), "--resume", *extra, *model_args]) == 2
    assert "--resume needs --output FILE --format jsonl" in capsys.readouterr().err


def test_resume_refuses_a_file_it_did_not_write(folder, model_args, tmp_path, capsys):
    out = tmp_path / "notes.jsonl"
    out.write_text('{"path": "a.png", "tags": []}\nhello\n{"path": "b.png", "tags": []}\n', encoding="utf-8")
    assert cli.main(["tag", str(folder / "img00.png"), "--format", "jsonl", "-o", str(out), "--resume",
                     *model_args]) == 2
    err = capsys.readouterr().err
    assert f"{out}: line 2 is not a record" in err and "Traceback" not in err


# --- sidecars ---------------------------------------------------------------------------------

@pytest.fixture
def photos(tmp_path) -> list[Path]:
    return [make_image(tmp_path / name, (40, 30), seed=i) for i, name in enumerate(["beach.png", "dog.png"])]


def tag_sidecars(paths, model_args, *extra) -> int:
    return cli.main(["tag", *map(str, paths), "--format", "jsonl", "--sidecar", *extra, *model_args])


def test_sidecars_in_the_hosts_layout(photos, model_args, tmp_path):
    missing = tmp_path / "gone.png"
    assert tag_sidecars([*photos, missing], model_args) == 1
    for photo in photos:
        document = json.loads(sidecar_path(str(photo)).read_text(encoding="utf-8"))
        assert sidecar_path(str(photo)) == photo.with_name(photo.stem + "_tags.json")
        assert document["file"] == str(photo) and document["filename"] == photo.name
        assert document["results"]["siglip"]["path"] == str(photo)
        assert len(document["results"]["siglip"]["tags"]) == 6
        assert "tagged_at" in document
    assert not sidecar_path(str(missing)).exists(), "a failed image gets no sidecar"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["beach.png", "beach_tags.json", "dog.png",
                                                          "dog_tags.json"], "no temporary files left"


def test_sidecars_newer_than_their_image_are_kept_unless_overwrite(photos, model_args):
    beach, dog = photos
    assert tag_sidecars(photos, model_args) == 0
    for photo in photos:  # the host's own sidecar, with another plugin's results, written after the image
        sidecar_path(str(photo)).write_text(json.dumps({"file": str(photo), "results": {"ram_plus": {"tags": []}}}))
    os.utime(dog, (time.time() + 10, time.time() + 10))  # the dog photo was edited after its sidecar

    assert tag_sidecars(photos, model_args) == 0
    kept = json.loads(sidecar_path(str(beach)).read_text())
    assert kept["results"] == {"ram_plus": {"tags": []}}, "a sidecar newer than its image is left alone"
    refreshed = json.loads(sidecar_path(str(dog)).read_text())
    assert set(refreshed["results"]) == {"ram_plus", "siglip"}, "stale: rewritten, other plugins kept"

    assert tag_sidecars(photos, model_args, "--overwrite") == 0
    assert set(json.loads(sidecar_path(str(beach)).read_text())["results"]) == {"ram_plus", "siglip"}


def test_sidecar_writes_are_atomic(photos, model_args, monkeypatch, tmp_path):
    beach = photos[0]
    sidecar_path(str(beach)).write_text('{"results": {}}')
    os.utime(sidecar_path(str(beach)), (0, 0))  # older than the image: due for a rewrite

    def crash(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(outputs.os, "replace", crash)
    assert tag_sidecars([beach], model_args) == 1  # the run goes on; the failure is logged and exits 1
    assert sidecar_path(str(beach)).read_text() == '{"results": {}}', "the old sidecar is intact"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["beach.png", "beach_tags.json", "dog.png"]


def test_overwrite_needs_sidecar(photos, model_args, capsys):
    assert cli.main(["tag", str(photos[0]), "--overwrite", *model_args]) == 2
    assert "--overwrite only applies to --sidecar" in capsys.readouterr().err


# --- the record and sink contract -----------------------------------------------------------------

def test_error_records_keep_the_output_contracts_shape():
    from visual_buffet_siglip.engine import ImageEmbedding, SiglipTagger
    from visual_buffet_siglip.errors import ImageDecodeError
    from visual_buffet_siglip.outputs import json_text, path_record
    from visual_buffet_siglip.records import error_record
    from visual_buffet_siglip.vocabulary import TagOptions, Vocabulary

    record = error_record("ImageDecodeError", "x.jpg: damaged")
    assert json_text(path_record("x.jpg", record)) == (
        '{"path": "x.jpg", "tags": [], "error": {"type": "ImageDecodeError", "message": "x.jpg: damaged"}}')
    item = ImageEmbedding(0, "x.jpg", None, ImageDecodeError("x.jpg: damaged").to_dict(), 1.0)
    options = TagOptions(Vocabulary.from_labels(["dog"]))
    assert SiglipTagger().record_scores(item, None, options) == record  # no model needed for a failed image


def test_every_output_is_a_sink():
    from visual_buffet_siglip.distributed import ParquetSink
    from visual_buffet_siglip.report import ReportSink
    from visual_buffet_siglip.store import EmbeddingWriter
    from visual_buffet_siglip.xmp import XmpSink

    for sink in (outputs.StreamSink, outputs.SidecarSink, XmpSink, EmbeddingWriter, ReportSink, ParquetSink):
        assert issubclass(sink, outputs.Sink), sink
    assert not issubclass(int, outputs.Sink)
