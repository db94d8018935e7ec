"""The debug runner end to end: folders, formats, exit codes, config files and overrides."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import LABELS

from visual_buffet_siglip.cli import main
from visual_buffet_siglip.commands import expand_paths


@pytest.fixture
def photo_dir(tmp_path, images):
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    for image in images[:3]:
        shutil.copy(image, folder / image.name)
    shutil.copy(images[3], folder / "sub" / "deep.png")
    (folder / "corrupt.jpg").write_bytes(b"\xff\xd8\xff" + b"\x00" * 50)
    (folder / "notes.txt").write_text("not an image")
    return folder


@pytest.fixture
def config_file(tmp_path, checkpoints):
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(LABELS), encoding="utf-8")
    path = tmp_path / "siglip.toml"
    path.write_text(f'[plugins.siglip]\nmodel = "{checkpoints["siglip"]}"\ndevice = "cpu"\n'
                    'labels_file = "labels.txt"\nmax_tags = 4\n', encoding="utf-8")
    return path


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_expand_paths(photo_dir):
    flat = list(expand_paths([str(photo_dir)]))
    assert [p.rsplit("/", 1)[1] for p in flat] == ["corrupt.jpg", "img0.png", "img1.png", "img2.png"]
    deep = list(expand_paths([str(photo_dir)], recursive=True))
    assert len(deep) == 5 and deep[-1].endswith("sub/deep.png")
    assert list(expand_paths(["missing.jpg"])) == ["missing.jpg"]  # named files always count


def test_tag_folder_jsonl_with_one_corrupt_file(capsys, photo_dir, config_file):
    code, out, err = run_cli(capsys, "-q", "tag", str(photo_dir), "-r", "--config", str(config_file),
                             "--format", "jsonl")
    assert code == 1  # some images failed
    records = [json.loads(line) for line in out.splitlines()]
    assert len(records) == 5
    by_name = {r["path"].rsplit("/", 1)[1]: r for r in records}
    assert by_name["corrupt.jpg"]["error"]["type"] == "ImageDecodeError"
    assert "corrupt.jpg" in by_name["corrupt.jpg"]["error"]["message"]
    good = [r for r in records if "error" not in r]
    assert len(good) == 4 and all(1 <= len(r["tags"]) <= 4 for r in good)
    assert "Traceback" not in err


def test_overrides_and_json_output_file(capsys, photo_dir, config_file, tmp_path):
    output = tmp_path / "out.json"
    code, out, _ = run_cli(capsys, "-q", "tag", str(photo_dir / "img0.png"), "--config", str(config_file),
                           "--max-tags", "2", "--threshold", "0.0", "--output", str(output))
    assert code == 0 and out == ""
    [record] = json.loads(output.read_text())
    assert record["path"] == str(photo_dir / "img0.png") and len(record["tags"]) == 2


def test_table_format(capsys, photo_dir, config_file):
    code, out, _ = run_cli(capsys, "-q", "tag", str(photo_dir / "img1.png"), str(photo_dir / "corrupt.jpg"),
                           "--config", str(config_file), "--format", "table")
    assert code == 1
    assert "img1.png" in out and "ERROR ImageDecodeError" in out


def test_config_errors_exit_2_without_traceback(capsys, photo_dir, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[plugins.siglip]\nmax_tag = 3\n", encoding="utf-8")
    code, _, err = run_cli(capsys, "tag", str(photo_dir), "--config", str(bad))
    assert code == 2 and "did you mean 'max_tags'" in err and "Traceback" not in err
    code, _, err = run_cli(capsys, "tag", str(photo_dir), "--model", "google/siglip-base-patch32-224")
    assert code == 2 and "closest real ones" in err


def test_no_images_is_a_usage_error(capsys, tmp_path):
    code, _, err = run_cli(capsys, "tag", str(tmp_path))
    assert code == 2 and "no images found" in err


def test_console_script_and_module_entry(photo_dir, config_file):
    script = Path(sys.executable).parent / "visual-buffet-siglip"  # installed beside this interpreter
    for command in ([str(script)], [sys.executable, "-m", "visual_buffet_siglip"]):
        proc = subprocess.run([*command, "-q", "tag", str(photo_dir / "img2.png"),
                               "--config", str(config_file), "--format", "jsonl"],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout)["tags"]


def test_report_from_tag_run(capsys, photo_dir, config_file, tmp_path):
    report = tmp_path / "report.html"
    code, _, _ = run_cli(capsys, "-q", "tag", str(photo_dir), "--config", str(config_file),
                         "--format", "jsonl", "--report", str(report))
    html = report.read_text(encoding="utf-8")
    assert code == 1 and "img0.png" in html and "corrupt.jpg" in html
    assert "http://" not in html and "https://" not in html


def test_report_command_from_jsonl(capsys, photo_dir, config_file, tmp_path, monkeypatch):
    monkeypatch.chdir(photo_dir)
    results = tmp_path / "results.jsonl"
    run_cli(capsys, "-q", "tag", ".", "--config", str(config_file), "--format", "jsonl", "-o", str(results))
    code, out, _ = run_cli(capsys, "report", str(results), "-o", str(tmp_path / "r.html"),
                           "--images-root", str(photo_dir))
    assert code == 0 and out.strip().endswith("r.html")
    assert "image\\/jpeg;base64," in (tmp_path / "r.html").read_text(encoding="utf-8")  # thumbnails embedded
    code, _, err = run_cli(capsys, "report", str(tmp_path / "nope.jsonl"), "-o", str(tmp_path / "x.html"))
    assert code == 2 and "nope.jsonl" in err


@pytest.mark.parametrize("spec, model, expected", [
    ("cuda:name=T4,vram_gb=16,cc=7.5", "google/siglip2-so400m-patch14-384", ["float16", "sdpa", "T4"]),
    ("cuda:name=H100,vram_gb=80,cc=9.0,flash_attn=2.7.4", "google/siglip2-so400m-patch14-384",
     ["bfloat16", "flash_attention_2"]),
    ("mps:memory_gb=16", "google/siglip2-base-patch16-224", ["mps", "float16"]),
    ("cpu:cores=8,ram_gb=32,avx512_bf16=1", "google/siglip-base-patch16-224", ["float32", "avx512_bf16"]),
])
def test_plan_command_simulates_machines(capsys, spec, model, expected):
    code, out, _ = run_cli(capsys, "plan", "--simulate", spec, "--model", model)
    assert code == 0
    for word in expected:
        assert word in out
    for key in ("device", "dtype", "attention", "batch_size", "quantization"):
        assert key in out


def test_plan_refuses_a_model_that_does_not_fit(capsys):
    code, _, err = run_cli(capsys, "plan", "--simulate", "cuda:name=GTX 1060 3GB,vram_gb=3,cc=6.1",
                           "--model", "google/siglip2-giant-opt-patch16-384")
    assert code == 2 and "4bit" in err and "Traceback" not in err


# --- path lists: `find ... | tag -`, --files-from, --null ---------------------------------------

def stdin_of(monkeypatch, data: bytes) -> None:
    import io

    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data)))


def test_paths_from_stdin_match_paths_as_arguments(capsys, photo_dir, config_file, monkeypatch):
    names = [str(photo_dir / "img0.png"), str(photo_dir / "corrupt.jpg"), str(photo_dir / "sub")]
    stdin_of(monkeypatch, ("\n".join(names) + "\n\n").encode())  # blank lines are skipped
    code, out, _ = run_cli(capsys, "-q", "tag", "-", "--config", str(config_file), "--format", "jsonl")
    piped = [json.loads(line) for line in out.splitlines()]
    assert code == 1
    assert [r["path"] for r in piped] == names[:2] + [str(photo_dir / "sub" / "deep.png")]
    _, out, _ = run_cli(capsys, "-q", "tag", *names, "--config", str(config_file), "--format", "jsonl")
    assert [r["tags"] for r in piped] == [json.loads(line)["tags"] for line in out.splitlines()]


def test_files_from_with_nul_separators_and_named_paths(capsys, photo_dir, config_file, tmp_path):
    spaced = photo_dir / "with space\nand newline.png"
    shutil.copy(photo_dir / "img1.png", spaced)
    listing = tmp_path / "list0"
    listing.write_bytes(b"\0".join(os.fsencode(p) for p in (spaced, photo_dir / "img2.png")) + b"\0")
    code, out, _ = run_cli(capsys, "-q", "tag", str(photo_dir / "img0.png"), "--files-from", str(listing), "-0",
                           "--config", str(config_file), "--format", "jsonl")
    assert code == 0
    assert [json.loads(line)["path"] for line in out.splitlines()] == [
        str(photo_dir / "img0.png"), str(spaced), str(photo_dir / "img2.png")]


def test_path_lists_keep_names_that_are_not_utf8():
    import io

    from visual_buffet_siglip.commands import read_path_list

    raw = b"/photos/caf\xe9.jpg\r\n/photos/b.jpg\n"
    assert [os.fsencode(p) for p in read_path_list(io.BytesIO(raw))] == [b"/photos/caf\xe9.jpg", b"/photos/b.jpg"]
    assert read_path_list(io.BytesIO(b"a b\nc\0d\0"), null=True) == ["a b\nc", "d"]


@pytest.mark.parametrize("argv, message", [
    (["tag"], "no PATH given"),
    (["tag", "-", "--files-from", "-"], "stdin can be read once"),
    (["tag", "a.jpg", "--null"], "--null applies to a path list"),
    (["tag", "--files-from", "/nonexistent/list.txt"], "/nonexistent/list.txt"),
])
def test_path_list_misuse_is_a_usage_error(capsys, monkeypatch, argv, message):
    stdin_of(monkeypatch, b"")
    code, out, err = run_cli(capsys, *argv)
    assert code == 2 and message in err and out == ""


def test_an_empty_path_list_says_so(capsys, monkeypatch):
    stdin_of(monkeypatch, b"\n")
    code, _, err = run_cli(capsys, "tag", "-")
    assert code == 2 and "no images found in the path list" in err
