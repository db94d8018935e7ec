"""Hostile-user tests of every output: nothing the user had is destroyed, by a typo, a failed run, a kill, a
second copy of the tool, a full disk, a FIFO, a symlink or a file name that is not UTF-8."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import make_image

from visual_buffet_siglip import cli, commands, fileio, locks, outputs
from visual_buffet_siglip.errors import InUseError
from visual_buffet_siglip.outputs import sidecar_path
from visual_buffet_siglip.store import EmbeddingStore

N_IMAGES = 4


@pytest.fixture
def folder(tmp_path) -> Path:
    root = tmp_path / "photos"
    root.mkdir()
    for i in range(N_IMAGES):
        make_image(root / f"img{i:02d}.png", (40 + i, 36), seed=60 + i)
    return root


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def store_paths(path: Path) -> list[str]:
    return [name for chunk in EmbeddingStore(path).chunks() for name in chunk.paths]


# --- 1: a failed run keeps the previous output; nothing on stdout before the first record -----

def test_a_failed_run_keeps_the_previous_results(folder, model_args, tmp_path, capsys):
    out = tmp_path / "results.json"
    assert cli.main(["tag", str(folder / "img00.png"), "-o", str(out), *model_args]) == 0
    before = out.read_bytes()
    assert json.loads(before)[0]["tags"]
    offline = ["--model", "google/siglip-base-patch16-224"]  # not cached, and HF_HUB_OFFLINE=1 here
    for fmt in ("json", "jsonl", "table"):
        target = out if fmt == "json" else tmp_path / f"results.{fmt}"
        if fmt != "json":
            cli.main(["tag", str(folder / "img00.png"), "-o", str(target), "--format", fmt, *model_args])
        kept = target.read_bytes()
        capsys.readouterr()
        assert cli.main(["tag", str(folder / "img00.png"), "-o", str(target), "--format", fmt,
                         *model_args, *offline]) == 2
        assert target.read_bytes() == kept, fmt
        assert cli.main(["tag", str(folder / "img00.png"), "--format", fmt, *model_args, *offline]) == 2
        assert capsys.readouterr().out == "", f"{fmt}: nothing on stdout before the first record"
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == [], "no temporary files left"


def test_a_failed_run_keeps_the_previous_report_and_parquet(folder, model_args, tmp_path):
    pytest.importorskip("pyarrow")
    report, parquet = tmp_path / "r.html", tmp_path / "t.parquet"
    argv = ["tag", str(folder / "img00.png"), "--report", str(report), "--format", "parquet", "-o", str(parquet)]
    assert cli.main([*argv, *model_args]) == 0
    before = snapshot(tmp_path)
    assert cli.main([*argv, *model_args, "--model", "google/siglip-base-patch16-224"]) == 2
    assert snapshot(tmp_path) == before
    assert cli.main([*argv, *model_args]) == 0, "our own report and parquet are replaced without --force"


def test_streamed_json_equals_the_whole_array(folder, model_args, capsys):
    assert cli.main(["tag", str(folder), *model_args]) == 0
    text = capsys.readouterr().out
    records = json.loads(text)
    assert len(records) == N_IMAGES
    assert text == json.dumps(records, indent=2, ensure_ascii=False) + "\n"


def test_an_interrupted_json_run_leaves_valid_json_and_an_idle_one_leaves_the_file(tmp_path):
    target = tmp_path / "out.json"
    target.write_text("previous\n")
    untouched = fileio.ReplacingOutput(target)
    outputs.StreamSink(untouched, "json").close()
    untouched.close()
    assert target.read_text() == "previous\n" and sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]
    output = fileio.ReplacingOutput(target)
    sink = outputs.StreamSink(output, "json")
    sink.write("a.png", None, {"tags": []})
    assert json.loads(target.read_text() + "]") == [{"path": "a.png", "tags": []}], "in place at the first record"
    sink.write("b.png", None, {"tags": []})
    sink.close()  # what run_tagging does when interrupted
    output.close()
    assert [r["path"] for r in json.loads(target.read_text())] == ["a.png", "b.png"]


# --- 12: outputs never overwrite inputs, images, devices, symlinks or other people's files -----

@pytest.mark.parametrize("argv", [
    ["tag", "{d}", "-o", "{d}/img00.png"],
    ["tag", "-o", "{d}/img00.png", "{d}/img01.png", "{d}/img02.png"],  # the typo `-o {d}/*.png`
    ["tag", "{d}/img01.png", "--report", "{d}/img00.png"],
    ["tag", "{d}/img01.png", "-o", "{t}/out.jsonl", "--format", "jsonl", "--report", "{t}/out.jsonl"],
    ["tag", "{d}/img01.png", "--save-embeddings", "{d}/img00.png"],
    ["tag", "{d}/img01.png", "-o", "{t}/labels.txt"],
    ["report", "{t}/prev.jsonl", "-o", "{d}/img00.png"],
    ["report", "{t}/prev.jsonl", "-o", "{t}/prev.jsonl", "--force"],
    ["retag", "{t}/prev.jsonl", "-o", "{t}/prev.jsonl", "--force"],
])
def test_an_output_that_is_an_input_or_an_image_is_refused(folder, model_args, tmp_path, capsys, argv):
    (tmp_path / "prev.jsonl").write_text(json.dumps({"path": "a.png", "tags": []}) + "\n", encoding="utf-8")
    (tmp_path / "labels.txt").write_text("dog\ncat\n", encoding="utf-8")
    argv = [a.format(d=folder, t=tmp_path) for a in argv]
    extra = [*model_args[:-5], "--labels-file", str(tmp_path / "labels.txt"), "-q"] if argv[0] != "report" else []
    before, prev = snapshot(folder), snapshot(tmp_path)
    assert cli.main([*argv, *extra]) == 2
    err = capsys.readouterr().err
    assert "refus" in err or "not replace" in err or "is one of" in err, err
    assert snapshot(folder) == before and snapshot(tmp_path) == prev


def test_an_existing_file_that_is_not_ours_needs_force(folder, model_args, tmp_path, capsys):
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n", encoding="utf-8")
    assert cli.main(["tag", str(folder / "img00.png"), "-o", str(notes), *model_args]) == 2
    assert "--force" in capsys.readouterr().err and notes.read_text() == "my notes\n"
    assert cli.main(["tag", str(folder / "img00.png"), "-o", str(notes), "--force", *model_args]) == 0
    assert json.loads(notes.read_text())[0]["path"] == str(folder / "img00.png")
    # our own outputs are replaced by the next run without --force, whatever their format
    for fmt in ("json", "jsonl", "table"):
        target = tmp_path / f"ours.{fmt}"
        for _ in range(2):
            assert cli.main(["tag", str(folder / "img00.png"), "-o", str(target), "--format", fmt,
                             *model_args]) == 0, fmt
    report = tmp_path / "r.html"
    for _ in range(2):
        assert cli.main(["tag", str(folder / "img00.png"), "--report", str(report), *model_args]) == 0
    capsys.readouterr()
    foreign = tmp_path / "page.html"
    foreign.write_text("<html>mine</html>", encoding="utf-8")
    assert cli.main(["report", str(tmp_path / "ours.jsonl"), "-o", str(foreign)]) == 2
    assert foreign.read_text() == "<html>mine</html>"
    assert cli.main(["report", str(tmp_path / "ours.jsonl"), "-o", str(report)]) == 0


@pytest.mark.parametrize("kind", ["symlink", "fifo", "directory", "device"])
def test_special_files_are_never_outputs(folder, model_args, tmp_path, capsys, kind):
    real = tmp_path / "real.json"
    real.write_text("[]\n")
    target = tmp_path / "target"
    if kind == "symlink":
        target.symlink_to(real)
    elif kind == "fifo":
        os.mkfifo(target)
    elif kind == "directory":
        target.mkdir()
    else:
        target = Path(os.devnull)
    for flag in ("-o", "--report", "--save-embeddings"):
        assert cli.main(["tag", str(folder / "img00.png"), flag, str(target), "--force", *model_args]) == 2, flag
        assert str(target) in capsys.readouterr().err
    assert real.read_text() == "[]\n"
    assert target.is_symlink() if kind == "symlink" else True


@pytest.mark.parametrize("kind", ["symlink", "fifo", "directory"])
def test_write_atomic_replaces_only_regular_files(tmp_path, kind):
    real = tmp_path / "real.txt"
    real.write_text("keep")
    target = tmp_path / "target"
    {"symlink": lambda: target.symlink_to(real), "fifo": lambda: os.mkfifo(target),
     "directory": target.mkdir}[kind]()
    with pytest.raises(OSError, match="not a regular file"):
        fileio.write_atomic(target, "new")
    assert real.read_text() == "keep" and os.path.lexists(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["real.txt", "target"]
    fileio.write_atomic(real, "new")
    assert real.read_text() == "new"


# --- 13: every output is validated before any is opened ------------------------------------

def test_resume_on_a_foreign_file_leaves_it_untouched(folder, model_args, tmp_path, capsys):
    notes = tmp_path / "notes.txt"
    notes.write_bytes(b"line one\nline two without newline")
    assert cli.main(["tag", str(folder / "img00.png"), "-o", str(notes), "--format", "jsonl", "--resume",
                     *model_args]) == 2
    assert notes.read_bytes() == b"line one\nline two without newline"
    assert "not a record" in capsys.readouterr().err


def test_a_refused_store_leaves_the_old_results_alone(folder, model_args, tmp_path, capsys):
    out, store = tmp_path / "old.jsonl", tmp_path / "s.emb"
    assert cli.main(["tag", str(folder / "img00.png"), "-o", str(out), "--format", "jsonl",
                     "--save-embeddings", str(store), *model_args]) == 0
    before = out.read_bytes()
    assert cli.main(["tag", str(folder / "img01.png"), "-o", str(out), "--format", "jsonl",
                     "--save-embeddings", str(store), *model_args]) == 2
    assert "already exists" in capsys.readouterr().err
    assert out.read_bytes() == before


# --- 14: one writer per output ------------------------------------------------------------------

HANG_AFTER_FIRST = """
import sys, threading
import visual_buffet_siglip.decoding as decoding
from visual_buffet_siglip import cli

real = decoding.load_image

def load_image(source, **kwargs):
    if str(source).endswith(sys.argv[1]):
        threading.Event().wait()
    return real(source, **kwargs)

decoding.load_image = load_image
sys.exit(cli.main(sys.argv[2:]))
"""


def test_a_second_run_on_the_same_outputs_is_refused(folder, model_args, tmp_path, capsys):
    out, store = tmp_path / "tags.jsonl", tmp_path / "s.emb"
    argv = ["tag", str(folder), "--format", "jsonl", "-o", str(out), "--resume", "--save-embeddings", str(store),
            *model_args]
    first = subprocess.Popen([sys.executable, "-c", HANG_AFTER_FIRST, "img01.png", *argv],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not (out.exists() and out.read_text(encoding="utf-8").count("\n") >= 1):
            assert first.poll() is None, first.stderr.read().decode()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert cli.main(argv) == 2
        assert f"already in use by PID {first.pid}" in capsys.readouterr().err
        other = tmp_path / "other.jsonl"
        assert cli.main([*argv[:5], str(other), *argv[6:]]) == 2  # the store alone is enough to refuse
        assert f"already in use by PID {first.pid}" in capsys.readouterr().err and not other.exists()
    finally:
        first.kill()
        first.wait()
        first.stderr.close()
    assert cli.main(argv) == 0  # the lock died with its holder
    assert sorted(Path(r["path"]).name for r in jsonl(out)) == [f"img{i:02d}.png" for i in range(N_IMAGES)]
    assert sorted(Path(p).name for p in store_paths(store)) == [f"img{i:02d}.png" for i in range(N_IMAGES)]
    assert not list(tmp_path.glob("*.lock")) and not list(tmp_path.glob(".*.lock"))


def test_lock_names_its_holder(tmp_path):
    target = tmp_path / "x.jsonl"
    with locks.exclusive(target):
        with pytest.raises(InUseError, match=f"already in use by PID {os.getpid()}"):
            with locks.exclusive(target):
                pass
    with locks.exclusive(target):  # released, so free again
        pass


# --- 15: the store and the jsonl are reconciled per image --------------------------------------

def test_resume_fills_a_store_that_lacks_images_the_jsonl_has(folder, model_args, tmp_path):
    out, store = tmp_path / "tags.jsonl", tmp_path / "s.emb"
    argv = ["tag", str(folder), "--format", "jsonl", "-o", str(out), "--save-embeddings", str(store), *model_args]
    assert cli.main(argv) == 0
    data = store.read_bytes()
    store.write_bytes(data[:data.index(b"\n") + 1])  # the frame write failed: disk full
    assert cli.main([*argv, "--resume"]) == 0
    assert sorted(store_paths(store)) == sorted(r["path"] for r in jsonl(out))
    assert len(jsonl(out)) == N_IMAGES


def test_resume_after_a_deleted_jsonl_line_adds_no_duplicate_row(folder, model_args, tmp_path):
    out, store = tmp_path / "tags.jsonl", tmp_path / "s.emb"
    argv = ["tag", str(folder), "--format", "jsonl", "-o", str(out), "--save-embeddings", str(store), *model_args]
    assert cli.main(argv) == 0
    lines = out.read_text(encoding="utf-8").splitlines(keepends=True)
    out.write_text("".join(lines[:1] + lines[2:]), encoding="utf-8")
    assert cli.main([*argv, "--resume"]) == 0
    assert sorted(store_paths(store)) == sorted(str(folder / f"img{i:02d}.png") for i in range(N_IMAGES))
    assert sorted(r["path"] for r in jsonl(out)) == sorted(store_paths(store))


# --- 16: a store is created with its header, atomically -----------------------------------------

SLOW_MODEL_LOAD = """
import sys, time
from pathlib import Path
from visual_buffet_siglip import cli, store

real = store.StoreIdentity.of

def slow(tagger):
    Path(sys.argv[1]).write_text("loading")
    time.sleep(600)

store.StoreIdentity.of = staticmethod(slow)
sys.exit(cli.main(sys.argv[2:]))
"""


def test_sigterm_while_the_model_loads_leaves_no_empty_store(folder, model_args, tmp_path):
    store, ready = tmp_path / "s.emb", tmp_path / "ready"
    argv = ["tag", str(folder), "--format", "jsonl", "-o", str(tmp_path / "t.jsonl"),
            "--save-embeddings", str(store), *model_args]
    proc = subprocess.Popen([sys.executable, "-c", SLOW_MODEL_LOAD, str(ready), *argv], stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not ready.exists():
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    finally:
        proc.kill()
        proc.wait()
        proc.stderr.close()
    assert not store.exists()
    assert cli.main([*argv, "--resume"]) == 0
    assert len(store_paths(store)) == N_IMAGES


# --- 17: names that are not valid UTF-8 ----------------------------------------------------------

def test_a_name_that_is_not_utf8_goes_through_every_output(folder, model_args, tmp_path, capsys):
    raw = os.fsencode(folder) + b"/caf\xe9.png"
    make_image(Path(os.fsdecode(raw)), (40, 30), seed=3)
    name = os.fsdecode(raw)
    out, store, report = tmp_path / "t.jsonl", tmp_path / "s.emb", tmp_path / "r.html"
    assert cli.main(["tag", str(folder), "--format", "jsonl", "-o", str(out), "--save-embeddings", str(store),
                     "--report", str(report), "--sidecar", *model_args]) == 0, capsys.readouterr().err
    assert name in [r["path"] for r in jsonl(out)]
    assert name in store_paths(store)
    assert "caf" in report.read_text(encoding="utf-8")
    assert json.loads(sidecar_path(name).read_text(encoding="utf-8"))["file"] == name
    assert cli.main(["retag", str(store), "--format", "jsonl", *model_args]) == 0
    assert name in [json.loads(line)["path"] for line in capsys.readouterr().out.splitlines()]


# --- 19: sidecars that are FIFOs or absurdly nested ----------------------------------------------

@pytest.fixture
def alarm():
    def timeout(*_):
        raise TimeoutError("hung")

    previous = signal.signal(signal.SIGALRM, timeout)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def test_a_fifo_sidecar_does_not_hang_the_run(folder, model_args, tmp_path, caplog, alarm):
    fifo = sidecar_path(str(folder / "img00.png"))
    os.mkfifo(fifo)
    os.utime(fifo, (0, 0))
    assert cli.main(["tag", str(folder), "-o", str(tmp_path / "t.json"), "--sidecar", "--overwrite",
                     *model_args]) == 1
    assert str(fifo) in caplog.text and "not a regular file" in caplog.text
    assert fifo.is_fifo() and sidecar_path(str(folder / "img01.png")).is_file()


def test_a_deeply_nested_sidecar_is_a_clear_error(folder, model_args, tmp_path, caplog):
    nested = sidecar_path(str(folder / "img00.png"))
    nested.write_text("[" * 200_000 + "]" * 200_000)
    os.utime(nested, (0, 0))
    assert cli.main(["tag", str(folder), "-o", str(tmp_path / "t.json"), "--sidecar", *model_args]) == 1
    assert str(nested) in caplog.text and "nested" in caplog.text
    assert nested.read_text().startswith("[[[")
    assert len(json.loads((tmp_path / "t.json").read_text())) == N_IMAGES


# --- 22: failures that used to exit 0 ------------------------------------------------------------

def test_an_unreadable_subfolder_exits_1_naming_it(folder, model_args, tmp_path, caplog, monkeypatch):
    (folder / "private").mkdir()
    make_image(folder / "private" / "x.png", (30, 30))
    real = os.scandir

    def scandir(path):
        if str(path).endswith("private"):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(commands.os, "scandir", scandir)
    assert cli.main(["tag", str(folder), "-r", "-o", str(tmp_path / "t.json"), *model_args]) == 1
    assert str(folder / "private") in caplog.text
    assert len(json.loads((tmp_path / "t.json").read_text())) == N_IMAGES


def test_a_failed_sidecar_write_exits_1(folder, model_args, tmp_path, caplog, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(outputs, "write_atomic", full)
    assert cli.main(["tag", str(folder / "img00.png"), "-o", str(tmp_path / "t.json"), "--sidecar",
                     *model_args]) == 1
    assert str(sidecar_path(str(folder / "img00.png"))) in caplog.text


def test_a_full_disk_while_writing_results_keeps_the_previous_ones(folder, model_args, tmp_path, monkeypatch,
                                                                   capsys):
    out = tmp_path / "t.jsonl"
    assert cli.main(["tag", str(folder), "-o", str(out), "--format", "jsonl", *model_args]) == 0
    before = out.read_bytes()
    real = os.fsync

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fileio.os, "fsync", full)
    assert cli.main(["tag", str(folder), "-o", str(out), "--format", "jsonl", *model_args]) == 2
    monkeypatch.setattr(fileio.os, "fsync", real)
    assert "No space left" in capsys.readouterr().err
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photos", "t.jsonl"]


def test_retag_of_a_damaged_store_keeps_the_good_rows_and_exits_1(folder, model_args, tmp_path, capsys, caplog):
    store = tmp_path / "s.emb"
    assert cli.main(["tag", str(folder), "--save-embeddings", str(store), *model_args]) == 0
    data = bytearray(store.read_bytes())
    data[-100] ^= 0x10
    store.write_bytes(bytes(data))
    capsys.readouterr()
    loud = [arg for arg in model_args if arg != "-q"]  # -q keeps only errors: the damage is a warning
    assert cli.main(["retag", str(store), "--format", "jsonl", *loud]) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and "unexpected" not in captured.err
    assert "damaged after row 0" in caplog.text and str(store) in caplog.text
    assert cli.main(["tag", str(folder), "--format", "jsonl", "-o", str(tmp_path / "t.jsonl"), "--resume",
                     "--save-embeddings", str(store), *model_args]) == 0  # the repair: embedded again
    assert sorted(store_paths(store)) == sorted(str(p) for p in folder.glob("*.png"))


@pytest.fixture
def tiny_disk(tmp_path):
    """A 256 KB tmpfs (needs root and mount; skipped elsewhere, where the fsync-patching test still runs)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def fill(disk: Path) -> Path:
    filler = disk / "filler"
    with open(filler, "wb", buffering=0) as handle:
        try:
            while True:
                handle.write(b"\0" * 512)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    return filler


def test_a_really_full_disk_loses_nothing(folder, model_args, tiny_disk, capsys):
    out, store = tiny_disk / "t.jsonl", tiny_disk / "s.emb"
    argv = ["tag", str(folder), "--format", "jsonl", "-o", str(out), "--save-embeddings", str(store), *model_args]
    assert cli.main(argv) == 0
    before = snapshot(tiny_disk)
    filler = fill(tiny_disk)
    store.unlink()  # a new store cannot even get its header onto the disk
    assert cli.main(argv) == 2
    assert "No space left" in capsys.readouterr().err
    assert snapshot(tiny_disk) == {**{k: v for k, v in before.items() if k != "s.emb"}, "filler": filler.read_bytes()}
    filler.unlink()
    assert cli.main([*argv, "--resume"]) == 0  # space again: the store is rebuilt for every image
    assert sorted(store_paths(store)) == sorted(r["path"] for r in jsonl(out)) and len(jsonl(out)) == N_IMAGES


def test_a_report_may_go_to_a_new_folder_and_needs_no_lock(folder, model_args, tmp_path):
    report = tmp_path / "new" / "dir" / "r.html"
    assert cli.main(["tag", str(folder / "img00.png"), "--report", str(report), *model_args]) == 0
    assert report.is_file() and sorted(p.name for p in report.parent.iterdir()) == ["r.html"]
