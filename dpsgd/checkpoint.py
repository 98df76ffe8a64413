"""Checkpoints: each node saves what it needs to go on; a run resumes where every node can.

A node's checkpoint is its model, optimizer state, place in its batch order, sharing
state (accumulators, generators), byte counters, random-choice generator, and what the
algorithm keeps (RWM's age). Files go to the node's own machine
(`<run>/checkpoints/<node>/<round>.pt`, written to a temporary name then renamed, the
last `KEEP` kept), so a crash mid-write never leaves a torn checkpoint. On resume the
nodes agree through the rendezvous store on the latest round that every one of them
saved, and every node continues from there: D-PSGD exactly as if never interrupted;
RWM restarts its walks from the saved models and ages (messages in flight at the
interruption are gone).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from dpsgd.communication import ByteCounters
from dpsgd.errors import ConfigError
from dpsgd.node import Node

KEEP = 2
SAVED_KEY = "checkpoint/latest"
# Top-level keys that may differ between a run and its resumption: none changes the numbers.
RESUMABLE_CHANGES = {"resume", "rounds", "checkpoint", "log", "comm", "cache_dir", "threads_per_rank"}


def checkpoint_dir(run_dir: Path, node: int) -> Path:
    return Path(run_dir) / "checkpoints" / str(node)


def saved_rounds(run_dir: Path, node: int) -> list[int]:
    directory = checkpoint_dir(run_dir, node)
    return sorted(int(p.stem) for p in directory.glob("*.pt")) if directory.exists() else []


def discard(run_dir: Path, node: int) -> None:
    """A new run in an old directory must not leave the old run's checkpoints to be resumed."""
    shutil.rmtree(checkpoint_dir(run_dir, node), ignore_errors=True)


def save(node: Node, run_dir: Path, round_number: int, elapsed_s: float, algorithm_state: dict,
         store: dist.Store, world_size: int) -> None:
    """Write this node's state after `round_number`, then prune what no resume can need.

    Nodes drift apart in rounds (RWM without bound), so a node keeps every checkpoint
    from the slowest node's latest saved round on: that round is the one a resume
    would pick. Checkpoints fall on multiples of checkpoint.every, the same for all.
    """
    directory = checkpoint_dir(run_dir, node.rank)
    directory.mkdir(parents=True, exist_ok=True)
    state = {
        "round": round_number, "elapsed_s": elapsed_s, "flat": node.flat.clone(),
        "optimizer": node.trainer.optimizer.state_dict(), "batches": node.trainer.batches.state_dict(),
        "sharing": node.sharing.state_dict(), "bytes": asdict(node.link.bytes),
        "rng": node.rng.bit_generator.state, "algorithm": algorithm_state,
    }
    temporary = directory / f".{round_number}.pt.tmp"
    with open(temporary, "wb") as file:
        torch.save(state, file)
        file.flush()
        os.fsync(file.fileno())  # the rename must never expose a torn file, even after an OS crash
    os.replace(temporary, directory / f"{round_number}.pt")
    store.set(f"{SAVED_KEY}/{node.rank}", str(round_number))
    keys = [f"{SAVED_KEY}/{rank}" for rank in range(world_size)]
    slowest = min(int(raw) for raw in store.multi_get(keys)) if store.check(keys) else 0
    for old in saved_rounds(run_dir, node.rank)[:-KEEP]:
        if old < slowest:
            (directory / f"{old}.pt").unlink(missing_ok=True)


def restore(node: Node, run_dir: Path, round_number: int) -> tuple[float, dict]:
    """Load the node's state saved after `round_number`; return (elapsed_s, algorithm state)."""
    state = torch.load(checkpoint_dir(run_dir, node.rank) / f"{round_number}.pt", weights_only=False)
    node.flat.copy_(state["flat"])
    node.trainer.optimizer.load_state_dict(state["optimizer"])
    node.trainer.batches.load_state_dict(state["batches"])
    node.sharing.load_state_dict(state["sharing"])
    for name, value in asdict(ByteCounters(**state["bytes"])).items():
        setattr(node.link.bytes, name, value)
    node.rng.bit_generator.state = state["rng"]
    return state["elapsed_s"], state["algorithm"]


def agree_on_resume_round(store: dist.Store, rank: int, world_size: int, run_dir: Path, timeout_s: float) -> int:
    """The latest round every node has a checkpoint for (all nodes compute the same answer)."""
    store.set(f"resume/{rank}", json.dumps(saved_rounds(run_dir, rank)))
    keys = [f"resume/{node}" for node in range(world_size)]
    store.wait(keys, timedelta(seconds=timeout_s))
    return latest_common_round([json.loads(raw) for raw in store.multi_get(keys)], run_dir)


def check_rounds(rounds: int, start_round: int) -> None:
    if rounds < start_round:
        raise ConfigError(f"rounds={rounds} but the run resumes after round {start_round}: set rounds to "
                          f"{start_round} or more to continue it.")


def latest_common_round(rounds_per_node: list[list[int]], run_dir: Path) -> int:
    common = set.intersection(*(set(rounds) for rounds in rounds_per_node))
    if not common:
        raise ConfigError(f"resume=true, but no round has a checkpoint from every node under {run_dir}/checkpoints "
                          "(checkpoint.every may be 0, or the run stopped before the first one). Start a new run "
                          "instead (resume=false).")
    return max(common)


def check_resumable(cfg: DictConfig, run_dir: Path, all_nodes_local: bool = False, rank: int = 0) -> None:
    """Resuming continues the same experiment: only keys that do not change the numbers may differ.

    config.yaml lives on rank 0's machine; other machines check only if they have a copy.
    With every node on this machine (standalone mode) the checkpoints are checked too.
    """
    saved_path = Path(run_dir) / "config.yaml"
    if rank != 0 and not saved_path.exists():
        return
    if not saved_path.exists():
        raise ConfigError(f"resume=true, but {saved_path} does not exist. Point hydra.run.dir at the directory of "
                          "the run to continue, e.g. `hydra.run.dir=outputs/2026-11-26/10-00-00 resume=true`.")
    saved = _flatten(OmegaConf.to_container(OmegaConf.load(saved_path), resolve=True))
    current = _flatten(OmegaConf.to_container(cfg, resolve=True))
    changed = sorted(key for key in set(saved) | set(current)
                     if key.split(".")[0] not in RESUMABLE_CHANGES and saved.get(key) != current.get(key))
    if changed:
        raise ConfigError(f"resume=true, but the configuration differs from the run's {saved_path} in: "
                          f"{', '.join(changed)}. Resume with the run's own settings (only rounds, checkpoint.*, "
                          "log.* and comm.* may change).")
    if all_nodes_local:
        latest_common_round([saved_rounds(run_dir, node) for node in range(cfg.nodes)], run_dir)


def _flatten(tree: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}"""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
