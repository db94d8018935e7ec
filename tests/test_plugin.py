"""The pluggy contract: discovery through the installed entry point, hooks, cheap import."""

from __future__ import annotations

import json
import subprocess
import sys

import pluggy
import pytest
from conftest import LABELS

import visual_buffet_siglip
from visual_buffet_siglip import hookspecs, plugin


def manager() -> pluggy.PluginManager:
    pm = pluggy.PluginManager("visual_buffet")
    pm.add_hookspecs(hookspecs)
    pm.register(plugin)
    return pm


def host_config(checkpoint, **block):
    return {"general": {"theme": "dark"},
            "plugins": {"siglip": {"model": str(checkpoint), "device": "cpu", "dtype": "float32",
                                   "labels": LABELS, **block}}}


def test_entry_point_discovery_in_a_fresh_interpreter():
    code = """
import json, sys, pluggy
import visual_buffet_siglip.hookspecs as specs
pm = pluggy.PluginManager("visual_buffet")
pm.add_hookspecs(specs)
pm.load_setuptools_entrypoints("visual_buffet")
info = pm.hook.visual_buffet_plugin_info()
print(json.dumps({"names": [name for name, _ in pm.list_name_plugin()], "info": info,
                  "torch": "torch" in sys.modules}))
"""
    out = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                    check=True, timeout=120).stdout)
    assert "siglip" in out["names"]
    [info] = out["info"]
    assert info["name"] == "siglip" and info["version"] == visual_buffet_siglip.__version__
    assert info["provides_confidence"] is True and info["recommended_threshold"] == 0.01
    assert info["defaults"]["model"] == "google/siglip2-so400m-patch14-384"
    assert out["torch"] is False  # discovery and plugin info never import torch


def test_importing_the_plugin_does_not_import_torch():
    code = "import sys, visual_buffet_siglip.plugin; print('torch' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.split() == ["False", "False"]


def test_tag_hook_output_contract(checkpoints, images):
    pm = manager()
    [result] = pm.hook.visual_buffet_tag(images=[str(p) for p in images],
                                         config=host_config(checkpoints["siglip"], max_tags=5))
    assert result["plugin"] == "siglip" and len(result["results"]) == len(images)
    for record in result["results"]:
        assert set(record) == {"tags", "model", "version", "inference_time_ms"}
        assert 0 < len(record["tags"]) <= 5
        confidences = [tag["confidence"] for tag in record["tags"]]
        assert confidences == sorted(confidences, reverse=True)
        assert all(set(tag) == {"label", "confidence"} and tag["confidence"] >= 0.01 for tag in record["tags"])
        assert record["version"] == visual_buffet_siglip.__version__
        assert isinstance(record["inference_time_ms"], float)
    json.dumps(result)  # plain JSON types only


def test_tag_hook_keeps_going_past_a_bad_image(checkpoints, images, tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    paths = [str(images[0]), str(bad), str(images[1])]
    [result] = manager().hook.visual_buffet_tag(images=paths, config=host_config(checkpoints["siglip"]))
    good, broken, good2 = result["results"]
    assert broken["tags"] == [] and broken["error"]["type"] == "ImageDecodeError"
    assert str(bad) in broken["error"]["message"]
    assert good["tags"] and good2["tags"] and "error" not in good


def test_disabled_returns_none(checkpoints, images):
    assert manager().hook.visual_buffet_tag(
        images=[str(images[0])], config=host_config(checkpoints["siglip"], enabled=False)) == []
    assert plugin.visual_buffet_tag(images=[str(images[0])],
                                    config=host_config(checkpoints["siglip"], enabled=False)) is None


def test_validate_config_hook():
    pm = manager()
    assert pm.hook.visual_buffet_validate_config(config={}) == [[]]
    [problems] = pm.hook.visual_buffet_validate_config(
        config={"plugins": {"siglip": {"max_tag": 5, "dtype": "fp8"}}})
    assert len(problems) == 2
    assert any("did you mean 'max_tags'" in p for p in problems) and any("dtype = 'fp8'" in p for p in problems)


def test_tagger_reused_while_model_settings_stay(checkpoints):
    from visual_buffet_siglip.config import settings_from_host_config

    def model_settings(config):
        return settings_from_host_config(config).model_settings

    first = plugin.tagger_for(model_settings(host_config(checkpoints["siglip"])))
    same = plugin.tagger_for(model_settings(host_config(checkpoints["siglip"], max_tags=3,
                                                        confidence_threshold=0.2, labels=["x"])))
    other = plugin.tagger_for(model_settings(host_config(checkpoints["siglip2"])))
    assert first is same and other is not first


def test_invalid_config_raises_from_tag_hook(checkpoints):
    from visual_buffet_siglip import ConfigError

    with pytest.raises(ConfigError, match="max_tags"):
        plugin.visual_buffet_tag(images=[], config=host_config(checkpoints["siglip"], max_tags=0))
