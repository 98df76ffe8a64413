"""What a node measures each round: when to evaluate, seconds per phase, and the round's record.

The record goes to the node's JSONL and, on evaluated rounds, to rank 0's aggregator
(`dpsgd.run_outputs`). Non-finite numbers are written as null (`dpsgd.divergence`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist

from dpsgd.consensus import ModelSketch
from dpsgd.divergence import finite_or_none
from dpsgd.progress import RoundsReached, startup_step
from dpsgd.run_outputs import NodeLog, publish, publish_sketch


@dataclass(frozen=True)
class EvalSchedule:
    """Evaluate every `every` rounds and always at the last round, so a run ends measured."""

    every: int
    rounds: int

    def due(self, round_number: int) -> bool:
        return round_number % self.every == 0 or round_number == self.rounds

    def rounds_due(self) -> list[int]:
        return [r for r in range(1, self.rounds + 1) if self.due(r)]


class PhaseClock:
    """Seconds spent per phase within one round (train, comm, eval); `on_enter(name)` is told each phase."""

    def __init__(self, on_enter: Callable[[str], None] | None = None):
        self.seconds = {"train_s": 0.0, "comm_s": 0.0, "eval_s": 0.0}
        self.on_enter = on_enter

    def phase(self, name: str):
        if self.on_enter is not None:
            self.on_enter(name)
        return _Phase(self.seconds, f"{name}_s")


class _Phase:
    def __init__(self, seconds: dict, key: str):
        self.seconds, self.key = seconds, key

    def __enter__(self):
        self.start = time.perf_counter()

    def __exit__(self, *exc):
        self.seconds[self.key] += time.perf_counter() - self.start


class RoundRecorder:
    """Turns one round's numbers into a JSONL line, and publishes evaluated rounds."""

    def __init__(
        self,
        node: int,
        log: NodeLog,
        store: dist.Store,
        schedule: EvalSchedule,
        sketch: ModelSketch | None = None,
    ):
        """`sketch`: what an evaluated round publishes of the model for the consensus distance (None: nothing)."""
        self.node = node
        self.log = log
        self.store = store
        self.schedule = schedule
        self.sketch = sketch
        self.started = time.monotonic()
        self.reached = (
            RoundsReached()
        )  # rank 0's progress line reads its first node's (`dpsgd.progress`)

    def start_clock(self, offset_s: float = 0.0) -> None:
        """time_s counts from here (after the start barrier), plus the time before a resume."""
        self.started = time.monotonic() - offset_s

    def elapsed_s(self) -> float:
        return time.monotonic() - self.started

    def record(
        self,
        round_number: int,
        clock: PhaseClock,
        byte_counts,
        model: torch.Tensor | None = None,
        **metrics,
    ) -> dict:
        record = {
            "node": self.node,
            "round": round_number,
            "time_s": time.monotonic() - self.started,
            **clock.seconds,
            "bytes_sent": byte_counts.sent,
            "bytes_sent_data": byte_counts.sent_data,
            "bytes_sent_meta": byte_counts.sent_meta,
            "bytes_recv": byte_counts.recv,
            "bytes_recv_data": byte_counts.recv_data,
            "bytes_recv_meta": byte_counts.recv_meta,
            **{k: finite_or_none(v) for k, v in metrics.items()},
        }
        self.log.write(record)
        if self.reached.latest[0] == 0:
            startup_step("first round done", show=False)
        self.reached.note(round_number, byte_counts.sent)
        if self.schedule.due(round_number):
            if (
                self.sketch is not None and model is not None
            ):  # first: the aggregator reads it with the record
                publish_sketch(self.store, self.node, round_number, self.sketch(model))
            publish(self.store, self.node, record)
        return record
