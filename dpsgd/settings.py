"""The run's settings as typed, frozen dataclasses: what every component reads instead of the raw config.

A key's default and meaning live in its YAML file (conf/); its type and range live here, on the
dataclass field that holds it (`key`), so a wrong value (`nodes=abc` arrives as the string "abc") is
one paragraph naming the key, found once at the composition root (`dpsgd.composition`) before any
rank starts, instead of a traceback from deep inside torch. A group whose keys depend on the chosen
option (a sharing method's, a pattern's, a data set's) keeps those in `options`, with their rules
beside the group (`OPTION_RULES`). Checks that involve several keys (topology, pattern, grouping)
are in `dpsgd.checks`. A data set or model of the user's own is named by `dataset._target_` or
`model._target_` (`builder_for`).
"""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

from dpsgd.errors import ConfigError


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


def key(kind: str, example: str, **limits) -> Any:
    """A settings field and the rule for its value: `kind` (see `Rule`), an example for the message,
    and optional limits (low, high, low_open, high_open, optional)."""
    return field(metadata={"rule": (kind, example, limits)})


def _rules_of(cls: type, prefix: str) -> tuple[Rule, ...]:
    """The rules of a settings dataclass's keyed fields and of its OPTION_RULES, with their config paths."""
    keyed = tuple(
        Rule(
            f"{prefix}{f.name}",
            f.metadata["rule"][0],
            example=f.metadata["rule"][1],
            **f.metadata["rule"][2],
        )
        for f in fields(cls)
        if "rule" in f.metadata
    )
    return keyed + tuple(
        Rule(
            f"{prefix}{r.key}",
            r.kind,
            r.low,
            r.high,
            r.low_open,
            r.high_open,
            r.optional,
            r.example,
        )
        for r in getattr(cls, "OPTION_RULES", ())
    )


def _build(cls: type, tree: dict):
    """`cls` from its part of the resolved config: typed fields by name, `options` the rest."""
    typed = {f.name for f in fields(cls)} - {"options"}
    values = {name: tree.get(name) for name in typed}
    if "options" in {f.name for f in fields(cls)}:
        values["options"] = {k: v for k, v in tree.items() if k != "name"}
    return cls(**values)


@dataclass(frozen=True)
class RunSettings:
    """The top-level keys: how many nodes, where, for how long, from which seed and data."""

    nodes: int = key("whole", "16", low=1)
    nodes_per_rank: int = key("whole", "8", low=1)
    device: str = key("text", "cpu")
    rounds: int = key("whole", "200", low=1)
    seed: int = key("whole", "1", low=0)
    alpha: float = key("number", "0.1", low=0, high=1, low_open=True)
    data_dir: str = key("text", "./data")
    cache_dir: str = key("text", ".dpsgd_cache")
    threads_per_rank: int = key("whole", "1", low=1)
    resume: bool = key("flag", "true")


@dataclass(frozen=True)
class TrainSettings:
    local_steps: int = key("whole", "20", low=1)
    batch_size: int = key("whole", "8", low=1)
    full_epochs: bool = key("flag", "false")
    stop_on_divergence: bool = key("flag", "true")


@dataclass(frozen=True)
class EvalSettings:
    every: int = key("whole", "10", low=1)
    test_samples: int | None = key("whole", "1000", low=1, optional=True)
    train_loss: bool = key("flag", "true")
    consensus_sketch: int = key("whole", "2048", low=0)


@dataclass(frozen=True)
class CommSettings:
    timeout_s: float = key("number", "120", low=0, low_open=True)


@dataclass(frozen=True)
class CheckpointSettings:
    every: int = key("whole", "50", low=0)


@dataclass(frozen=True)
class LogSettings:
    per_node_tb: bool = key("flag", "false")
    progress: bool = key("flag", "true")
    progress_every_s: float = key("number", "10", low=0, low_open=True)


@dataclass(frozen=True)
class TopologySettings:
    kind: str = key("text", "regular")
    degree: int | None = key("whole", "4", low=1, optional=True)
    rewire_p: float = key("number", "0.1", low=0, high=1)
    path: str | None = key("text", "graph.txt", optional=True)
    resample_every: int | None = key("whole", "10", low=1, optional=True)


@dataclass(frozen=True)
class OptimizerSettings:
    """`options`: every key but `name` (lr included), as the optimizer's keyword arguments."""

    name: str = key("text", "sgd")
    lr: float = key("number", "0.1", low=0)
    options: dict = field(default_factory=dict)
    OPTION_RULES: ClassVar = (
        Rule("momentum", "number", low=0, high=1, high_open=True, example="0.9"),
        Rule("weight_decay", "number", low=0, example="0.0"),
    )


@dataclass(frozen=True)
class SharingSettings:
    """`options`: every key but `name` (merge included), as the sharing method's keyword arguments."""

    name: str = key("text", "partial")
    merge: str = key("text", "fill_own")
    options: dict = field(default_factory=dict)
    OPTION_RULES: ClassVar = (
        Rule("values", "text", example="float16"),
        Rule("accumulation", "flag", example="true"),
        Rule("accumulate_averaging_changes", "flag", example="true"),
        Rule("metadata_cap", "number", low=0, high=1, low_open=True, example="1.0"),
        Rule("alpha_list", "fractions", low=0, high=1, low_open=True, example="[0.1,0.2,1.0]"),
    )


@dataclass(frozen=True)
class PatternSettings:
    """The communication pattern (`algorithm.*`); `options`: its own keys (`dpsgd.algorithms.patterns`)."""

    name: str = key("text", "dpsgd")
    options: dict = field(default_factory=dict)
    OPTION_RULES: ClassVar = (
        Rule("every", "whole", low=1, example="5"),
        Rule("fanout", "whole", low=1, example="4"),
        Rule("switch_round", "whole", low=1, optional=True, example="100"),
        Rule("byte_budget", "whole", low=1, optional=True, example="50000000"),
    )


@dataclass(frozen=True)
class BuiltByName:
    """A group whose builder is chosen by `name` from a registry, or by a `_target_` of the user's
    own; `options`: every key but `name` (`_target_` included), the builder's keywords."""

    name: str | None = None
    options: dict = field(default_factory=dict)

    @property
    def target(self) -> str | None:
        return self.options.get("_target_")


@dataclass(frozen=True)
class DatasetSettings(BuiltByName):
    OPTION_RULES: ClassVar = (
        Rule("_target_", "text", optional=True, example="mypkg.data.MyRatings"),
        Rule("name", "text", example="movielens"),
        Rule("train_fraction", "number", 0, 1, True, True, example="0.7"),
        Rule("image_size", "whole", low=1, example="84"),
        Rule("strict", "flag", example="false"),
        Rule("split_users", "flag", example="false"),
        Rule("num_users", "whole", low=1, example="400"),
        Rule("num_items", "whole", low=1, example="600"),
        Rule("rank", "whole", low=1, example="5"),
        Rule("min_ratings", "whole", low=1, example="20"),
        Rule("max_ratings", "whole", low=1, example="80"),
        Rule("noise_std", "number", low=0, example="0.3"),
        Rule("partition", "text", optional=True, example="shuffled_users"),
    )


@dataclass(frozen=True)
class ModelSettings(BuiltByName):
    """`regularization` among the options is the loss's (`dpsgd.building.build_task`)."""

    OPTION_RULES: ClassVar = (
        Rule("_target_", "text", optional=True, example="mypkg.nets.TinyNet"),
        Rule("name", "text", example="mf"),
        Rule("embedding_dim", "whole", low=1, example="20"),
        Rule("regularization", "number", low=0, example="0.05"),
        Rule("input_scale", "number", low=0, low_open=True, example="1.0"),
    )


# Config group -> the settings dataclass holding it ("": the top-level keys).
GROUP_SETTINGS: dict[str, type] = {
    "": RunSettings,
    "train": TrainSettings,
    "eval": EvalSettings,
    "comm": CommSettings,
    "checkpoint": CheckpointSettings,
    "log": LogSettings,
    "optimizer": OptimizerSettings,
    "model": ModelSettings,
    "topology": TopologySettings,
    "sharing": SharingSettings,
    "algorithm": PatternSettings,
    "dataset": DatasetSettings,
}
RULES: tuple[Rule, ...] = tuple(
    rule
    for group, cls in GROUP_SETTINGS.items()
    for rule in _rules_of(cls, f"{group}." if group else "")
)


@dataclass(frozen=True)
class Settings:
    """One run's settings, checked (`dpsgd.composition.settings_from`). `resolved`: the whole config as
    plain values, as the run's config.yaml records it and a resume compares it."""

    run: RunSettings
    train: TrainSettings
    eval: EvalSettings
    comm: CommSettings
    checkpoint: CheckpointSettings
    log: LogSettings
    optimizer: OptimizerSettings
    model: ModelSettings
    topology: TopologySettings
    sharing: SharingSettings
    algorithm: PatternSettings
    dataset: DatasetSettings
    resolved: dict

    @classmethod
    def from_tree(cls, tree: dict) -> Settings:
        """Settings from the resolved config (plain dicts and values whose rules have been checked)."""
        parts = {
            ("run" if group == "" else group): _build(kind, tree if group == "" else tree[group])
            for group, kind in GROUP_SETTINGS.items()
        }
        return cls(**parts, resolved=tree)


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
