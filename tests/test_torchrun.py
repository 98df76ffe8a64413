"""torchrun launch: two agents on this host (c10d on loopback) emulate two machines; multirun sweeps."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from dpsgd.launch import free_port
from tests.conftest import RANK_TEST_TIMEOUT_S, REPO, read_jsonl, run_train


def _two_agents(tmp_path: Path, *overrides: str) -> None:
    """launch/multinode.sh as two machines would run it, both on loopback, cwd tmp_path."""
    env = {
        **os.environ,
        "GLOO_SOCKET_IFNAME": "lo",
        "DPSGD_CACHE": str(tmp_path / "cache"),
        "DPSGD_PORT": str(free_port()),
        "DPSGD_RUN_ID": "test",
        "PYTHON": sys.executable,
    }
    command = ["bash", str(REPO / "launch" / "multinode.sh"), "127.0.0.1", "2", "2", *overrides]
    agents = [
        subprocess.Popen(
            command,
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(2)
    ]
    try:
        outputs = [agent.communicate(timeout=RANK_TEST_TIMEOUT_S)[0] for agent in agents]
    finally:
        for agent in agents:
            agent.kill()
            agent.wait()
    assert all(agent.returncode == 0 for agent in agents), "\n".join(outputs)


def _assert_complete_run(run_dir: Path, nodes: int, rounds: int) -> None:
    assert sorted(p.name for p in (run_dir / "nodes").iterdir()) == [
        f"{n}.jsonl" for n in range(nodes)
    ]
    for node in range(nodes):
        assert [r["round"] for r in read_jsonl(run_dir / "nodes" / f"{node}.jsonl")] == list(
            range(1, rounds + 1)
        )
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["nodes"] == nodes and summary["rounds_min"] == rounds
    assert summary["per_round"][-1]["nodes_reporting"] == nodes


def test_two_agents_make_one_run_with_one_directory(tmp_path):
    _two_agents(tmp_path, "topology=ring", "rounds=12", "eval.every=4")
    run_dirs = [p for p in (tmp_path / "outputs").glob("*/*") if p.is_dir()]
    assert len(run_dirs) == 1, run_dirs  # the default, time-stamped directory: one for all ranks
    _assert_complete_run(run_dirs[0], nodes=4, rounds=12)


def test_multirun_under_torchrun_gives_each_job_its_own_run(tmp_path):
    _two_agents(
        tmp_path,
        "-m",
        "topology=ring",
        "rounds=4,6",
        "eval.every=2",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
    )
    _assert_complete_run(tmp_path / "sweep" / "0", nodes=4, rounds=4)
    _assert_complete_run(tmp_path / "sweep" / "1", nodes=4, rounds=6)


def test_standalone_multirun_gives_each_job_its_own_run(tmp_path):
    run_train(
        tmp_path,
        "-m",
        "nodes=4",
        "topology=ring",
        "rounds=4,6",
        "eval.every=2",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
    )
    _assert_complete_run(tmp_path / "sweep" / "0", nodes=4, rounds=4)
    _assert_complete_run(tmp_path / "sweep" / "1", nodes=4, rounds=6)
    assert json.loads((tmp_path / "sweep" / "1" / "summary.json").read_text())["rounds"] == 6


def test_plain_torchrun_takes_the_node_count_from_the_world_size(tmp_path):
    """`torchrun --standalone --nproc_per_node 4 train.py` with no `nodes=`: four nodes."""
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "DPSGD_CACHE": str(tmp_path / "cache")}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "4",
        str(REPO / "train.py"),
        "topology=ring",
        "rounds=4",
        "eval.every=2",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    result = subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=RANK_TEST_TIMEOUT_S
    )
    assert result.returncode == 0, result.stdout + result.stderr
    _assert_complete_run(tmp_path / "run", nodes=4, rounds=4)


def test_two_agents_host_groups_when_nodes_is_given(tmp_path):
    """`nodes=8` on a world of 4 ranks: each rank hosts a group of 2 nodes (nodes_per_rank follows)."""
    _two_agents(tmp_path, "nodes=8", "rounds=6", "eval.every=3", "log.progress=false")
    run_dirs = [p for p in (tmp_path / "outputs").glob("*/*") if p.is_dir()]
    assert len(run_dirs) == 1, run_dirs
    _assert_complete_run(run_dirs[0], nodes=8, rounds=6)


def test_two_agents_run_epidemic_learning_and_a_hybrid_run(tmp_path):
    """The patterns beyond the study under torchrun: Epidemic draws across machines, and a hybrid run
    whose ranks host groups (the walk's transport, then the averaging one, over real process groups)."""
    for name in ("epidemic", "hybrid"):
        (tmp_path / name).mkdir()
    _two_agents(
        tmp_path / "epidemic",
        "algorithm=epidemic",
        "algorithm.fanout=2",
        "rounds=6",
        "eval.every=3",
        "log.progress=false",
    )
    _two_agents(
        tmp_path / "hybrid",
        "algorithm=hybrid",
        "algorithm.switch_round=3",
        "nodes=8",
        "rounds=6",
        "eval.every=3",
        "log.progress=false",
    )
    (epidemic,) = [p for p in (tmp_path / "epidemic" / "outputs").glob("*/*") if p.is_dir()]
    _assert_complete_run(epidemic, nodes=4, rounds=6)
    (hybrid,) = [p for p in (tmp_path / "hybrid" / "outputs").glob("*/*") if p.is_dir()]
    assert json.loads((hybrid / "summary.json").read_text())["switch_round"] == 3
    for node in range(8):
        records = read_jsonl(hybrid / "nodes" / f"{node}.jsonl")
        assert [r["round"] for r in records if r["phase"] == "dpsgd"] == [4, 5, 6]
