"""Every configuration value's type and range, checked once before any rank starts.

Hydra hands over whatever the command line said (`nodes=abc` arrives as the string
"abc"); checked here, a wrong value is one paragraph naming the key, instead of a
traceback from deep inside torch or a rank that "crashed" minutes later. The table
below is the one place that says what each key may hold; checks that involve several
keys (topology, sharing method, optimizer name) live with the code they concern. A data set or
model of the user's own is named by `dataset._target_` or `model._target_` (`builder_for`).
"""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from omegaconf import DictConfig, ListConfig, OmegaConf

from dpsgd.config_help import closest_keys, declared_keys, leaf_keys
from dpsgd.errors import ConfigError

_ABSENT = object()


@dataclass(frozen=True)
class Rule:
    """What one key may hold: a kind, an optional range, and an example for the message."""

    key: str
    kind: str  # "whole", "number", "flag", "text" or "fractions"
    low: float | None = None
    high: float | None = None
    low_open: bool = False  # low itself is not allowed
    high_open: bool = False  # high itself is not allowed
    optional: bool = False  # null is allowed
    example: str = ""

    def problem(self, value) -> str | None:
        """Why `value` does not fit this rule, or None when it does."""
        if value is None:
            return None if self.optional else "must be set"
        if not _KIND_CHECKS[self.kind](value):
            return f"must be {_KIND_WORDS[self.kind]}"
        values = (
            list(value)
            if self.kind == "fractions"
            else [value]
            if self.kind in ("whole", "number")
            else []
        )
        if not all(self._in_range(v) for v in values):
            return f"must be {self._range_words()}"
        return None

    def _in_range(self, value: float) -> bool:
        low_ok = self.low is None or (value > self.low if self.low_open else value >= self.low)
        high_ok = self.high is None or (value < self.high if self.high_open else value <= self.high)
        return low_ok and high_ok

    def _range_words(self) -> str:
        low = "" if self.low is None else f"{'>' if self.low_open else '>='} {self.low:g}"
        high = "" if self.high is None else f"{'<' if self.high_open else '<='} {self.high:g}"
        return " and ".join(part for part in (low, high) if part) or "in range"


def _is_whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


_KIND_CHECKS = {
    "whole": _is_whole,
    "number": _is_number,
    "flag": lambda value: isinstance(value, bool),
    "text": lambda value: isinstance(value, str),
    "fractions": lambda value: (
        isinstance(value, (list, tuple)) and len(value) > 0 and all(map(_is_number, value))
    ),
}
_KIND_WORDS = {
    "whole": "a whole number",
    "number": "a finite number",
    "flag": "true or false",
    "text": "a text value",
    "fractions": "a non-empty list of numbers",
}

RULES = (
    Rule("nodes", "whole", low=1, example="16"),
    Rule("nodes_per_rank", "whole", low=1, example="8"),
    Rule("device", "text", example="cpu"),
    Rule("rounds", "whole", low=1, example="200"),
    Rule("seed", "whole", low=0, example="1"),
    Rule("alpha", "number", low=0, high=1, low_open=True, example="0.1"),
    Rule("data_dir", "text", example="./data"),
    Rule("cache_dir", "text", example=".dpsgd_cache"),
    Rule("threads_per_rank", "whole", low=1, example="1"),
    Rule("resume", "flag", example="true"),
    Rule("train.local_steps", "whole", low=1, example="20"),
    Rule("train.batch_size", "whole", low=1, example="8"),
    Rule("train.full_epochs", "flag", example="false"),
    Rule("train.stop_on_divergence", "flag", example="true"),
    Rule("eval.every", "whole", low=1, example="10"),
    Rule("eval.test_samples", "whole", low=1, optional=True, example="1000"),
    Rule("eval.train_loss", "flag", example="true"),
    Rule("eval.consensus_sketch", "whole", low=0, example="2048"),
    Rule("comm.timeout_s", "number", low=0, low_open=True, example="120"),
    Rule("checkpoint.every", "whole", low=0, example="50"),
    Rule("log.per_node_tb", "flag", example="false"),
    Rule("log.progress", "flag", example="true"),
    Rule("log.progress_every_s", "number", low=0, low_open=True, example="10"),
    Rule("optimizer.name", "text", example="sgd"),
    Rule("optimizer.lr", "number", low=0, example="0.1"),
    Rule("optimizer.momentum", "number", low=0, high=1, high_open=True, example="0.9"),
    Rule("optimizer.weight_decay", "number", low=0, example="0.0"),
    Rule("model._target_", "text", optional=True, example="mypkg.nets.TinyNet"),
    Rule("model.name", "text", example="mf"),
    Rule("model.embedding_dim", "whole", low=1, example="20"),
    Rule("model.regularization", "number", low=0, example="0.05"),
    Rule("model.input_scale", "number", low=0, low_open=True, example="1.0"),
    Rule("topology.kind", "text", example="regular"),
    Rule("topology.degree", "whole", low=1, optional=True, example="4"),
    Rule("topology.rewire_p", "number", low=0, high=1, example="0.1"),
    Rule("topology.path", "text", optional=True, example="graph.txt"),
    Rule("topology.resample_every", "whole", low=1, optional=True, example="10"),
    Rule("sharing.name", "text", example="partial"),
    Rule("sharing.merge", "text", example="fill_own"),
    Rule("sharing.values", "text", example="float16"),
    Rule("sharing.accumulation", "flag", example="true"),
    Rule("sharing.accumulate_averaging_changes", "flag", example="true"),
    Rule("sharing.metadata_cap", "number", low=0, high=1, low_open=True, example="1.0"),
    Rule("sharing.alpha_list", "fractions", low=0, high=1, low_open=True, example="[0.1,0.2,1.0]"),
    Rule("algorithm.name", "text", example="dpsgd"),
    Rule("algorithm.every", "whole", low=1, example="5"),
    Rule("algorithm.fanout", "whole", low=1, example="4"),
    Rule("algorithm.switch_round", "whole", low=1, optional=True, example="100"),
    Rule("algorithm.byte_budget", "whole", low=1, optional=True, example="50000000"),
    Rule("dataset._target_", "text", optional=True, example="mypkg.data.MyRatings"),
    Rule("dataset.name", "text", example="movielens"),
    Rule(
        "dataset.train_fraction",
        "number",
        low=0,
        high=1,
        low_open=True,
        high_open=True,
        example="0.7",
    ),
    Rule("dataset.image_size", "whole", low=1, example="84"),
    Rule("dataset.strict", "flag", example="false"),
    Rule("dataset.split_users", "flag", example="false"),
    Rule("dataset.num_users", "whole", low=1, example="400"),
    Rule("dataset.num_items", "whole", low=1, example="600"),
    Rule("dataset.rank", "whole", low=1, example="5"),
    Rule("dataset.min_ratings", "whole", low=1, example="20"),
    Rule("dataset.max_ratings", "whole", low=1, example="80"),
    Rule("dataset.noise_std", "number", low=0, example="0.3"),
)


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


def alpha_note(cfg: DictConfig) -> str | None:
    """Why `alpha` does not apply to this run's sharing method, or None when it does (or is left at 1).

    `alpha` means something to partial and sub-sampling sharing only. A sweep that crosses
    sharing methods with alphas (`sharing=full,partial alpha=0.1,0.5`) is the usual way to
    compare them, so with the other methods alpha is accepted, said not to apply, and
    recorded so in the run's config.yaml; the report leaves it out of their labels.
    """
    if cfg.sharing.name not in ("full", "random_alpha") or cfg.alpha == 1.0:
        return None
    why = (
        "every message carries the whole model"
        if cfg.sharing.name == "full"
        else "each round's fraction is drawn from sharing.alpha_list"
    )
    return f"alpha={cfg.alpha} does not apply to sharing={cfg.sharing.name} ({why})"


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


def builder_for(
    group: str, registry: Mapping[str, Callable], name: str | None, target: str | None, hint: str
) -> Callable:
    """`registry[name]` (`<group>.name`), or the callable `<group>._target_` names: the user's own, from their
    package, whose `name` is then only the label that logs and summaries show. One paragraph when neither fits."""
    if target is None:
        if name not in registry:
            raise ConfigError(
                f"{group}.name={name!r} is not known; choose one of {list(registry)}{hint}."
            )
        return registry[name]
    if (
        name is None or name in registry
    ):  # dpsgd's own name: its keys and its special cases would apply
        raise ConfigError(
            f"{group}._target_={target} names your own {group}, so {group}.name must be a label of "
            f"your own, not {name!r}: choose `{group}=own {group}._target_={target}` (your keys: "
            f"`+{group}.<key>=<value>`) or an option file of your own (`--config-dir`) with a `name`."
        )
    from hydra.utils import get_method  # here: a config without targets needs no more of Hydra

    logger = logging.getLogger("hydra.utils")
    logger.disabled = True  # it would log the error that this paragraph explains
    try:
        return get_method(target)
    except Exception as error:  # noqa: BLE001 - whatever importing the user's module raised
        reason = " ".join(str(error).split()).removeprefix(
            f"Error loading '{target}': "
        )  # Hydra's own words
        raise ConfigError(
            f"{group}._target_={target} cannot be imported ({reason}). Give "
            "the dotted path of a callable in a package Python finds, e.g. `mypkg.nets.TinyNet` for "
            "class TinyNet in mypkg/nets.py, with mypkg installed (`pip install -e .` in its project) "
            "or its folder on PYTHONPATH."
        ) from None
    finally:
        logger.disabled = False


def call_target(
    group: str,
    target: str,
    built_by: Callable,
    arguments: dict,
    options: dict,
    wanted: str,
    fits: Callable[[object], bool],
):
    """What `built_by`, the callable `<group>._target_` names, returns when called as dpsgd calls its own builders:
    `arguments` in order, then the group's other keys; one paragraph when it does not take them or returns
    something other than `wanted`."""
    call = f"{target}({', '.join([*arguments, *(f'{k}={v!r}' for k, v in options.items())])})"
    try:
        inspect.signature(built_by).bind(*arguments.values(), **options)
    except TypeError as error:
        raise ConfigError(
            f"{group}._target_={target}: dpsgd calls {call}, but {error}. Give it those parameters "
            f"(`**options` takes any keys), or drop the {group} keys it does not take."
        ) from None
    except ValueError:
        pass  # no signature to check: the call itself says what does not fit
    made = built_by(*arguments.values(), **options)
    if not fits(made):
        raise ConfigError(
            f"{group}._target_={target}: {call} returned {type(made).__name__}, but dpsgd needs "
            f'{wanted}. Return one from it (README "Your own model or data set").'
        )
    return made
