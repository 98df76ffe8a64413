"""A rank's parts from the config: the data set, each node's model, trainer, sharing and log, the
group they form, its transport, and the pattern's loop over them (`build_rank`)."""

from __future__ import annotations

import ctypes
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from dpsgd.algorithms.patterns import PATTERNS
from dpsgd.algorithms.peers import FixedGraph, ResampledGraph, RoundPeers
from dpsgd.averaging import MERGE_RULES
from dpsgd.checkpoint import Checkpoints
from dpsgd.checks import pattern_options, run_topology
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
from dpsgd.settings import Settings
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


def prepare_data(settings: Settings):
    """Parse (or generate) the data set once; the cache makes later calls cheap."""
    return prepare_dataset(
        settings.dataset.name,
        settings.dataset.options,
        settings.run.seed,
        Path(settings.run.cache_dir).expanduser(),
        data_dir=settings.run.data_dir,
    )


def no_learning_baseline(settings: Settings, dataset=None) -> dict[str, float]:
    """What the config's task scores without learning (global train mean; majority class) on the
    whole train split and the test set a run evaluates: the line a learning result must beat.

    `dataset`: the prepared data set when the caller has it (a run's rank 0), else it is prepared here.
    """
    dataset = dataset or prepare_data(settings)
    whole = dataset.node_data(0, 1, settings.run.seed, settings.eval.test_samples)
    return build_task(settings, dataset.task).no_learning(whole.train, whole.test)


def build_rank(
    settings: Settings,
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
    peers = peers or round_peers(settings, topology)
    checkpoints = checkpoints or dict.fromkeys(hosted_nodes(ctx.rank, settings.run.nodes_per_rank))
    pattern = PATTERNS[settings.algorithm.name]
    group = build_group(
        settings,
        ctx,
        topology,
        dataset,
        store,
        run_dir,
        start_round,
        checkpoints,
        divergence=_divergence_watch(settings, peers, store),
        walking=pattern.walks,
    )
    options = pattern_options(settings, pattern.keys)
    if pattern.plan is not None:
        options["peers"] = peers
    if pattern.plan is not None and pattern.walks:  # walks first, then averages (hybrid)
        options["averaging"] = _transport(
            RoundTransport,
            settings,
            ctx,
            topology,
            group.rows,
            store,
            group.nodes[0].sharing.check_header,
            group.liveness,
        )
    _hand_back_freed_memory()
    return group, lambda rounds, start=0, states=None: pattern.loop(
        group, rounds, start, states, **options
    )


def _hand_back_freed_memory() -> None:
    """Building a model per node leaves its first parameters freed (they were copied into the node's
    row), but glibc keeps those pages: for 500 MovieLens-sized nodes about as much as their rows.
    malloc_trim returns them to the system; elsewhere than glibc there is nothing to do."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (AttributeError, OSError):
        pass


def round_peers(settings: Settings, topology: Topology) -> RoundPeers:
    """Who sends to whom each round in the synchronous patterns (`dpsgd.algorithms.peers`); a walking
    pattern's graph otherwise (its spectral gap goes into summary.json)."""
    every = settings.topology.resample_every
    if every is not None:
        return ResampledGraph(
            lambda period: run_topology(settings, period), every, settings.run.nodes
        )
    pattern = PATTERNS[settings.algorithm.name]
    if pattern.plan is None:
        return FixedGraph(topology)
    return pattern.plan(
        settings.run.nodes,
        settings.run.seed,
        pattern_options(settings, pattern.plan_keys),
        topology,
    )


def build_group(
    settings: Settings,
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
    per_rank = settings.run.nodes_per_rank
    hosted = hosted_nodes(ctx.rank, per_rank)
    template = build_model(
        settings.model.name, dataset.dims, settings.run.seed, **_model_options(settings)
    )
    device = torch.device(settings.run.device)
    rows = torch.empty(per_rank, num_parameters(template), dtype=torch.float32, device=device)
    liveness = Liveness(
        store,
        ctx.rank,
        ctx.world_size,
        slow_after_s=settings.comm.timeout_s / 2,
        label=rank_label(per_rank),
    ).start()
    schedule = EvalSchedule(settings.eval.every, settings.run.rounds)
    sketch = model_sketch(settings, rows.shape[1])  # one per rank: its hash is drawn once
    nodes, trainers = [], []
    for g, node_id in enumerate(hosted):
        data = dataset.node_data(
            node_id, settings.run.nodes, settings.run.seed, settings.eval.test_samples
        ).to(device)
        trainer, flat = build_trainer(settings, dataset, data, node_id, row=rows[g])
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
                    settings.sharing.name,
                    flat,
                    settings.run.alpha,
                    settings.sharing.options,
                    settings.run.seed,
                    node_id,
                ),
                merge=MERGE_RULES[settings.sharing.merge],
                link=None,
                recorder=recorder,
                schedule=schedule,
                evaluate=(lambda t=trainer, d=data: _evaluate(settings, t, d)),
                rng=numpy_rng(settings.run.seed, "neighbour_choice", node_id),
                checkpoints=checkpoints[node_id],
                divergence=divergence,
                liveness=liveness,
            )
        )
    transport = _transport(
        WalkTransport if walking else RoundTransport,
        settings,
        ctx,
        topology,
        rows,
        store,
        nodes[0].sharing.check_header,
        liveness,
    )
    for node in nodes:
        node.link = transport.ports[node.rank]
    trainer = _group_trainer(settings, rows, template, trainers, build_task(settings, dataset.task))
    return NodeGroup(nodes, rows, torch.empty_like(rows), transport, trainer, liveness)


def _transport(
    kind: type,
    settings: Settings,
    ctx: RankContext,
    topology: Topology,
    rows: torch.Tensor,
    store: dist.Store,
    header_check,
    liveness: Liveness,
) -> RoundTransport | WalkTransport:
    """The rank's transport (`kind`: RoundTransport to average, WalkTransport to walk)."""
    per_rank = settings.run.nodes_per_rank
    rank_of = [node // per_rank for node in range(settings.run.nodes)]
    return kind(
        ctx.rank,
        rank_of,
        topology,
        rows.shape[1],
        settings.comm.timeout_s,
        FailureBoard(store, rank_label(per_rank)),
        header_check=header_check,
        liveness=liveness,
        device=rows.device,
    )


def _group_trainer(
    settings: Settings, rows: torch.Tensor, template, trainers, task
) -> StackedMFTrainer | NodeByNode:
    """Stacked training where it applies to more than one node; a node alone trains with its own Trainer."""
    options = {key: value for key, value in settings.optimizer.options.items() if key != "lr"}
    if len(trainers) == 1 or not stacked_applies(settings.model.name, settings.optimizer.name):
        return NodeByNode(trainers)
    if sparse_sgd_applies(settings.optimizer.name, options):
        return StackedMFTrainer(rows, layout(template), trainers, task, settings.optimizer.lr)
    return StackedMFTrainer(
        rows,
        layout(template),
        trainers,
        task,
        settings.optimizer.lr,
        make_optimizer=lambda params: build_optimizer(
            settings.optimizer.name, params, settings.optimizer.lr, **options
        ),
    )


def model_sketch(settings: Settings, numel: int) -> ModelSketch | None:
    """What each node publishes of its model for the consensus distance (`eval.consensus_sketch`; 0: nothing)."""
    return (
        ModelSketch(numel, settings.eval.consensus_sketch, settings.run.seed)
        if settings.eval.consensus_sketch
        else None
    )


def _divergence_watch(settings: Settings, peers: RoundPeers, store: dist.Store) -> DivergenceWatch:
    """Synchronous nodes stop together, a drift margin after the first divergence; RWM nodes at once
    (a hybrid run's walk too: `dpsgd.algorithms.hybrid` lifts the margin while it walks)."""
    margin = None if PATTERNS[settings.algorithm.name].plan is None else peers.stop_margin
    return DivergenceWatch(store, settings.train.stop_on_divergence, margin)


def build_trainer(
    settings: Settings, dataset, data: NodeData, rank: int, row: torch.Tensor | None = None
) -> tuple[Trainer, torch.Tensor]:
    """A node's model, optimizer, batch stream and task from the config, and the flat vector
    that holds the model's parameters (`dpsgd.models.flat`): a new one, or `row` (a node
    group's row for this node).

    Used by every node of a run and by the centralized reference (`benchmarks/centralized.py`),
    so both train exactly the same way.
    """
    model = build_model(
        settings.model.name, dataset.dims, settings.run.seed, **_model_options(settings, data)
    )
    if row is None:
        flat = flatten_model(model)
    else:
        bind_model_to(model, row)
        flat = row
    optimizer = build_optimizer(
        settings.optimizer.name, model.parameters(), **settings.optimizer.options
    )
    batches = BatchStream(
        data.train, settings.train.batch_size, torch_generator(settings.run.seed, "batches", rank)
    )
    trainer = Trainer(
        model,
        optimizer,
        build_task(settings, dataset.task),
        batches,
        settings.train.local_steps,
        settings.train.full_epochs,
    )
    return trainer, flat


def build_task(settings: Settings, task: str) -> Task:
    """What a node minimises and how it is judged: rating prediction or classification."""
    regularization = settings.model.options.get(
        "regularization", 0.0
    )  # a model of the user's own: none
    return RatingsTask(regularization) if task == "ratings" else ClassificationTask()


def _model_options(settings: Settings, data: NodeData | None = None) -> dict:
    """The model keys `build_model` takes: all but `name` and the loss's `regularization` (`build_task`).
    SPEC §6: mf's global offset starts from the node's own train mean (no communication; 0 without `data`)."""
    options = dict(settings.model.options)
    options.pop("regularization", None)
    if settings.model.name == "mf" and data is not None:
        options["initial_offset"] = float(data.train[2].double().mean())
    return options


def _evaluate(settings: Settings, trainer: Trainer, data: NodeData) -> dict[str, float]:
    test = trainer.evaluate(data.test)
    result = {"test_loss": test["loss"], "test_acc": test["acc"]}
    if settings.eval.train_loss:
        result["train_loss"] = trainer.evaluate(data.train)["loss"]
    return result
