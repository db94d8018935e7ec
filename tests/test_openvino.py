"""The OpenVINO backend: reference-exact in float32 on every family, cached conversions, planning."""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from conftest import LABELS, make_image, make_settings, reference_scores
from test_equivalence import scores_from_tags, tags_only

from visual_buffet_siglip import openvino_backend
from visual_buffet_siglip.config import ConfigError, Settings
from visual_buffet_siglip.engine import SiglipTagger
from visual_buffet_siglip.hardware import CpuInfo, CudaDevice, HardwareProfile
from visual_buffet_siglip.models import model_info
from visual_buffet_siglip.openvino_backend import ModelCache, OpenVINOTowers
from visual_buffet_siglip.planner import plan
from visual_buffet_siglip.vocabulary import normalize_labels

LABELS_N = list(normalize_labels(LABELS))
OV = "2026.4.1"
CPU = CpuInfo(model="test CPU", cores=2, ram_gb=16, available_ram_gb=12, features=frozenset({"avx2"}))


@pytest.fixture
def ov_cache(tmp_path, monkeypatch) -> Path:
    """A private, empty conversion cache for one test."""
    monkeypatch.setenv("VISUAL_BUFFET_SIGLIP_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def odd_images(tmp_path_factory) -> list[Path]:
    """More images than the conversion traced, of aspect ratios it never saw (NaFlex spatial shapes)."""
    root = tmp_path_factory.mktemp("odd")
    sizes = [(300, 40), (40, 300), (100, 100), (90, 30), (33, 200), (150, 151)]
    return [make_image(root / f"odd{i}.png", size, seed=10 + i) for i, size in enumerate(sizes)]


def ov_settings(checkpoint: Path, **overrides):
    return make_settings(checkpoint, backend="openvino", **overrides)


@pytest.mark.parametrize("family", ["siglip", "siglip2"])  # NaFlex: test_naflex_exact_at_every_patch_count...
def test_float32_matches_reference(checkpoints, family, images):
    checkpoint = checkpoints[family]
    tagger = SiglipTagger(ov_settings(checkpoint))
    assert tagger.plan.backend == "openvino"
    ours = scores_from_tags(tagger.tag(images), LABELS_N)
    reference = reference_scores(checkpoint, images, LABELS_N)
    assert not np.isnan(ours).any()
    assert np.abs(ours - reference).max() <= 1e-5
    assert reference.std() > 1e-3


def test_float32_embeddings_equal_pytorch(checkpoint, odd_images):
    ov = SiglipTagger(ov_settings(checkpoint, batch_size=4))
    torch_ = SiglipTagger(make_settings(checkpoint, backend="torch", batch_size=4))
    assert torch_.plan.backend == "torch"
    assert np.abs(ov.embed_images(odd_images) - torch_.embed_images(odd_images)).max() <= 1e-6
    assert np.abs(ov.embed_texts(LABELS_N) - torch_.embed_texts(LABELS_N)).max() <= 1e-6


def test_naflex_exact_at_every_patch_count_from_one_conversion(checkpoints, tmp_path, ov_cache):
    """Mixed aspect ratios in each batch (padding masks), grids up- and downsampled, one graph for all.

    The sizes give patch grids 41, 47 and 61 wide, whose row split OpenVINO's division gets wrong
    in-graph (2e-3 off before the position embeddings were computed outside it).
    """
    checkpoint = checkpoints["naflex"]
    sizes = [(150, 16), (66, 30), (61, 16), (108, 16), (40, 300), (100, 100), (27, 16)]
    pictures = [make_image(tmp_path / f"naflex{i}.png", size, seed=30 + i) for i, size in enumerate(sizes)]
    for patches in (64, 256, 1024):
        tagger = SiglipTagger(ov_settings(checkpoint, batch_size=3, max_num_patches=patches, text_cache=False))
        assert tagger.plan.backend == "openvino"
        ours = scores_from_tags(tagger.tag(pictures), LABELS_N)
        reference = reference_scores(checkpoint, pictures, LABELS_N, max_num_patches=patches)
        assert np.abs(ours - reference).max() <= 1e-5, patches
    vision = [p for p in (ov_cache / "openvino").iterdir() if p.name.startswith("vision-") and p.is_dir()]
    assert len(vision) == 1  # dynamic patch counts: converted once


def test_naflex_positions_are_transformers_own_and_cached(checkpoints):
    import torch
    from transformers import AutoModel

    model = AutoModel.from_pretrained(checkpoints["naflex"], dtype=torch.float32).eval()
    embeddings = model.vision_model.embeddings
    positions = openvino_backend.NaFlexPositions(embeddings)
    shapes = torch.tensor([[5, 47], [16, 16], [5, 47]])
    grid = embeddings.position_embedding.weight.reshape(16, 16, -1)
    with torch.no_grad():
        expected = embeddings.resize_positional_embeddings(grid, shapes, max_length=256)
    assert torch.allclose(positions(shapes, 256), expected, rtol=0, atol=1e-7)
    assert len(positions._grids) == 2  # one per distinct grid
    for width in range(1, 2 * positions.LIMIT):
        positions(torch.tensor([[1, width]]), 64)
    assert len(positions._grids) == positions.LIMIT


def test_a_family_without_an_exact_conversion_runs_on_pytorch_with_the_reason(checkpoints, monkeypatch):
    monkeypatch.setattr(openvino_backend, "SUPPORTED_FAMILIES", ("siglip", "siglip2"))
    checkpoint = checkpoints["naflex"]
    tagger = SiglipTagger(make_settings(checkpoint, backend="auto"))
    assert tagger.plan.backend == "torch"
    assert "'naflex'" in tagger.plan.reason("backend")
    with pytest.raises(ConfigError, match="'naflex'"):
        _ = SiglipTagger(ov_settings(checkpoint)).plan


def test_second_tagger_loads_the_cache_without_converting(checkpoints, images, ov_cache, monkeypatch):
    checkpoint = checkpoints["siglip"]
    first = tags_only(SiglipTagger(ov_settings(checkpoint, text_cache=False)).tag(images))
    entries = sorted(p.name for p in (ov_cache / "openvino").iterdir() if p.is_dir())
    assert [name.split("-")[0] for name in entries] == ["text", "vision"]

    def no_conversion(self, tower, names):
        raise AssertionError(f"{tower} converted again")

    monkeypatch.setattr(OpenVINOTowers, "_convert", no_conversion)
    assert tags_only(SiglipTagger(ov_settings(checkpoint, text_cache=False)).tag(images)) == first


def test_corrupt_entry_is_named_and_rebuilt(checkpoints, images, ov_cache, caplog):
    checkpoint = checkpoints["siglip2"]
    expected = tags_only(SiglipTagger(ov_settings(checkpoint, text_cache=False)).tag(images))
    vision = next(p for p in (ov_cache / "openvino").iterdir() if p.name.startswith("vision-") and p.is_dir())
    weights = vision / "model.bin"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # a truncated copy
    with caplog.at_level(logging.WARNING):
        again = tags_only(SiglipTagger(ov_settings(checkpoint, text_cache=False)).tag(images))
    assert again == expected
    assert any(str(vision) in r.getMessage() and "model.bin" in r.getMessage() for r in caplog.records)
    assert weights.stat().st_size * 2 > weights.stat().st_size // 2 * 2 + 1  # rebuilt whole
    assert not list((ov_cache / "openvino").glob(".*.tmp"))


def test_concurrent_builders_convert_once(tmp_path):
    import openvino as ov
    import openvino.opset13 as ops

    calls = []

    def build():
        calls.append(1)
        x = ops.parameter([-1, 4], np.float32, name="x")
        return ov.Model([ops.relu(x)], [x], "tiny")

    key = {"tower": "vision", "model": "m"}
    results = []
    threads = [threading.Thread(target=lambda: results.append(ModelCache(tmp_path).get_or_build(key, build)))
               for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1 and len(results) == 4  # separate caches (file locks), one conversion
    compiled = ov.Core().compile_model(results[-1], "CPU")
    assert compiled(np.array([[-1, 2, -3, 4]], np.float32))[0].tolist() == [[0, 2, 0, 4]]


def test_two_models_converting_in_threads_at_once_both_convert(checkpoints, images, ov_cache):
    """torch.jit.trace (under convert_model) is not thread-safe: a host tagging with two models from two
    threads once failed the first trace's check, as the second renamed its modules mid-trace."""
    families = ("siglip", "siglip2")
    taggers = {f: SiglipTagger(ov_settings(checkpoints[f], text_cache=False)) for f in families}
    start = threading.Barrier(len(families))
    results: dict[str, list] = {}

    def tag(family: str) -> None:
        start.wait()
        results[family] = tags_only(taggers[family].tag(images))

    threads = [threading.Thread(target=tag, args=(f,)) for f in families]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for family in families:
        assert results[family] == tags_only(SiglipTagger(ov_settings(checkpoints[family])).tag(images))


def test_unwritable_cache_converts_in_memory(checkpoints, images, tmp_path, monkeypatch, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("VISUAL_BUFFET_SIGLIP_CACHE", str(blocker))
    with caplog.at_level(logging.WARNING):
        records = SiglipTagger(ov_settings(checkpoints["siglip"], text_cache=False)).tag(images)
    assert all(record["tags"] for record in records)
    assert any("not writable" in r.getMessage() for r in caplog.records)


def test_int8_weight_compression_runs_close_to_float32(checkpoints, images, ov_cache, capfd):
    checkpoint = checkpoints["siglip"]
    tagger = SiglipTagger(ov_settings(checkpoint, quantization="8bit"))
    assert tagger.plan.quantization == "8bit" and "NNCF" in tagger.plan.reason("quantization")
    exact = scores_from_tags(SiglipTagger(ov_settings(checkpoint)).tag(images), LABELS_N)
    int8 = scores_from_tags(tagger.tag(images), LABELS_N)
    assert capfd.readouterr().out == ""  # NNCF's tables and progress bar stay off stdout (it carries results)
    assert 0 < np.abs(int8 - exact).max() < 0.05  # compressed (not identical), still close
    names = [p.name for p in (ov_cache / "openvino").iterdir() if p.is_dir()]
    assert len(names) == 4  # int8 entries of their own beside the float32 ones: keyed apart
    assert SiglipTagger(ov_settings(checkpoint, quantization="8bit")).text_cache_key() != \
        SiglipTagger(ov_settings(checkpoint)).text_cache_key()


# --- planning ------------------------------------------------------------------------------------

def _plan(openvino=OV, nncf="3.4.0", cuda=(), **settings):
    profile = HardwareProfile(cpu=CPU, cuda=cuda, openvino=openvino, nncf=nncf, torch_version="2.13",
                              bitsandbytes="0.49.0")
    return plan(profile, Settings.from_mapping(settings).model_settings, model_info("google/siglip2-base-patch16-224"))


def test_auto_picks_openvino_on_cpu_and_says_what_torch_costs():
    chosen = _plan()
    assert chosen.backend == "openvino" and chosen.dtype == "float32"
    assert "PyTorch" in chosen.reason("backend") and "convert" in chosen.reason("backend")
    assert chosen.to_dict()["backend"] == "openvino"


@pytest.mark.parametrize(("settings", "why"), [
    ({"dtype": "float16"}, 'dtype = "float16"'),
    ({"quantization": "4bit"}, "4bit"),
])
def test_auto_falls_back_to_torch_with_the_reason(settings, why):
    chosen = _plan(**settings)
    assert chosen.backend == "torch" and why in chosen.reason("backend")


def test_auto_without_openvino_or_on_gpu_is_torch():
    assert "not installed" in _plan(openvino=None).reason("backend")
    gpu = CudaDevice(index=0, name="A100", total_gb=40, free_gb=39, capability=(8, 0))
    chosen = _plan(cuda=(gpu,))
    assert chosen.backend == "torch" and "CPU only" in chosen.reason("backend")


@pytest.mark.parametrize(("kwargs", "named"), [
    ({"openvino": None}, "openvino is not installed"),
    ({"dtype": "float16"}, 'dtype = "float16"'),
    ({"nncf": None, "quantization": "8bit"}, "needs nncf"),
])
def test_explicit_openvino_that_cannot_run_is_a_config_error(kwargs, named):
    with pytest.raises(ConfigError, match='backend = "openvino"') as info:
        _plan(backend="openvino", **kwargs)
    assert named in str(info.value)


def test_unsupported_family_is_named():
    problem = openvino_backend.unsupported("clip", "cpu", "auto", "none", OV, None)
    assert problem is not None and "'clip'" in problem


def test_backend_setting_is_validated_with_a_suggestion():
    with pytest.raises(ConfigError, match="openvino"):
        Settings.from_mapping({"backend": "openvno"})
    assert Settings.from_mapping({"backend": "torch"}).model_settings.backend == "torch"


def test_label_cache_and_store_identity_record_the_backend(checkpoints):
    from visual_buffet_siglip.store import StoreIdentity

    ov = SiglipTagger(ov_settings(checkpoints["siglip"]))
    torch_ = SiglipTagger(make_settings(checkpoints["siglip"], backend="torch"))
    assert ov.text_cache_key()["backend"] == "openvino" and torch_.text_cache_key()["backend"] == "torch"
    assert StoreIdentity.of(ov).backend == "openvino" and StoreIdentity.of(ov).exact


def test_importing_the_plugin_does_not_import_openvino():
    code = ("import sys, visual_buffet_siglip.plugin, visual_buffet_siglip.hardware as h, "
            "visual_buffet_siglip.planner as p; p.plan(h.detect(), __import__('visual_buffet_siglip').ModelSettings(), "
            "__import__('visual_buffet_siglip.models', fromlist=['x']).model_info('google/siglip-base-patch16-224')); "
            "assert 'openvino' not in sys.modules, 'imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_numpy_normalisation_is_bit_identical_to_the_processor(checkpoints):
    import torch
    from PIL import Image
    from transformers import AutoProcessor

    from visual_buffet_siglip.pixels import fixed_normaliser

    rng = np.random.default_rng(3)
    for family in ("siglip", "siglip2"):
        processor = AutoProcessor.from_pretrained(checkpoints[family])
        normalise = fixed_normaliser(processor)
        size = processor.image_processor.size
        for _ in range(3):
            image = Image.fromarray(rng.integers(0, 256, (size.height, size.width, 3), dtype=np.uint8))
            expected = processor(images=[image], return_tensors="pt")["pixel_values"]
            assert torch.equal(normalise(image), expected), family


def test_a_float32_store_serves_both_backends_and_other_precisions_are_refused(checkpoints, tmp_path):
    import dataclasses
    from types import SimpleNamespace

    from visual_buffet_siglip.store import StoreError, StoreIdentity, check_compatible

    checkpoint = checkpoints["siglip"]
    ov = SiglipTagger(ov_settings(checkpoint))
    torch_ = SiglipTagger(make_settings(checkpoint, backend="torch"))
    written = StoreIdentity.of(ov)
    check_compatible(SimpleNamespace(identity=written, path=tmp_path / "a.store"), torch_)  # interchangeable
    bf16 = dataclasses.replace(written, dtype="bfloat16")
    with pytest.raises(StoreError, match="--backend openvino") as info:
        check_compatible(SimpleNamespace(identity=bf16, path=tmp_path / "b.store"), torch_)
    assert "--dtype bfloat16" in str(info.value)
    old_header = {k: v for k, v in dataclasses.asdict(written).items() if k != "backend"}
    assert StoreIdentity.from_dict(old_header).backend == "torch"  # stores from before the backend existed
