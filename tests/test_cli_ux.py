"""The debug runner's UX: models, doctor, table output, -q/-v anywhere, no tracebacks, fast offline failures."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import LABELS, make_image

from visual_buffet_siglip import cli, doctor
from visual_buffet_siglip.modelfacts import REGISTRY
from visual_buffet_siglip.simulate import parse_simulation

CACHED = "google/siglip-base-patch16-224"


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    """A Hugging Face cache holding one registry model (config.json is what marks it cached)."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    repo = cache / ("models--" + CACHED.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123abcd")
    (repo / "snapshots" / "0123abcd").mkdir(parents=True)
    (repo / "snapshots" / "0123abcd" / "config.json").write_text('{"model_type": "siglip"}')
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def run(*argv: str, env: dict[str, str] | None = None, timeout: int = 120) -> subprocess.CompletedProcess:
    """The real CLI in a fresh process; `timeout` only guards against a hang."""
    return subprocess.run([sys.executable, "-m", "visual_buffet_siglip", *argv], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


# --- models and doctor --------------------------------------------------------------------------

def test_models_table_lists_the_registry_and_what_is_cached(hub_cache, capsys):
    assert cli.main(["models"]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert rows[0].split() == ["id", "family", "resolution", "params", "min", "VRAM", "fp16", "cached"]
    by_id = {row.split()[0]: row.split() for row in rows[1:]}
    assert set(by_id) == set(REGISTRY)
    assert by_id[CACHED][1:5] == ["siglip", "224", "203M", "2"] and by_id[CACHED][-1] == "yes"
    assert by_id["google/siglip2-so400m-patch16-naflex"][2] == "naflex"
    assert sum(row[-1] == "yes" for row in by_id.values()) == 1


def test_doctor_prints_one_line_per_check_with_fixes(hub_cache, capsys):
    assert cli.main(["doctor", "--model", CACHED]) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if not line.lstrip().startswith("fix:")]
    names = [line.split()[1] for line in lines]
    assert names == ["python", "torch", "transformers", "device", "bitsandbytes", "flash-attn", "heif", "avif",
                     "cache", "models", "offline"]
    assert all(line.split()[0] in ("OK", "WARN", "FAIL") for line in lines)
    assert out.count("WARN") == out.count("fix:"), "every warning says what to do"
    models_line = next(line for line in lines if line.split()[1] == "models")
    assert models_line.startswith("OK") and f"cached registry models: {CACHED}" in models_line
    assert str(hub_cache) in out


@pytest.mark.parametrize("spec, status", [("cpu:cores=8,ram_gb=32", "WARN"),
                                          ("cuda:name=A100,vram_gb=80,cc=8.0", "OK"), ("mps:memory_gb=16", "OK")])
def test_doctor_device_check(spec, status):
    check = doctor.check_device(parse_simulation(spec))
    assert check.status == status
    assert bool(check.fix) == (status == "WARN")


def test_doctor_optional_package_checks_say_how_to_fix():
    from dataclasses import replace

    ampere = parse_simulation("cuda:name=A100,vram_gb=80,cc=8.0")
    turing = parse_simulation("cuda:name=T4,vram_gb=16,cc=7.5")
    cpu = parse_simulation("cpu:cores=8,ram_gb=32")
    flash = doctor.check_flash_attn(replace(ampere, flash_attn=None))
    assert flash.status == "WARN" and "visual-buffet-siglip[flash]" in flash.fix
    assert doctor.check_flash_attn(replace(turing, flash_attn=None)).status == "OK"
    assert doctor.check_flash_attn(replace(ampere, flash_attn="2.7.0")).status == "OK"
    bnb = doctor.check_bitsandbytes(replace(ampere, bitsandbytes=None))
    assert bnb.status == "WARN" and "visual-buffet-siglip[quant]" in bnb.fix
    on_cpu = doctor.check_bitsandbytes(replace(cpu, bitsandbytes="0.50.2"))
    assert on_cpu.status == "OK" and "CPU" in on_cpu.detail
    heif = doctor.check_heif(None)
    assert heif.status == "WARN" and "visual-buffet-siglip[heif]" in heif.fix
    assert doctor.check_transformers("4.57.1").status == "FAIL"
    assert doctor.check_torch(None, None).status == "FAIL"
    assert doctor.check_python((3, 9, 18)).status == "FAIL"
    offline = doctor.check_offline(True, [])
    assert offline.status == "WARN" and "download" in offline.fix
    assert doctor.check_models([], "google/siglip2-base-patch16-224", False).fix.startswith(
        "visual-buffet-siglip download google/siglip2-base-patch16-224")


def test_doctor_cache_size_counts_files_once(tmp_path):
    blob = tmp_path / "blobs" / "abc"
    blob.parent.mkdir()
    blob.write_bytes(b"x" * 1000)
    (tmp_path / "snapshot").mkdir()
    (tmp_path / "snapshot" / "model.safetensors").symlink_to(blob)  # how the hub cache links files
    assert doctor.folder_size(tmp_path) == 1000


# --- tag --format table ---------------------------------------------------------------------------

def test_table_format_is_human_readable(checkpoints, tmp_path, capsys):
    photo = make_image(tmp_path / "beach.png", (40, 30))
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(LABELS[:3]), encoding="utf-8")
    code = cli.main(["tag", str(photo), str(tmp_path / "gone.png"), "--format", "table", "-q",
                     "--model", str(checkpoints["siglip"]), "--device", "cpu", "--dtype", "float32",
                     "--threshold", "0", "--labels-file", str(labels)])
    assert code == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0] == str(photo)
    rows = [line.split() for line in out[1:4]]
    confidences = [float(row[0]) for row in rows]
    assert confidences == sorted(confidences, reverse=True)
    assert {row[1] for row in rows} == {"dog", "cat", "golden"}  # "golden retriever" spans two columns
    assert all(0 <= float(row[0]) <= 1 and set(row[-1]) == {"#"} for row in rows)
    assert out[4] == str(tmp_path / "gone.png")
    assert out[5].startswith("  ERROR ImageNotFoundError: ") and "gone.png" in out[5]


# --- verbosity and errors -----------------------------------------------------------------------

@pytest.mark.parametrize("argv, level", [(["models"], logging.INFO), (["models", "-q"], logging.ERROR),
                                         (["-q", "models"], logging.ERROR), (["models", "--verbose"], logging.DEBUG),
                                         (["-v", "models"], logging.DEBUG)])
def test_quiet_and_verbose_work_before_or_after_the_subcommand(argv, level, hub_cache, capsys):
    try:
        assert cli.main(argv) == 0
        assert logging.getLogger("visual_buffet_siglip").level == level
    finally:
        cli.configure_logging()
    assert logging.getLogger().handlers.count(cli._handler) == 0, "the root logger is given back"


LOG_LINES = """
import logging, sys
from visual_buffet_siglip import cli
code = cli.main(sys.argv[1:])
logging.getLogger("httpx").info("HTTP Request: GET https://huggingface.co/api/models")
logging.getLogger("urllib3.connectionpool").debug("Starting new HTTPS connection")
logging.getLogger("huggingface_hub.file_download").warning("a library warning")
logging.getLogger("visual_buffet_siglip.models").info("our own progress note")
logging.getLogger("visual_buffet_siglip.models").debug("our own debug detail")
sys.exit(code)
"""


@pytest.mark.parametrize("verbose", [False, True])
def test_library_logs_stay_out_unless_verbose(verbose, tmp_path):
    argv = ["models", "-v"] if verbose else ["models"]
    result = subprocess.run([sys.executable, "-c", LOG_LINES, *argv], capture_output=True, text=True,
                            timeout=120, env={**os.environ, "HF_HOME": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    err = result.stderr
    assert "INFO: our own progress note" in err and "a library warning" in err
    assert ("HTTP Request: GET" in err) == verbose, "third-party INFO only with -v"
    assert ("our own debug detail" in err) == verbose
    assert "Starting new HTTPS connection" not in err, "libraries' DEBUG floods even -v"
    assert err.count("our own progress note") == 1


# --- broken pipe, machine-readable output, flag typos ---------------------------------------------

@pytest.mark.parametrize("argv", [["plan"], ["models"], ["doctor", "--format", "json"]])
def test_a_closed_stdout_ends_quietly(argv, tmp_path):
    """`... | head -1` or `| true`: the reader is gone before we write."""
    read, write = os.pipe()
    os.close(read)
    try:
        result = subprocess.run([sys.executable, "-m", "visual_buffet_siglip", *argv], stdout=write,
                                stderr=subprocess.PIPE, text=True, timeout=120,
                                env={**os.environ, "HF_HOME": str(tmp_path)})
    finally:
        os.close(write)
    assert result.returncode == cli.SIGPIPE_EXIT, result.stderr
    assert "error" not in result.stderr.lower() and "Traceback" not in result.stderr
    assert "Exception ignored" not in result.stderr


def test_models_json(hub_cache, capsys):
    assert cli.main(["models", "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [row["id"] for row in rows] == list(REGISTRY)
    by_id = {row["id"]: row for row in rows}
    assert by_id[CACHED]["cached"] is True and sum(row["cached"] for row in rows) == 1
    assert by_id[CACHED]["image_size"] == 224 and by_id[CACHED]["min_vram_gb_fp16"] == 2.0
    assert by_id["google/siglip2-so400m-patch16-naflex"]["image_size"] is None


def test_plan_json_matches_the_planner(capsys):
    from visual_buffet_siglip.config import Settings
    from visual_buffet_siglip.models import model_info
    from visual_buffet_siglip.planner import plan

    spec = "cuda:name=T4,vram_gb=16,cc=7.5"
    assert cli.main(["plan", "--simulate", spec, "--model", CACHED, "--format", "json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    profile = parse_simulation(spec)
    expected = plan(profile, Settings.from_mapping({"model": CACHED}).model_settings, model_info(CACHED))
    assert shown["plan"] == json.loads(json.dumps(expected.to_dict()))
    assert shown["model"]["id"] == CACHED and shown["hardware"]["cuda"][0]["name"] == "T4"
    assert shown["hardware"]["cpu"]["features"] == sorted(profile.cpu.features)


def test_doctor_json(hub_cache, capsys):
    assert cli.main(["doctor", "--model", CACHED, "--format", "json"]) == 0
    checks = json.loads(capsys.readouterr().out)
    assert [check["name"] for check in checks][:3] == ["python", "torch", "transformers"]
    assert all(set(check) == {"status", "name", "detail", "fix"} for check in checks)
    assert all(check["status"] in ("OK", "WARN", "FAIL") for check in checks)


@pytest.mark.parametrize("argv, typo, meant", [
    (["tag", "a.jpg", "--treshold", "0.5"], "--treshold", "--threshold"),
    (["tag", "a.jpg", "--max_tags=3"], "--max_tags", "--max-tags"),
    (["models", "--fromat", "json"], "--fromat", "--format"),
    (["plan", "--simulte", "cpu:cores=2"], "--simulte", "--simulate"),
    (["doctor", "--modle", "x"], "--modle", "--model"),
])
def test_a_mistyped_flag_gets_a_did_you_mean(argv, typo, meant, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert f"unrecognized arguments: {typo}" in err and f"did you mean {meant}?" in err
    assert f"visual-buffet-siglip {argv[0]}" in err, "the subcommand's own usage"


def test_an_unknown_flag_with_no_near_miss_gets_no_guess(capsys):
    with pytest.raises(SystemExit):
        cli.main(["models", "--zzzzzz"])
    assert "did you mean" not in capsys.readouterr().err


def test_quiet_and_verbose_together_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["-q", "models", "-v"])
    assert exit_.value.code == 2 and "cannot be combined" in capsys.readouterr().err


def test_errors_show_a_traceback_only_with_verbose(tmp_path):
    missing = str(tmp_path / "no-such-model")
    plain = run("plan", "--model", missing)
    assert plain.returncode == 2 and missing in plain.stderr and "Traceback" not in plain.stderr
    verbose = run("plan", "--model", missing, "-v")
    assert verbose.returncode == 2 and "Traceback" in verbose.stderr


def test_unexpected_errors_are_reported_without_traceback(monkeypatch, capsys):
    def broken(args):
        raise RuntimeError("something odd")

    monkeypatch.setattr(cli, "cmd_models", broken)
    assert cli.main(["models"]) == 2
    err = capsys.readouterr().err
    assert "unexpected RuntimeError: something odd" in err and "--verbose" in err and "Traceback" not in err


# --- offline ------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv", [
    ["tag", "{image}", "--model", "google/siglip2-base-patch16-224"],
    ["download", "google/siglip2-base-patch16-224"],
    ["plan", "--model", "someone/my-siglip-finetune"],  # not in the registry: plan must read its config
], ids=["tag", "download", "plan"])
def test_offline_uncached_model_fails_fast_with_the_fix(argv, tmp_path):
    image = make_image(tmp_path / "photo.png", (20, 20))
    argv = [arg.replace("{image}", str(image)) for arg in argv]
    model = argv[-1]
    result = run(*argv, env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "empty-hf-home")}, timeout=90)
    assert result.returncode == 2, result.stderr
    assert f"'{model}'" in result.stderr and "HF_HUB_OFFLINE" in result.stderr
    assert "Traceback" not in result.stderr
    if argv[0] != "download":
        assert f"visual-buffet-siglip download {model}" in result.stderr
