"""Everything one node owns during a run, built by `dpsgd.building` and driven, with the other
nodes of its rank, by an algorithm (`dpsgd.node_group`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch

from dpsgd.averaging import MergeRule
from dpsgd.divergence import DivergenceWatch
from dpsgd.liveness import Liveness
from dpsgd.metrics import EvalSchedule, PhaseClock, RoundRecorder
from dpsgd.sharing import Sharing
from dpsgd.topology import Topology
from dpsgd.training import Trainer

if TYPE_CHECKING:
    from dpsgd.checkpoint import Checkpoints
    from dpsgd.transport.base import NodePort


@dataclass
class Node:
    rank: int
    topology: Topology
    flat: torch.Tensor  # the model's parameters, as one vector
    trainer: Trainer
    sharing: Sharing
    merge: MergeRule  # how received values enter the model (sharing.merge)
    link: "NodePort"  # what the rank's transport keeps for this node (its byte counts)
    recorder: RoundRecorder
    schedule: EvalSchedule
    evaluate: Callable[[], dict[str, float]]
    rng: np.random.Generator  # this node's algorithm-level choices (RWM's next neighbour)
    checkpoints: "Checkpoints | None" = (
        None  # saves this node's state every checkpoint.every rounds
    )
    divergence: DivergenceWatch | None = None  # notes non-finite training; says when to stop
    liveness: Liveness | None = None  # heartbeat: what this node is doing, for failure verdicts
    phase: str | None = None  # hybrid runs: the pattern the node is in, written in each record

    def clock(self) -> PhaseClock:
        """This round's phase timer; entering a phase also tells the heartbeat (dpsgd.liveness)."""
        return PhaseClock(on_enter=None if self.liveness is None else self.liveness.enter)

    def record(self, round_number: int, clock: PhaseClock, **metrics) -> None:
        """After a round: its JSONL line, and on evaluated rounds what rank 0 aggregates (with a
        sketch of the model, for the consensus distance)."""
        if self.phase is not None:
            metrics["phase"] = self.phase
        self.recorder.record(round_number, clock, self.link.bytes, model=self.flat, **metrics)

    def note_divergence(self, round_number: int, batch_loss: float) -> None:
        """After a round: tell the run's divergence watch how this node's round ended."""
        if self.divergence is not None:
            self.divergence.note(
                self.rank, round_number, batch_loss, self.flat, self.schedule.due(round_number)
            )

    def checkpoint(self, round_number: int, algorithm_state: dict) -> None:
        """After a round: save the node's state if a checkpoint is due (algorithms call this)."""
        if self.checkpoints is not None:
            self.checkpoints.after_round(self, round_number, algorithm_state)

    @property
    def degree(self) -> int:
        return self.topology.degree(self.rank)

    @property
    def neighbours(self) -> list[int]:
        return self.topology.neighbours(self.rank)
