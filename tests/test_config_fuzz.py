"""Config fuzzing: any `[plugins.siglip]` mapping validates or raises ConfigError naming the key; nothing else."""

from __future__ import annotations

import datetime as dt

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from visual_buffet_siglip import plugin
from visual_buffet_siglip.config import KEYS, ConfigError, Settings, settings_from_host_config

FUZZ = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# What TOML (and a host building configs in code) can produce, plus None and nesting.
scalars = st.one_of(
    st.booleans(), st.integers(), st.integers(-3, 2000), st.floats(), st.floats(-1, 2), st.text(max_size=20),
    st.datetimes(), st.dates(), st.times(), st.none(),
    st.sampled_from(["auto", "AUTO", "cpu", "cuda", "cuda:1", "cuda:x", "mps", "fast", "exact", "none", "8bit",
                     "4bit", "float16", "bf16", "sdpa", "flash", "eager", "true", "0.01", "", " ", "\x00", "~",
                     "~nobody-here/x", "~/nowhere/labels.txt", "/", ".", "..", "a/b", "a/b/c", "owner/",
                     "google/siglip2-base-patch16-224", "google/siglip-base-patch32-224",
                     "google/siglip-large-patch16-512", "GOOGLE/SIGLIP-BASE-PATCH16-224", "x" * 300]),
)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=8)


def typo(key: str) -> str:
    return key[:-1] if len(key) > 3 else key + "s"


keys = st.one_of(st.sampled_from(KEYS), st.sampled_from(KEYS).map(typo), st.sampled_from(KEYS).map(str.upper),
                 st.text(max_size=12), st.integers(), st.none())
blocks = st.dictionaries(keys, values, max_size=6)


def named(key, message: str) -> bool:
    text = repr(key)
    return (isinstance(key, str) and key in message) or text[:60] in message


def validate(block):
    """The Settings, or the ConfigError; any other exception fails the test."""
    try:
        return Settings.from_mapping(block)
    except ConfigError as exc:
        assert str(exc) and exc.problems and all(isinstance(p, str) and p for p in exc.problems)
        return exc


@FUZZ
@given(blocks)
def test_any_block_validates_or_raises_config_error_naming_every_bad_key(block):
    outcome = validate(block)
    alone = {key: validate({key: value}) for key, value in block.items()}
    bad = [key for key, result in alone.items() if isinstance(result, ConfigError)]
    if isinstance(outcome, Settings):
        assert not bad
        assert outcome == Settings.from_mapping(outcome.to_mapping()), "valid settings round-trip"
        return
    message = str(outcome)
    for key in bad:  # every problem is reported at once, each naming its key
        assert named(key, message), (key, message)
    if not bad:  # only a combination can be wrong
        assert "labels" in message and "labels_file" in message, message


@FUZZ
@given(st.one_of(values, st.dictionaries(st.sampled_from(["plugins", "other"]),
                                         st.one_of(values, st.dictionaries(st.sampled_from(["siglip", "ram"]),
                                                                           st.one_of(values, blocks))))))
def test_whole_host_configs_never_raise_anything_else(config):
    try:
        settings_from_host_config(config)
    except ConfigError as exc:
        assert any(where in str(exc) for where in ("host config", "[plugins", " = ", "unknown key")), str(exc)
    problems = plugin.visual_buffet_validate_config(config=config)
    assert isinstance(problems, list) and all(isinstance(p, str) and p for p in problems)


def test_examples_the_fuzzer_found():
    """Paths with `~user` for a user that does not exist used to raise RuntimeError from Path.expanduser."""
    for block in ({"model": "~nobody-here/x"}, {"labels_file": "~nobody-here/labels.txt"},
                  {"cache_dir": "~nobody-here/cache"}):
        result = validate(block)
        assert isinstance(result, ConfigError) and next(iter(block)) in str(result)
    assert validate({"dtype": dt.datetime(2024, 1, 1)}).problems[0].startswith("dtype = datetime")
