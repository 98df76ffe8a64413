"""The nodes one rank hosts: their models are the rows of one [group, P] tensor.

Every rank hosts a group; the default `nodes_per_rank=1` is a group of one. Each hosted node
is a `Node` like any other (its own model bound to its row, optimizer, batch stream, sharing
state, JSONL, checkpoints, seeded streams), so what a node does does not depend on how nodes
are grouped, and the output contract, checkpoints and the report do not either. What the
group shares is the work: training runs for all its nodes in one call (`StackedMFTrainer`
where it applies, else node after node without a process each), and messages go through one
transport (`dpsgd.transport`).

Nodes are dealt to ranks in contiguous blocks: rank r hosts nodes r*G .. r*G+G-1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from dpsgd.algorithms.stopping import evaluate_at_stop
from dpsgd.liveness import Liveness
from dpsgd.metrics import PhaseClock
from dpsgd.models.flat import rebind_model
from dpsgd.node import Node
from dpsgd.stacked_mf import StackedMFTrainer
from dpsgd.transport.rounds import RoundTransport
from dpsgd.transport.walks import WalkTransport


@dataclass
class NodeGroup:
    """The nodes one rank hosts, and what they share."""

    nodes: list[Node]
    rows: torch.Tensor  # [group, P]: row g is node nodes[g]'s flat model
    spare: torch.Tensor  # [group, P]: whole models are averaged here, then swapped in (or: a
    # snapshot of the rows that in-place merges read)
    transport: RoundTransport | WalkTransport
    trainer: "StackedMFTrainer | NodeByNode"
    liveness: Liveness

    def clock(self) -> PhaseClock:
        return PhaseClock(on_enter=self.liveness.enter)

    def train_round(self, only: list[int] | None = None) -> list[float]:
        """A round of training for every hosted node (or the group positions `only`); their mean losses."""
        return self.trainer.train_round(only)

    def swap_rows(self) -> None:
        """The spare rows (just averaged into) become the models; the old rows become spare."""
        self.rows, self.spare = self.spare, self.rows
        for g, node in enumerate(self.nodes):
            node.flat = self.rows[g]
            rebind_model(node.trainer.model, node.flat)
        self.trainer.rebind(self.rows)

    def evaluate_at_stop(self) -> None:
        """Every hosted node measures the round it stopped after (`dpsgd.algorithms.stopping`)."""
        for node in self.nodes:
            evaluate_at_stop(node)

    def stop_after(self, completed: int) -> dict[int, int]:
        """Each hosted node's rounds completed (all `completed`), once each has measured its last round."""
        self.evaluate_at_stop()
        return dict.fromkeys((node.rank for node in self.nodes), completed)


class NodeByNode:
    """Training without vectorisation: each hosted node's own Trainer in turn (no process each)."""

    def __init__(self, trainers: list):
        self.trainers = trainers

    def train_round(self, only: list[int] | None = None) -> list[float]:
        positions = range(len(self.trainers)) if only is None else only
        return [self.trainers[g].train_round() for g in positions]

    def rebind(self, rows: torch.Tensor) -> None:
        pass  # the node's models were rebound; their trainers hold the same parameter objects


def hosted_nodes(rank: int, nodes_per_rank: int) -> range:
    return range(rank * nodes_per_rank, (rank + 1) * nodes_per_rank)


def rank_label(nodes_per_rank: int) -> Callable[[int], str]:
    """How failures name a rank: "node 3" (one node per rank), or by the nodes it hosts."""
    if nodes_per_rank == 1:
        return "node {}".format

    def label(rank: int) -> str:
        hosted = hosted_nodes(rank, nodes_per_rank)
        return f"rank {rank} (nodes {hosted[0]}-{hosted[-1]})"

    return label
