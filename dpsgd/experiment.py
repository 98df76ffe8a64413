"""One rank's run, from joining the process group to leaving it (`run_node`).

The jobs around it are components of their own: `dpsgd.checks` finds configuration mistakes
before any rank exists, `dpsgd.building` prepares the data and builds the rank's node group,
transport and pattern loop, `dpsgd.run_outputs` aggregates on rank 0. Here: the process group,
the run's files, resume, the start barrier, and the final line.
"""

from __future__ import annotations

import copy
import json
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import yaml

from dpsgd.building import build_rank, no_learning_baseline, prepare_data, round_peers
from dpsgd.checkpoint import Checkpoints, agree_on_start_round, check_resumable
from dpsgd.checks import RANDOM_TOPOLOGIES, check_config, config_notes, topology_degree
from dpsgd.divergence import describe, divergence_report
from dpsgd.errors import NodeFailure
from dpsgd.launch import RankContext
from dpsgd.node import Node
from dpsgd.node_group import hosted_nodes
from dpsgd.progress import rank_arrived, run_store, startup_step
from dpsgd.run_folder import check_fresh_node, write_atomic
from dpsgd.run_outputs import (
    RESUME_AGGREGATED_KEY,
    Aggregator,
    RunInfo,
    earlier_rounds,
    publish_rounds_completed,
    republish_kept_rounds,
)
from dpsgd.settings import Settings

# What test_loss means, per task.
TEST_LOSS_METRIC = {"ratings": "rmse", "classification": "cross_entropy"}


def run_node(settings: Settings, ctx: RankContext, run_dir: Path, dataset=None) -> None:
    """Everything one rank does in a run, from joining the process group to leaving it.

    A rank hosts one node, or with `nodes_per_rank` > 1 a group of them (`dpsgd.group`).
    """
    torch.set_num_threads(settings.run.threads_per_rank)
    topology = check_config(settings, ctx.world_size)
    hosted = hosted_nodes(ctx.rank, settings.run.nodes_per_rank)
    for node_id in hosted:
        _check_run_folder(settings, run_dir, node_id)
    dataset = dataset or _prepare_on_every_rank(settings, ctx.rank)
    store = _join_process_group(settings, ctx, run_dir)
    startup_step(
        "process group",
        f"process group ready ({ctx.world_size} rank{'s' if ctx.world_size > 1 else ''}); "
        f"building {settings.run.nodes} nodes",
        show=ctx.rank == 0,
    )
    checkpoints = {
        node_id: Checkpoints(run_dir, node_id, settings.run.nodes, settings.checkpoint.every, store)
        for node_id in hosted
    }
    start_round = agree_on_start_round(
        list(checkpoints.values()),
        settings.run.resume,
        settings.run.rounds,
        settings.comm.timeout_s,
    )
    if ctx.rank == 0:
        write_run_files(settings, dataset, run_dir)
    group, run_algorithm = build_rank(
        settings, ctx, topology, dataset, store, run_dir, start_round, checkpoints
    )
    nodes = group.nodes
    restored = {node.rank: checkpoints[node.rank].restore(node, start_round) for node in nodes}
    elapsed_s = restored[nodes[0].rank][0]
    aggregator = (
        _start_aggregator(settings, nodes[0], store, run_dir, dataset, start_round)
        if ctx.rank == 0
        else None
    )
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
    rounds_completed = run_algorithm(
        settings.run.rounds, start_round, {node: state for node, (_, state) in restored.items()}
    )
    for node_checkpoints in checkpoints.values():  # a run stopped early has writes still going
        node_checkpoints.wait()
    for node in nodes:
        node.recorder.log.close()
        publish_rounds_completed(store, node.rank, rounds_completed[node.rank])
    nodes[0].liveness.end("done")
    _barrier(ctx.rank)
    if aggregator is not None:
        diverged = divergence_report(store, settings.run.nodes)
        if diverged is not None:
            print(f"[dpsgd] {describe(diverged)}", flush=True)
        _print_final(aggregator.finish(diverged=diverged), run_dir)
    dist.destroy_process_group()


def _check_run_folder(settings: Settings, run_dir: Path, rank: int) -> None:
    """Resume only a run whose settings match; a fresh node never writes over another run's files."""
    if settings.run.resume:
        check_resumable(settings, run_dir, rank=rank)
    else:
        check_fresh_node(run_dir, rank)


def _prepare_on_every_rank(settings: Settings, rank: int):
    """Under torchrun every rank prepares the data; the cache makes only one of them parse it."""
    dataset = prepare_data(settings)
    if rank == 0:
        print(f"[dpsgd] {settings.dataset.name}: {dataset.describe()}", flush=True)
    return dataset


def _join_process_group(settings: Settings, ctx: RankContext, run_dir: Path) -> dist.Store:
    """Start gloo; return this run's namespace in the rendezvous store.

    On a NodeFailure the process group is left as it is: tearing down gloo pairs to a
    dead peer can block, and the launcher ends the process right after.
    """
    store = run_store(ctx.store, run_key(run_dir))
    dist.init_process_group(
        "gloo",
        store=dist.PrefixStore("pg", store),
        rank=ctx.rank,
        world_size=ctx.world_size,
        timeout=timedelta(seconds=settings.comm.timeout_s),
    )
    Path(run_dir).mkdir(
        parents=True, exist_ok=True
    )  # Hydra made it on rank 0's machine, not elsewhere
    return store


def run_key(run_dir: Path) -> str:
    """The run's name in the rendezvous store: the same on every machine whatever each one's cwd.

    The last two parts of the run directory (date/time, or sweep time/job number) are
    what differs between runs and jobs; the absolute path may not be equal everywhere.
    """
    return "/".join(Path(run_dir).parts[-2:])


def write_run_files(settings: Settings, dataset, run_dir: Path) -> None:
    """The resolved config, and which users (and how many samples) each node got, so runs can be compared.

    config.yaml records the degree the graph was built with, not `null` (a resume compares it with
    the degree it would build, `check_resumable`, so a changed default can never change a run's graph).
    """
    notes = "".join(f"# {note}\n" for note in config_notes(settings))
    recorded = copy.deepcopy(settings.resolved)
    if settings.topology.degree is None and settings.topology.kind in RANDOM_TOPOLOGIES:
        recorded["topology"]["degree"] = topology_degree(settings)
    text = yaml.safe_dump(recorded, sort_keys=False, allow_unicode=True)
    write_atomic(Path(run_dir) / "config.yaml", notes + text)
    partition = {
        "dataset": settings.dataset.name,
        "description": dataset.describe(),
        **dataset.partition(settings.run.nodes, settings.run.seed),
    }
    write_atomic(Path(run_dir) / "partition.json", json.dumps(partition, indent=1) + "\n")


def _start_aggregator(
    settings: Settings, node: Node, store: dist.Store, run_dir: Path, dataset, start_round: int
) -> Aggregator:
    """Rank 0's aggregator, carrying over on resume the aggregates written before the interruption.

    The no-learning scores go into summary.json so that a report draws every result against
    them without the data (a few milliseconds here: the data set is already parsed).
    """
    carried = earlier_rounds(run_dir, start_round)
    store.set(RESUME_AGGREGATED_KEY, str(carried[-1]["round"] if carried else 0))
    baseline = no_learning_baseline(settings, dataset)
    info = RunInfo(
        nodes=settings.run.nodes,
        rounds=settings.run.rounds,
        num_parameters=node.flat.numel(),
        model=settings.model.name,
        dataset=settings.dataset.name,
        algorithm=settings.algorithm.name,
        sharing=settings.sharing.name,
        metric_name=TEST_LOSS_METRIC[dataset.task],
        spectral_gap=round_peers(settings, node.topology).mixing_gap(),
        no_learning={f"test_{key}": value for key, value in baseline.items()},
    )
    return Aggregator(
        store,
        run_dir,
        info,
        node.schedule.rounds_due(),
        per_node_tb=settings.log.per_node_tb,
        progress=settings.log.progress,
        earlier_rounds=carried,
        reached=node.recorder.reached,
        progress_every_s=settings.log.progress_every_s,
    ).start()


def _barrier(rank: int) -> None:
    """Bounded by the process group's timeout (comm.timeout_s)."""
    try:
        dist.barrier()
    except Exception as error:  # noqa: BLE001
        raise NodeFailure(
            f"node {rank} stops: not every node reached the barrier ({error})"
        ) from None


def _print_final(summary: dict, run_dir: Path) -> None:
    final = summary["final"]
    if final is None:
        outcome = "no evaluated round was reached by every node (lower eval.every to measure one)"
    else:
        loss = final.get("test_loss", {}).get(
            "mean"
        )  # absent when every node's loss was non-finite
        loss_text = "not finite on any node" if loss is None else f"{loss:.4f}"
        outcome = (
            f"mean test {summary['test_loss_metric']} {loss_text} at round {final['round']}; "
            f"mean bytes sent per node {final['bytes_sent']['mean']:,.0f}"
        )
    rounds = (
        summary["rounds_min"]
        if summary["rounds_min"] == summary["rounds_max"]
        else f"{summary['rounds_min']}-{summary['rounds_max']}"
    )
    print(
        f"[dpsgd] done: {rounds} rounds in {summary['wall_s']:.1f} s; {outcome}; results in {run_dir}",
        flush=True,
    )
