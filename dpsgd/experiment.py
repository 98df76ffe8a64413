"""Composition: turn the resolved config into one running node.

`check_config` runs before any rank exists (it finds user mistakes while they can
still be one clear paragraph); `prepare_data` parses data sets once so that ranks
memory-map or inherit them; `run_node` builds a node's parts and hands them to the
algorithm. No other module reads the config.
"""

from __future__ import annotations

import json
import os
from datetime import timedelta
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from dpsgd.algorithms.patterns import PATTERNS
from dpsgd.algorithms.peers import FixedGraph, ResampledGraph, RoundPeers
from dpsgd.averaging import AVERAGING_ONLY, MERGE_RULES
from dpsgd.checkpoint import Checkpoints, agree_on_start_round, check_resumable
from dpsgd.communication import FailureBoard
from dpsgd.data.datasets import NodeData, dataset_builder, prepare_dataset
from dpsgd.divergence import DivergenceWatch, describe, divergence_report
from dpsgd.errors import ConfigError, NodeFailure
from dpsgd.consensus import ModelSketch
from dpsgd.launch import RankContext
from dpsgd.liveness import Liveness
from dpsgd.metrics import EvalSchedule, RoundRecorder
from dpsgd.models import build_model, model_builder
from dpsgd.models.flat import bind_model_to, flatten_model, layout, num_parameters
from dpsgd.node import Node
from dpsgd.node_group import NodeByNode, NodeGroup, hosted_nodes, rank_label
from dpsgd.progress import rank_arrived, run_store, startup_step
from dpsgd.run_folder import check_fresh_node, write_atomic
from dpsgd.run_outputs import (RESUME_AGGREGATED_KEY, Aggregator, NodeLog, RunInfo, earlier_rounds,
                               publish_rounds_completed, republish_kept_rounds)
from dpsgd.seeding import numpy_rng, stream_key, torch_generator
from dpsgd.settings import alpha_note, check_known_keys, check_values
from dpsgd.sharing import build_sharing, check_sharing
from dpsgd.stacked_mf import StackedMFTrainer, sparse_sgd_applies, stacked_applies
from dpsgd.transport.rounds import RoundTransport
from dpsgd.transport.walks import WalkTransport
from dpsgd.topology import DEFAULT_DEGREE, Topology, build_topology, default_degree
from dpsgd.training import (BatchStream, ClassificationTask, RatingsTask, Task, Trainer, build_optimizer,
                            check_optimizer)

# Topologies drawn from the seed, which `topology.resample_every` can draw anew.
RANDOM_TOPOLOGIES = ("regular", "smallworld")
# What test_loss means, per task.
TEST_LOSS_METRIC = {"ratings": "rmse", "classification": "cross_entropy"}


def check_config(cfg: DictConfig, world_size: int | None = None, choices=None) -> Topology:
    """Find configuration mistakes before any rank trains; return the validated topology.

    `world_size`: the ranks that were started (None before forking them: they follow from the config).
    `choices`: the chosen option of each config group, for refusing keys no config file declares
    (default: Hydra's runtime choices inside a Hydra app; outside one that check is skipped).
    """
    if choices is None and HydraConfig.initialized():
        choices = HydraConfig.get().runtime.choices
    if choices is not None:
        check_known_keys(cfg, choices)
    check_values(cfg)  # every key's type and range first: the checks below rely on them
    _check_grouping(cfg, ranks_for(cfg) if world_size is None else world_size)
    if cfg.algorithm.name not in PATTERNS:
        raise ConfigError(f"algorithm.name={cfg.algorithm.name!r} is not known; choose one of "
                          f"{sorted(PATTERNS)}, e.g. `algorithm=dpsgd`.")

    dataset_builder(cfg.dataset.get("name"), cfg.dataset.get("_target_"))  # a known name, or a target that imports
    model_builder(cfg.model.get("name"), cfg.model.get("_target_"))
    check_sharing(cfg.sharing.name, cfg.alpha, _options(cfg.sharing))
    if cfg.algorithm.name == "rwm" and cfg.sharing.merge in AVERAGING_ONLY:
        raise ConfigError(f"sharing.merge={cfg.sharing.merge} applies to D-PSGD, whose nodes average several "
                          "neighbours' messages at once; RWM merges each arriving model by age on the coordinates "
                          "it carries (SPEC §5). Choose another rule, e.g. `sharing.merge=fill_own` (RWM's "
                          "age-weighted average), or use `algorithm=dpsgd`.")
    _check_pattern(cfg)
    # No torch computation here: the standalone parent runs this before forking the ranks.
    check_optimizer(cfg.optimizer.name, cfg.optimizer.lr)
    return _topology(cfg)


def _check_pattern(cfg: DictConfig) -> None:
    """The pattern's own keys and rules (`dpsgd.algorithms.patterns`), and graph resampling."""
    name, pattern = cfg.algorithm.name, PATTERNS[cfg.algorithm.name]
    missing = [key for key in pattern.declared if key not in cfg.algorithm]
    if missing:
        raise ConfigError(f"algorithm.name={name} needs the keys {missing} of its config group; choose the "
                          f"pattern with `algorithm={name}` (which brings them) rather than `algorithm.name={name}`.")
    if pattern.check is not None:
        pattern.check(pattern_options(cfg, pattern.declared), cfg.nodes, cfg.rounds)
    every = resample_every(cfg)
    if every is not None and (name != "dpsgd" or cfg.topology.kind not in RANDOM_TOPOLOGIES):
        raise ConfigError(f"topology.resample_every={every} draws a new random graph for D-PSGD, but this run has "
                          f"algorithm={name} and topology.kind={cfg.topology.kind}. It needs `algorithm=dpsgd` and "
                          f"a random graph (topology.kind one of {list(RANDOM_TOPOLOGIES)}); epidemic draws its own "
                          "peers each round, and RWM walks one fixed graph. Otherwise drop topology.resample_every.")
    if every is not None and topology_degree(cfg) < 3:
        raise ConfigError(f"topology.resample_every={every} with topology.degree={topology_degree(cfg)}: every period "
                          "draws a new graph during the run, and graphs of degree below 3 are often disconnected, "
                          "which would stop the run midway. Use `topology.degree=3` or more.")


def topology_degree(cfg: DictConfig) -> int:
    """`topology.degree`, or when it is left unset (null) the largest valid degree up to 4 for the nodes."""
    degree = cfg.topology.degree
    return default_degree(cfg.topology.kind, cfg.nodes) if degree is None else degree


def config_notes(cfg: DictConfig) -> list[str]:
    """One line for each setting that does not mean what it may seem to: said at start-up and kept in
    the run's config.yaml. Call after check_config (the values are valid)."""
    notes = [note for note in (alpha_note(cfg),) if note]
    degree = topology_degree(cfg)
    if (cfg.topology.degree is None and cfg.topology.kind in RANDOM_TOPOLOGIES and degree != DEFAULT_DEGREE
            and not PATTERNS[cfg.algorithm.name].complete_graph):
        notes.append(f"topology.degree={degree}: the largest valid degree up to {DEFAULT_DEGREE} for {cfg.nodes} nodes "
                     f"(set topology.degree to choose one)")
    return notes


def resample_every(cfg: DictConfig) -> int | None:
    """`topology.resample_every`: rounds per graph when D-PSGD draws a new one (None: one graph)."""
    return OmegaConf.select(cfg, "topology.resample_every", default=None)


def ranks_for(cfg: DictConfig) -> int:
    """How many ranks a run of `nodes` nodes, `nodes_per_rank` on each, needs (at least one)."""
    return max(1, cfg.nodes // cfg.nodes_per_rank)


def _check_grouping(cfg: DictConfig, world_size: int) -> None:
    per_rank = cfg.nodes_per_rank
    if cfg.nodes % per_rank:
        raise ConfigError(f"nodes={cfg.nodes} cannot be split into groups of nodes_per_rank={per_rank}: every rank "
                          f"hosts the same number of nodes. Choose nodes_per_rank dividing {cfg.nodes}, e.g. "
                          f"`nodes_per_rank={max(d for d in range(1, per_rank + 1) if cfg.nodes % d == 0)}`.")
    _check_device(cfg)
    if cfg.nodes != world_size * per_rank:
        raise ConfigError(f"nodes={cfg.nodes} with nodes_per_rank={per_rank} needs {cfg.nodes // per_rank} ranks, "
                          f"but {world_size} were started. Under torchrun the ranks are nnodes x nproc_per_node: "
                          f"give nodes (a multiple of the world size) or start {cfg.nodes // per_rank} ranks.")


def _check_device(cfg: DictConfig) -> None:
    """A GPU trains node groups with whole-model sharing; nothing else may depend on one being there."""
    if cfg.device == "cpu":
        return
    if cfg.device != "cuda":
        raise ConfigError(f"device={cfg.device!r} is not known: use `device=cpu` or `device=cuda`.")
    if cfg.nodes_per_rank == 1 or cfg.sharing.name != "full":
        raise ConfigError("device=cuda trains node groups with whole-model messages: set nodes_per_rank above 1 "
                          f"and sharing=full (now nodes_per_rank={cfg.nodes_per_rank}, sharing={cfg.sharing.name}), "
                          "or use device=cpu.")
    # Asked through NVML: a CUDA context in the standalone parent would break the ranks it forks.
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    if not torch.cuda.is_available():
        raise ConfigError("device=cuda, but torch sees no CUDA device on this machine. Use `device=cpu`.")


def prepare_data(cfg: DictConfig):
    """Parse (or generate) the data set once; the cache makes later calls cheap."""
    return prepare_dataset(cfg.dataset.name, _options(cfg.dataset), cfg.seed, Path(cfg.cache_dir).expanduser(),
                           data_dir=cfg.data_dir)


def run_node(cfg: DictConfig, ctx: RankContext, run_dir: Path, dataset=None) -> None:
    """Everything one rank does in a run, from joining the process group to leaving it.

    A rank hosts one node, or with `nodes_per_rank` > 1 a group of them (`dpsgd.group`).
    """
    torch.set_num_threads(cfg.threads_per_rank)
    topology = check_config(cfg, ctx.world_size)
    hosted = hosted_nodes(ctx.rank, cfg.nodes_per_rank)
    for node_id in hosted:
        _check_run_folder(cfg, run_dir, node_id)
    dataset = dataset or _prepare_on_every_rank(cfg, ctx.rank)
    store = _join_process_group(cfg, ctx, run_dir)
    startup_step("process group", f"process group ready ({ctx.world_size} rank{'s' if ctx.world_size > 1 else ''}); "
                 f"building {cfg.nodes} nodes", show=ctx.rank == 0)
    checkpoints = {node_id: Checkpoints(run_dir, node_id, cfg.nodes, cfg.checkpoint.every, store) for node_id in hosted}
    start_round = agree_on_start_round(list(checkpoints.values()), cfg.resume, cfg.rounds, cfg.comm.timeout_s)
    if ctx.rank == 0:
        write_run_files(cfg, dataset, run_dir)
    group, run_algorithm = build_rank(cfg, ctx, topology, dataset, store, run_dir, start_round, checkpoints)
    nodes = group.nodes
    restored = {node.rank: checkpoints[node.rank].restore(node, start_round) for node in nodes}
    elapsed_s = restored[nodes[0].rank][0]
    aggregator = _start_aggregator(cfg, nodes[0], store, run_dir, dataset, start_round) if ctx.rank == 0 else None
    if start_round:  # rank 0 may not have aggregated every round the nodes had logged
        aggregated = int(store.get(RESUME_AGGREGATED_KEY))
        for node in nodes:
            republish_kept_rounds(store, node.rank, node.recorder.log, aggregated, node.schedule)
    startup_step("nodes built")
    rank_arrived(store, "ready")  # the run's namespace: a torchrun sweep's jobs share ctx.store
    _barrier(ctx.rank)
    startup_step("rounds start")
    for node in nodes:
        node.recorder.start_clock(elapsed_s)
    if aggregator is not None:
        aggregator.start_clock(elapsed_s)
        if start_round:
            print(f"[dpsgd] resumed after round {start_round}", flush=True)
    rounds_completed = run_algorithm(cfg.rounds, start_round, {node: state for node, (_, state) in restored.items()})
    for node in nodes:
        node.recorder.log.close()
        publish_rounds_completed(store, node.rank, rounds_completed[node.rank])
    nodes[0].liveness.end("done")
    _barrier(ctx.rank)
    if aggregator is not None:
        diverged = divergence_report(store, cfg.nodes)
        if diverged is not None:
            print(f"[dpsgd] {describe(diverged)}", flush=True)
        _print_final(aggregator.finish(diverged=diverged), run_dir)
    dist.destroy_process_group()


def build_rank(cfg: DictConfig, ctx: RankContext, topology: Topology, dataset, store: dist.Store, run_dir: Path,
               start_round: int = 0, checkpoints: dict[int, Checkpoints] | None = None,
               peers: RoundPeers | None = None) -> tuple[NodeGroup, Callable]:
    """The rank's nodes, and its algorithm as run(rounds, start_round, states) -> {node: rounds completed},
    where `states` maps each node to what its checkpoint kept for the algorithm (RWM's age).

    `peers`: the synchronous patterns' plan (default: the config's); `checkpoints`: per hosted node
    (default: none are saved)."""
    peers = peers or round_peers(cfg, topology)
    checkpoints = checkpoints or dict.fromkeys(hosted_nodes(ctx.rank, cfg.nodes_per_rank))
    pattern = PATTERNS[cfg.algorithm.name]
    group = build_group(cfg, ctx, topology, dataset, store, run_dir, start_round, checkpoints,
                        divergence=_divergence_watch(cfg, peers, store), walking=pattern.walks)
    options = pattern_options(cfg, pattern.keys)
    if pattern.plan is not None:
        options["peers"] = peers
    if pattern.plan is not None and pattern.walks:  # walks first, then averages (hybrid)
        options["averaging"] = _transport(RoundTransport, cfg, ctx, topology, group.rows, store,
                                          group.nodes[0].sharing.check_header, group.liveness)
    return group, lambda rounds, start=0, states=None: pattern.loop(group, rounds, start, states, **options)


def pattern_options(cfg: DictConfig, keys: tuple[str, ...]) -> dict:
    """These `algorithm.*` keys (a pattern declares them), as keyword arguments."""
    return {key: cfg.algorithm[key] for key in keys}


def round_peers(cfg: DictConfig, topology: Topology) -> RoundPeers:
    """Who sends to whom each round in the synchronous patterns (`dpsgd.algorithms.peers`); a walking
    pattern's graph otherwise (its spectral gap goes into summary.json)."""
    every = resample_every(cfg)
    if every is not None:
        return ResampledGraph(lambda period: _topology(cfg, period), every, cfg.nodes)
    pattern = PATTERNS[cfg.algorithm.name]
    if pattern.plan is None:
        return FixedGraph(topology)
    return pattern.plan(cfg.nodes, cfg.seed, pattern_options(cfg, pattern.plan_keys), topology)


def _check_run_folder(cfg: DictConfig, run_dir: Path, rank: int) -> None:
    """Resume only a run whose settings match; a fresh node never writes over another run's files."""
    if cfg.resume:
        check_resumable(cfg, run_dir, rank=rank)
    else:
        check_fresh_node(run_dir, rank)


def _prepare_on_every_rank(cfg: DictConfig, rank: int):
    """Under torchrun every rank prepares the data; the cache makes only one of them parse it."""
    dataset = prepare_data(cfg)
    if rank == 0:
        print(f"[dpsgd] {cfg.dataset.name}: {dataset.describe()}", flush=True)
    return dataset


def _join_process_group(cfg: DictConfig, ctx: RankContext, run_dir: Path) -> dist.Store:
    """Start gloo; return this run's namespace in the rendezvous store.

    On a NodeFailure the process group is left as it is: tearing down gloo pairs to a
    dead peer can block, and the launcher ends the process right after.
    """
    store = run_store(ctx.store, run_key(run_dir))
    dist.init_process_group("gloo", store=dist.PrefixStore("pg", store), rank=ctx.rank,
                            world_size=ctx.world_size, timeout=timedelta(seconds=cfg.comm.timeout_s))
    Path(run_dir).mkdir(parents=True, exist_ok=True)  # Hydra made it on rank 0's machine, not elsewhere
    return store


def run_key(run_dir: Path) -> str:
    """The run's name in the rendezvous store: the same on every machine whatever each one's cwd.

    The last two parts of the run directory (date/time, or sweep time/job number) are
    what differs between runs and jobs; the absolute path may not be equal everywhere.
    """
    return "/".join(Path(run_dir).parts[-2:])


def build_group(cfg: DictConfig, ctx: RankContext, topology: Topology, dataset, store: dist.Store, run_dir: Path,
                start_round: int, checkpoints: dict[int, Checkpoints], divergence: DivergenceWatch,
                walking: bool) -> NodeGroup:
    """Every node the rank hosts, bound to its row, and the group's trainer and transport (`walking`: RWM's)."""
    per_rank = cfg.nodes_per_rank
    hosted = hosted_nodes(ctx.rank, per_rank)
    template = build_model(cfg.model.name, dataset.dims, cfg.seed, **_model_options(cfg))
    device = torch.device(cfg.device)
    rows = torch.empty(per_rank, num_parameters(template), dtype=torch.float32, device=device)
    liveness = Liveness(store, ctx.rank, ctx.world_size, slow_after_s=cfg.comm.timeout_s / 2,
                        label=rank_label(per_rank)).start()
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
    transport = _transport(WalkTransport if walking else RoundTransport, cfg, ctx, topology, rows, store,
                           nodes[0].sharing.check_header, liveness)
    for node in nodes:
        node.link = transport.ports[node.rank]
    trainer = _group_trainer(cfg, rows, template, trainers, build_task(cfg, dataset.task))
    return NodeGroup(nodes, rows, torch.empty_like(rows), transport, trainer, liveness)


def _transport(kind: type, cfg: DictConfig, ctx: RankContext, topology: Topology, rows: torch.Tensor,
               store: dist.Store, header_check, liveness: Liveness) -> RoundTransport | WalkTransport:
    """The rank's transport (`kind`: RoundTransport to average, WalkTransport to walk)."""
    per_rank = cfg.nodes_per_rank
    rank_of = [node // per_rank for node in range(cfg.nodes)]
    return kind(ctx.rank, rank_of, topology, rows.shape[1], cfg.comm.timeout_s,
                FailureBoard(store, rank_label(per_rank)), header_check=header_check, liveness=liveness,
                device=rows.device)


def _group_trainer(cfg: DictConfig, rows: torch.Tensor, template, trainers, task) -> StackedMFTrainer | NodeByNode:
    """Stacked training where it applies to more than one node; a node alone trains with its own Trainer."""
    options = {key: value for key, value in cfg.optimizer.items() if key not in ("name", "lr")}
    if len(trainers) == 1 or not stacked_applies(cfg.model.name, cfg.optimizer.name):
        return NodeByNode(trainers)
    if sparse_sgd_applies(cfg.optimizer.name, options):
        return StackedMFTrainer(rows, layout(template), trainers, task, cfg.optimizer.lr)
    return StackedMFTrainer(rows, layout(template), trainers, task, cfg.optimizer.lr,
                            make_optimizer=lambda params: build_optimizer(cfg.optimizer.name, params,
                                                                          cfg.optimizer.lr, **options))


def model_sketch(cfg: DictConfig, numel: int) -> ModelSketch | None:
    """What each node publishes of its model for the consensus distance (`eval.consensus_sketch`; 0: nothing)."""
    return ModelSketch(numel, cfg.eval.consensus_sketch, cfg.seed) if cfg.eval.consensus_sketch else None


def _divergence_watch(cfg: DictConfig, peers: RoundPeers, store: dist.Store) -> DivergenceWatch:
    """Synchronous nodes stop together, a drift margin after the first divergence; RWM nodes at once
    (a hybrid run's walk too: `dpsgd.algorithms.hybrid` lifts the margin while it walks)."""
    margin = None if PATTERNS[cfg.algorithm.name].plan is None else peers.stop_margin
    return DivergenceWatch(store, cfg.train.stop_on_divergence, margin)


def build_trainer(cfg: DictConfig, dataset, data: NodeData, rank: int,
                  row: torch.Tensor | None = None) -> tuple[Trainer, torch.Tensor]:
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
    optimizer = build_optimizer(cfg.optimizer.name, model.parameters(), **_options(cfg.optimizer))
    batches = BatchStream(data.train, cfg.train.batch_size, torch_generator(cfg.seed, "batches", rank))
    trainer = Trainer(model, optimizer, build_task(cfg, dataset.task), batches, cfg.train.local_steps,
                      cfg.train.full_epochs)
    return trainer, flat


def write_run_files(cfg: DictConfig, dataset, run_dir: Path) -> None:
    """The resolved config, and which users (and how many samples) each node got, so runs can be compared.

    config.yaml records the degree the graph was built with, not `null` (a resume compares it with
    the degree it would build, `check_resumable`, so a changed default can never change a run's graph).
    """
    notes = "".join(f"# {note}\n" for note in config_notes(cfg))
    recorded = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    if recorded.topology.get("degree") is None and recorded.topology.kind in RANDOM_TOPOLOGIES:
        recorded.topology.degree = topology_degree(cfg)
    write_atomic(Path(run_dir) / "config.yaml", notes + OmegaConf.to_yaml(recorded))
    partition = {"dataset": cfg.dataset.name, "description": dataset.describe(), **dataset.partition(cfg.nodes, cfg.seed)}
    write_atomic(Path(run_dir) / "partition.json", json.dumps(partition, indent=1) + "\n")


def no_learning_baseline(cfg: DictConfig, dataset=None) -> dict[str, float]:
    """What the config's task scores without learning (global train mean; majority class) on the
    whole train split and the test set a run evaluates: the line a learning result must beat.

    `dataset`: the prepared data set when the caller has it (a run's rank 0), else it is prepared here.
    """
    dataset = dataset or prepare_data(cfg)
    whole = dataset.node_data(0, 1, cfg.seed, cfg.eval.test_samples)
    return build_task(cfg, dataset.task).no_learning(whole.train, whole.test)


def build_task(cfg: DictConfig, task: str) -> Task:
    """What a node minimises and how it is judged: rating prediction or classification."""
    regularization = OmegaConf.select(cfg, "model.regularization", default=0.0)  # a model of the user's own: none
    return RatingsTask(regularization) if task == "ratings" else ClassificationTask()


def _model_options(cfg: DictConfig, data: NodeData | None = None) -> dict:
    """The model keys `build_model` takes: all but `name` and the loss's `regularization` (`build_task`).
    SPEC §6: mf's global offset starts from the node's own train mean (no communication; 0 without `data`)."""
    options = _options(cfg.model)
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


def _options(group: DictConfig) -> dict:
    """A config group's settings other than its `name`, as plain keyword arguments."""
    options = OmegaConf.to_container(group, resolve=True)
    options.pop("name")
    return options


def _topology(cfg: DictConfig, period: int = 0) -> Topology:
    """The run's graph; with `topology.resample_every`, the graph of that period (period 0: the run's graph).

    Epidemic Learning draws its peers from all nodes, so its graph is the complete one whatever
    `topology.*` says.
    """
    t = cfg.topology
    if PATTERNS[cfg.algorithm.name].complete_graph:
        return build_topology("full", cfg.nodes)
    seed = cfg.seed if period == 0 else stream_key(cfg.seed, "resampled_topology", period)
    return build_topology(t.kind, cfg.nodes, seed=seed, degree=t.degree, path=t.path, rewire_p=t.rewire_p)


def _start_aggregator(cfg: DictConfig, node: Node, store: dist.Store, run_dir: Path, dataset,
                      start_round: int) -> Aggregator:
    """Rank 0's aggregator, carrying over on resume the aggregates written before the interruption.

    The no-learning scores go into summary.json so that a report draws every result against
    them without the data (a few milliseconds here: the data set is already parsed).
    """
    carried = earlier_rounds(run_dir, start_round)
    store.set(RESUME_AGGREGATED_KEY, str(carried[-1]["round"] if carried else 0))
    baseline = no_learning_baseline(cfg, dataset)
    info = RunInfo(nodes=cfg.nodes, rounds=cfg.rounds, num_parameters=node.flat.numel(), model=cfg.model.name,
                   dataset=cfg.dataset.name, algorithm=cfg.algorithm.name, sharing=cfg.sharing.name,
                   metric_name=TEST_LOSS_METRIC[dataset.task],
                   spectral_gap=round_peers(cfg, node.topology).mixing_gap(),
                   no_learning={f"test_{key}": value for key, value in baseline.items()})
    return Aggregator(store, run_dir, info, node.schedule.rounds_due(), per_node_tb=cfg.log.per_node_tb,
                      progress=cfg.log.progress, earlier_rounds=carried, reached=node.recorder.reached,
                      progress_every_s=cfg.log.progress_every_s).start()


def _barrier(rank: int) -> None:
    """Bounded by the process group's timeout (comm.timeout_s)."""
    try:
        dist.barrier()
    except Exception as error:  # noqa: BLE001
        raise NodeFailure(f"node {rank} stops: not every node reached the barrier ({error})") from None


def _print_final(summary: dict, run_dir: Path) -> None:
    final = summary["final"]
    if final is None:
        outcome = "no evaluated round was reached by every node (lower eval.every to measure one)"
    else:
        loss = final.get("test_loss", {}).get("mean")  # absent when every node's loss was non-finite
        loss_text = "not finite on any node" if loss is None else f"{loss:.4f}"
        outcome = (f"mean test {summary['test_loss_metric']} {loss_text} at round {final['round']}; "
                   f"mean bytes sent per node {final['bytes_sent']['mean']:,.0f}")
    rounds = summary["rounds_min"] if summary["rounds_min"] == summary["rounds_max"] else \
        f"{summary['rounds_min']}-{summary['rounds_max']}"
    print(f"[dpsgd] done: {rounds} rounds in {summary['wall_s']:.1f} s; {outcome}; results in {run_dir}", flush=True)
