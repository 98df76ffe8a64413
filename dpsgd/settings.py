"""Every configuration value's type and range, checked once before any rank starts.

Hydra hands over whatever the command line said (`nodes=abc` arrives as the string
"abc"); checked here, a wrong value is one paragraph naming the key, instead of a
traceback from deep inside torch or a rank that "crashed" minutes later. The table
below is the one place that says what each key may hold; checks that involve several
keys (topology, sharing method, optimizer name) live with the code they concern.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from omegaconf import DictConfig, ListConfig, OmegaConf

from dpsgd.config_help import closest_keys, declared_keys, leaf_keys
from dpsgd.errors import ConfigError

_ABSENT = object()


@dataclass(frozen=True)
class Rule:
    """What one key may hold: a kind, an optional range, and an example for the message."""

    key: str
    kind: str                  # "whole", "number", "flag", "text" or "fractions"
    low: float | None = None
    high: float | None = None
    low_open: bool = False     # low itself is not allowed
    high_open: bool = False    # high itself is not allowed
    optional: bool = False     # null is allowed
    example: str = ""

    def problem(self, value) -> str | None:
        """Why `value` does not fit this rule, or None when it does."""
        if value is None:
            return None if self.optional else "must be set"
        if not _KIND_CHECKS[self.kind](value):
            return f"must be {_KIND_WORDS[self.kind]}"
        values = list(value) if self.kind == "fractions" else [value] if self.kind in ("whole", "number") else []
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
    "fractions": lambda value: isinstance(value, (list, tuple)) and len(value) > 0 and all(map(_is_number, value)),
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
    Rule("dataset.name", "text", example="movielens"),
    Rule("dataset.train_fraction", "number", low=0, high=1, low_open=True, high_open=True, example="0.7"),
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
    for rule in RULES:
        value = _select(cfg, rule.key)
        if value is _ABSENT:
            continue  # a key of another group member (e.g. momentum with adam)
        problem = rule.problem(value)
        if problem is not None:
            raise ConfigError(f"{rule.key}={value!r} {problem}. Set it on the command line or in its "
                              f"config file, e.g. `{rule.key}={rule.example}`.")


def alpha_note(cfg: DictConfig) -> str | None:
    """Why `alpha` does not apply to this run's sharing method, or None when it does (or is left at 1).

    `alpha` means something to partial and sub-sampling sharing only. A sweep that crosses
    sharing methods with alphas (`sharing=full,partial alpha=0.1,0.5`) is the usual way to
    compare them, so with the other methods alpha is accepted, said not to apply, and
    recorded so in the run's config.yaml; the report leaves it out of their labels.
    """
    if cfg.sharing.name not in ("full", "random_alpha") or cfg.alpha == 1.0:
        return None
    why = ("every message carries the whole model" if cfg.sharing.name == "full"
           else "each round's fraction is drawn from sharing.alpha_list")
    return f"alpha={cfg.alpha} does not apply to sharing={cfg.sharing.name} ({why})"


def check_known_keys(cfg: DictConfig, choices) -> None:
    """Refuse a key no config file declares (`+train.bogus=1`): nothing would read it, so the run
    would silently differ from what the user asked for.

    `choices`: Hydra's runtime choices (group -> option); the keys the primary config and the
    chosen options declare (`dpsgd.config_help.declared_keys`) are the ones components read.
    """
    declared = declared_keys(choices)
    undeclared = sorted(key for key in leaf_keys(OmegaConf.to_container(cfg, resolve=False)) if key not in declared)
    if undeclared:
        key = undeclared[0]
        value = OmegaConf.select(cfg, key)
        similar = closest_keys(key, declared)
        hint = f"Did you mean {' or '.join(f'`{k}`' for k in similar)}? " if similar else ""
        more = f" (also {', '.join(undeclared[1:])})" if len(undeclared) > 1 else ""
        raise ConfigError(f"{key}={value} is not a key of this configuration{more}: no part of dpsgd reads it, so "
                          f"the run would silently ignore it. {hint}Drop it from the command line; "
                          "`python train.py --help` lists every key with its meaning (a group option's keys come "
                          "with the option, e.g. `optimizer=sgd optimizer.momentum=0.9`).")


def _select(cfg: DictConfig, key: str):
    """The value at `key`; a value that cannot be resolved (a bad interpolation) is reported as such."""
    try:
        value = OmegaConf.select(cfg, key, default=_ABSENT, throw_on_missing=True)
        return OmegaConf.to_container(value, resolve=True) if isinstance(value, ListConfig) else value
    except Exception as error:  # noqa: BLE001 - omegaconf raises several kinds for one cause
        raise ConfigError(f"{key} cannot be read from the configuration ({error}). Give it a value, "
                          f"e.g. `{key}=...` on the command line.") from None
