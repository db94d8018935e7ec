"""One tagger, many threads: the same results as serial use, and the model loads once."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

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
    monkeypatch.setattr(plugin, "_current", None)
    manager = pluggy.PluginManager(hookspecs.PROJECT)
    manager.add_hookspecs(hookspecs)
    manager.register(plugin)
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
