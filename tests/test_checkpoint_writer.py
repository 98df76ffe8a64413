"""Checkpoints written in the background: the state of the round is saved, never a torn or later one;
a node waits for its write before the next and at the last round; a failed write raises on the node."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from concurrent.futures import Future
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.distributed as dist

from dpsgd.checkpoint import WRITER, Checkpoints, CheckpointWriter, load_checkpoint, saved_rounds
from dpsgd.communication import ByteCounters
from dpsgd.training import BatchStream
from tests.conftest import REPO

PARAMETERS = 1000


def _node(rounds: int = 100) -> SimpleNamespace:
    """What a checkpoint reads from a node, with an optimizer whose state changes in place (Adam's)."""
    flat = torch.nn.Parameter(torch.randn(PARAMETERS))
    optimizer = torch.optim.Adam([flat], lr=0.1)
    node = SimpleNamespace(
        flat=flat.data,
        rng=np.random.default_rng(0),
        link=SimpleNamespace(bytes=ByteCounters()),
        trainer=SimpleNamespace(
            optimizer=optimizer,
            parameter=flat,
            batches=BatchStream((torch.arange(10),), 4, torch.Generator()),
        ),
        sharing=SimpleNamespace(state_dict=dict),
        recorder=SimpleNamespace(elapsed_s=lambda: 2.5),
        schedule=SimpleNamespace(rounds=rounds),
    )
    _step(node)
    return node


def _step(node: SimpleNamespace) -> None:
    node.trainer.parameter.grad = torch.ones(PARAMETERS)
    node.trainer.optimizer.step()
    node.trainer.batches.next_positions()
    node.link.bytes.sent_data += 100


class GatedWriter(CheckpointWriter):
    """Writes only once `gate` is set: a disk as slow as a test needs."""

    def __init__(self):
        super().__init__(threads=2)
        self.gate = threading.Event()

    def submit(self, write) -> Future:
        return super().submit(lambda: (self.gate.wait(timeout=30), write())[1])


def _checkpoints(run_dir: Path, writer: CheckpointWriter = WRITER) -> Checkpoints:
    """Node 0 of a one-node run, saving every 2 rounds."""
    return Checkpoints(run_dir, 0, 1, 2, dist.HashStore(), writer=writer)


def test_a_checkpoint_holds_the_state_of_its_round_though_the_node_went_on(tmp_path):
    writer = GatedWriter()
    checkpoints, node = _checkpoints(tmp_path, writer), _node()
    moments = node.trainer.optimizer.state[node.trainer.parameter][
        "exp_avg"
    ]  # Adam's, updated in place
    expected = {
        "flat": node.flat.clone(),
        "exp_avg": moments.clone(),
        "order": node.trainer.batches.state_dict()["order"].clone(),
        "rng": node.rng.bit_generator.state,
    }
    checkpoints.after_round(node, 2, {"age": 7})
    for _ in range(3):  # the node trains on while its checkpoint waits for the disk
        _step(node)
        node.flat.add_(1.0)
        node.rng.random()
    assert saved_rounds(tmp_path, 0) == []  # nothing a resume would trust before the file is whole
    writer.gate.set()
    checkpoints.wait()
    assert saved_rounds(tmp_path, 0) == [2]
    state = load_checkpoint(tmp_path / "checkpoints" / "0" / "2.pt", PARAMETERS)
    assert torch.equal(state["flat"], expected["flat"])
    assert torch.equal(state["optimizer"]["state"][0]["exp_avg"], expected["exp_avg"])
    assert torch.equal(state["batches"]["order"], expected["order"])
    assert (
        state["rng"] == expected["rng"]
        and state["algorithm"] == {"age": 7}
        and state["elapsed_s"] == 2.5
    )
    assert state["bytes"]["sent_data"] == 100
    assert sorted(p.name for p in (tmp_path / "checkpoints" / "0").iterdir()) == [
        "2.pt"
    ]  # no temporary left


def test_the_next_checkpoint_and_the_last_round_wait_for_the_write_in_progress(tmp_path):
    writer = GatedWriter()
    checkpoints, node = _checkpoints(tmp_path, writer), _node(rounds=5)
    checkpoints.after_round(node, 2, {})
    checkpoints.after_round(node, 3, {})  # not a checkpoint round: nothing waits
    threading.Timer(0.3, writer.gate.set).start()
    checkpoints.after_round(node, 4, {})  # waits for round 2's file, then hands round 4 over
    assert saved_rounds(tmp_path, 0) == [2]
    checkpoints.after_round(node, 5, {})  # the run's last round: returns once every file is on disk
    assert saved_rounds(tmp_path, 0) == [2, 4]


def test_the_nodes_of_a_rank_wait_for_their_last_checkpoints_together(tmp_path):
    writer, store = GatedWriter(), dist.HashStore()
    group = [Checkpoints(tmp_path, g, 2, 2, store, writer=writer) for g in range(2)]
    started = time.monotonic()
    group[0].after_round(_node(rounds=2), 2, {})  # node 1 has not ended: nothing waits yet
    assert time.monotonic() - started < 10 and saved_rounds(tmp_path, 0) == []
    threading.Timer(0.3, writer.gate.set).start()
    group[1].after_round(
        _node(rounds=2), 2, {}
    )  # the rank's last node: every checkpoint is on disk after it
    assert saved_rounds(tmp_path, 0) == saved_rounds(tmp_path, 1) == [2]


def test_a_failed_write_raises_on_the_nodes_thread_and_leaves_no_round(tmp_path):
    blocked = tmp_path / "run"
    blocked.mkdir()
    (blocked / "checkpoints").write_text("a file where the folder should be")
    checkpoints, node = _checkpoints(blocked), _node(rounds=4)
    checkpoints.after_round(node, 2, {})  # handed over: the error comes with the next wait
    with pytest.raises(OSError, match="Node 0's checkpoint of round 2 could not be written"):
        checkpoints.after_round(node, 4, {})
    assert saved_rounds(blocked, 0) == []


def test_pruning_keeps_the_last_rounds_once_they_are_on_disk(tmp_path):
    checkpoints, node = _checkpoints(tmp_path), _node(rounds=10)
    for round_number in range(1, 11):
        checkpoints.after_round(node, round_number, {})
    assert saved_rounds(tmp_path, 0) == [8, 10]


def test_checkpoint_needs_no_node():
    """checkpoint reads the parts of a node it saves (`SavedNode`), so it imports no dpsgd.node, whose
    imports lead back to it (tests/test_layout.py checks the whole package for circles)."""
    code = "import sys, dpsgd.run_folder; print('dpsgd.node' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0 and result.stdout.strip() == "False", result.stderr
