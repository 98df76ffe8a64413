"""Everything one node owns during a run, built by `dpsgd.experiment` and driven by an algorithm."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from dpsgd.averaging import MergeRule
from dpsgd.communication import NeighbourLink, RandomWalkLink
from dpsgd.metrics import EvalSchedule, RoundRecorder
from dpsgd.sharing import Sharing
from dpsgd.topology import Topology
from dpsgd.training import Trainer


@dataclass
class Node:
    rank: int
    topology: Topology
    flat: torch.Tensor                      # the model's parameters, as one vector
    trainer: Trainer
    sharing: Sharing
    merge: MergeRule                        # how received values enter the model (sharing.merge)
    link: NeighbourLink | RandomWalkLink    # moves messages as the algorithm needs
    recorder: RoundRecorder
    schedule: EvalSchedule
    evaluate: Callable[[], dict[str, float]]
    rng: np.random.Generator                # this node's algorithm-level choices (RWM's next neighbour)
    checkpoint: Callable[[int, dict], None]  # after a round: save state if due (round, algorithm state)

    @property
    def degree(self) -> int:
        return self.topology.degree(self.rank)

    @property
    def neighbours(self) -> list[int]:
        return self.topology.neighbours(self.rank)
