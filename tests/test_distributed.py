"""Ray Data batch tagging gives the local tagger's records, loads the model once per actor, keeps bad files as rows.

One local Ray instance (2 CPUs) serves the whole module. A worker setup hook
counts model loads across processes: every `from_pretrained` of a model in a
Ray worker leaves a marker file named after its process.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

import pytest
from conftest import make_image, make_settings

from visual_buffet_siglip import cli
from visual_buffet_siglip.config import Settings
from visual_buffet_siglip.errors import ConfigError
from visual_buffet_siglip.distributed import (actor_settings, in_input_order, plan_actors, record_to_row,
                                              result_schema, row_to_record, tag_dataset)
from visual_buffet_siglip.engine import SiglipTagger

LOAD_MARKS = "VBS_TEST_MODEL_LOAD_MARKS"
TOLERANCE = 1e-6


def _count_model_loads() -> None:
    """Ray worker setup hook: each model load in this process drops a marker file.

    It wraps the loader before the engine imports it (the hook runs first in a
    fresh worker) and without importing torch, so idle workers stay cheap.
    """
    from visual_buffet_siglip import models

    original = models.load

    def counted(*args, **kwargs):
        fd, _ = tempfile.mkstemp(prefix=f"{os.getpid()}-", dir=os.environ[LOAD_MARKS])
        os.close(fd)
        return original(*args, **kwargs)

    models.load = counted


@pytest.fixture(scope="module")
def ray_instance(tmp_path_factory):
    import ray
    import ray.cloudpickle

    marks = tmp_path_factory.mktemp("model-loads")
    os.environ[LOAD_MARKS] = str(marks)  # workers inherit the driver's environment
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import tests/
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"worker_process_setup_hook": _count_model_loads})
    yield marks
    ray.shutdown()


def load_pids(marks: Path) -> list[str]:
    """The process id of every model load so far, one entry per load."""
    return [p.name.split("-")[0] for p in marks.iterdir()]


@pytest.fixture(scope="module")
def folder(tmp_path_factory, images) -> Path:
    """The shared test images plus one corrupt file, in one folder."""
    root = tmp_path_factory.mktemp("archive")
    for i, image in enumerate(images):
        (root / f"img{i}.png").write_bytes(image.read_bytes())
    make_image(root / "wide.png", (300, 40), seed=9)
    (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n but the rest is garbage")
    return root


def assert_same_records(ours: list[dict], local: list[dict]) -> None:
    """Equal records except timing, confidences within TOLERANCE, same labels in the same order."""
    assert len(ours) == len(local)
    for mine, theirs in zip(ours, local):
        assert set(mine) == set(theirs)
        assert {k: v for k, v in mine.items() if k not in ("tags", "inference_time_ms")} == \
            {k: v for k, v in theirs.items() if k not in ("tags", "inference_time_ms")}
        assert [t["label"] for t in mine["tags"]] == [t["label"] for t in theirs["tags"]]
        for a, b in zip(mine["tags"], theirs["tags"]):
            assert abs(a["confidence"] - b["confidence"]) <= TOLERANCE


def test_paths_dataset_equals_local_and_loads_model_once_per_actor(ray_instance, checkpoints, folder):
    import ray

    settings = make_settings(checkpoints["siglip"])
    paths = sorted(str(p) for p in folder.iterdir())
    before = len(load_pids(ray_instance))
    dataset = ray.data.from_items([{"path": p, "asset_id": 100 + i} for i, p in enumerate(paths)])
    rows = tag_dataset(dataset, settings, actors=2, batch_size=1).take_all()

    assert sorted(row["path"] for row in rows) == paths  # nothing lost, nothing doubled
    by_path = {row["path"]: row for row in rows}
    assert [by_path[p]["asset_id"] for p in paths] == [100 + i for i in range(len(paths))]  # passes through
    local = SiglipTagger(settings).tag(paths)
    assert_same_records([row_to_record(by_path[p]) for p in paths], local)
    errors = [row for row in rows if row["error_type"] is not None]
    assert [row["path"] for row in errors] == [str(folder / "corrupt.png")]
    assert errors[0]["error_type"] == "ImageDecodeError" and errors[0]["tags"] == []
    assert all(len(row["tags"]) == len(settings.options.labels) for row in rows if row["error_type"] is None)

    pids = load_pids(ray_instance)[before:]
    assert len(pids) == 2 and len(set(pids)) == 2, f"expected one load in each of 2 actors, got {pids}"


def test_read_binary_files_rows_equal_local_and_errors_name_the_path(ray_instance, checkpoints, folder):
    import ray

    settings = make_settings(checkpoints["siglip2"], confidence_threshold=0.3, max_tags=3)
    dataset = ray.data.read_binary_files(str(folder), include_paths=True)
    rows = tag_dataset(dataset, settings, actors=1, embeddings=True).take_all()

    paths = sorted(row["path"] for row in rows)
    assert paths == sorted(str(p) for p in folder.iterdir())
    by_path = {row["path"]: row for row in rows}
    assert "bytes" not in rows[0]  # the file content is not carried into the results
    local = SiglipTagger(settings).tag(paths)
    assert_same_records([row_to_record(by_path[p]) for p in paths], local)
    corrupt = by_path[str(folder / "corrupt.png")]
    assert corrupt["error_message"].startswith(str(folder / "corrupt.png") + ": ")  # not "<38 bytes>"
    assert corrupt["embedding"] is None
    assert len(by_path[str(folder / "wide.png")]["embedding"]) == 32  # the tiny model's width


def test_cli_ray_writes_the_local_jsonl(ray_instance, checkpoints, folder, tmp_path, monkeypatch):
    monkeypatch.chdir(folder.parent)  # relative names, as a user types them
    odd = tmp_path / os.fsdecode(b"caf\xe9 broken.png")  # a Latin-1 file name: not valid UTF-8
    odd.write_bytes(b"GIF89a truncated")
    common = ["-q", "tag", folder.name, str(odd), "--model", str(checkpoints["siglip"]), "--device", "cpu",
              "--dtype", "float32", "--threshold", "0.2", "--format", "jsonl"]
    assert cli.main(common + ["-o", str(tmp_path / "local.jsonl")]) == 1  # 1: the corrupt file failed
    assert cli.main(common + ["--ray", "--actors", "2", "-o", str(tmp_path / "ray.jsonl")]) == 1

    local = [json.loads(line) for line in (tmp_path / "local.jsonl").read_text().splitlines()]
    ours = [json.loads(line) for line in (tmp_path / "ray.jsonl").read_text().splitlines()]
    assert [r["path"] for r in ours] == [r["path"] for r in local]
    assert ours[0]["path"] == f"{folder.name}/corrupt.png"
    assert ours[0]["error"]["message"].startswith(f"{folder.name}/corrupt.png: ")  # named as the user did
    assert ours[-1]["path"] == str(odd) and ours[-1]["error"]["message"].startswith(str(odd) + ": ")
    assert_same_records(ours, local)


def test_parquet_output_holds_the_jsonl_records(checkpoints, folder, tmp_path):
    import pyarrow.parquet as pq

    common = ["-q", "tag", str(folder), "--model", str(checkpoints["siglip"]), "--device", "cpu",
              "--dtype", "float32", "--threshold", "0.2"]
    cli.main(common + ["--format", "jsonl", "-o", str(tmp_path / "out.jsonl")])
    assert cli.main(common + ["--format", "parquet", "-o", str(tmp_path / "out.parquet")]) == 1
    table = pq.read_table(tmp_path / "out.parquet")
    assert table.schema.equals(result_schema())
    jsonl = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    rows = table.to_pylist()
    assert_same_records([{"path": row["path"], **row_to_record(row)} for row in rows], jsonl)


def test_ray_without_the_extra_names_it(monkeypatch, capsys, folder):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    assert cli.main(["tag", str(folder), "--ray"]) == 2
    assert "install the ray extra: pip install 'visual-buffet-siglip[ray]'" in capsys.readouterr().err


@pytest.mark.parametrize(("flags", "message"), [
    (["--ray", "--report", "r.html"], "--report need the model in this process"),
    (["--actors", "2"], "only apply with --ray"),
    (["--ray", "--actors", "0"], "--actors 0: expected 1 or more"),
    (["--format", "parquet"], "--format parquet needs --output FILE"),
])
def test_cli_usage_errors(capsys, folder, flags, message):
    assert cli.main(["tag", str(folder)] + flags) == 2
    assert message in capsys.readouterr().err


def test_rows_round_trip_to_exact_output_records():
    import pyarrow as pa

    ok = {"tags": [{"label": "dog", "confidence": 0.25}, {"label": "cat", "confidence": 0.125}],
          "model": "m", "version": "0.1.0", "inference_time_ms": 3.5}
    bad = {"tags": [], "error": {"type": "ImageDecodeError", "message": "x.png: cannot decode"}}
    table = pa.Table.from_pylist([record_to_row("a.png", ok), record_to_row("x.png", bad)], schema=result_schema())
    assert [row_to_record(row) for row in table.to_pylist()] == [ok, bad]
    name = os.fsdecode(b"caf\xe9.png")  # not valid UTF-8: a lone surrogate in Python
    odd = record_to_row(name, {"tags": [], "error": {"type": "T", "message": name + ": x"}})
    assert (odd["path"], odd["error_message"]) == ("caf\\xe9.png", "caf\\xe9.png: x")  # valid UTF-8 for Arrow


def test_rows_come_back_in_input_order():
    rows = [{"index": i} for i in (2, 0, 3, 1)]
    assert [row["index"] for row in in_input_order(rows)] == [0, 1, 2, 3]
    with pytest.raises(RuntimeError, match="never row 1"):
        list(in_input_order([{"index": 0}, {"index": 2}]))


def test_actor_plan_for_cpus_gpus_and_explicit_values():
    cpu = plan_actors([{"CPU": 2.0}], "auto")
    assert (cpu.actors, cpu.num_cpus, cpu.num_gpus) == (1, 1.0, 0.0)  # one CPU left for read tasks
    two = plan_actors([{"CPU": 2.0}], "cpu", actors=2)
    assert (two.actors, two.num_cpus) == (2, 0.5)
    big = plan_actors([{"CPU": 33.0}], "auto")
    assert (big.actors, big.num_cpus) == (8, 4.0)
    gpu = plan_actors([{"CPU": 16.0, "GPU": 2.0}, {"CPU": 16.0, "GPU": 2.0}, {"CPU": 8.0}], "auto")
    assert (gpu.actors, gpu.num_cpus, gpu.num_gpus) == (4, 1.0, 1.0)
    forced_cpu = plan_actors([{"CPU": 16.0, "GPU": 2.0}], "cpu")
    assert forced_cpu.num_gpus == 0.0
    explicit = plan_actors([{"CPU": 16.0, "GPU": 2.0}], "auto", actors=3, num_cpus=2, num_gpus=0.5)
    assert (explicit.actors, explicit.num_cpus, explicit.num_gpus) == (3, 2.0, 0.5)
    assert set(explicit.reasons) == {"actors", "num_cpus", "num_gpus"}
    with pytest.raises(ConfigError, match="has no GPUs"):
        plan_actors([{"CPU": 8.0}], "cuda")
    with pytest.raises(ConfigError, match="actors = 0"):
        plan_actors([{"CPU": 8.0}], "auto", actors=0)


def test_actor_settings_need_no_local_file_and_no_gpu_index(checkpoints, tmp_path):
    labels = tmp_path / "labels.txt"
    labels.write_text("# ours\nDog\nred  car\n")
    settings = Settings.from_mapping({"model": str(checkpoints["siglip"]), "labels_file": str(labels),
                                      "device": "cuda:1"})
    mapping = actor_settings(settings)
    assert "labels_file" not in mapping and mapping["labels"] == ["dog", "red car"]
    assert mapping["device"] == "cuda"  # Ray makes the actor's own GPU the only visible one
    labels.unlink()  # an actor on another node has no such file
    assert Settings.from_mapping(mapping).options.labels == settings.options.labels
