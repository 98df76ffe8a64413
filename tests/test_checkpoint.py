"""Checkpoints and resume: a resumed run continues exactly; interruptions lose nothing completed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO, read_jsonl, run_train, wait_for_rounds

TIMINGS = {"time_s", "train_s", "comm_s", "eval_s"}
COMMON = (
    "nodes=4",
    "topology=ring",
    "eval.every=4",
    "checkpoint.every=4",
    "sharing=random_alpha",
    "optimizer=adam",
    "optimizer.lr=0.01",
)


def _numbers(run_dir, node):
    return [
        {k: v for k, v in r.items() if k not in TIMINGS}
        for r in read_jsonl(run_dir / "nodes" / f"{node}.jsonl")
    ]


def test_resumed_dpsgd_run_equals_the_uninterrupted_one(tmp_path):
    run_train(tmp_path / "whole", *COMMON, "rounds=12")
    run_train(tmp_path / "parts", *COMMON, "rounds=8")
    assert sorted(p.name for p in (tmp_path / "parts" / "run" / "checkpoints" / "0").iterdir()) == [
        "4.pt",
        "8.pt",
    ]
    result = run_train(tmp_path / "parts", *COMMON, "rounds=12", "resume=true")
    assert "resumed after round 8" in result.stdout
    for node in range(4):
        assert _numbers(tmp_path / "parts" / "run", node) == _numbers(
            tmp_path / "whole" / "run", node
        )
    whole = json.loads((tmp_path / "whole" / "run" / "summary.json").read_text())
    parts = json.loads((tmp_path / "parts" / "run" / "summary.json").read_text())
    assert (
        [e["round"] for e in parts["per_round"]]
        == [e["round"] for e in whole["per_round"]]
        == [4, 8, 12]
    )
    assert parts["final"]["test_loss"]["mean"] == pytest.approx(whole["final"]["test_loss"]["mean"])


def test_an_interrupted_run_keeps_its_rounds_and_resumes_after_the_last_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    env = {**os.environ, "DPSGD_CACHE": str(tmp_path / "cache"), "GLOO_SOCKET_IFNAME": "lo"}
    command = [
        sys.executable,
        str(REPO / "train.py"),
        "nodes=4",
        "topology=ring",
        "rounds=100000",
        "eval.every=2",
        "checkpoint.every=3",
        f"hydra.run.dir={run_dir}",
        "log.progress=false",
    ]
    process = subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        wait_for_rounds(run_dir, 4, 8, timeout_s=120)
        process.send_signal(signal.SIGKILL)  # no cleanup at all: ranks die with their parent
    finally:
        process.kill()
        process.wait()
    time.sleep(1)
    written = min(len(read_jsonl(run_dir / "nodes" / f"{n}.jsonl")) for n in range(4))
    assert written >= 8
    overrides = (
        "nodes=4",
        "topology=ring",
        "eval.every=2",
        "checkpoint.every=3",
        "log.progress=false",
    )
    run_train(tmp_path, *overrides, "rounds=24", "resume=true")
    for node in range(4):
        rounds = [r["round"] for r in read_jsonl(run_dir / "nodes" / f"{node}.jsonl")]
        assert rounds == list(range(1, 25))  # no round lost, none duplicated
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["rounds_min"] == 24 and not summary["in_progress"]
    # Rounds logged before the kill but not yet aggregated were published again on resume.
    assert [entry["round"] for entry in summary["per_round"]] == list(range(2, 25, 2))
    assert all(entry["nodes_reporting"] == 4 for entry in summary["per_round"])


def test_resume_refuses_a_changed_configuration_or_a_missing_checkpoint(tmp_path):
    run_train(tmp_path, "nodes=4", "topology=ring", "rounds=4", "checkpoint.every=0")
    missing = run_train(
        tmp_path, "nodes=4", "topology=ring", "rounds=8", "resume=true", check=False, timeout_s=120
    )
    assert missing.returncode == 2 and "no round has a checkpoint" in missing.stderr
    changed = run_train(
        tmp_path,
        "nodes=4",
        "topology=ring",
        "rounds=8",
        "optimizer.lr=0.5",
        "resume=true",
        check=False,
        timeout_s=60,
    )
    assert (
        changed.returncode == 2
        and "optimizer.lr" in changed.stderr
        and "Traceback" not in changed.stderr
    )


def test_rwm_resumes_from_the_latest_round_every_node_saved(tmp_path):
    common = ("algorithm=rwm", "nodes=4", "topology=ring", "eval.every=2", "checkpoint.every=2")
    run_train(tmp_path, *common, "rounds=10")
    first = json.loads((tmp_path / "run" / "summary.json").read_text())
    resumed = run_train(tmp_path, *common, "rounds=16", "resume=true")
    start = int(resumed.stdout.split("resumed after round ")[1].split()[0])
    assert start <= first["rounds_min"] and start % 2 == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["rounds_max"] == 16
    for node in range(4):
        rounds = [r["round"] for r in read_jsonl(tmp_path / "run" / "nodes" / f"{node}.jsonl")]
        assert rounds == list(range(1, len(rounds) + 1)) and len(rounds) > start


def test_a_run_saved_before_a_config_key_existed_still_resumes(tmp_path):
    from omegaconf import OmegaConf

    from dpsgd.checkpoint import check_resumable
    from dpsgd.composition import settings_from
    from tests.conftest import compose_config

    cfg = compose_config("nodes=4", "topology=ring")
    saved = OmegaConf.to_container(cfg, resolve=True)
    del saved["device"]  # written by a dpsgd without node groups on GPUs
    OmegaConf.save(OmegaConf.create(saved), tmp_path / "config.yaml")
    check_resumable(settings_from(cfg), tmp_path)
    saved["optimizer"]["lr"] = 0.5
    OmegaConf.save(OmegaConf.create(saved), tmp_path / "config.yaml")
    with pytest.raises(Exception, match="optimizer.lr"):
        check_resumable(settings_from(cfg), tmp_path)


def test_resume_compares_the_degree_the_graph_was_built_with(tmp_path):
    """A run saved with `degree: 4` (the old default) resumes under today's unset default when that
    gives 4 too; a default that would now build another graph is refused; a new run records its degree."""
    from omegaconf import OmegaConf

    from dpsgd.checkpoint import check_resumable
    from dpsgd.composition import settings_from
    from tests.conftest import compose_config

    cfg = compose_config("nodes=5")  # topology.degree unset: 4 for 5 nodes
    saved = OmegaConf.to_container(cfg, resolve=True)
    saved["topology"]["degree"] = 4
    OmegaConf.save(OmegaConf.create(saved), tmp_path / "config.yaml")
    check_resumable(settings_from(cfg), tmp_path)
    saved["nodes"] = 4  # with 4 nodes the default is 3: the saved 4-regular graph is another graph
    OmegaConf.save(OmegaConf.create(saved), tmp_path / "config.yaml")
    with pytest.raises(Exception, match="topology.degree"):
        check_resumable(settings_from(compose_config("nodes=4")), tmp_path)
    saved["topology"]["kind"] = (
        "ring"  # a ring reads no degree: the old 4 and today's 3 build the same graph
    )
    OmegaConf.save(OmegaConf.create(saved), tmp_path / "config.yaml")
    check_resumable(settings_from(compose_config("nodes=4", "topology=ring")), tmp_path)

    run = tmp_path / "run"
    run_train(tmp_path, "nodes=4", "rounds=1", "checkpoint.every=1", "log.progress=false")
    recorded = OmegaConf.load(run / "config.yaml")
    assert recorded.topology.degree == 3
    run_train(
        tmp_path, "nodes=4", "rounds=2", "checkpoint.every=1", "log.progress=false", "resume=true"
    )
    assert len(read_jsonl(run / "nodes" / "0.jsonl")) >= 2
