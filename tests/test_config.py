"""[plugins.siglip] validation: every problem at once, each naming key, value and what is allowed."""

from __future__ import annotations

import pytest

from visual_buffet_siglip.config import (DEFAULT_MODEL, ConfigError, Settings, builtin_vocabulary,
                                         load_settings, settings_from_host_config)


def problems_of(block, **kwargs) -> list[str]:
    with pytest.raises(ConfigError) as info:
        Settings.from_mapping(block, **kwargs)
    return info.value.problems


def test_defaults():
    settings = Settings.from_mapping({})
    model, options = settings.model_settings, settings.options
    assert model.model == DEFAULT_MODEL
    assert options.confidence_threshold == 0.01 and options.max_tags == 50
    assert model.batch_size == "auto" and model.decode == "fast" and settings.enabled
    assert options.labels == builtin_vocabulary() and len(options.labels) >= 1000
    assert Settings() == settings  # a plain Settings() is the defaults, built-in vocabulary included


def test_typo_gets_did_you_mean():
    [problem] = problems_of({"confidence_treshold": 0.02})
    assert "confidence_treshold" in problem and "did you mean 'confidence_threshold'" in problem


def test_all_problems_reported_at_once():
    problems = problems_of({"batch_size": 0, "dtype": "fp16", "max_tags": "10", "confidence_threshold": 1.5,
                            "attention": "flash", "device": "gpu", "enabled": "yes", "max_num_patches": 32})
    assert len(problems) == 8
    joined = "\n".join(problems)
    for key, value in [("batch_size", "0"), ("dtype", "'fp16'"), ("max_tags", "'10'"),
                       ("confidence_threshold", "1.5"), ("attention", "'flash'"), ("device", "'gpu'"),
                       ("enabled", "'yes'"), ("max_num_patches", "32")]:
        assert f"{key} = {value}" in joined
    assert "'float16'" in joined and "from 64 to 1024" in joined  # what is allowed
    assert "did you mean 'flash_attention_2'" in joined


def test_booleans_are_not_integers():
    assert "max_tags = True" in problems_of({"max_tags": True})[0]


def test_enums_are_case_insensitive_and_normalised():
    settings = Settings.from_mapping({"dtype": "BFloat16", "device": "CUDA:1", "quantization": "4BIT"}).model_settings
    assert (settings.dtype, settings.device, settings.quantization) == ("bfloat16", "cuda:1", "4bit")


def test_labels_normalised_and_deduplicated():
    settings = Settings.from_mapping({"labels": ["  Golden   Retriever ", "golden retriever", "DOG", ""]})
    assert settings.options.labels == ("golden retriever", "dog")


def test_labels_file(tmp_path):
    path = tmp_path / "labels.txt"
    path.write_text("# my labels\nCat\n\n  red   car \ncat\n", encoding="utf-8")
    (tmp_path / "siglip.toml").write_text('[plugins.siglip]\nlabels_file = "labels.txt"\n', encoding="utf-8")
    settings = load_settings(tmp_path / "siglip.toml")  # relative to the config file
    assert settings.options.labels == ("cat", "red car")


def test_missing_labels_file_and_both_label_keys(tmp_path):
    problems = problems_of({"labels_file": "nope.txt", "labels": ["a"]}, base_dir=tmp_path)
    assert any("labels_file = 'nope.txt'" in p and "no such file" in p for p in problems)
    assert any("both set" in p for p in problems)


def test_empty_labels_file(tmp_path):
    path = tmp_path / "empty.txt"
    path.write_text("# nothing\n\n", encoding="utf-8")
    assert "holds no labels" in problems_of({"labels_file": str(path)})[0]


def test_model_names():
    problem = problems_of({"model": "google/siglip-base-patch32-224"})[0]
    assert "not a released Google SigLIP checkpoint" in problem and "google/siglip-base-patch16-224" in problem
    assert "google/siglip-large-patch16-384" in problems_of({"model": "google/siglip-large-patch16-512"})[0]
    assert Settings.from_mapping({"model": "someone/siglip-finetune"}).model_settings.model == "someone/siglip-finetune"
    assert "not an existing directory" in problems_of({"model": "/no/such/dir"})[0]


def test_host_config_block_and_disabled():
    settings = settings_from_host_config({"general": {"x": 1}, "plugins": {"siglip": {"enabled": False}}})
    assert settings.enabled is False
    assert settings_from_host_config({}).enabled  # a missing block means defaults
    with pytest.raises(ConfigError, match=r"\[plugins.siglip\] must be a table"):
        settings_from_host_config({"plugins": {"siglip": 3}})


def test_config_file_errors(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[plugins.siglip\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "missing.toml")


def test_replace_validates_and_keeps_the_rest():
    settings = Settings.from_mapping({"max_tags": 7, "labels": ["a", "b"]})
    changed = settings.replace(confidence_threshold=0.2)
    assert changed.options.max_tags == 7 and changed.options.labels == ("a", "b")
    assert changed.options.confidence_threshold == 0.2
    assert changed.model_settings == settings.model_settings
    assert settings.replace(model="google/siglip-base-patch16-224").model_settings != settings.model_settings
    with pytest.raises(ConfigError, match="max_tags"):
        settings.replace(max_tags=0)


def test_settings_are_frozen_and_hashable():
    settings = Settings.from_mapping({"labels": ["x"]})
    with pytest.raises(AttributeError):
        settings.options.max_tags = 3  # type: ignore[misc]
    assert hash(settings) == hash(Settings.from_mapping({"labels": ["x"]}))


def test_xmp_keys_validated():
    settings = Settings.from_mapping({"xmp_max_keywords": 5, "xmp_root": " AI | SigLIP "})
    assert (settings.xmp_max_keywords, settings.xmp_root) == (5, "AI|SigLIP")
    assert Settings.from_mapping({}).xmp_max_keywords == 15 and Settings.from_mapping({"xmp_root": ""}).xmp_root == ""
    problems = problems_of({"xmp_max_keywords": 0, "xmp_root": "AI||x"})
    assert any("xmp_max_keywords = 0" in p for p in problems) and any("no empty parts" in p for p in problems)


def test_other_tools_key_names_get_ours_suggested():
    for key, ours in (("threshold", "confidence_threshold"), ("limit", "max_tags")):
        [problem] = problems_of({key: 1})
        assert f"did you mean {ours!r}" in problem
