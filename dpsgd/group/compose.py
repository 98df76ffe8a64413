"""A rank that hosts a group of nodes: their models are the rows of one [group, P] tensor.

Each hosted node is a `Node` like any other (its own model bound to its row, optimizer,
batch stream, sharing state, JSONL, checkpoints, seeded streams), so what a node does
does not depend on how nodes are grouped, and the output contract, checkpoints and the
report stay as they are. What the group shares is the work: training runs for all its
nodes in one call (`StackedMFTrainer` where it applies, else node after node without a
process each), and messages go through one `GroupLink`.

Nodes are dealt to ranks in contiguous blocks: rank r hosts nodes r*G .. r*G+G-1.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from omegaconf import DictConfig

from dpsgd.averaging import MERGE_RULES
from dpsgd.checkpoint import Checkpoints
from dpsgd.communication import FailureBoard
from dpsgd.divergence import DivergenceWatch
from dpsgd.group.link import GroupLink
from dpsgd.group.walk import GroupWalkLink
from dpsgd.group.stacked_mf import StackedMFTrainer, sparse_sgd_applies, stacked_applies
from dpsgd.launch import RankContext
from dpsgd.liveness import Liveness
from dpsgd.metrics import EvalSchedule, PhaseClock, RoundRecorder
from dpsgd.models import build_model
from dpsgd.models.flat import layout, num_parameters, rebind_model
from dpsgd.node import Node
from dpsgd.run_outputs import NodeLog
from dpsgd.seeding import numpy_rng
from dpsgd.sharing import build_sharing
from dpsgd.topology import Topology
from dpsgd.training import build_optimizer


@dataclass
class NodeGroup:
    """The nodes one rank hosts, and what they share."""

    nodes: list[Node]
    rows: torch.Tensor                     # [group, P]: row g is node nodes[g]'s flat model
    spare: torch.Tensor                    # [group, P]: whole models are averaged here, then swapped in (or: a
                                           # snapshot of the rows that in-place merges read)
    link: "GroupLink | GroupWalkLink"
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


def build_group(cfg: DictConfig, ctx: RankContext, topology: Topology, dataset, store: dist.Store, run_dir: Path,
                start_round: int, checkpoints: dict[int, Checkpoints], divergence: DivergenceWatch,
                walking: bool) -> NodeGroup:
    """Every hosted node, bound to its row, and the group's trainer and link (`walking`: RWM's)."""
    from dpsgd.experiment import _evaluate, _options, build_task, build_trainer, model_sketch  # composition helpers

    per_rank = cfg.nodes_per_rank
    hosted = hosted_nodes(ctx.rank, per_rank)
    template = build_model(cfg.model.name, dataset.dims, cfg.seed)
    device = torch.device(cfg.device)
    rows = torch.empty(per_rank, num_parameters(template), dtype=torch.float32, device=device)
    label = rank_label(per_rank)
    liveness = Liveness(store, ctx.rank, ctx.world_size, slow_after_s=cfg.comm.timeout_s / 2, label=label).start()
    schedule = EvalSchedule(cfg.eval.every, cfg.rounds)
    sketch = model_sketch(cfg, rows.shape[1])  # one per rank: its hash is drawn once
    nodes, trainers = [], []
    for g, node_id in enumerate(hosted):
        data = dataset.node_data(node_id, cfg.nodes, cfg.seed, cfg.eval.test_samples).to(device)
        trainer, flat = build_trainer(cfg, dataset, data, node_id, row=rows[g])
        trainers.append(trainer)
        recorder = RoundRecorder(node_id, NodeLog(run_dir, node_id, keep_through_round=start_round), store, schedule,
                                 sketch=sketch)
        nodes.append(Node(rank=node_id, topology=topology, flat=flat, trainer=trainer,
                          sharing=build_sharing(cfg.sharing.name, flat, cfg.alpha, _options(cfg.sharing), cfg.seed,
                                                node_id),
                          merge=MERGE_RULES[cfg.sharing.merge], link=None, recorder=recorder, schedule=schedule,
                          evaluate=(lambda t=trainer, d=data: _evaluate(cfg, t, d)),
                          rng=numpy_rng(cfg.seed, "neighbour_choice", node_id),
                          checkpoints=checkpoints[node_id], divergence=divergence, liveness=liveness))
    link = group_link(GroupWalkLink if walking else GroupLink, cfg, ctx, topology, rows, store,
                      nodes[0].sharing.check_header, liveness)
    for node in nodes:
        node.link = link.ports[node.rank]
    trainer = _group_trainer(cfg, rows, template, trainers, build_task(cfg, dataset.task))
    return NodeGroup(nodes, rows, torch.empty_like(rows), link, trainer, liveness)


def group_link(link_class: type, cfg: DictConfig, ctx: RankContext, topology: Topology, rows: torch.Tensor,
               store: dist.Store, header_check, liveness: Liveness) -> "GroupLink | GroupWalkLink":
    """A transport for the rank's group (`link_class`: GroupLink to average, GroupWalkLink to walk)."""
    per_rank = cfg.nodes_per_rank
    rank_of = [node // per_rank for node in range(cfg.nodes)]
    return link_class(ctx.rank, rank_of, topology, rows.shape[1], cfg.comm.timeout_s,
                      FailureBoard(store, rank_label(per_rank)), header_check=header_check, liveness=liveness,
                      device=rows.device)


def _group_trainer(cfg: DictConfig, rows: torch.Tensor, template, trainers, task) -> "StackedMFTrainer | NodeByNode":
    options = {key: value for key, value in cfg.optimizer.items() if key not in ("name", "lr")}
    if not stacked_applies(cfg.model.name, cfg.optimizer.name):
        return NodeByNode(trainers)
    if sparse_sgd_applies(cfg.optimizer.name, options):
        return StackedMFTrainer(rows, layout(template), trainers, task, cfg.optimizer.lr)
    return StackedMFTrainer(rows, layout(template), trainers, task, cfg.optimizer.lr,
                            make_optimizer=lambda params: build_optimizer(cfg.optimizer.name, params,
                                                                          cfg.optimizer.lr, **options))
