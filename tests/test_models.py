"""Model registry, name checks, and loading through the same code path users take (offline)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from conftest import make_settings

from visual_buffet_siglip.modelfacts import REGISTRY
from visual_buffet_siglip.models import (ModelLoadError, fingerprint, info_from_config, model_name_problem,
                                         resolve_source)

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def test_registry_covers_the_design_list():
    ids = set(REGISTRY)
    assert len(ids) == 27  # 10 SigLIP, 15 fixed-resolution SigLIP 2, 2 NaFlex
    for res in (224, 256, 384, 512):
        assert f"google/siglip-base-patch16-{res}" in ids and f"google/siglip2-base-patch16-{res}" in ids
    assert {"google/siglip2-base-patch16-naflex", "google/siglip2-so400m-patch16-naflex",
            "google/siglip2-giant-opt-patch16-384", "google/siglip-so400m-patch16-256-i18n"} <= ids
    naflex = [info for info in REGISTRY.values() if info.family == "naflex"]
    assert len(naflex) == 2 and all(info.image_size is None for info in naflex)
    assert REGISTRY["google/siglip-so400m-patch14-384"].patch_size == 14
    assert REGISTRY["google/siglip2-giant-opt-patch16-256"].min_vram_gb_fp16 == 12


@pytest.mark.parametrize("name", ["google/siglip-base-patch32-224", "google/siglip-large-patch16-512",
                                  "google/SigLIP-base-patch16-224", "siglip-base"])
def test_look_alike_ids_are_rejected_with_real_ones(name):
    problem = model_name_problem(name)
    assert problem and "closest real ones: google/" in problem


def test_other_names():
    assert model_name_problem("google/siglip2-so400m-patch14-384") is None
    assert model_name_problem("my-org/siglip-finetuned") is None  # checked when loaded
    assert "neither" in model_name_problem("justaname")


def test_local_directory_checks(tmp_path, checkpoints):
    assert model_name_problem(str(checkpoints["siglip"])) is None
    with pytest.raises(ModelLoadError, match="no config.json"):
        resolve_source(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "clip"}))
    with pytest.raises(ModelLoadError, match="is a clip model, not SigLIP"):
        info_from_config(str(tmp_path), {"model_type": "clip"})


def test_unregistered_checkpoint_info(checkpoints):
    from visual_buffet_siglip.models import model_info

    assert model_info(str(checkpoints["naflex"])).family == "naflex"
    info = model_info(str(checkpoints["siglip"]))
    assert info.family == "siglip" and info.image_size == 32 and not info.in_registry


def test_pickle_checkpoints_are_refused(tmp_path, checkpoints):
    from visual_buffet_siglip.engine import SiglipTagger

    folder = tmp_path / "pickled"
    shutil.copytree(checkpoints["siglip"], folder)
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match=r"no \.safetensors weights \(found only pytorch_model.bin\)"):
        SiglipTagger(make_settings(folder)).tag([])


def damaged(tmp_path, checkpoint, how: str):
    folder = tmp_path / how
    shutil.copytree(checkpoint, folder)
    weights = folder / "model.safetensors"
    config = json.loads((folder / "config.json").read_text())
    if how == "truncated":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif how == "reshaped":
        config["vision_config"]["intermediate_size"] = config["vision_config"]["intermediate_size"] + 8
    elif how == "absurd":
        config["vision_config"]["hidden_size"] = 10**7
        config["text_config"]["vocab_size"] = -1
    elif how == "no-tokenizer":
        for name in ("tokenizer.json", "spiece.model", "tokenizer.model"):
            (folder / name).unlink(missing_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("family", ["siglip", "siglip2"])
@pytest.mark.parametrize("how, expected", [
    ("truncated", r"model\.safetensors in '.*truncated' is damaged or truncated"),
    ("reshaped", r"the weights in '.*reshaped' do not fit its config\.json"),
    ("absurd", r"vision_config\.hidden_size = 10000000 .*text_config\.vocab_size = -1"),
    ("no-tokenizer", r"'.*no-tokenizer' has no tokenizer \(none of tokenizer\.json, spiece\.model"),
])
def test_broken_checkpoints_say_what_is_wrong_and_where(tmp_path, checkpoints, family, how, expected):
    from visual_buffet_siglip.engine import SiglipTagger

    folder = damaged(tmp_path, checkpoints[family], how)
    with pytest.raises(ModelLoadError, match=expected) as caught:
        SiglipTagger(make_settings(folder)).tag([])
    assert "model_file or model_proto" not in str(caught.value)


def test_absurd_sizes_are_refused_by_the_planner_too(tmp_path, checkpoints):
    folder = damaged(tmp_path, checkpoints["siglip"], "absurd")
    with pytest.raises(ModelLoadError, match="sizes no SigLIP checkpoint has"):
        info_from_config(str(folder), json.loads((folder / "config.json").read_text()))


def _fake_hub_cache(root, repo_id, checkpoint):
    """The layout huggingface_hub writes: models--org--name/{refs/main, snapshots/<commit>/...}."""
    repo = root / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    shutil.copytree(checkpoint, repo / "snapshots" / COMMIT)


def test_hub_id_loads_from_the_local_cache_without_network(tmp_path, monkeypatch, checkpoints, images):
    from huggingface_hub import constants

    from visual_buffet_siglip.engine import SiglipTagger

    _fake_hub_cache(tmp_path, "someone/siglip-tiny", checkpoints["siglip"])
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    source = resolve_source("someone/siglip-tiny")
    assert source.name == COMMIT and fingerprint(source) == f"hub:{COMMIT}"
    by_id = SiglipTagger(make_settings("someone/siglip-tiny")).tag(images[:2])
    by_dir = SiglipTagger(make_settings(checkpoints["siglip"])).tag(images[:2])
    assert [r["tags"] for r in by_id] == [r["tags"] for r in by_dir]
    assert by_id[0]["model"] == "someone/siglip-tiny"


def test_not_cached_offline_fails_fast_with_a_fix(tmp_path):
    code = ("from visual_buffet_siglip.models import resolve_source\n"
            "resolve_source('google/siglip2-base-patch16-224')\n")
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path), "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode != 0
    assert "'google/siglip2-base-patch16-224' is not in the local Hugging Face cache" in proc.stderr
    assert "visual-buffet-siglip download google/siglip2-base-patch16-224" in proc.stderr
    assert "HF_HUB_OFFLINE is set" in proc.stderr


def test_fingerprint_of_a_directory_changes_with_its_weights(tmp_path, checkpoints):
    folder = tmp_path / "copy"
    shutil.copytree(checkpoints["siglip"], folder)
    before = fingerprint(folder)
    with open(folder / "model.safetensors", "ab") as handle:
        handle.write(b"\0")
    assert fingerprint(folder) != before and before.startswith("dir:")


def test_uncached_model_is_downloaded_once_when_online(tmp_path, monkeypatch, checkpoints):
    import huggingface_hub
    from huggingface_hub import constants

    from visual_buffet_siglip import models

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(models, "_offline", lambda: False)
    calls = []

    def fake_snapshot_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs["allow_patterns"]))
        _fake_hub_cache(tmp_path, repo_id, checkpoints["siglip"])
        return str(tmp_path / ("models--" + repo_id.replace("/", "--")) / "snapshots" / COMMIT)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    first = resolve_source("someone/fresh-siglip")
    second = resolve_source("someone/fresh-siglip")  # now cached: no second download
    assert first == second and first.name == COMMIT and len(calls) == 1
    assert "*.safetensors" in calls[0][1] and not any(p.endswith(".bin") for p in calls[0][1])


def test_failed_download_says_how_to_get_the_model(tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub import constants

    from visual_buffet_siglip import models

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(models, "_offline", lambda: False)

    def no_network(repo_id, **kwargs):
        raise ConnectionError("Name or service not known")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_network)
    with pytest.raises(ModelLoadError) as info:
        resolve_source("google/siglip2-base-patch16-224")
    message = str(info.value)
    assert "not in the local Hugging Face cache" in message and "Name or service not known" in message
    assert "visual-buffet-siglip download google/siglip2-base-patch16-224" in message
