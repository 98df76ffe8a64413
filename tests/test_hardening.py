"""What a hostile but fair user does to a run: shared folders, tampered checkpoints, wrong types,
divergence, signals, frozen nodes. Each case ends in one clear message and loses nothing."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from dpsgd.checkpoint import load_checkpoint, saved_rounds
from dpsgd.checks import check_config
from dpsgd.errors import ConfigError
from dpsgd.launch import EXIT_CONFIG_ERROR, EXIT_NODE_FAILURE
from dpsgd.run_folder import MARKER, claim
from tests.conftest import (
    REPO,
    children_of,
    compose_settings,
    read_jsonl,
    run_train,
    wait_for_rounds,
)

SMALL = ("nodes=4", "topology=ring", "log.progress=false")


def _env(tmp_path: Path) -> dict:
    return {**os.environ, "DPSGD_CACHE": str(tmp_path / "cache"), "GLOO_SOCKET_IFNAME": "lo"}


def _strict_json(text: str):
    """json.loads that rejects NaN and Infinity, as strict readers (e.g. JavaScript, jq) do."""

    def refuse(constant):
        raise ValueError(f"non-standard JSON constant {constant}")

    return json.loads(text, parse_constant=refuse)


def _start(tmp_path: Path, *overrides: str) -> subprocess.Popen:
    command = [
        sys.executable,
        str(REPO / "train.py"),
        *overrides,
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    return subprocess.Popen(
        command,
        cwd=REPO,
        env=_env(tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


# ---------------------------------------------------------------- 2. a run owns its folder


def test_a_second_fresh_run_into_a_used_folder_is_refused_and_the_first_is_untouched(tmp_path):
    run_train(tmp_path, *SMALL, "rounds=4", "checkpoint.every=2")
    run_dir = tmp_path / "run"
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    second = run_train(tmp_path, *SMALL, "rounds=6", check=False, timeout_s=60)
    assert second.returncode == EXIT_CONFIG_ERROR
    assert "already holds a run" in second.stderr and "resume=true" in second.stderr
    assert "Traceback" not in second.stderr
    assert {
        p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()
    } == before  # nothing rewritten
    run_train(
        tmp_path, *SMALL, "rounds=6", "checkpoint.every=2", "resume=true"
    )  # resuming is the way in
    assert [r["round"] for r in read_jsonl(run_dir / "nodes" / "0.jsonl")] == list(range(1, 7))


def test_of_runs_claiming_one_folder_at_once_exactly_one_wins(tmp_path):
    outcomes: list[str] = []

    def attempt() -> None:
        try:
            claim(tmp_path / "run")
            outcomes.append("won")
        except ConfigError:
            outcomes.append("refused")

    threads = [threading.Thread(target=attempt) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(outcomes) == ["refused"] * 7 + ["won"]
    assert (tmp_path / "run" / MARKER).exists()


def test_runs_started_in_the_same_second_get_their_own_default_folders(tmp_path):
    command = [sys.executable, str(REPO / "train.py"), *SMALL, "rounds=3", "eval.every=1"]
    processes = [
        subprocess.Popen(
            command,
            cwd=tmp_path,
            env=_env(tmp_path),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    results = [p.communicate(timeout=180) for p in processes]
    assert [p.returncode for p in processes] == [0, 0, 0], results
    folders = sorted((tmp_path / "outputs").glob("*/*"))
    assert len(folders) == 3
    for folder in folders:
        assert _strict_json((folder / "summary.json").read_text())["rounds_completed"] == 3
        assert [r["round"] for r in read_jsonl(folder / "nodes" / "0.jsonl")] == [1, 2, 3]


def test_a_rejected_resume_leaves_the_runs_hydra_record_alone(tmp_path):
    run_train(tmp_path, *SMALL, "rounds=4", "checkpoint.every=2")
    overrides = tmp_path / "run" / ".hydra" / "overrides.yaml"
    before = overrides.read_text()
    refused = run_train(
        tmp_path, *SMALL, "rounds=6", "optimizer.lr=0.5", "resume=true", check=False, timeout_s=60
    )
    assert refused.returncode == EXIT_CONFIG_ERROR and "optimizer.lr" in refused.stderr
    assert overrides.read_text() == before


# ---------------------------------------------------------------- 3. checkpoints load no code


class _Payload:
    def __reduce__(self):
        return (os.system, (f"touch {_Payload.target}",))


def test_a_checkpoint_carrying_a_pickle_payload_is_refused_without_running_it(tmp_path):
    run_train(tmp_path, *SMALL, "rounds=4", "checkpoint.every=2")
    victim = tmp_path / "run" / "checkpoints" / "2" / "4.pt"
    _Payload.target = tmp_path / "pwned"
    victim.write_bytes(pickle.dumps({"round": 4, "flat": _Payload()}))
    result = run_train(
        tmp_path, *SMALL, "rounds=6", "checkpoint.every=2", "resume=true", check=False, timeout_s=60
    )
    assert result.returncode == EXIT_CONFIG_ERROR
    assert str(victim) in result.stderr and "Traceback" not in result.stderr
    assert not _Payload.target.exists()


def test_a_truncated_or_foreign_checkpoint_names_the_file(tmp_path):
    run_train(tmp_path, *SMALL, "rounds=2", "checkpoint.every=2")
    saved = tmp_path / "run" / "checkpoints" / "1" / "2.pt"
    saved.write_bytes(saved.read_bytes()[:200])
    with pytest.raises(ConfigError, match=str(saved)):
        load_checkpoint(saved)
    import torch

    foreign = tmp_path / "3.pt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    with pytest.raises(ConfigError, match="not a dpsgd checkpoint"):
        load_checkpoint(foreign)


def test_stray_files_in_a_checkpoint_folder_are_not_rounds(tmp_path):
    folder = tmp_path / "checkpoints" / "0"
    folder.mkdir(parents=True)
    for name in ("4.pt", "8.pt", "notes.pt", "best.pt", ".12.pt.tmp"):
        (folder / name).write_bytes(b"")
    assert saved_rounds(tmp_path, 0) == [4, 8]


# ---------------------------------------------------------------- 6. divergence is a result


@pytest.mark.parametrize("stop", [True, False])
def test_a_diverged_run_says_so_once_writes_strict_json_and_exits_zero(tmp_path, stop):
    result = run_train(
        tmp_path,
        *SMALL,
        "rounds=12",
        "eval.every=2",
        "optimizer.lr=1000",
        f"train.stop_on_divergence={str(stop).lower()}",
    )
    assert result.stdout.count("training diverged at round") == 1
    assert "Traceback" not in result.stderr
    run_dir = tmp_path / "run"
    summary = _strict_json((run_dir / "summary.json").read_text())
    assert summary["diverged"]["round"] >= 1 and summary["diverged"]["nodes"]
    for node in range(4):
        records = [
            _strict_json(line)
            for line in (run_dir / "nodes" / f"{node}.jsonl").read_text().splitlines()
        ]
        assert any(r["batch_loss"] is None for r in records)  # non-finite is null, not NaN
        rounds = [r["round"] for r in records]
        assert rounds[-1] == (summary["diverged"]["stop_after"] if stop else 12)
    assert summary["rounds_completed"] == (summary["diverged"]["stop_after"] if stop else 12)


def test_a_healthy_run_reports_no_divergence(tmp_path):
    run_train(tmp_path, *SMALL, "rounds=4")
    assert _strict_json((tmp_path / "run" / "summary.json").read_text())["diverged"] is None


# ---------------------------------------------------------------- 7. every key's type and range


@pytest.mark.parametrize(
    "overrides,key",
    [
        (("sharing=partial", "alpha=abc"), "alpha"),
        (("sharing=partial", "alpha=1.5"), "alpha"),
        (("nodes=abc",), "nodes"),
        (("comm.timeout_s=abc",), "comm.timeout_s"),
        (("optimizer.lr=abc",), "optimizer.lr"),
        (("optimizer.lr=nan",), "optimizer.lr"),
        (("seed=abc",), "seed"),
        (("seed=-1",), "seed"),
        (("checkpoint.every=abc",), "checkpoint.every"),
        (("threads_per_rank=0",), "threads_per_rank"),
        (("optimizer.momentum=-1",), "optimizer.momentum"),
        (("rounds=true",), "rounds"),
        (("eval.test_samples=0",), "eval.test_samples"),
        (("train.full_epochs=maybe",), "train.full_epochs"),
        (("algorithm=rwm", "sharing.merge=renormalize"), "sharing.merge"),
    ],
)
def test_a_wrong_value_is_one_paragraph_naming_its_key(overrides, key):
    with pytest.raises(ConfigError) as error:
        check_config(compose_settings(*overrides), 16)
    message = str(error.value)
    assert message.startswith(f"{key}=") and "\n" not in message


@pytest.mark.parametrize("override", ["nodes=abc", "optimizer.momentum=-1", "threads_per_rank=0"])
def test_wrong_values_on_the_command_line_end_before_any_rank_starts(tmp_path, override):
    result = run_train(tmp_path, "rounds=2", override, check=False, timeout_s=60)
    assert result.returncode == EXIT_CONFIG_ERROR
    assert override.split("=")[0] in result.stderr and "Traceback" not in result.stderr
    assert "crashed" not in result.stderr
    run_train(
        tmp_path, "nodes=4", "topology=ring", "rounds=2"
    )  # the refused run left the folder free


# ---------------------------------------------------------------- 9. stopping is quiet and resumable


@pytest.mark.parametrize("stop_signal,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_stops_every_rank_with_one_line_and_the_resume_command(
    tmp_path, stop_signal, code
):
    process = _start(tmp_path, *SMALL, "rounds=100000", "checkpoint.every=2", "eval.every=2")
    try:
        wait_for_rounds(tmp_path / "run", 4, 5)
        ranks = children_of(process.pid)
        process.send_signal(stop_signal)
        stdout, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
        process.wait()
    assert process.returncode == code
    assert "Traceback" not in stderr and len(stderr.strip().splitlines()) == 1, stderr
    assert "resume=true" in stderr and "last checkpoint is round" in stderr
    assert not [
        pid
        for pid in ranks
        if Path(f"/proc/{pid}").exists()
        and "Z" not in Path(f"/proc/{pid}/stat").read_text().split()[2]
    ]
    command = stderr.split("Continue with: ")[1].strip().split()
    assert command[:2] == ["python", "train.py"]
    resumed = subprocess.run(
        [sys.executable, str(REPO / "train.py"), *command[2:], "rounds=12"],
        cwd=REPO,
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed after round" in resumed.stdout


# ---------------------------------------------------------------- 1. the right node is blamed


@pytest.mark.parametrize("algorithm", ["dpsgd", "rwm"])
def test_a_frozen_node_is_the_one_named(tmp_path, algorithm):
    frozen = 2
    process = _start(
        tmp_path,
        f"algorithm={algorithm}",
        "nodes=6",
        "rounds=100000",
        "comm.timeout_s=8",
        "checkpoint.every=0",
        "eval.every=5",
        "log.progress=false",
    )
    try:
        wait_for_rounds(tmp_path / "run", 6, 3)
        ranks = children_of(process.pid)
        assert len(ranks) == 6
        os.kill(ranks[frozen], signal.SIGSTOP)  # ranks are forked in rank order
        _, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
        process.wait()
    assert process.returncode == EXIT_NODE_FAILURE
    first_line = stderr.strip().splitlines()[0]
    assert f"the first was node {frozen}" in first_line, stderr
    assert f"node {frozen} stopped answering" in stderr


def test_a_slow_node_is_the_one_named(tmp_path, monkeypatch):
    """Alive (its heartbeat goes on) but training far longer than comm.timeout_s: it, not a waiting neighbour."""
    import torch.distributed as dist

    from dpsgd.building import prepare_data
    from dpsgd.experiment import run_node
    from dpsgd.launch import RankFailure, spawn
    from dpsgd.training import Trainer

    slow, timeout_s = 2, 6
    cfg = compose_settings(
        "nodes=6",
        "rounds=50",
        "log.progress=false",
        f"comm.timeout_s={timeout_s}",
        "checkpoint.every=0",
        f"cache_dir={tmp_path / 'cache'}",
    )
    check_config(cfg, 6)
    dataset = prepare_data(cfg)
    original = Trainer.train_round

    def train_round_slowly_once(self):
        self.rounds_trained = getattr(self, "rounds_trained", 0) + 1
        if dist.get_rank() == slow and self.rounds_trained == 3:
            time.sleep(timeout_s + 15)
        return original(self)

    monkeypatch.setattr(
        Trainer, "train_round", train_round_slowly_once
    )  # inherited by the forked ranks
    with pytest.raises(RankFailure) as failure:
        spawn(
            lambda ctx: run_node(cfg, ctx, tmp_path / "run", dataset),
            6,
            timeout_s=180,
            grace_s=timeout_s + 30,
            quiet_failures=True,
        )
    assert failure.value.first_failed == slow, str(failure.value)
    assert f"node {slow} has been in its train phase" in str(failure.value)
