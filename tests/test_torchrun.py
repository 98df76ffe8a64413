"""Two torchrun agents on this host (c10d rendezvous on loopback) form one run with one directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from dpsgd.launch import free_port
from tests.conftest import RANK_TEST_TIMEOUT_S, REPO, read_jsonl


def test_two_agents_make_one_run_with_one_directory(tmp_path):
    port = free_port()
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "DPSGD_CACHE": str(tmp_path / "cache")}
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "2",
               "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "test",
               str(REPO / "train.py"), "nodes=4", "topology=ring", "rounds=12", "eval.every=4"]
    # cwd is tmp_path so the default, time-stamped run directory lands there.
    agents = [subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    try:
        outputs = [agent.communicate(timeout=RANK_TEST_TIMEOUT_S)[0] for agent in agents]
    finally:
        for agent in agents:
            agent.kill()
            agent.wait()
    assert all(agent.returncode == 0 for agent in agents), "\n".join(outputs)

    run_dirs = [p for p in (tmp_path / "outputs").glob("*/*") if p.is_dir()]
    assert len(run_dirs) == 1, run_dirs
    run_dir = run_dirs[0]
    assert sorted(p.name for p in (run_dir / "nodes").iterdir()) == [f"{n}.jsonl" for n in range(4)]
    for node in range(4):
        assert [r["round"] for r in read_jsonl(run_dir / "nodes" / f"{node}.jsonl")] == list(range(1, 13))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["nodes"] == 4 and summary["rounds_completed"] == 12
    assert summary["per_round"][-1]["nodes_reporting"] == 4
