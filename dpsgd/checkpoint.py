"""Checkpoints: each node saves what it needs to go on; a run resumes where every node can.

A node's checkpoint is its model, optimizer state, place in its batch order, sharing
state (accumulators, generators), byte counters, random-choice generator, and what the
algorithm keeps (RWM's age). Files go to the node's own machine
(`<run>/checkpoints/<node>/<round>.pt`, written to a temporary name, flushed to disk, then
renamed, the last `KEEP` kept), so a crash mid-write never leaves a torn checkpoint. On
resume the nodes agree through the rendezvous store on the latest round that every one of
them saved, and every node continues from there: D-PSGD exactly as if never interrupted;
RWM restarts its walks from the saved models and ages (messages in flight at the
interruption are gone).

Writing is in the background (`CheckpointWriter`): at a checkpoint round a node copies its
tensors (a tenth of a millisecond for a MovieLens model) and trains on while a writer thread
serializes them, puts the bytes on disk, waits for fsync and prunes. Done in the round, writing
cost a rank of 96 MovieLens nodes 13-22% of its run (`benchmarks/checkpoints.py`). A node has one
checkpoint in progress at most: before it writes the next one, and at the run's last round, it
waits for the one in progress; a write that failed raises there, on the node's thread. Only a
checkpoint that is wholly on disk is renamed to its round, announced to the others and counted
by a resume.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, fields
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Protocol

import torch
import torch.distributed as dist
import yaml

from dpsgd.communication import ByteCounters
from dpsgd.errors import ConfigError
from dpsgd.settings import Settings
from dpsgd.topology import default_degree

if TYPE_CHECKING:
    import numpy as np

    from dpsgd.sharing import Sharing
    from dpsgd.training import Trainer

KEEP = 2
SAVED_KEY = "checkpoint/latest"
# What every checkpoint this library writes holds; anything else is not one of ours.
STATE_KEYS = frozenset(
    {"round", "elapsed_s", "flat", "optimizer", "batches", "sharing", "bytes", "rng", "algorithm"}
)
# Top-level keys that may differ between a run and its resumption: none changes the numbers.
RESUMABLE_CHANGES = {
    "resume",
    "rounds",
    "checkpoint",
    "log",
    "comm",
    "cache_dir",
    "threads_per_rank",
}
# Graph kinds that read topology.degree (the others ignore it).
DEGREE_KINDS = ("regular", "smallworld")


class SavedNode(Protocol):
    """What a checkpoint reads from a node and restores into it (`dpsgd.node.Node` is one)."""

    flat: torch.Tensor  # the model
    trainer: Trainer  # its optimizer and batch stream
    sharing: Sharing  # accumulators and generators
    link: Any  # `.bytes`: the node's ByteCounters
    rng: np.random.Generator  # the algorithm's random choices
    recorder: Any  # `.elapsed_s()`: seconds of rounds so far
    schedule: Any  # `.rounds`: the run's last round


def checkpoint_dir(run_dir: Path, node: int) -> Path:
    return Path(run_dir) / "checkpoints" / str(node)


def saved_rounds(run_dir: Path, node: int) -> list[int]:
    """Rounds with a checkpoint file `<round>.pt`; other files in the folder are not ours and are ignored."""
    directory = checkpoint_dir(run_dir, node)
    if not directory.exists():
        return []
    return sorted(int(p.stem) for p in directory.glob("*.pt") if p.stem.isdigit())


class CheckpointWriter:
    """Threads that put the checkpoints of the nodes a process hosts on disk, while the nodes go on training.

    A write is a few system calls and store requests, which wait (for the disk's fsync, for the
    store) without holding the interpreter, so `threads` writes wait together. Until its file is
    written a checkpoint's bytes stay in memory: at most one per hosted node (96 MovieLens nodes:
    85 MB). Threads do not survive a fork: a forked rank starts its own at its first checkpoint.
    """

    def __init__(self, threads: int):
        self.threads = threads
        self._executor: ThreadPoolExecutor | None = None
        self._pid = 0
        self._hosted: dict[
            Path, list[Checkpoints]
        ] = {}  # per run folder, the nodes this process hosts
        # Per run folder, the slowest node's latest saved round as last read from the store. It only
        # grows during a run, so a value read earlier never frees a file that a resume could need.
        self.slowest: dict[Path, int] = {}

    def submit(self, write: Callable[[], None]) -> Future:
        if self._executor is None or self._pid != os.getpid():
            self._executor = ThreadPoolExecutor(self.threads, thread_name_prefix="dpsgd-checkpoint")
            self._pid = os.getpid()
        return self._executor.submit(write)

    def enrol(self, checkpoints: Checkpoints) -> None:
        self._hosted.setdefault(checkpoints.run_dir, []).append(checkpoints)

    def at_last_round(self, checkpoints: Checkpoints) -> None:
        """`checkpoints`' node ended its last round: once every node of its run in this process has,
        wait until all their checkpoints are on disk (the last ones written together, not node after node)."""
        checkpoints.ended = True
        hosted = self._hosted.get(checkpoints.run_dir, [checkpoints])
        if all(node_checkpoints.ended for node_checkpoints in hosted):
            self._hosted.pop(checkpoints.run_dir, None)
            for node_checkpoints in hosted:
                node_checkpoints.wait()


WRITER = CheckpointWriter(threads=4)


class Checkpoints:
    """One node's checkpoints: save every `every` rounds, agree on where to resume, restore, prune.

    The only component that reads or writes `<run>/checkpoints/<node>/`.
    """

    def __init__(
        self,
        run_dir: Path,
        rank: int,
        world_size: int,
        every: int,
        store: dist.Store,
        writer: CheckpointWriter = WRITER,
    ):
        self.run_dir = Path(run_dir)
        self.rank = rank
        self.world_size = world_size
        self.every = every
        self.store = store
        self.writer = writer
        self.directory = checkpoint_dir(run_dir, rank)
        self.ended = False  # the node ended its last round
        self._writing: Future | None = None
        writer.enrol(self)

    def announce(self) -> None:
        """Tell the others which rounds this node has saved (a rank hosting a group announces each node first)."""
        self.store.set(f"resume/{self.rank}", json.dumps(saved_rounds(self.run_dir, self.rank)))

    def agree(self, timeout_s: float) -> int:
        """Once every node announced: the latest round all of them saved."""
        keys = [f"resume/{node}" for node in range(self.world_size)]
        self.store.wait(keys, timedelta(seconds=timeout_s))
        return latest_common_round(
            [json.loads(raw) for raw in self.store.multi_get(keys)], self.run_dir
        )

    def after_round(self, node: SavedNode, round_number: int, algorithm_state: dict) -> None:
        if self.every and round_number % self.every == 0:
            self.save(node, round_number, node.recorder.elapsed_s(), algorithm_state)
        if round_number >= node.schedule.rounds:
            self.writer.at_last_round(self)  # every checkpoint is on disk before the rank can exit

    def save(
        self, node: SavedNode, round_number: int, elapsed_s: float, algorithm_state: dict
    ) -> None:
        """Copy this node's state after `round_number` and hand it to a writer thread, which
        serializes and writes it (`wait` ends the write).

        The tensors are copied now, so the node may change its state while the file is written;
        serializing is left to the thread (torch.save releases the interpreter while it copies
        bytes, so the node trains on meanwhile).
        """
        self.wait()  # one checkpoint in progress per node: the previous one is on disk (or raised) first
        state = _copied(
            {
                "round": round_number,
                "elapsed_s": elapsed_s,
                "flat": node.flat,
                "optimizer": node.trainer.optimizer.state_dict(),
                "batches": node.trainer.batches.state_dict(),
                "sharing": node.sharing.state_dict(),
                "bytes": asdict(node.link.bytes),
                "rng": node.rng.bit_generator.state,
                "algorithm": algorithm_state,
            }
        )
        self._writing = self.writer.submit(partial(self._write, round_number, state))

    def wait(self) -> None:
        """Until the checkpoint in progress is on disk (and pruned); raises if writing it failed."""
        if self._writing is not None:
            write, self._writing = self._writing, None
            write.result()  # the writer thread's error, raised on the node's thread

    def _write(self, round_number: int, state: dict) -> None:
        """On a writer thread: the state under a temporary name, flushed to disk, renamed to its round; prune."""
        temporary = self.directory / f".{round_number}.pt.tmp"
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            with open(temporary, "wb") as file:
                torch.save(state, file)
                file.flush()
                os.fsync(
                    file.fileno()
                )  # the rename must never expose a torn file, even after an OS crash
            os.replace(temporary, self.directory / f"{round_number}.pt")
        except OSError as error:
            with contextlib.suppress(OSError):
                temporary.unlink(missing_ok=True)
            raise OSError(
                f"Node {self.rank}'s checkpoint of round {round_number} could not be written to "
                f"{self.directory}: {error}. Free space there, or checkpoint less often "
                "(checkpoint.every larger, or 0 for none)."
            ) from error
        self._prune(round_number)

    def restore(self, node: SavedNode, round_number: int) -> tuple[float, dict | None]:
        """Load the state saved after `round_number` into `node`; return (elapsed_s, algorithm state)."""
        if not round_number:
            return 0.0, None
        state = load_checkpoint(self.directory / f"{round_number}.pt", node.flat.numel())
        node.flat.copy_(state["flat"])
        node.trainer.optimizer.load_state_dict(state["optimizer"])
        node.trainer.batches.load_state_dict(state["batches"])
        node.sharing.load_state_dict(state["sharing"])
        for name, value in asdict(ByteCounters(**state["bytes"])).items():
            setattr(node.link.bytes, name, value)
        node.rng.bit_generator.state = state["rng"]
        return state["elapsed_s"], state["algorithm"]

    def _prune(self, round_number: int) -> None:
        """Say that `round_number` is saved, then delete what no resume can need.

        Nodes drift apart in rounds (RWM without bound), so a node keeps every checkpoint
        from the slowest node's latest saved round on: that round is the one a resume
        would pick. Checkpoints fall on multiples of checkpoint.every, the same for all.
        """
        self.store.set(f"{SAVED_KEY}/{self.rank}", str(round_number))
        older = saved_rounds(self.run_dir, self.rank)[:-KEEP]
        slowest = self.writer.slowest.get(self.run_dir, 0)
        if (
            older and older[-1] >= slowest
        ):  # what this process last read keeps some: read the store again
            keys = [f"{SAVED_KEY}/{rank}" for rank in range(self.world_size)]
            if self.store.check(keys):
                slowest = self.writer.slowest[self.run_dir] = min(
                    int(raw) for raw in self.store.multi_get(keys)
                )
        for old in older:
            if old < slowest:
                (self.directory / f"{old}.pt").unlink(missing_ok=True)


def _copied(tree: Any) -> Any:
    """`tree` with every tensor in it cloned and every dict, list and tuple rebuilt: a copy that
    the node's later steps cannot change (a view is cloned too, so only its own values are saved)."""
    if isinstance(tree, torch.Tensor):
        return tree.detach().clone()
    if isinstance(tree, dict):
        return {key: _copied(value) for key, value in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_copied(value) for value in tree)
    return tree


def load_checkpoint(path: Path, numel: int | None = None) -> dict:
    """A checkpoint written by this library, or a ConfigError naming the file.

    `weights_only=True`: unpickling runs no code, so a tampered file cannot act on resume.
    """
    try:
        with (
            warnings.catch_warnings()
        ):  # torch warns about foreign pickles; the error below says it all
            warnings.simplefilter("ignore")
            state = torch.load(path, weights_only=True)
    except (
        pickle.UnpicklingError
    ):  # torch's own text suggests weights_only=False: never for a file like this
        raise _unusable(
            path,
            "it holds objects other than tensors and plain values (loading it could run "
            "code, so it was not loaded)",
        ) from None
    except Exception as error:  # noqa: BLE001 - truncation and I/O fail in many ways
        detail = str(error).strip().splitlines()[0] if str(error).strip() else "no detail"
        raise _unusable(path, f"it cannot be read: {type(error).__name__}: {detail}") from None
    if not isinstance(state, dict) or not STATE_KEYS <= set(state):
        raise _unusable(path, "it is not a dpsgd checkpoint (its keys differ)")
    flat = state["flat"]
    if not isinstance(flat, torch.Tensor) or (numel is not None and flat.numel() != numel):
        raise _unusable(path, f"its model vector does not have this model's {numel} parameters")
    if not isinstance(state["bytes"], dict) or set(state["bytes"]) != {
        f.name for f in fields(ByteCounters)
    }:
        raise _unusable(
            path, "its byte counters are not this version's (it was written by an older dpsgd)"
        )
    if str(state["round"]) != Path(path).stem:
        raise _unusable(path, f"it holds round {state['round']}, not the round its name says")
    return state


def _unusable(path: Path, why: str) -> ConfigError:
    return ConfigError(
        f"The checkpoint {path} cannot be resumed from: {why}. It may be truncated or not "
        f"written by dpsgd. Delete it (the run then resumes from an earlier round every node "
        f"saved, if any) or start a new run without resume=true.",
        rank_specific=True,
    )


def agree_on_start_round(
    checkpoints: list[Checkpoints], resume: bool, rounds: int, timeout_s: float
) -> int:
    """The round a run starts after, agreed by all nodes: 0, or on resume the latest every node saved.

    A rank hosting several nodes announces all of them before waiting for the others'
    (announcing and waiting node by node would deadlock the ranks).
    """
    if not resume:
        return 0
    for node_checkpoints in checkpoints:
        node_checkpoints.announce()
    start_round = checkpoints[0].agree(timeout_s)
    check_rounds(rounds, start_round)
    return start_round


def check_rounds(rounds: int, start_round: int) -> None:
    if rounds < start_round:
        raise ConfigError(
            f"rounds={rounds} but the run resumes after round {start_round}: set rounds to "
            f"{start_round} or more to continue it."
        )


def latest_common_round(rounds_per_node: list[list[int]], run_dir: Path) -> int:
    common = set.intersection(*(set(rounds) for rounds in rounds_per_node))
    if not common:
        raise ConfigError(
            f"resume=true, but no round has a checkpoint from every node under {run_dir}/checkpoints "
            "(checkpoint.every may be 0, or the run stopped before the first one). Start a new run "
            "instead (resume=false)."
        )
    return max(common)


def check_resumable(
    settings: Settings, run_dir: Path, all_nodes_local: bool = False, rank: int = 0
) -> None:
    """Resuming continues the same experiment: only keys that do not change the numbers may differ.

    config.yaml lives on rank 0's machine; other machines check only if they have a copy.
    With every node on this machine (standalone mode) the checkpoints are checked too.
    """
    saved_path = Path(run_dir) / "config.yaml"
    if rank != 0 and not saved_path.exists():
        return
    if not saved_path.exists():
        raise ConfigError(
            f"resume=true, but {saved_path} does not exist. Point hydra.run.dir at the directory of "
            "the run to continue, e.g. `hydra.run.dir=outputs/2026-11-26/10-00-00 resume=true`."
        )
    saved = _effective_degree(_flatten(yaml.safe_load(saved_path.read_text()) or {}))
    current = _effective_degree(_flatten(settings.resolved))
    # A key the saved config lacks came with a newer dpsgd: the run used what its default now gives.
    changed = sorted(
        key
        for key in saved
        if key.split(".")[0] not in RESUMABLE_CHANGES and saved.get(key) != current.get(key)
    )
    if changed:
        raise ConfigError(
            f"resume=true, but the configuration differs from the run's {saved_path} in: "
            f"{', '.join(changed)}. Resume with the run's own settings (only rounds, checkpoint.*, "
            "log.* and comm.* may change)."
        )
    if all_nodes_local:
        round_number = latest_common_round(
            [saved_rounds(run_dir, node) for node in range(settings.run.nodes)], run_dir
        )
        for node in range(
            settings.run.nodes
        ):  # found here, before any rank starts, a bad file is one clear paragraph
            load_checkpoint(checkpoint_dir(run_dir, node) / f"{round_number}.pt")


def _effective_degree(flat: dict) -> dict:
    """The graph's degree as the run uses it, so that a resume compares graphs, not how they were asked for.

    An unset degree (null) is the default for the node count (`default_degree`): a run saved with
    `degree: 4` by a dpsgd whose default was 4 resumes under today's null when that is still 4, and
    a run whose default would now differ is refused. Kinds that take no degree ignore the key.
    """
    kind = flat.get("topology.kind")
    if kind not in DEGREE_KINDS:
        flat.pop("topology.degree", None)
    elif flat.get("topology.degree") is None and isinstance(flat.get("nodes"), int):
        flat["topology.degree"] = default_degree(kind, flat["nodes"])
    return flat


def _flatten(tree: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}"""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
