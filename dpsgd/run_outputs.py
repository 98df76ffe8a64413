"""What a run leaves behind: per-node JSONL, across-node aggregates, TensorBoard, summary.

Every node writes its own `nodes/<node>.jsonl` on its own machine's disk, one flushed
line per round, so an interrupted run keeps every completed round. Aggregates must
not need a shared file system: on evaluated rounds each node publishes its record in
the rendezvous store, and a thread on rank 0 polls the store (never blocking it, so
rank 0's own training goes on), writes the across-node curves to TensorBoard, prints
progress, and at the end writes `summary.json`. On resume the same component carries
over what was written before the interruption.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch.distributed as dist

from dpsgd.across_nodes import across_nodes, is_finite_number
from dpsgd.consensus import consensus_distance
from dpsgd.divergence import finite_or_none
from dpsgd.progress import ProgressLine, RoundsReached
from dpsgd.run_folder import node_log_path, write_atomic

if TYPE_CHECKING:
    from dpsgd.metrics import EvalSchedule

METRICS_PREFIX = "metrics"
SKETCH_PREFIX = "sketch"  # a node's model sketch per evaluated round (`dpsgd.consensus`)
DONE_PREFIX = "done"
STOP_PREFIX = "stop"  # a node's evaluated record of the round it stopped after
STOP_SKETCH_PREFIX = "stop_sketch"  # and its model's sketch then
SWITCH_KEY = "hybrid/switch_round"  # the round after which a hybrid run's nodes switched to D-PSGD
RESUME_AGGREGATED_KEY = (
    "resume/aggregated"  # on resume: the last round rank 0 had aggregated before
)
CONSENSUS_FILE = (
    "consensus.jsonl"  # per evaluated round: the consensus distance of the nodes' models
)
POLL_INTERVAL_S = 0.2


CURVE_KEYS = ("train_loss", "test_loss", "test_acc", "bytes_sent")
EVALUATED_KEYS = (
    "test_loss",
    "test_acc",
    "train_loss",
)  # what a node's evaluation adds to its record


class NodeLog:
    """One JSON object per round, flushed at once, in `<run>/nodes/<node>.jsonl`.

    A new run starts the file afresh; a resumed run keeps the lines up to the round it
    resumes from and appends after them.
    """

    def __init__(self, run_dir: Path, node: int, keep_through_round: int = 0):
        path = node_log_path(run_dir, node)
        path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if keep_through_round and path.exists():
            kept = [
                line
                for line in path.read_text().splitlines()
                if _round_of(line) is not None and _round_of(line) <= keep_through_round
            ]
        # The kept lines replace the file in one step, so an interruption here loses no round.
        write_atomic(path, "".join(line + "\n" for line in kept))
        self._file = open(path, "a", buffering=1)
        self.kept_records = [json.loads(line) for line in kept]
        self.last_record: dict | None = None  # the last line written by this process
        self._last_start = 0  # where that line starts in the file

    def write(self, record: dict) -> None:
        self._last_start = self._file.tell()
        self._file.write(json.dumps(record, allow_nan=False) + "\n")
        self.last_record = record

    def amend_last(self, extra: dict) -> dict:
        """The last line again, with `extra` added (a node's evaluation when it stops after a round that
        was not evaluated): the JSONL keeps one line per round. Returns the amended record."""
        if self.last_record is None:
            raise ValueError("amend_last: this node has written no round yet")
        record = {**self.last_record, **extra}
        self._file.truncate(self._last_start)  # append mode: the next write lands at the new end
        self._file.write(json.dumps(record, allow_nan=False) + "\n")
        self.last_record = record
        return record

    def close(self) -> None:
        self._file.close()


def _round_of(line: str) -> int | None:
    """The round of a JSONL line, or None for a line torn by a crash."""
    try:
        return json.loads(line)["round"]
    except (ValueError, KeyError, TypeError):
        return None


def publish(store: dist.Store, node: int, record: dict) -> None:
    """Make an evaluated round's record visible to rank 0's aggregator."""
    store.set(_metrics_key(record["round"], node), json.dumps(record, allow_nan=False))


def _metrics_key(round_number: int, node: int) -> str:
    return f"{METRICS_PREFIX}/{round_number}/{node}"


def publish_sketch(store: dist.Store, node: int, round_number: int, sketch: np.ndarray) -> None:
    """The node's model sketch for an evaluated round, published before its record."""
    store.set(
        f"{SKETCH_PREFIX}/{round_number}/{node}", np.asarray(sketch, dtype=np.float64).tobytes()
    )


def publish_skipped(store: dist.Store, node: int, round_number: int) -> None:
    """An evaluated round this node never ran (a hybrid run's walk stopped before it), so the
    aggregator does not wait for it."""
    store.set(
        _metrics_key(round_number, node),
        json.dumps({"node": node, "round": round_number, "skipped": True}),
    )


def publish_at_stop(store: dist.Store, node: int, record: dict, sketch: np.ndarray | None) -> None:
    """The node's evaluated record of the round it stopped after, and a sketch of its model then:
    rank 0 aggregates every node's into summary.json's `final` (the end of the run). A later
    stop (a hybrid run's averaging after its walk) replaces it."""
    if sketch is not None:  # first: the aggregator reads it with the record
        store.set(f"{STOP_SKETCH_PREFIX}/{node}", np.asarray(sketch, dtype=np.float64).tobytes())
    store.set(f"{STOP_PREFIX}/{node}", json.dumps(record, allow_nan=False))


def publish_rounds_completed(store: dist.Store, node: int, rounds_completed: int) -> None:
    """How far this node got (RWM nodes stop at different rounds)."""
    store.set(f"{DONE_PREFIX}/{node}", str(rounds_completed))


@dataclass
class RunInfo:
    """The facts about a run that summary.json states besides the curves."""

    nodes: int
    rounds: int
    num_parameters: int
    model: str
    dataset: str
    algorithm: str
    sharing: str
    metric_name: str  # what test_loss means: "rmse" or "cross_entropy"
    spectral_gap: (
        float | None
    )  # of the graph's Metropolis-Hastings matrix (None: the mixing changes)
    # What the task scores without learning (test_loss, test_acc): the line figures draw a result against.
    no_learning: dict[str, float] | None = None


def summarize(records: list[dict]) -> dict:
    """Across-node statistics of each metric (`dpsgd.across_nodes`), and how many nodes reported."""
    return {"nodes_reporting": len(records), **across_nodes(records)}


class Aggregator:
    """Rank 0's reader of published records: TensorBoard curves, progress line, summary.json."""

    def __init__(
        self,
        store: dist.Store,
        run_dir: Path,
        info: RunInfo,
        eval_rounds: list[int],
        per_node_tb: bool = False,
        progress: bool = True,
        earlier_rounds: list[dict] | None = None,
        reached: RoundsReached | None = None,
        progress_every_s: float = 10.0,
    ):
        """`earlier_rounds`: on resume, the aggregates already written before the interruption.

        `reached`: how far rank 0's first node got (round, bytes), for the progress line between
        evaluated rounds; `progress_every_s`: seconds between plain progress lines (`dpsgd.progress`).
        """
        self.store = store
        self.run_dir = Path(run_dir)
        self.info = info
        self.per_round: list[dict] = list(earlier_rounds or [])
        aggregated_through = self.per_round[-1]["round"] if self.per_round else 0
        self.pending = [r for r in eval_rounds if r > aggregated_through]
        self.per_node_tb = per_node_tb
        self._progress = (
            ProgressLine(
                info.rounds,
                info.metric_name,
                reached,
                first_round=aggregated_through,
                every_s=progress_every_s,
            )
            if progress
            else None
        )
        self._stop = threading.Event()
        self._started = time.monotonic()  # origin of wall_s (moved back on resume)
        # On resume, events after the last aggregated round are dropped: they are logged again.
        self._writer = _summary_writer(self.run_dir / "tb", purge_after=aggregated_through)
        bytes_through = int(self.per_round[-1]["bytes_sent"]["mean"]) if self.per_round else 0
        self._bytes_writer = _summary_writer(
            self.run_dir / "tb" / "vs_bytes", purge_after=bytes_through
        )
        self._node_writers = {}
        self._thread = threading.Thread(target=self._loop, name="dpsgd-aggregator", daemon=True)

    def start(self) -> "Aggregator":
        self._thread.start()
        return self

    def start_clock(self, offset_s: float = 0.0) -> None:
        """wall_s counts from the same moment as the nodes' time_s (after the start barrier)."""
        self._started = time.monotonic() - offset_s
        if self._progress is not None:
            self._progress.start_clock()

    def finish(self, diverged: dict | None = None) -> dict:
        """After every node published how far it got: drain, write summary.json, return it.

        `diverged`: dpsgd.divergence's report, when training diverged somewhere.
        """
        self._stop.set()
        self._thread.join()
        self._collect(final=True)
        if self._progress is not None:
            self._progress.close()
        done_keys = [f"{DONE_PREFIX}/{node}" for node in range(self.info.nodes)]
        summary = self._summary(
            [int(raw) for raw in self.store.multi_get(done_keys)], self._at_stop()
        )
        summary["diverged"] = diverged
        if self.store.check([SWITCH_KEY]):
            summary["switch_round"] = int(self.store.get(SWITCH_KEY))
        self._write_summary(summary)
        self._writer.close()
        self._bytes_writer.close()
        for writer in self._node_writers.values():
            writer.close()
        return summary

    def _at_stop(self) -> dict | None:
        """The end of the run: every node's evaluation of the round it stopped after, across nodes, with
        the consensus distance of the models then; `round` is the last round any node ran. None when a
        node published none (it ran no round in this process)."""
        nodes = range(self.info.nodes)
        keys = [f"{STOP_PREFIX}/{node}" for node in nodes]
        if not self.store.check(keys):
            return None
        records = [json.loads(raw) for raw in self.store.multi_get(keys)]
        sketch_keys = [f"{STOP_SKETCH_PREFIX}/{node}" for node in nodes]
        sketches = (
            [np.frombuffer(raw, dtype=np.float64) for raw in self.store.multi_get(sketch_keys)]
            if self.store.check(sketch_keys)
            else []
        )
        consensus = finite_or_none(consensus_distance(sketches)) if len(sketches) > 1 else None
        return {
            "round": max(record["round"] for record in records),
            **summarize(records),
            "consensus_distance": consensus,
        }

    def _loop(self) -> None:
        while not self._stop.wait(POLL_INTERVAL_S):
            self._collect(final=False)
            if self._progress is not None:
                self._progress.tick()

    def _collect(self, final: bool) -> None:
        """Aggregate, in order, every pending round whose records are all present."""
        while self.pending:
            round_number = self.pending[0]
            keys = [_metrics_key(round_number, node) for node in range(self.info.nodes)]
            if not self.store.check(keys):
                if not final:
                    return
                keys = [key for key in keys if self.store.check([key])]
                if not keys:
                    self.pending.pop(0)
                    continue
            records = [json.loads(raw) for raw in self.store.multi_get(keys)]
            records = [record for record in records if not record.get("skipped")]
            for key in keys:
                self.store.delete_key(key)
            self.pending.pop(0)
            if records:
                self._log_round(round_number, records, self._consensus(round_number, records))

    def _consensus(self, round_number: int, records: list[dict]) -> float | None:
        """The consensus distance of the reporting nodes' models, from their sketches (None: not sketched,
        or one node alone, as at the end of an RWM run)."""
        keys = [f"{SKETCH_PREFIX}/{round_number}/{record['node']}" for record in records]
        # Every record's sketch is there (published before it), unless sketching is off or a resumed
        # run republished records it had logged: then ask key by key.
        present = (
            keys if self.store.check(keys) else [key for key in keys if self.store.check([key])]
        )
        sketches = (
            [np.frombuffer(raw, dtype=np.float64) for raw in self.store.multi_get(present)]
            if present
            else []
        )
        for key in present:
            self.store.delete_key(key)
        return finite_or_none(consensus_distance(sketches)) if len(sketches) > 1 else None

    def _log_round(
        self, round_number: int, records: list[dict], consensus: float | None = None
    ) -> None:
        stats = summarize(records)
        self.per_round.append({"round": round_number, **stats, "consensus_distance": consensus})
        for key in CURVE_KEYS:
            if key in stats:
                self._writer.add_scalar(f"{key}/mean", stats[key]["mean"], round_number)
        if consensus is not None:
            self._writer.add_scalar("consensus_distance", consensus, round_number)
        if "bytes_sent" in stats:
            step = int(stats["bytes_sent"]["mean"])
            for key in EVALUATED_KEYS:
                if key in stats:
                    self._bytes_writer.add_scalar(f"vs_bytes/{key}", stats[key]["mean"], step)
        ages = [record["age"] for record in records if is_finite_number(record.get("age"))]
        if ages:  # RWM: how unevenly the walking models have been trained
            self._writer.add_histogram("age", np.asarray(ages, dtype=np.float64), round_number)
        phases = [record["phase"] for record in records if "phase" in record]
        if phases:  # hybrid: 0 while the nodes walk, 1 once they all average with every neighbour
            self._writer.add_scalar("phase", phases.count("dpsgd") / len(phases), round_number)
        if self.per_node_tb:
            self._log_nodes(round_number, records)
        self._writer.flush()
        self._bytes_writer.flush()
        self._write_consensus()
        self._write_summary(self._summary(None))  # an interrupted run keeps its aggregates so far
        if self._progress is not None and len(records) == self.info.nodes:
            metrics = {key: stats[key]["mean"] for key in ("test_loss", "test_acc") if key in stats}
            self._progress.evaluated(round_number, metrics, stats.get("bytes_sent", {}).get("mean"))

    def _write_consensus(self) -> None:
        """consensus.jsonl, rewritten whole from the aggregates (so a resumed run continues it)."""
        lines = [
            json.dumps(
                {
                    "round": entry["round"],
                    "consensus_distance": entry.get("consensus_distance"),
                    "nodes_reporting": entry["nodes_reporting"],
                }
            )
            for entry in self.per_round
        ]
        write_atomic(self.run_dir / CONSENSUS_FILE, "".join(line + "\n" for line in lines))

    def _log_nodes(self, round_number: int, records: list[dict]) -> None:
        for record in records:
            node = record["node"]
            if node not in self._node_writers:
                self._node_writers[node] = _summary_writer(
                    self.run_dir / "tb" / "nodes" / str(node)
                )
            for key in CURVE_KEYS:
                if record.get(key) is not None:
                    self._node_writers[node].add_scalar(key, record[key], round_number)

    def _write_summary(self, summary: dict) -> None:
        write_atomic(
            self.run_dir / "summary.json", json.dumps(summary, indent=1, allow_nan=False) + "\n"
        )

    def _summary(self, rounds_per_node: list[int] | None, at_stop: dict | None = None) -> dict:
        """`final` is the end of the run (`at_stop`: each node evaluated when it stopped; RWM nodes
        stop at different rounds). While the run goes on (`rounds_per_node` None), `in_progress`
        is true, the rounds reached are those aggregated so far, and `final` is the last evaluated
        round every node reached.
        """
        info = self.info
        if rounds_per_node is None:
            reached = self.per_round[-1]["round"] if self.per_round else 0
            rounds_per_node = [reached] * info.nodes
        rounds_min = min(rounds_per_node)
        complete = [
            entry
            for entry in self.per_round
            if entry["round"] <= rounds_min and entry["nodes_reporting"] == info.nodes
        ]
        return {
            "nodes": info.nodes,
            "rounds": info.rounds,
            "rounds_completed": rounds_min,
            "rounds_min": rounds_min,
            "rounds_max": max(rounds_per_node),
            "rounds_per_node": rounds_per_node,
            "num_parameters": info.num_parameters,
            "model": info.model,
            "dataset": info.dataset,
            "algorithm": info.algorithm,
            "sharing": info.sharing,
            "test_loss_metric": info.metric_name,
            "spectral_gap": info.spectral_gap,
            "no_learning": info.no_learning,
            "wall_s": time.monotonic() - self._started,
            "in_progress": not self._stop.is_set(),
            "final": at_stop if at_stop is not None else complete[-1] if complete else None,
            "per_round": self.per_round,
        }


def earlier_rounds(run_dir: Path, through_round: int) -> list[dict]:
    """The aggregates a run wrote (summary.json) up to `through_round`, to carry over on resume."""
    path = Path(run_dir) / "summary.json"
    if not through_round or not path.exists():
        return []
    return [
        entry
        for entry in json.loads(path.read_text())["per_round"]
        if entry["round"] <= through_round
    ]


def republish_kept_rounds(
    store: dist.Store, node: int, log: NodeLog, after_round: int, schedule: "EvalSchedule"
) -> None:
    """On resume: evaluated rounds that rank 0 had not aggregated yet are published again."""
    for record in log.kept_records:
        if record["round"] > after_round and schedule.due(record["round"]):
            publish(store, node, record)


def _summary_writer(log_dir: Path, purge_after: int = 0):
    # Imported here: tensorboard's import is slow and only rank 0 needs it.
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(
        log_dir=str(log_dir), flush_secs=5, purge_step=purge_after + 1 if purge_after else None
    )
