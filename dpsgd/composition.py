"""The composition root's side of Hydra: the composed config checked once and turned into `Settings`,
and the callback that claims a run's folder before Hydra writes into it.

Only this module (and train.py) sees Hydra's config objects; every component below it reads the
typed, frozen `dpsgd.settings.Settings`. A wrong value is found here, while it can still be one
paragraph naming the key: its type and range (`dpsgd.settings.RULES`), a key no config file declares,
an interpolation that cannot be resolved, `dataset=own` without its target.
"""

from __future__ import annotations

import os
import sys
from datetime import datetime
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict, read_write

from dpsgd.config_help import closest_keys, declared_keys, leaf_keys
from dpsgd.errors import ConfigError
from dpsgd.launch import EXIT_CONFIG_ERROR
from dpsgd.run_folder import claim
from dpsgd.settings import RULES, Settings

_ABSENT = object()


def settings_from(cfg: DictConfig, choices=None) -> Settings:
    """The run's settings from Hydra's composed config, or a ConfigError naming the first wrong key.

    `choices`: Hydra's runtime choices (group -> option), for refusing keys no config file declares;
    None skips that check (a config composed outside a Hydra app, as tests do).
    """
    if choices is not None:
        check_known_keys(cfg, choices)
    check_values(cfg)
    return Settings.from_tree(OmegaConf.to_container(cfg, resolve=True))


def check_values(cfg: DictConfig) -> None:
    """Raise a ConfigError for the first key whose value has the wrong type or range."""
    for group in (
        "dataset",
        "model",
    ):  # `=own` without its target (dataset=own picks model=own too)
        if group in cfg and OmegaConf.is_missing(cfg[group], "_target_"):
            raise ConfigError(
                f"{group}=own needs {group}._target_, the dotted path of your own {group}'s callable, "
                f"e.g. `{group}._target_=mypkg.{'nets.TinyNet' if group == 'model' else 'data.MyData'}`"
                " (dataset=own picks model=own too: `model=mf` or another model gives dpsgd's own)."
            )
    for rule in RULES:
        value = _select(cfg, rule.key)
        if value is _ABSENT:
            continue  # a key of another group member (e.g. momentum with adam)
        problem = rule.problem(value)
        if problem is not None:
            raise ConfigError(
                f"{rule.key}={value!r} {problem}. Set it on the command line or in its "
                f"config file, e.g. `{rule.key}={rule.example}`."
            )


def check_known_keys(cfg: DictConfig, choices) -> None:
    """Refuse a key no config file declares (`+train.bogus=1`): nothing would read it, so the run
    would silently differ from what the user asked for.

    `choices`: Hydra's runtime choices (group -> option); the keys the primary config and the
    chosen options declare (`dpsgd.config_help.declared_keys`) are the ones components read.
    """
    declared = declared_keys(choices)
    # A `_target_` of the user's own takes the group's keys, whatever they are: its call says which it lacks.
    own = tuple(
        f"{group}."
        for group in ("dataset", "model")
        if OmegaConf.select(cfg, f"{group}._target_") is not None
    )
    undeclared = sorted(
        key
        for key in leaf_keys(OmegaConf.to_container(cfg, resolve=False))
        if key not in declared and not key.startswith(own)
    )
    if undeclared:
        key = undeclared[0]
        value = OmegaConf.select(cfg, key)
        similar = closest_keys(key, declared)
        hint = f"Did you mean {' or '.join(f'`{k}`' for k in similar)}? " if similar else ""
        more = f" (also {', '.join(undeclared[1:])})" if len(undeclared) > 1 else ""
        raise ConfigError(
            f"{key}={value} is not a key of this configuration{more}: no part of dpsgd reads it, so "
            f"the run would silently ignore it. {hint}Drop it from the command line; "
            "`python train.py --help` lists every key with its meaning (a group option's keys come "
            "with the option, e.g. `optimizer=sgd optimizer.momentum=0.9`)."
        )


def _select(cfg: DictConfig, key: str):
    """The value at `key`; a value that cannot be resolved (a bad interpolation) is reported as such."""
    try:
        value = OmegaConf.select(cfg, key, default=_ABSENT, throw_on_missing=True)
        return (
            OmegaConf.to_container(value, resolve=True) if isinstance(value, ListConfig) else value
        )
    except Exception as error:  # noqa: BLE001 - omegaconf raises several kinds for one cause
        raise ConfigError(
            f"{key} cannot be read from the configuration ({error}). Give it a value, "
            f"e.g. `{key}=...` on the command line."
        ) from None


class ClaimRunFolder(Callback):
    """Hydra callback (conf/config.yaml): claim the run folder before Hydra writes into it.

    On resume the folder is the run's own; Hydra's record of this invocation then goes to
    `.hydra/resume-<time>/`, so the run's original `.hydra/overrides.yaml` is never rewritten,
    even by a resume that is refused.
    """

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        if os.environ.get("RANK", "0") != "0":
            return  # under torchrun rank 0 speaks for the run
        run_dir = Path(config.hydra.run.dir)
        if config.get("resume"):
            with read_write(config.hydra), open_dict(config.hydra):
                config.hydra.output_subdir = f".hydra/resume-{datetime.now():%Y-%m-%d_%H-%M-%S-%f}"
            return
        try:
            claim(run_dir)
        except ConfigError as error:
            print(f"dpsgd: {error}", file=sys.stderr, flush=True)
            sys.exit(EXIT_CONFIG_ERROR)
