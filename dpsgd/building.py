"""A rank's parts from the config: the data set, each node's model, trainer, sharing and log, the
group they form, its transport, and the pattern's loop over them (`build_rank`)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from dpsgd.algorithms.patterns import PATTERNS
from dpsgd.algorithms.peers import FixedGraph, ResampledGraph, RoundPeers
from dpsgd.averaging import MERGE_RULES
from dpsgd.checkpoint import Checkpoints
from dpsgd.checks import group_options, pattern_options, resample_every, run_topology
from dpsgd.communication import FailureBoard
from dpsgd.consensus import ModelSketch
from dpsgd.data.datasets import NodeData, prepare_dataset
from dpsgd.divergence import DivergenceWatch
from dpsgd.launch import RankContext
from dpsgd.liveness import Liveness
from dpsgd.metrics import EvalSchedule, RoundRecorder
from dpsgd.models import build_model
from dpsgd.models.flat import bind_model_to, flatten_model, layout, num_parameters
from dpsgd.node import Node
from dpsgd.node_group import NodeByNode, NodeGroup, hosted_nodes, rank_label
from dpsgd.run_outputs import NodeLog
from dpsgd.seeding import numpy_rng, torch_generator
from dpsgd.sharing import build_sharing
from dpsgd.stacked_mf import StackedMFTrainer, sparse_sgd_applies, stacked_applies
from dpsgd.topology import Topology
from dpsgd.training import (
    BatchStream,
    ClassificationTask,
    RatingsTask,
    Task,
    Trainer,
    build_optimizer,
)
from dpsgd.transport.rounds import RoundTransport
from dpsgd.transport.walks import WalkTransport


def prepare_data(cfg: DictConfig):
    """Parse (or generate) the data set once; the cache makes later calls cheap."""
    return prepare_dataset(
        cfg.dataset.name,
        group_options(cfg.dataset),
        cfg.seed,
        Path(cfg.cache_dir).expanduser(),
        data_dir=cfg.data_dir,
    )


def no_learning_baseline(cfg: DictConfig, dataset=None) -> dict[str, float]:
    """What the config's task scores without learning (global train mean; majority class) on the
    whole train split and the test set a run evaluates: the line a learning result must beat.

    `dataset`: the prepared data set when the caller has it (a run's rank 0), else it is prepared here.
    """
    dataset = dataset or prepare_data(cfg)
    whole = dataset.node_data(0, 1, cfg.seed, cfg.eval.test_samples)
    return build_task(cfg, dataset.task).no_learning(whole.train, whole.test)


def build_rank(
    cfg: DictConfig,
    ctx: RankContext,
    topology: Topology,
    dataset,
    store: dist.Store,
    run_dir: Path,
    start_round: int = 0,
    checkpoints: dict[int, Checkpoints] | None = None,
    peers: RoundPeers | None = None,
) -> tuple[NodeGroup, Callable]:
    """The rank's nodes, and its algorithm as run(rounds, start_round, states) -> {node: rounds completed},
    where `states` maps each node to what its checkpoint kept for the algorithm (RWM's age).

    `peers`: the synchronous patterns' plan (default: the config's); `checkpoints`: per hosted node
    (default: none are saved)."""
    peers = peers or round_peers(cfg, topology)
    checkpoints = checkpoints or dict.fromkeys(hosted_nodes(ctx.rank, cfg.nodes_per_rank))
    pattern = PATTERNS[cfg.algorithm.name]
    group = build_group(
        cfg,
        ctx,
        topology,
        dataset,
        store,
        run_dir,
        start_round,
        checkpoints,
        divergence=_divergence_watch(cfg, peers, store),
        walking=pattern.walks,
    )
    options = pattern_options(cfg, pattern.keys)
    if pattern.plan is not None:
        options["peers"] = peers
    if pattern.plan is not None and pattern.walks:  # walks first, then averages (hybrid)
        options["averaging"] = _transport(
            RoundTransport,
            cfg,
            ctx,
            topology,
            group.rows,
            store,
            group.nodes[0].sharing.check_header,
            group.liveness,
        )
    return group, lambda rounds, start=0, states=None: pattern.loop(
        group, rounds, start, states, **options
    )


def round_peers(cfg: DictConfig, topology: Topology) -> RoundPeers:
    """Who sends to whom each round in the synchronous patterns (`dpsgd.algorithms.peers`); a walking
    pattern's graph otherwise (its spectral gap goes into summary.json)."""
    every = resample_every(cfg)
    if every is not None:
        return ResampledGraph(lambda period: run_topology(cfg, period), every, cfg.nodes)
    pattern = PATTERNS[cfg.algorithm.name]
    if pattern.plan is None:
        return FixedGraph(topology)
    return pattern.plan(cfg.nodes, cfg.seed, pattern_options(cfg, pattern.plan_keys), topology)


def build_group(
    cfg: DictConfig,
    ctx: RankContext,
    topology: Topology,
    dataset,
    store: dist.Store,
    run_dir: Path,
    start_round: int,
    checkpoints: dict[int, Checkpoints],
    divergence: DivergenceWatch,
    walking: bool,
) -> NodeGroup:
    """Every node the rank hosts, bound to its row, and the group's trainer and transport (`walking`: RWM's)."""
    per_rank = cfg.nodes_per_rank
    hosted = hosted_nodes(ctx.rank, per_rank)
    template = build_model(cfg.model.name, dataset.dims, cfg.seed, **_model_options(cfg))
    device = torch.device(cfg.device)
    rows = torch.empty(per_rank, num_parameters(template), dtype=torch.float32, device=device)
    liveness = Liveness(
        store,
        ctx.rank,
        ctx.world_size,
        slow_after_s=cfg.comm.timeout_s / 2,
        label=rank_label(per_rank),
    ).start()
    schedule = EvalSchedule(cfg.eval.every, cfg.rounds)
    sketch = model_sketch(cfg, rows.shape[1])  # one per rank: its hash is drawn once
    nodes, trainers = [], []
    for g, node_id in enumerate(hosted):
        data = dataset.node_data(node_id, cfg.nodes, cfg.seed, cfg.eval.test_samples).to(device)
        trainer, flat = build_trainer(cfg, dataset, data, node_id, row=rows[g])
        trainers.append(trainer)
        recorder = RoundRecorder(
            node_id,
            NodeLog(run_dir, node_id, keep_through_round=start_round),
            store,
            schedule,
            sketch=sketch,
        )
        nodes.append(
            Node(
                rank=node_id,
                topology=topology,
                flat=flat,
                trainer=trainer,
                sharing=build_sharing(
                    cfg.sharing.name, flat, cfg.alpha, group_options(cfg.sharing), cfg.seed, node_id
                ),
                merge=MERGE_RULES[cfg.sharing.merge],
                link=None,
                recorder=recorder,
                schedule=schedule,
                evaluate=(lambda t=trainer, d=data: _evaluate(cfg, t, d)),
                rng=numpy_rng(cfg.seed, "neighbour_choice", node_id),
                checkpoints=checkpoints[node_id],
                divergence=divergence,
                liveness=liveness,
            )
        )
    transport = _transport(
        WalkTransport if walking else RoundTransport,
        cfg,
        ctx,
        topology,
        rows,
        store,
        nodes[0].sharing.check_header,
        liveness,
    )
    for node in nodes:
        node.link = transport.ports[node.rank]
    trainer = _group_trainer(cfg, rows, template, trainers, build_task(cfg, dataset.task))
    return NodeGroup(nodes, rows, torch.empty_like(rows), transport, trainer, liveness)


def _transport(
    kind: type,
    cfg: DictConfig,
    ctx: RankContext,
    topology: Topology,
    rows: torch.Tensor,
    store: dist.Store,
    header_check,
    liveness: Liveness,
) -> RoundTransport | WalkTransport:
    """The rank's transport (`kind`: RoundTransport to average, WalkTransport to walk)."""
    per_rank = cfg.nodes_per_rank
    rank_of = [node // per_rank for node in range(cfg.nodes)]
    return kind(
        ctx.rank,
        rank_of,
        topology,
        rows.shape[1],
        cfg.comm.timeout_s,
        FailureBoard(store, rank_label(per_rank)),
        header_check=header_check,
        liveness=liveness,
        device=rows.device,
    )


def _group_trainer(
    cfg: DictConfig, rows: torch.Tensor, template, trainers, task
) -> StackedMFTrainer | NodeByNode:
    """Stacked training where it applies to more than one node; a node alone trains with its own Trainer."""
    options = {key: value for key, value in cfg.optimizer.items() if key not in ("name", "lr")}
    if len(trainers) == 1 or not stacked_applies(cfg.model.name, cfg.optimizer.name):
        return NodeByNode(trainers)
    if sparse_sgd_applies(cfg.optimizer.name, options):
        return StackedMFTrainer(rows, layout(template), trainers, task, cfg.optimizer.lr)
    return StackedMFTrainer(
        rows,
        layout(template),
        trainers,
        task,
        cfg.optimizer.lr,
        make_optimizer=lambda params: build_optimizer(
            cfg.optimizer.name, params, cfg.optimizer.lr, **options
        ),
    )


def model_sketch(cfg: DictConfig, numel: int) -> ModelSketch | None:
    """What each node publishes of its model for the consensus distance (`eval.consensus_sketch`; 0: nothing)."""
    return (
        ModelSketch(numel, cfg.eval.consensus_sketch, cfg.seed)
        if cfg.eval.consensus_sketch
        else None
    )


def _divergence_watch(cfg: DictConfig, peers: RoundPeers, store: dist.Store) -> DivergenceWatch:
    """Synchronous nodes stop together, a drift margin after the first divergence; RWM nodes at once
    (a hybrid run's walk too: `dpsgd.algorithms.hybrid` lifts the margin while it walks)."""
    margin = None if PATTERNS[cfg.algorithm.name].plan is None else peers.stop_margin
    return DivergenceWatch(store, cfg.train.stop_on_divergence, margin)


def build_trainer(
    cfg: DictConfig, dataset, data: NodeData, rank: int, row: torch.Tensor | None = None
) -> tuple[Trainer, torch.Tensor]:
    """A node's model, optimizer, batch stream and task from the config, and the flat vector
    that holds the model's parameters (`dpsgd.models.flat`): a new one, or `row` (a node
    group's row for this node).

    Used by every node of a run and by the centralized reference (`benchmarks/centralized.py`),
    so both train exactly the same way.
    """
    model = build_model(cfg.model.name, dataset.dims, cfg.seed, **_model_options(cfg, data))
    if row is None:
        flat = flatten_model(model)
    else:
        bind_model_to(model, row)
        flat = row
    optimizer = build_optimizer(
        cfg.optimizer.name, model.parameters(), **group_options(cfg.optimizer)
    )
    batches = BatchStream(
        data.train, cfg.train.batch_size, torch_generator(cfg.seed, "batches", rank)
    )
    trainer = Trainer(
        model,
        optimizer,
        build_task(cfg, dataset.task),
        batches,
        cfg.train.local_steps,
        cfg.train.full_epochs,
    )
    return trainer, flat


def build_task(cfg: DictConfig, task: str) -> Task:
    """What a node minimises and how it is judged: rating prediction or classification."""
    regularization = OmegaConf.select(
        cfg, "model.regularization", default=0.0
    )  # a model of the user's own: none
    return RatingsTask(regularization) if task == "ratings" else ClassificationTask()


def _model_options(cfg: DictConfig, data: NodeData | None = None) -> dict:
    """The model keys `build_model` takes: all but `name` and the loss's `regularization` (`build_task`).
    SPEC §6: mf's global offset starts from the node's own train mean (no communication; 0 without `data`)."""
    options = group_options(cfg.model)
    options.pop("regularization", None)
    if cfg.model.name == "mf" and data is not None:
        options["initial_offset"] = float(data.train[2].double().mean())
    return options


def _evaluate(cfg: DictConfig, trainer: Trainer, data: NodeData) -> dict[str, float]:
    test = trainer.evaluate(data.test)
    result = {"test_loss": test["loss"], "test_acc": test["acc"]}
    if cfg.eval.train_loss:
        result["train_loss"] = trainer.evaluate(data.train)["loss"]
    return result
