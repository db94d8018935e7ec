"""benchmarks/gpu_check.py in its CPU mode: the same checks as on a GPU, minus what needs CUDA.

Runs in a subprocess, as on the GPU machine, and reads back its JSON and table.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"


def gpu_check(out: Path, *args: str, pythonpath: str = "") -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [pythonpath, str(REPO)])))
    return subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--quick", "--out", str(out), *args],
                          capture_output=True, text=True, timeout=600, env=env, check=False)


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> tuple[dict, str, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("gpu_check")
    proc = gpu_check(out)
    return json.loads((out / "gpu_check.json").read_text()), (out / "gpu_check.md").read_text(), proc


def test_cpu_mode_passes_and_writes_json_and_table(report):
    result, table, proc = report
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert result["ok"] and not result["errors"] and not result["failures"]
    assert result["machine"]["device"] == "cpu" and result["machine"]["cores"] >= 1
    assert set(result["sections"]) == {"equivalence", "half", "attention", "oom", "memory", "planner", "speed"}
    for section in result["sections"].values():
        assert section["rows"] and f"**{section['title']}**" in table
        assert "| " + " | ".join(section["columns"]) + " |" in table
    assert proc.stdout.strip() == table.strip()  # printed as written


def test_cpu_mode_checks_equivalence_on_every_family_and_naflex_sizes(report):
    rows = report[0]["sections"]["equivalence"]["rows"]
    assert {(r["family"], r["max_num_patches"]) for r in rows} == {
        ("siglip", "-"), ("siglip2", "-"), ("naflex", 256), ("naflex", 1024)}
    assert all(r["pass"] and 0 <= r["max_abs"] <= 1e-5 for r in rows)


def test_cpu_mode_measures_half_precision_and_attention(report):
    half = report[0]["sections"]["half"]["rows"]
    assert {(r["family"], r["dtype"]) for r in half} == {(f, d) for f in ("siglip", "siglip2", "naflex")
                                                         for d in ("bfloat16", "float16")}
    assert all(r["finite"] and 0 < r["max_abs"] < 0.05 for r in half)  # measured, not zero: a real half run
    attention = report[0]["sections"]["attention"]["rows"]
    assert all(r["attention"] == "sdpa" and r["pass"] for r in attention) and len(attention) == 3


def test_cpu_mode_halves_the_batch_on_a_simulated_oom_and_loses_no_image(report):
    (row,) = report[0]["sections"]["oom"]["rows"]
    assert row["kind"] == "simulated" and row["embedded"] == row["images"] and row["pass"]
    assert row["batch after"] < row["batch before"]


def test_cpu_mode_prints_predictions_and_the_planner_table(report):
    result = report[0]
    memory = result["sections"]["memory"]["rows"]
    assert all(r["predicted GB"] > 0 and r["measured GB"] is None for r in memory)
    planner = {r["card"]: r for r in result["sections"]["planner"]["rows"]}
    assert planner["4 GB"]["batch"] >= 2  # issue 18: so400m-384 at float16 on a 4 GB card
    assert all(r["predicted peak / free"] <= 0.8 for r in planner.values())
    (speed,) = result["sections"]["speed"]["rows"]
    assert speed["ours img/s"] > 0 and speed["bound img/s"] > 0


def test_cpu_mode_says_what_it_skipped_and_why(report):
    skipped = {s["check"]: s["reason"] for s in report[0]["skipped"]}
    assert "CUDA" in skipped["bitsandbytes"] and "CUDA" in skipped["attention flash_attention_2"]
    assert "Skipped:" in report[1]


def test_a_missing_tokenizer_library_is_a_skip_not_a_crash(tmp_path):
    blocker = tmp_path / "blocked"
    blocker.mkdir()
    (blocker / "sentencepiece.py").write_text("raise ImportError('sentencepiece is not installed (test)')\n")
    proc = gpu_check(tmp_path / "out", "--only", "equivalence", pythonpath=str(blocker))
    result = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert proc.returncode == 0 and result["ok"], proc.stderr[-3000:]
    assert {r["family"] for r in result["sections"]["equivalence"]["rows"]} == {"siglip2", "naflex"}
    assert any(s["check"] == "checkpoint siglip-tiny" and "sentencepiece" in s["reason"] for s in result["skipped"])
