"""Today's Visual Buffet host (the README section of that name), played by the stand-in in tests/standin_host.

install-into-host / --uninstall on a copy of the stand-in checkout, the host's loader
finding our adapter, configure() + tag() one image at a time (no reload, no
re-encoding), settings priority, discovery mode, and the host's own command line.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest
from conftest import LABELS

STANDIN = Path(__file__).parent / "standin_host"
sys.path.insert(0, str(STANDIN / "src"))  # the stand-in's `visual_buffet` package

from visual_buffet.engine import TaggingEngine  # noqa: E402
from visual_buffet.plugins.loader import PluginLoadError, discover_plugins  # noqa: E402
from visual_buffet.plugins.schemas import PluginInfo, TagResult  # noqa: E402

from visual_buffet_siglip import __version__, cli, hostinstall  # noqa: E402
from visual_buffet_siglip.config import DEFAULT_MODEL, ConfigError, Settings, builtin_vocabulary, tomllib  # noqa: E402
from visual_buffet_siglip.engine import SiglipTagger  # noqa: E402
from visual_buffet_siglip.host import MODEL_VARIANTS, SiglipPlugin  # noqa: E402
from visual_buffet_siglip.modelfacts import REGISTRY  # noqa: E402
from visual_buffet_siglip.plugin import tagger_for  # noqa: E402

ROOT_MANIFEST = Path(__file__).parents[1] / "plugin.toml"


# --- fixtures and helpers ----------------------------------------------------------------------

@pytest.fixture
def host(tmp_path) -> Path:
    """A fresh copy of the stand-in checkout, with the host's own plugins/siglip in it."""
    return Path(shutil.copytree(STANDIN, tmp_path / "visual-buffet"))


@pytest.fixture(autouse=True)
def host_config(tmp_path, monkeypatch):
    """Write the host user's config file ($VISUAL_BUFFET_CONFIG); its [plugins.siglip] block from kwargs."""
    path = tmp_path / "host-config.toml"
    monkeypatch.setenv("VISUAL_BUFFET_CONFIG", str(path))

    def write(**block):
        lines = ["[general]", 'theme = "dark"', "", "[plugins.siglip]"]
        lines += [f"{key} = {json.dumps(value)}" for key, value in block.items()]
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        return path

    write()
    return write


def tiny(checkpoint: Path, **extra) -> dict:
    """A [plugins.siglip] block for a tiny test checkpoint on the CPU."""
    return {"model": str(checkpoint), "labels": LABELS, "device": "cpu", "dtype": "float32",
            "text_cache": False, **extra}


@pytest.fixture
def loads(monkeypatch) -> list[str]:
    """Model loads from here on (the shared tagger is reset first)."""
    from visual_buffet_siglip import engine, plugin

    monkeypatch.setattr(plugin, "_taggers", type(plugin._taggers)())
    calls: list[str] = []
    real = engine.load

    def counting(name, plan):
        calls.append(name)
        return real(name, plan)

    monkeypatch.setattr(engine, "load", counting)
    return calls


@pytest.fixture
def embedded(monkeypatch) -> list[int]:
    """Sizes of the vision batches run from here on."""
    sizes: list[int] = []
    real = SiglipTagger._vision_chunk

    def counting(self, chunk):
        sizes.append(len(chunk))
        return real(self, chunk)

    monkeypatch.setattr(SiglipTagger, "_vision_chunk", counting)
    return sizes


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def installed_plugin(host: Path) -> SiglipPlugin:
    hostinstall.install(host)
    plugin = discover_plugins(host / "plugins")["siglip"]
    assert isinstance(plugin, SiglipPlugin)
    return plugin


def as_pairs(result: TagResult) -> list[tuple[str, float]]:
    return [(tag.label, tag.confidence) for tag in result.tags]


# --- install / uninstall -----------------------------------------------------------------------

def test_install_moves_host_plugin_aside_and_host_loads_ours(host, capsys):
    plugins = host / "plugins"
    original = snapshot(plugins / "siglip")
    assert cli.main(["install-into-host", str(host)]) == 0
    out = capsys.readouterr().out
    [backup] = hostinstall.backups(plugins)
    assert backup.name.startswith(".siglip.backup-") and str(backup) in out
    assert snapshot(backup) == original
    init = (plugins / "siglip" / "__init__.py").read_text("utf-8")
    assert init.count("\n") == 1 and init.startswith("from visual_buffet_siglip.host import SiglipPlugin")
    assert (plugins / "siglip" / "plugin.toml").read_bytes() == ROOT_MANIFEST.read_bytes()

    found = discover_plugins(plugins)
    assert set(found) == {"siglip", "ram_plus", "florence_2", "yolo"}
    assert isinstance(found["siglip"], SiglipPlugin)
    # the dot in the backup's name is what hides it: visible, the host would find two "siglip" plugins
    backup.rename(plugins / "siglip-old")
    with pytest.raises(PluginLoadError, match="two plugins are named 'siglip'"):
        discover_plugins(plugins)


def test_repeat_install_keeps_backups_and_uninstall_restores_byte_for_byte(host, capsys):
    plugins = host / "plugins"
    original = snapshot(plugins / "siglip")
    now = datetime(2026, 11, 30, 12, 0, 0)
    older = [plugins / ".siglip.backup-20200101-000000", plugins / ".siglip.backup-20261130-120000"]
    for i, folder in enumerate(older):  # earlier backups, one taken in the very same second
        folder.mkdir()
        (folder / "__init__.py").write_text(f"# older backup {i}\n")

    hostinstall.install(host, now)
    assert hostinstall.install(host, now)[0].startswith("replaced the earlier visual-buffet-siglip install")
    found = hostinstall.backups(plugins)
    assert found[:2] == older and found[2].name == ".siglip.backup-20261130-120000-2" and len(found) == 3
    assert snapshot(found[2]) == original

    assert cli.main(["install-into-host", str(host), "--uninstall"]) == 0
    assert "restored" in capsys.readouterr().out
    assert snapshot(plugins / "siglip") == original
    assert hostinstall.backups(plugins) == older
    assert [(f / "__init__.py").read_text() for f in older] == ["# older backup 0\n", "# older backup 1\n"]

    # what is there now is the host's own plugin, not ours: uninstall must refuse and change nothing
    assert cli.main(["install-into-host", str(host), "--uninstall"]) == 2
    assert "was not written by visual-buffet-siglip" in capsys.readouterr().err
    assert snapshot(plugins / "siglip") == original


def test_install_into_host_without_siglip_and_uninstall_leaves_nothing(host):
    plugins = host / "plugins"
    shutil.rmtree(plugins / "siglip")
    before = sorted(p.name for p in plugins.iterdir())
    hostinstall.install(host)
    assert hostinstall.backups(plugins) == []
    assert "no backup to restore" in hostinstall.uninstall(host)[-1]
    assert sorted(p.name for p in plugins.iterdir()) == before


def test_refuses_a_folder_that_is_not_a_checkout(tmp_path, capsys):
    folder = tmp_path / "not-a-host"
    (folder / "plugins").mkdir(parents=True)
    assert cli.main(["install-into-host", str(folder)]) == 2
    err = capsys.readouterr().err
    assert "not a Visual Buffet checkout" in err and "src/visual_buffet/plugins/base.py" in err
    assert [p.name for p in folder.iterdir()] == ["plugins"] and not any((folder / "plugins").iterdir())


# --- the adapter -------------------------------------------------------------------------------

def test_info_and_manifest_agree_with_settings(host):
    plugin = installed_plugin(host)
    info = plugin.get_info()
    assert isinstance(info, PluginInfo)
    assert (info.name, info.version, info.provides_confidence, info.recommended_threshold) == \
        ("siglip", __version__, True, 0.01)
    assert plugin.is_available()
    manifest = tomllib.loads(ROOT_MANIFEST.read_text("utf-8"))["plugin"]
    assert manifest["entry_point"] == SiglipPlugin.__name__
    defaults, options = manifest["defaults"], Settings().options
    assert defaults["threshold"] == defaults["confidence_threshold"] == options.confidence_threshold
    assert defaults["limit"] == defaults["max_tags"] == options.max_tags
    assert defaults["model"] == DEFAULT_MODEL


def test_configure_then_tag_per_image_matches_batched_without_reloading(host, host_config, checkpoints, images,
                                                                        loads, encoded, embedded, tmp_path):
    host_config(**tiny(checkpoints["siglip"]))
    plugin = installed_plugin(host)
    assert plugin.setup()
    assert len(loads) == 1 and sorted(encoded) == sorted(Settings.from_mapping({"labels": LABELS}).options.labels)
    encoded.clear()
    batched = tagger_for(plugin.settings.model_settings).tag(images, labels=LABELS, threshold=0.0, max_tags=1000)
    embedded.clear()

    for image, reference in zip(images, batched):
        plugin.configure(threshold=0.0, limit=1000)
        result = plugin.tag(image)
        assert isinstance(result, TagResult) and result.model == str(checkpoints["siglip"])
        assert dict(as_pairs(result)) == pytest.approx({t["label"]: t["confidence"] for t in reference["tags"]},
                                                       abs=1e-6)
        assert [c for _, c in as_pairs(result)] == sorted((c for _, c in as_pairs(result)), reverse=True)
    assert sum(embedded) == len(images) and len(embedded) < len(images)  # read ahead: fewer, larger batches

    scores = sorted(t["confidence"] for t in batched[0]["tags"])
    middle = len(scores) // 2
    cut = (scores[middle - 1] + scores[middle]) / 2  # between two scores: batch size moves them by ~1e-7
    plugin.configure(threshold=cut, limit=1000)
    assert {label for label, _ in as_pairs(plugin.tag(images[0]))} == \
        {t["label"] for t in batched[0]["tags"] if t["confidence"] >= cut}
    plugin.configure(threshold=0.0, limit=3)
    assert [label for label, _ in as_pairs(plugin.tag(images[0]))] == [t["label"] for t in batched[0]["tags"][:3]]
    assert len(loads) == 1 and encoded == [] and sum(embedded) == len(images)  # re-tags cost no model call

    missing = plugin.tag(tmp_path / "no-such-photo.jpg")
    assert missing.tags == [] and missing.metadata["error"]["type"] == "ImageNotFoundError"
    assert len(plugin.tag(images[1]).tags) == 3

    plugin.configure(threshold=0.0, limit=3, model=str(checkpoints["siglip2"]))
    assert len(plugin.tag(images[0]).tags) == 3
    assert loads == [str(checkpoints["siglip"]), str(checkpoints["siglip2"])]


def test_settings_priority_configure_over_config_file_over_defaults(host_config, tmp_path):
    assert SiglipPlugin(tmp_path).settings.options.confidence_threshold == 0.01
    host_config(threshold=0.2, limit=7)  # the host's names work in its config file too
    options = SiglipPlugin(tmp_path).settings.options
    assert (options.confidence_threshold, options.max_tags) == (0.2, 7)
    host_config(confidence_threshold=0.3)
    plugin = SiglipPlugin(tmp_path)
    assert plugin.settings.options.confidence_threshold == 0.3
    plugin.configure(threshold=0.5)
    assert plugin.settings.options.confidence_threshold == 0.5
    plugin.configure()  # each call states the settings whole, as the host does
    assert plugin.settings.options.confidence_threshold == 0.3
    # both names in one call (the manifest's defaults list both): the one left at its default yields
    plugin.configure(threshold=0.01, confidence_threshold=0.25, limit=9, max_tags=50)
    assert (plugin.settings.options.confidence_threshold, plugin.settings.options.max_tags) == (0.25, 9)
    plugin.configure(threshold=0.4, confidence_threshold=0.01)
    assert plugin.settings.options.confidence_threshold == 0.4
    plugin.configure(enabled=False)
    skipped = plugin.tag(tmp_path / "photo.jpg")
    assert skipped.tags == [] and "enabled = false" in skipped.metadata["skipped"]


def test_host_names_map_to_our_settings(tmp_path, caplog):
    plugin = SiglipPlugin(tmp_path)
    assert set(MODEL_VARIANTS) == {"base", "large", "so400m", "giant", "v2-base", "v2-so400m", "v2-naflex",
                                   "v2-giant"}
    for variant, model in MODEL_VARIANTS.items():
        plugin.configure(model_variant=variant, model=DEFAULT_MODEL)
        assert plugin.settings.model_settings.model == model and model in REGISTRY
    assert REGISTRY[MODEL_VARIANTS["v2-naflex"]].family == "naflex"
    with pytest.raises(ConfigError, match="model_variant = 'huge'.*v2-naflex"):
        plugin.configure(model_variant="huge")

    plugin.configure(custom_vocabulary=["Sky", " sky ", "Old  House"])
    assert plugin.settings.options.labels == ("sky", "old house")
    plugin.configure(custom_vocabulary=[])
    assert plugin.settings.options.labels == builtin_vocabulary()

    with caplog.at_level(logging.WARNING):
        plugin.configure(limt=5, quality="high", use_gpu="auto")  # the host's own keys must not fail
    assert "'limt'" in caplog.text and "did you mean 'limit'" in caplog.text
    assert "'quality'" in caplog.text and "'use_gpu'" in caplog.text
    with pytest.raises(ConfigError, match=r"configure\(\): max_tags = 0"):
        plugin.configure(limit=0)
    with pytest.raises(ConfigError, match="discovery_mode = 'yes'"):
        plugin.configure(discovery_mode="yes")


def test_setup_fails_with_a_reason_not_an_exception(host_config, tmp_path, loads, caplog):
    host_config(model="google/siglip2-base-patch16-224")  # not in the (offline, empty) hub cache
    with caplog.at_level(logging.ERROR):
        assert SiglipPlugin(tmp_path).setup() is False
    assert "visual-buffet-siglip download google/siglip2-base-patch16-224" in caplog.text
    caplog.clear()
    host_config(max_tags="many")
    with caplog.at_level(logging.ERROR):
        assert SiglipPlugin(tmp_path).setup() is False
    assert "host-config.toml [plugins.siglip]: max_tags = 'many'" in caplog.text


# --- discovery mode ----------------------------------------------------------------------------

def test_discovery_mode_scores_candidates_from_other_plugins(host, host_config, checkpoints, images, loads,
                                                             encoded, caplog):
    host_config(**tiny(checkpoints["siglip"], labels=["mountain", "dog"]))
    hostinstall.install(host)
    engine = TaggingEngine(host / "plugins")  # hands ram_plus, florence_2 and yolo to "siglip"
    options = {"threshold": 0.0, "limit": 1000, "discovery_mode": True, "use_ram_plus": True,
               "use_florence_2": True}

    with caplog.at_level(logging.WARNING):
        first = engine.tag_image(images[0], ["siglip"], {"siglip": options})["siglip"]
    assert {label for label, _ in as_pairs(first)} == {"mountain", "dog", "golden retriever", "beach", "red car",
                                                       "sailboat"}
    assert first.metadata["discovery"] == {"ram_plus": {"candidates": 3}, "florence_2": {"candidates": 3},
                                           "yolo": {"error": "RuntimeError: yolo weights not found"}}
    assert "plugin 'yolo' failed" in caplog.text
    alone = tagger_for(engine.plugins["siglip"].settings.model_settings).tag([images[0]], labels=["sailboat"],
                                                                             threshold=0.0)
    assert dict(as_pairs(first))["sailboat"] == pytest.approx(alone[0]["tags"][0]["confidence"], abs=1e-6)

    encoded.clear()
    engine.tag_image(images[1], ["siglip"], {"siglip": options})
    assert encoded == []  # every candidate was seen before: no text encoding at all

    without_florence = engine.tag_image(images[1], ["siglip"],
                                        {"siglip": {**options, "use_florence_2": False}})["siglip"]
    assert {label for label, _ in as_pairs(without_florence)} == {"mountain", "dog", "golden retriever", "beach"}
    plain = engine.tag_image(images[1], ["siglip"], {"siglip": {**options, "discovery_mode": False}})["siglip"]
    assert {label for label, _ in as_pairs(plain)} == {"mountain", "dog"} and "discovery" not in plain.metadata
    assert len(loads) == 1


# --- the host's own command line ---------------------------------------------------------------

def test_host_command_line_uses_our_plugin_after_install(host, host_config, checkpoints, images):
    config = host_config(**tiny(checkpoints["siglip"]))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(host / "src"), os.environ.get("PYTHONPATH", "")]),
           "VISUAL_BUFFET_CONFIG": str(config)}
    command = [sys.executable, "-m", "visual_buffet", "tag", str(images[0]), "-p", "siglip", "--limit", "3",
               "--threshold", "0"]

    def host_tags() -> dict:
        done = subprocess.run(command, cwd=host, env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)[str(images[0])]["siglip"]

    assert host_tags()["model"] == "host"  # the host's own plugin, before
    assert cli.main(["install-into-host", str(host)]) == 0
    ours = host_tags()
    assert ours["model"] == str(checkpoints["siglip"]) and ours["version"] == __version__
    assert len(ours["tags"]) == 3 and all(set(t) == {"label", "confidence"} for t in ours["tags"])


def test_uninstall_deletes_only_the_files_it_wrote(host, capsys):
    plugins = host / "plugins"
    original = snapshot(plugins / "siglip")
    hostinstall.install(host)
    notes = plugins / "siglip" / "my-notes.txt"
    notes.write_text("settings I tried")
    assert cli.main(["install-into-host", str(host), "--uninstall"]) == 2
    err = capsys.readouterr().err
    assert "my-notes.txt" in err and "nothing was changed" in err
    assert notes.read_text() == "settings I tried" and (plugins / "siglip" / "__init__.py").is_file()
    assert len(hostinstall.backups(plugins)) == 1

    notes.unlink()
    (plugins / "siglip" / "__pycache__").mkdir()  # what the host's import of our __init__.py leaves
    (plugins / "siglip" / "__pycache__" / "__init__.cpython-311.pyc").write_bytes(b"\0")
    assert cli.main(["install-into-host", str(host), "--uninstall"]) == 0
    assert snapshot(plugins / "siglip") == original


def test_undo_hint_is_quoted_for_a_path_with_spaces(tmp_path, capsys):
    import shlex

    host = Path(shutil.copytree(STANDIN, tmp_path / "my photos" / "visual buffet"))
    assert cli.main(["install-into-host", str(host)]) == 0
    out = capsys.readouterr().out
    hint = out[out.index("Undo: ") + len("Undo: "):].split("\n")[0]
    assert shlex.split(hint) == ["visual-buffet-siglip", "install-into-host", str(host), "--uninstall"]
