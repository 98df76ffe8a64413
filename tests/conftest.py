"""Shared test helpers: composing the real config, and running small worlds of ranks safely."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
MOVIELENS_CSV = SHARED_DATA / "ml-latest-small" / "ratings.csv"
RANK_TEST_TIMEOUT_S = 240  # hard bound for any multi-rank test: a hang fails, it never blocks CI


def compose_config(*overrides: str):
    """The config exactly as train.py would compose it (without Hydra's own node)."""
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        return compose(config_name="config", overrides=list(overrides))


def compose_settings(*overrides: str):
    """The run's typed settings (`dpsgd.settings.Settings`) as train.py makes them from the config."""
    from dpsgd.composition import settings_from

    return settings_from(compose_config(*overrides))


def no_learning_baseline(tmp_path: Path, *overrides: str) -> dict[str, float]:
    """What the task of this config scores without learning (global train mean; majority class),
    on the same split and test set as a run with these overrides: the line a learning test must beat."""
    from dpsgd.building import no_learning_baseline as baseline

    return baseline(compose_settings(*overrides, f"cache_dir={tmp_path / 'cache'}"))


def run_train(
    tmp_path: Path, *overrides: str, timeout_s: float = RANK_TEST_TIMEOUT_S, check: bool = True
) -> subprocess.CompletedProcess:
    """`python train.py` in a subprocess with its run directory in tmp_path/run."""
    env = {**os.environ, "DPSGD_CACHE": str(tmp_path / "cache"), "GLOO_SOCKET_IFNAME": "lo"}
    # Overrides first: a "-m" among them must precede every positional override.
    command = [
        sys.executable,
        str(REPO / "train.py"),
        *overrides,
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    result = subprocess.run(
        command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout_s
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"train.py failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
        )
    return result


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def wait_for_rounds(run_dir: Path, nodes: int, rounds: int, timeout_s: float = 90) -> None:
    """Until nodes 0..nodes-1 of a running run have each logged `rounds` rounds; fails after timeout_s."""
    deadline = time.monotonic() + timeout_s
    logs = [run_dir / "nodes" / f"{n}.jsonl" for n in range(nodes)]
    while time.monotonic() < deadline:
        if all(p.exists() and len(p.read_text().splitlines()) >= rounds for p in logs):
            return
        time.sleep(0.2)
    raise AssertionError(f"the run did not reach round {rounds} within {timeout_s} s")


@pytest.fixture
def movielens_csv() -> Path:
    if not MOVIELENS_CSV.exists():
        pytest.skip(f"MovieLens copy not present at {MOVIELENS_CSV}")
    return MOVIELENS_CSV


def children_of(pid: int) -> list[int]:
    """The process ids of `pid`'s children, in creation order (forked ranks: rank order)."""
    children = []
    for task in sorted(os.listdir(f"/proc/{pid}/task")):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            children += [int(c) for c in f.read().split()]
    return sorted(children)
