"""The typed settings: every key of the composed config reaches them with its value, they cannot be
changed after the check, and every rule names a key some config file declares."""

from __future__ import annotations

import dataclasses

import pytest

from dpsgd import config_help
from dpsgd.composition import settings_from
from dpsgd.errors import ConfigError
from dpsgd.settings import GROUP_SETTINGS, RULES, Settings
from tests.conftest import compose_config

PRESETS = (
    "",
    "experiment=movielens_1",
    "experiment=femnist",
    "sharing=partial",
    "algorithm=hybrid",
)


def _leaves(tree: dict, prefix: str = ""):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _read(settings: Settings, path: str):
    """The value at a config path as a component reads it: a typed field, or the group's options."""
    group, _, key = path.rpartition(".")
    part = getattr(settings, group or "run")
    field_names = {f.name for f in dataclasses.fields(part)}
    return getattr(part, key) if key in field_names else part.options[key]


@pytest.mark.parametrize("preset", PRESETS)
def test_every_key_of_the_config_reaches_the_settings_with_its_value(preset):
    cfg = compose_config(*([preset] if preset else []))
    settings = settings_from(cfg)
    leaves = dict(_leaves(settings.resolved))
    assert leaves, "the resolved config is empty"
    for path, value in leaves.items():
        assert _read(settings, path) == value, path
    assert settings.run.nodes == cfg.nodes and settings.train.local_steps == cfg.train.local_steps


def test_settings_cannot_change_after_the_check():
    settings = settings_from(compose_config())
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.run.rounds = 5
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.train = None


def test_a_value_of_the_wrong_type_never_becomes_settings():
    with pytest.raises(ConfigError, match=r"^train.batch_size='eight' must be a whole number"):
        settings_from(compose_config("train.batch_size=eight"))


def test_every_rule_names_a_declared_key_once():
    declared = config_help.every_declared_key()
    keys = [rule.key for rule in RULES]
    assert len(keys) == len(set(keys))
    assert not [key for key in keys if key not in declared]
    assert set(GROUP_SETTINGS) - {""} <= {key.split(".")[0] for key in keys}
