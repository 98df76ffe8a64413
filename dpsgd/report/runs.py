"""Reading run directories into across-node statistics per round.

A run is any directory holding `summary.json` (a sweep is a tree of them). The
per-node JSONL is the richest source: every node, every round. It is used when the
run directory holds a file for every node; on several machines only rank 0's machine
has `summary.json` and only its own nodes' JSONL, so there the per-round aggregates
of `summary.json` (evaluated rounds, all nodes) are the faithful source instead.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import yaml

from dpsgd.across_nodes import across_nodes

SUMMARY_FILE = "summary.json"
CONFIG_FILE = "config.yaml"
NODES_DIR = "nodes"
# Sub-directories of a run that never hold another run; skipping them keeps discovery fast.
RUN_INTERNALS = {NODES_DIR, "tb", ".hydra"}
# Sharing methods whose `alpha` says nothing about what was sent (full sends all, random_alpha draws
# its own): `alpha_unused` in dpsgd.sharing.methods, repeated here because the report never imports
# torch (tests/test_plug_in_sharing.py checks that the two agree).
SHARING_WITHOUT_ALPHA = {"full", "random_alpha"}


class ReportError(Exception):
    """A run directory the report cannot read; the message names the file and the fix."""


@dataclass(frozen=True)
class Stat:
    """One metric at one round across nodes; `n` is how many nodes gave a value."""

    mean: float
    std: float
    min: float
    max: float
    n: int


RoundStats = dict[str, Stat]


@dataclass(frozen=True)
class Metric:
    """The test metric a run is judged by: accuracy for classification, RMSE for ratings."""

    key: str  # the record key: test_acc or test_loss
    name: str  # what axes and tables call it
    higher_is_better: bool


ACCURACY = Metric("test_acc", "test accuracy", True)
RMSE = Metric("test_loss", "test RMSE", False)


@dataclass(eq=False)  # a run is itself: compared and hashed by identity
class Run:
    """One run directory: its config, its summary, and its statistics per round."""

    path: Path
    config: dict
    summary: dict
    rounds: dict[int, RoundStats]  # ascending rounds
    source: str  # "jsonl" (per-node logs) or "summary" (summary.json per_round)
    label: str = field(default="")
    # The run's folder as tables name it: relative to the folder the report was given (its name
    # first), so a committed table never holds one machine's absolute paths.
    shown_dir: str = field(default="")
    # The test metric without learning (summary.json's `no_learning`, or the report's --baseline).
    no_learning: float | None = field(default=None)
    # The end of the run (round, stats): each node's evaluation of the round it stopped after, across
    # nodes; None for runs written before nodes evaluated when they stopped (`final_stats`).
    final: tuple[int, RoundStats] | None = field(default=None)

    @property
    def nodes(self) -> int:
        return int(self.summary["nodes"])

    @property
    def algorithm(self) -> str:
        return str(_config_name(self.config, "algorithm") or self.summary.get("algorithm", "?"))

    @property
    def sharing(self) -> str:
        return str(_config_name(self.config, "sharing") or self.summary.get("sharing", "?"))

    @property
    def dataset(self) -> str:
        return str(_config_name(self.config, "dataset") or self.summary.get("dataset", "?"))

    @property
    def alpha(self) -> float | None:
        alpha = self.config.get("alpha")
        return None if alpha is None else float(alpha)

    @property
    def metric(self) -> Metric:
        return test_metric(self.summary, self.rounds)

    @property
    def train_key(self) -> str:
        """train_loss (the whole local set) when the run measured it, else the last batch's loss."""
        return (
            "train_loss"
            if any("train_loss" in stats for stats in self.rounds.values())
            else "batch_loss"
        )


def test_metric(summary: dict, rounds: dict[int, RoundStats]) -> Metric:
    """RMSE for ratings runs (test_loss is an RMSE there); accuracy for classification."""
    metric_name = summary.get("test_loss_metric")
    if metric_name == "rmse":
        return RMSE
    if any(ACCURACY.key in stats for stats in rounds.values()):
        return ACCURACY
    return Metric("test_loss", f"test {metric_name or 'loss'}", False)


def discover(paths: Iterable[Path | str]) -> list[Path]:
    """Every directory under `paths` (themselves included) that holds summary.json."""
    found: set[Path] = set()
    for path in map(Path, paths):
        if not path.is_dir():
            raise ReportError(f"{path}: not a directory; pass a run directory or a sweep directory")
        for dirpath, dirnames, filenames in os.walk(path):
            if SUMMARY_FILE in filenames:
                found.add(Path(dirpath))
            dirnames[:] = [name for name in dirnames if name not in RUN_INTERNALS]
    if not found:
        shown = ", ".join(str(p) for p in paths)
        raise ReportError(
            f"no {SUMMARY_FILE} under {shown}; a run writes it when it ends "
            f"(pass the directory `python train.py` printed as 'results in ...')"
        )
    return sorted(found, key=_natural_key)


def load_runs(paths: Iterable[Path | str], baseline: float | None = None) -> list[Run]:
    """Every run under `paths`, in natural path order, with unique labels and folders named
    relative to `paths`.

    `baseline`: the no-learning test metric for runs whose summary.json does not record one
    (runs from before it did); a run's own value always wins.
    """
    paths = [Path(path) for path in paths]
    runs = [load_run(path) for path in discover(paths)]
    for run, label in zip(runs, unique_labels(runs)):
        run.label = label
        run.shown_dir = shown_dir(run.path, paths)
        if run.no_learning is None:
            run.no_learning = baseline
    return runs


def shown_dir(run_dir: Path, inputs: list[Path]) -> str:
    """`run_dir` as "<input folder's name>/<path below it>" for the first input holding it.

    Relative to what the user passed, so the same runs give the same tables on any machine.
    """
    resolved = Path(run_dir).resolve()
    for root in (Path(path).resolve() for path in inputs):
        if resolved == root or root in resolved.parents:
            return Path(root.name, resolved.relative_to(root)).as_posix()
    return resolved.name


def load_run(path: Path) -> Run:
    """One run directory; per-node JSONL when it covers every node, else summary.json."""
    path = Path(path)
    summary = _read_json(path / SUMMARY_FILE)
    config = _read_config(path / CONFIG_FILE)
    records = read_node_logs(path)
    if records is not None and len({record["node"] for record in records}) >= int(summary["nodes"]):
        run = Run(path, config, summary, round_stats_from_records(records), "jsonl")
        run.final = final_stats(records)
    else:
        run = Run(path, config, summary, round_stats_from_summary(summary), "summary")
        run.final = _entry_stats(summary["final"]) if summary.get("final") else None
    run.shown_dir = path.resolve().name
    run.no_learning = (summary.get("no_learning") or {}).get(run.metric.key)
    return run


def read_node_logs(path: Path) -> list[dict] | None:
    """All records of `<run>/nodes/*.jsonl`, or None when the run has no node logs here."""
    files = sorted((Path(path) / NODES_DIR).glob("*.jsonl"), key=_natural_key)
    if not files:
        return None
    return [record for file in files for record in _read_jsonl(file)]


def round_stats_from_records(records: Iterable[dict]) -> dict[int, RoundStats]:
    """Mean, population std, min and max across the nodes that logged each round."""
    by_round: dict[int, list[dict]] = {}
    for record in records:
        by_round.setdefault(int(record["round"]), []).append(record)
    return {round_number: _stats(by_round[round_number]) for round_number in sorted(by_round)}


def round_stats_from_summary(summary: dict) -> dict[int, RoundStats]:
    """summary.json's per_round entries, in the same shape as computed from the JSONL."""
    rounds = dict(_entry_stats(entry) for entry in summary.get("per_round", []))
    return dict(sorted(rounds.items()))


def final_stats(records: Iterable[dict]) -> tuple[int, RoundStats] | None:
    """The end of the run, as summary.json's `final` says it: each node's last record (the round it
    stopped after, which it evaluated then) across nodes, at the last round any node ran.

    None when some node's last record holds no evaluation: runs written before nodes evaluated
    when they stopped, whose final round is the last evaluated round every node reached."""
    last: dict[int, dict] = {}
    for record in records:
        if record["round"] >= last.get(record["node"], {"round": 0})["round"]:
            last[record["node"]] = record
    if not last or any("test_loss" not in record for record in last.values()):
        return None
    return max(record["round"] for record in last.values()), _stats(list(last.values()))


def _entry_stats(entry: dict) -> tuple[int, RoundStats]:
    """One aggregate of summary.json (a per_round entry, or `final`) as (round, stats)."""
    reporting = int(entry["nodes_reporting"])
    return int(entry["round"]), {
        key: Stat(value["mean"], value["std"], value["min"], value["max"], reporting)
        for key, value in entry.items()
        if isinstance(value, dict)
    }


def run_label(run: Run) -> str:
    """What a legend calls a run, from its config: "dpsgd partial a=0.1", "rwm full"."""
    parts = [run.algorithm, run.sharing]
    if run.sharing not in SHARING_WITHOUT_ALPHA and run.alpha is not None:
        parts.append(f"a={run.alpha:g}")
    return " ".join(parts)


def unique_labels(runs: list[Run]) -> list[str]:
    """Config labels; runs that share one get their directory name (or more of the path) appended."""
    bases = [run_label(run) for run in runs]
    counts = Counter(bases)
    labels = list(bases)
    for base in (base for base, count in counts.items() if count > 1):
        members = [i for i, label in enumerate(bases) if label == base]
        tails = _distinct_tails([runs[i].path for i in members])
        for i, tail in zip(members, tails):
            labels[i] = f"{base} ({tail})"
    return labels


def _distinct_tails(paths: list[Path]) -> list[str]:
    """Per path, the shortest ending no other path shares (sweep jobs: just "0", "1")."""
    parts = [path.resolve().parts for path in paths]
    return [
        _shortest_own_tail(own, [other for other in parts if other is not own]) for own in parts
    ]


def _shortest_own_tail(own: tuple[str, ...], others: list[tuple[str, ...]]) -> str:
    for depth in range(1, len(own) + 1):
        if all(other[-depth:] != own[-depth:] for other in others):
            return "/".join(own[-depth:])
    return "/".join(own)


def _stats(records: list[dict]) -> RoundStats:
    return {key: Stat(**values) for key, values in across_nodes(records).items()}


def _config_name(config: dict, group: str) -> str | None:
    value = config.get(group)
    return value.get("name") if isinstance(value, dict) else None


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ReportError(
            f"{path}: not valid JSON ({error}); the run may still be writing it"
        ) from error


def _read_config(path: Path) -> dict:
    """The resolved config, or {} when absent: labels then come from summary.json alone."""
    if not path.exists():
        return {}
    config = yaml.safe_load(path.read_text())
    return config if isinstance(config, dict) else {}


def _read_jsonl(path: Path) -> list[dict]:
    records = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as error:
            raise ReportError(
                f"{path}:{number}: not a JSON line ({error}); "
                f"remove the damaged line or the file to report from summary.json"
            ) from error
    return records


def _natural_key(path: Path) -> list:
    """Sort sweep jobs 0, 1, 2, ..., 10 rather than 0, 1, 10, 2."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", str(path))]
