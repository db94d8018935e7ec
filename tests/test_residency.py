"""Only the vision tower lives on the accelerator; the text tower visits it to encode missing labels.

No accelerator here: placement is checked on the meta device standing in for one
(tensors there have a device but no data), and the text tower's trips through
its `.to` calls; the engine's use of both through a recording stand-in.
"""

from __future__ import annotations

import pytest
import torch
from conftest import LABELS, make_settings

from visual_buffet_siglip import engine, residency
from visual_buffet_siglip.plan import Plan


def _devices(module: torch.nn.Module) -> set[str]:
    return {p.device.type for p in module.parameters()}


@pytest.fixture
def model(checkpoints):
    from transformers import AutoModel

    return AutoModel.from_pretrained(checkpoints["siglip"], dtype=torch.float32).eval()


def test_place_puts_only_the_vision_tower_on_the_accelerator(model):
    text_before = {n: p.clone() for n, p in model.text_model.named_parameters()}
    residency.place(model, Plan("meta", "float32", "sdpa", 4))
    assert _devices(model.vision_model) == {"meta"}
    assert model.logit_scale.device.type == model.logit_bias.device.type == "meta"
    assert _devices(model.text_model) == {"cpu"}  # never visited the device
    assert "text_model" in dict(model.named_children())  # still a registered child
    assert all(torch.equal(p, text_before[n]) for n, p in model.text_model.named_parameters())


def test_place_leaves_quantized_models_where_bitsandbytes_put_them(model):
    moved = []
    model.to = lambda *a, **k: moved.append(a)  # bitsandbytes models refuse .to()
    residency.place(model, Plan("cuda:0", "float16", "sdpa", 4, quantization="8bit"))
    assert moved == []


class Trips:
    """Records where the text tower is sent, without moving it (no accelerator here)."""

    def __init__(self, module: torch.nn.Module):
        self.targets: list[str] = []
        module.to = self  # instance attribute: only this module's .to is recorded

    def __call__(self, device, *args, **kwargs):
        self.targets.append(str(torch.device(device)))


def test_text_tower_visits_the_device_and_returns(model):
    trips = Trips(model.text_model)
    with residency.text_tower_on(model, "cuda:0"):
        assert trips.targets == ["cuda:0"]
    assert trips.targets == ["cuda:0", "cpu"]


def test_text_tower_returns_even_when_encoding_fails(model):
    trips = Trips(model.text_model)
    with pytest.raises(RuntimeError), residency.text_tower_on(model, "mps"):
        raise RuntimeError("encoding failed")
    assert trips.targets == ["mps", "cpu"]


def test_text_tower_already_there_does_not_move(model):
    trips = Trips(model.text_model)
    with residency.text_tower_on(model, "cpu"):
        pass
    assert trips.targets == []


def test_engine_moves_the_text_tower_only_for_labels_missing_from_the_cache(checkpoints, images, monkeypatch,
                                                                              encoded):
    visits: list[str] = []
    real = residency.text_tower_on

    def recording(model, device):
        visits.append(str(device))
        return real(model, device)

    monkeypatch.setattr(engine, "text_tower_on", recording)
    tagger = engine.SiglipTagger(make_settings(checkpoints["siglip"]))
    first = tagger.tag(images)
    assert visits == [tagger.plan.text_device] == ["cpu"] and len(encoded) == len(LABELS)
    assert [r["tags"] for r in tagger.tag(images)] == [r["tags"] for r in first]  # all cached: no move
    assert len(visits) == 1
    tagger.embed_texts(["a brand new label"])
    assert len(visits) == 2 and encoded[-1] == "a brand new label"
