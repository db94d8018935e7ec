"""One tagger, many threads: the same results as serial use, and the model loads once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pluggy
import pytest
from conftest import LABELS, make_settings

import visual_buffet_siglip.engine as engine
from visual_buffet_siglip import hookspecs, plugin
from visual_buffet_siglip.engine import SiglipTagger

THREADS = 4


@pytest.fixture
def count_loads(monkeypatch) -> list[int]:
    """Counts model loads; each load lingers so that every thread asks for the model meanwhile."""
    loads = [0]
    real = engine.load

    def counting_load(*args, **kwargs):
        loads[0] += 1
        time.sleep(0.3)  # widen the window in which a second load could start
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "load", counting_load)
    return loads


def plugin_manager() -> pluggy.PluginManager:
    manager = pluggy.PluginManager(hookspecs.PROJECT)
    manager.add_hookspecs(hookspecs)
    manager.register(plugin)
    return manager


def host_config(checkpoint, **overrides) -> dict:
    block = {"model": str(checkpoint), "labels": LABELS, "confidence_threshold": 0.0, "max_tags": 1000,
             "device": "cpu", "dtype": "float32", "text_cache": False}
    return {"plugins": {"siglip": dict(block, **overrides)}}


def reference(config: dict, paths: list[str]) -> list:
    """What the hook returns for `config`, from a fresh tagger loaded alone."""
    from visual_buffet_siglip.config import settings_from_host_config

    settings = settings_from_host_config(config)
    return tags(SiglipTagger(settings.model_settings).tag(paths, settings.options))


def workloads(images) -> list[list]:
    """Different inputs per thread: orders, subsets, duplicates."""
    return [list(images), list(reversed(images)), [images[1], images[1], images[0]], list(images[2:])]


def tags(records):
    return [record["tags"] for record in records]


def test_one_tagger_from_many_threads_matches_serial(checkpoint, images, count_loads):
    tagger = SiglipTagger(make_settings(checkpoint, batch_size=2))
    jobs = workloads(images) * 2
    with ThreadPoolExecutor(THREADS) as pool:  # first use from all threads at once: the model loads once
        concurrent = list(pool.map(lambda job: tags(tagger.tag(job)), jobs))
    assert count_loads[0] == 1
    serial = [tags(tagger.tag(job)) for job in jobs]
    assert concurrent == serial


def test_concurrent_label_sets_do_not_mix(checkpoints, images):
    tagger = SiglipTagger(make_settings(checkpoints["siglip2"]))
    label_sets = [LABELS[:4], LABELS[4:9], LABELS[::3], LABELS[1::5]] * 2
    with ThreadPoolExecutor(THREADS) as pool:
        concurrent = list(pool.map(lambda labels: tags(tagger.tag(images, labels=labels)), label_sets))
    assert concurrent == [tags(tagger.tag(images, labels=labels)) for labels in label_sets]


def test_pluggy_hook_called_concurrently_loads_the_model_once(checkpoints, images, count_loads, monkeypatch):
    monkeypatch.setattr(plugin, "_taggers", OrderedDict())
    manager = plugin_manager()
    block = {"model": str(checkpoints["naflex"]), "labels": LABELS, "confidence_threshold": 0.0,
             "max_tags": 1000, "device": "cpu", "dtype": "float32", "text_cache": False}
    configs = [{"plugins": {"siglip": dict(block, max_tags=n)}} for n in (1000, 5, 1000, 3)]
    paths = [str(p) for p in images]

    def call(config):
        [result] = manager.hook.visual_buffet_tag(images=paths, config=config)
        return tags(result["results"])

    with ThreadPoolExecutor(THREADS) as pool:
        concurrent = list(pool.map(call, configs))
    assert count_loads[0] == 1, "max_tags does not shape the model: one shared tagger, one load"
    assert concurrent == [call(config) for config in configs]
    assert [len(result[0]) for result in concurrent] == [len(set(map(str.lower, LABELS))), 5,
                                                          len(set(map(str.lower, LABELS))), 3]


@pytest.fixture
def overlapping_loads(monkeypatch) -> list[int]:
    """The most transformers loads seen running at the same time (each lingers to widen the window)."""
    import threading

    import transformers

    lock, running, most = threading.Lock(), [0], [0]
    real = transformers.AutoModel.from_pretrained

    def watched(*args, **kwargs):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        try:
            time.sleep(0.3)
            return real(*args, **kwargs)
        finally:
            with lock:
                running[0] -= 1

    monkeypatch.setattr(transformers.AutoModel, "from_pretrained", watched)
    return most


def test_two_models_from_many_threads_each_get_their_own_weights(checkpoints, images, count_loads,
                                                                 overlapping_loads, monkeypatch):
    """A host alternating between two models from threads: right weights for each, and no reload per call."""
    monkeypatch.setattr(plugin, "_taggers", OrderedDict())
    manager = plugin_manager()
    models = {"A": host_config(checkpoints["siglip"]), "B": host_config(checkpoints["siglip2"])}
    paths = [str(p) for p in images]
    order = ["A", "B"] * 6

    def call(name):
        [result] = manager.hook.visual_buffet_tag(images=paths, config=models[name])
        return tags(result["results"])

    with ThreadPoolExecutor(THREADS) as pool:
        concurrent = list(pool.map(call, order))
    assert count_loads[0] == 2, "each model loads once, however the calls alternate"
    assert overlapping_loads[0] == 1, "transformers' loading is not thread-safe: one load at a time"
    serial = {name: reference(config, paths) for name, config in models.items()}
    assert serial["A"] != serial["B"]
    assert concurrent == [serial[name] for name in order]


def test_the_tagger_cache_keeps_the_most_recent_models(checkpoints, monkeypatch):
    from visual_buffet_siglip.config import settings_from_host_config

    monkeypatch.setattr(plugin, "_taggers", OrderedDict())
    monkeypatch.setattr(plugin, "TAGGERS_KEPT", 2)
    a, b, c = (settings_from_host_config(host_config(checkpoints[f])).model_settings
               for f in ("siglip", "siglip2", "naflex"))
    first_a = plugin.tagger_for(a)
    plugin.tagger_for(b)
    assert plugin.tagger_for(a) is first_a  # A was used last: B is the one dropped next
    plugin.tagger_for(c)
    assert plugin.tagger_for(a) is first_a
    assert len(plugin._taggers) == 2 and b not in plugin._taggers


COLD_START = """
import json, sys
from concurrent.futures import ThreadPoolExecutor
import pluggy
from visual_buffet_siglip import hookspecs, plugin
manager = pluggy.PluginManager(hookspecs.PROJECT)
manager.add_hookspecs(hookspecs)
manager.register(plugin)
configs, paths = json.loads(sys.argv[1]), json.loads(sys.argv[2])

def call(config):
    try:
        [result] = manager.hook.visual_buffet_tag(images=paths, config=config)
        return [record["tags"] for record in result["results"]]
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"

with ThreadPoolExecutor(4) as pool:  # the first import of transformers and both loads, all at once
    concurrent = list(pool.map(call, configs * 2))
from visual_buffet_siglip.config import settings_from_host_config
from visual_buffet_siglip.engine import SiglipTagger
serial = []
for config in configs:  # the reference: fresh taggers, loaded one at a time
    settings = settings_from_host_config(config)
    records = SiglipTagger(settings.model_settings).tag(paths, settings.options)
    serial.append([record["tags"] for record in records])
print(json.dumps({"concurrent": concurrent, "serial": serial}))
"""


def test_cold_start_loads_from_threads_in_a_fresh_process(checkpoints, images):
    """transformers is first imported by several threads at once (a host's first parallel calls)."""
    configs = [host_config(checkpoints["siglip"]), host_config(checkpoints["naflex"])]
    paths = [str(p) for p in images[:2]]
    result = subprocess.run([sys.executable, "-c", COLD_START, json.dumps(configs), json.dumps(paths)],
                            capture_output=True, text=True, timeout=600,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(
                                [str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])})
    assert result.returncode == 0, result.stderr[-2000:]
    shown = json.loads(result.stdout.splitlines()[-1])
    assert shown["concurrent"] == shown["serial"] * 2
