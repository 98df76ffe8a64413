"""What every configuration key means, read from the comments in conf/*.yaml.

The trailing comment of a key in its YAML file is the one place its meaning is written:
`python train.py --help` prints those comments, and `declared_keys` reads the same files
to say which keys the chosen group options declare, so a key no file declares
(`+train.bogus=1`) is refused instead of being silently ignored. Plain text parsing
only (no Hydra, no torch): the help is printed before anything heavy is imported.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import yaml

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
# The config groups of conf/config.yaml's defaults list, in the order --help shows them.
GROUPS = ("dataset", "model", "sharing", "algorithm", "topology", "optimizer", "experiment")
GLOBAL_PACKAGE = "# @package _global_"  # a preset's keys are top-level keys (conf/experiment/)

# What each metric of nodes/<node>.jsonl, summary.json, TensorBoard and the report means.
METRICS = {
    "test_loss": "ratings: RMSE of the node's predictions on its test ratings; images: mean cross-entropy "
    "on the test set",
    "test_acc": "ratings: the share of test ratings predicted exactly, after clipping the prediction to the "
    "rating scale and rounding it to the nearest half star (a 3.7 counts as 3.5); images: accuracy",
    "train_loss": "test_loss's measure over the node's whole train set (eval.train_loss=true)",
    "batch_loss": "mean mini-batch loss of the round's local steps (with the MF regularization for ratings)",
    "bytes_sent": "cumulative bytes a node sent: bytes_sent_data (values) + bytes_sent_meta (headers, indices); "
    "bytes_recv likewise",
    "consensus_distance": "(1/n) sum_i ||x_i - x_mean||^2 over the nodes' models: how far apart averaging "
    "leaves them (estimated from count sketches, eval.consensus_sketch)",
}

_KEY_LINE = re.compile(
    r"^(?P<indent>\s*)(?P<dash>-\s+)?(?P<key>[A-Za-z_][\w]*|override\s+/\w+)\s*:(?P<rest>.*)$"
)


@dataclass(frozen=True)
class KeyDoc:
    """One key of a conf file: its dotted path inside the file, default as written, and comment."""

    key: str
    default: str
    doc: str


@dataclass(frozen=True)
class ConfFile:
    """One conf file: what its leading comment says, its keys, and its defaults list entries."""

    description: str
    keys: tuple[KeyDoc, ...]
    defaults: tuple[KeyDoc, ...]  # `- group: option  # doc` (or `- option` within a group)
    is_global: bool


def _split_comment(text: str) -> tuple[str, str]:
    """'value   # doc' -> ('value', 'doc'); a '#' inside quotes or ${...} is part of the value."""
    depth, quote = 0, None
    for position, char in enumerate(text):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
        elif char == "#" and depth == 0 and (position == 0 or text[position - 1].isspace()):
            return text[:position].strip(), text[position + 1 :].strip()
    return text.strip(), ""


@cache
def read_conf(relative: str) -> ConfFile:
    """Parse conf/<relative> line by line, keeping each key's trailing comment as its doc."""
    lines = (CONF_DIR / relative).read_text().splitlines()
    description: list[str] = []
    keys: list[KeyDoc] = []
    defaults: list[KeyDoc] = []
    stack: list[tuple[int, str]] = []  # (indent, key) of the enclosing mappings
    seen_key = False
    for line in lines:
        stripped = line.strip()
        if not stripped:
            continue
        if stripped.startswith("#"):
            if not seen_key and stripped != GLOBAL_PACKAGE:
                description.append(stripped.lstrip("#").strip())
            continue
        seen_key = True
        indent = len(line) - len(line.lstrip())
        if stripped.startswith("- ") and not _KEY_LINE.match(line):
            value, doc = _split_comment(stripped[2:])  # `- full`: a base option of the same group
            defaults.append(KeyDoc("", value, doc))
            continue
        match = _KEY_LINE.match(line)
        if match is None:
            continue
        value, doc = _split_comment(match["rest"])
        while stack and stack[-1][0] >= indent:
            stack.pop()
        if match["dash"]:
            defaults.append(KeyDoc(match["key"], value, doc))
            continue
        path = ".".join([key for _, key in stack] + [match["key"]])
        if value:
            keys.append(KeyDoc(path, value, doc))
        else:
            stack.append((indent, match["key"]))
            if doc:
                keys.append(
                    KeyDoc(path, "", doc)
                )  # a section's own comment (e.g. hydra.callbacks.*)
    return ConfFile(
        " ".join(description), tuple(keys), tuple(defaults), is_global=GLOBAL_PACKAGE in lines[:1]
    )


def group_options(group: str) -> list[str]:
    """The options of a config group: its YAML files."""
    return sorted(path.stem for path in (CONF_DIR / group).glob("*.yaml"))


def leaf_keys(tree: dict, prefix: str = "") -> set[str]:
    """{'a': {'b': 1}, 'c': [1]} -> {'a.b', 'c'} (a list is one value)."""
    keys: set[str] = set()
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            keys |= leaf_keys(value, f"{prefix}{key}.")
        else:
            keys.add(f"{prefix}{key}")
    return keys


@cache
def _load(relative: str) -> dict:
    return yaml.safe_load((CONF_DIR / relative).read_text()) or {}


def option_keys(group: str, option: str) -> frozenset[str]:
    """The keys `group=option` declares, with those of the options it builds on (partial: full's too)."""
    keys = _file_keys(CONF_DIR / group / f"{option}.yaml", group, (CONF_DIR,))
    assert keys is not None, f"conf/{group}/{option}.yaml builds on an option conf/ lacks"
    return keys


def _find_option(group: str, option: str, roots: tuple[Path, ...]) -> Path | None:
    """The file of `group=option` in the first config folder that has it (Hydra's search order)."""
    return next(
        (
            root / group / f"{option}.yaml"
            for root in roots
            if (root / group / f"{option}.yaml").exists()
        ),
        None,
    )


@cache
def _file_keys(path: Path, group: str, roots: tuple[Path, ...]) -> frozenset[str] | None:
    """The keys an option file declares with those of the options it builds on; None if one cannot be found."""
    text = path.read_text()
    data = yaml.safe_load(text) or {}
    body = {key: value for key, value in data.items() if key != "defaults"}
    prefix = "" if GLOBAL_PACKAGE in text.splitlines()[:1] else f"{group}."
    keys = {prefix + key for key in leaf_keys(body)}
    for entry in data.get("defaults", []):
        if isinstance(entry, str) and entry != "_self_":
            base = _find_option(group, entry, roots)
            base_keys = None if base is None else _file_keys(base, group, roots)
            if base_keys is None:
                return None
            keys |= base_keys
    return frozenset(keys)


class DeclaredKeys(frozenset):
    """Declared keys, plus every key under `unchecked`: the prefixes of groups whose chosen option
    is not a file dpsgd can read (a `pkg://` config source), which are therefore not checked."""

    unchecked: tuple[str, ...] = ()

    def __contains__(self, key: object) -> bool:
        return frozenset.__contains__(self, key) or (
            isinstance(key, str) and key.startswith(self.unchecked)
        )


def config_roots() -> tuple[Path, ...]:
    """The config folders Hydra searches, in its order: conf/ and those added with --config-dir
    (inside a Hydra app; elsewhere conf/ alone)."""
    from hydra.core.hydra_config import HydraConfig  # here: --help runs without Hydra

    if not HydraConfig.initialized():
        return (CONF_DIR,)
    roots = tuple(
        Path(source["path"])
        for source in HydraConfig.get().runtime.config_sources
        if source["schema"] == "file" and source["path"]
    )
    return roots if CONF_DIR in roots else (CONF_DIR, *roots)


def declared_keys(
    choices: Mapping[str, str | None], roots: tuple[Path, ...] | None = None
) -> frozenset[str]:
    """Every key the primary config and the chosen group options declare (Hydra's runtime choices).

    `roots`: the config folders to find an option in (default `config_roots()`), so an option a user
    keeps in their own folder (`--config-dir`) declares its keys too. A group whose option is in none
    of them (a `pkg://` source) is not checked.
    """
    roots = config_roots() if roots is None else roots
    primary = {
        key: value
        for key, value in _load("config.yaml").items()
        if key not in ("defaults", "hydra")
    }
    keys = set(leaf_keys(primary))
    unchecked: list[str] = []
    for group in GROUPS:
        option = choices.get(group)
        if not option:
            continue
        path = _find_option(group, option, roots)
        option_keys_ = None if path is None else _file_keys(path, group, roots)
        if option_keys_ is None:
            unchecked.append(
                "" if group == "experiment" else f"{group}."
            )  # a preset sets top-level keys
        else:
            keys |= option_keys_
    declared = DeclaredKeys(keys)
    declared.unchecked = tuple(unchecked)
    return declared


def every_declared_key() -> frozenset[str]:
    """The keys some option of some group declares: the vocabulary a mistyped key is matched against."""
    keys = set(declared_keys({}, roots=(CONF_DIR,)))
    for group in GROUPS:
        for option in group_options(group):
            keys |= option_keys(group, option)
    return frozenset(keys)


def closest_keys(key: str, known: set[str] | frozenset[str]) -> list[str]:
    """Up to three declared keys that look like `key` (for 'did you mean')."""
    return difflib.get_close_matches(key, sorted(known), n=3, cutoff=0.6)


def help_text() -> str:
    """`python train.py --help`: usage, the groups, every key with its default and meaning, the metrics."""
    primary = read_conf("config.yaml")
    lines = [
        "dpsgd: decentralized learning on torch.distributed (README.md explains the library).",
        "",
        "usage: python train.py [key=value ...] [group=option ...]",
        "       python train.py -m key=a,b ...      a sweep: one run per combination",
        "       torchrun --nproc_per_node N train.py [key=value ...]",
        "       python train.py --cfg job [...]     print the composed config; --hydra-help: Hydra's flags",
        "",
        "Config groups (group=option; the default shown):",
    ]
    for entry in primary.defaults:
        if entry.key in GROUPS:
            lines.append(
                _row(
                    f"{entry.key}={entry.default}",
                    f"{entry.doc} [{', '.join(group_options(entry.key))}]",
                )
            )
    lines += ["", "Keys (key=default):"]
    lines += [
        _row(f"{k.key}={k.default}", k.doc) for k in primary.keys if not k.key.startswith("hydra")
    ]
    lines += [
        _row(
            "hydra.run.dir=<folder>",
            "the run folder (default outputs/<date>/<time>); sweeps: hydra.sweep.dir",
        )
    ]
    for group in GROUPS:
        lines += ["", f"{group}=<option> and its keys:"]
        for option in group_options(group):
            conf = read_conf(f"{group}/{option}.yaml")
            name_doc = next((k.doc for k in conf.keys if k.key == "name" and k.doc), "")
            bases = [
                entry.default
                for entry in conf.defaults
                if not entry.key and entry.default != "_self_"
            ]
            based = (
                f" (and the keys of {group}={', '.join(bases)})"
                if bases and group != "model"
                else ""
            )
            lines.append(f"  {group}={option}: {conf.description or name_doc}{based}".rstrip())
            if group == "experiment":
                continue  # a preset's keys are the keys above, set to the study's values
            prefix = "" if conf.is_global else f"{group}."
            lines += [
                _row(f"{prefix}{k.key}={k.default}", k.doc, indent=4)
                for k in conf.keys
                if k.key != "name"
            ]
    lines += ["", "Metrics (nodes/<node>.jsonl, summary.json, TensorBoard, the report):"]
    lines += [_row(name, meaning) for name, meaning in METRICS.items()]
    return "\n".join(lines)


def _row(left: str, doc: str, indent: int = 2) -> str:
    left = " " * indent + left
    return f"{left:<36} {doc}".rstrip() if len(left) < 36 else f"{left}\n{'':<36} {doc}".rstrip()


def composition_error(error: Exception, argv: list[str]) -> str:
    """One paragraph for a command line Hydra could not compose (an unknown key, group option or
    syntax): what was wrong, the likely fix, and where the keys are listed."""
    from hydra.errors import MissingConfigException, OverrideParseException

    listed = "`python train.py --help` lists every group, option and key with its meaning."
    unknown = re.match(r"Could not override '([^']+)'", str(error))
    if unknown:
        key = unknown[1]
        given = next((arg for arg in argv if arg.lstrip("+~").startswith(f"{key}=")), key)
        owners = [
            f"{group}={option}"
            for group in GROUPS
            for option in group_options(group)
            if key in option_keys(group, option)
            and not read_conf(f"{group}/{option}.yaml").is_global
        ]
        if owners:
            return (
                f"{given}: `{key}` belongs to {' and '.join(owners)}, not to the option chosen in this run, "
                f"so nothing would read it. Choose that option too (e.g. `{owners[0]} {given}`) or drop "
                f"the key. {listed}"
            )
        group = key.split(".")[0]
        if any(arg.lstrip("+").startswith((f"{group}._target_=", f"{group}=own")) for arg in argv):
            return (
                f"{given}: `{key}` is a key of your own {group} (`{group}._target_`), which no config file "
                f"declares: add it with a +, `+{given}`, or declare it in an option file of your own "
                f"(`--config-dir`). {listed}"
            )
        similar = closest_keys(key, every_declared_key())
        hint = f"Did you mean {' or '.join(f'`{k}`' for k in similar)}? " if similar else ""
        return f"{given}: `{key}` is not a key of the configuration, so nothing would read it. {hint}{listed}"
    if isinstance(error, MissingConfigException) and error.options:
        missing = Path(error.missing_cfg_file or "group/option")
        return (
            f"{missing.parent.name}={missing.name}: the config group {missing.parent.name} has no option "
            f"{missing.name}; its options are {', '.join(error.options)}, e.g. "
            f"`{missing.parent.name}={error.options[0]}`. {listed}"
        )
    if isinstance(error, OverrideParseException):
        return (
            f"`{error.override}` cannot be read as an override ({_one_line(error.message)}); write key=value, "
            f"e.g. `nodes=16` or `sharing.alpha_list=[0.1,0.5]`. {listed}"
        )
    cause = f" ({_one_line(str(error.__cause__))})" if error.__cause__ else ""
    return f"The command line does not compose into a configuration: {_one_line(str(error))}{cause}. {listed}"


def _one_line(text: str) -> str:
    return " ".join(text.split())
