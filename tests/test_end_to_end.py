"""Whole runs through train.py: the output contract, determinism, real MovieLens, user errors."""

from __future__ import annotations

import json
import statistics

import pytest
from omegaconf import OmegaConf

from dpsgd.sharing.wire import HEADER_BYTES
from dpsgd.topology import build_topology, spectral_gap
from tests.conftest import no_learning_baseline, read_jsonl, run_train

SMALL_RUN = ("nodes=6", "rounds=30", "eval.every=5", "train.local_steps=20", "log.per_node_tb=true")


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("small_run")
    result = run_train(tmp_path, *SMALL_RUN)
    return tmp_path / "run", result


def test_output_contract_is_present_and_consistent(small_run):
    run_dir, result = small_run
    assert "[dpsgd] round 30/30" in result.stdout
    assert (run_dir / "config.yaml").exists()
    summary = json.loads((run_dir / "summary.json").read_text())
    for key in (
        "nodes",
        "rounds_completed",
        "num_parameters",
        "model",
        "dataset",
        "algorithm",
        "sharing",
        "wall_s",
        "per_round",
    ):
        assert key in summary
    assert summary["nodes"] == 6 and summary["rounds_completed"] == 30
    config = OmegaConf.load(run_dir / "config.yaml")
    graph = build_topology(config.topology.kind, 6, seed=config.seed, degree=config.topology.degree)
    assert 0 < summary["spectral_gap"] <= 1
    assert summary["spectral_gap"] == pytest.approx(spectral_gap(graph), abs=1e-12)
    assert [entry["round"] for entry in summary["per_round"]] == [5, 10, 15, 20, 25, 30]
    assert all(entry["nodes_reporting"] == 6 for entry in summary["per_round"])
    assert list((run_dir / "tb").glob("events.out.tfevents.*"))
    assert list((run_dir / "tb" / "vs_bytes").glob("events.out.tfevents.*"))
    assert all(
        list((run_dir / "tb" / "nodes" / str(n)).glob("events.out.tfevents.*")) for n in range(6)
    )

    numel = summary["num_parameters"]
    degree = 4
    for node in range(6):
        records = read_jsonl(run_dir / "nodes" / f"{node}.jsonl")
        assert [r["round"] for r in records] == list(range(1, 31))
        for r in records:
            assert r["bytes_sent_data"] == r["round"] * degree * 4 * numel
            assert r["bytes_sent_meta"] == r["round"] * degree * HEADER_BYTES
            assert r["bytes_sent"] == r["bytes_sent_data"] + r["bytes_sent_meta"]
            assert r["bytes_recv"] == r["bytes_sent"]  # regular graph, full model both ways
            assert r["time_s"] >= r["train_s"] + r["comm_s"] + r["eval_s"] - 1e-6
            assert ("test_loss" in r) == (r["round"] % 5 == 0)


def test_summary_aggregates_equal_a_recomputation_from_the_node_logs(small_run):
    run_dir, _ = small_run
    summary = json.loads((run_dir / "summary.json").read_text())
    logs = [read_jsonl(run_dir / "nodes" / f"{node}.jsonl") for node in range(6)]
    for entry in summary["per_round"]:
        values = [log[entry["round"] - 1]["test_loss"] for log in logs]
        assert entry["test_loss"]["mean"] == pytest.approx(statistics.fmean(values))
        assert entry["test_loss"]["min"] == pytest.approx(min(values))
        assert entry["test_loss"]["max"] == pytest.approx(max(values))
        assert entry["test_loss"]["std"] == pytest.approx(statistics.pstdev(values))


def test_mean_test_rmse_beats_the_global_mean_predictor(small_run, tmp_path):
    """Learning means beating the line of predicting the mean rating, not merely a falling loss."""
    run_dir, _ = small_run
    per_round = json.loads((run_dir / "summary.json").read_text())["per_round"]
    baseline = no_learning_baseline(tmp_path, *SMALL_RUN)["loss"]
    assert (
        per_round[-1]["test_loss"]["mean"] < baseline - 0.05
    )  # 0.84 against 0.92 (1.88 without mu)


def _numbers(run_dir, node):
    timing = {"time_s", "train_s", "comm_s", "eval_s"}
    return [
        {k: v for k, v in r.items() if k not in timing}
        for r in read_jsonl(run_dir / "nodes" / f"{node}.jsonl")
    ]


def test_same_seed_and_config_give_the_same_numbers(small_run, tmp_path):
    run_dir, _ = small_run
    run_train(tmp_path, *SMALL_RUN)
    for node in range(6):
        assert _numbers(run_dir, node) == _numbers(tmp_path / "run", node)


def test_another_seed_gives_other_numbers(small_run, tmp_path):
    run_dir, _ = small_run
    run_train(tmp_path, *SMALL_RUN, "seed=2")
    assert _numbers(run_dir, 0) != _numbers(tmp_path / "run", 0)


def test_real_movielens_run_learns(tmp_path, movielens_csv):
    data_dir = movielens_csv.parent.parent
    run_train(
        tmp_path,
        "dataset=movielens",
        f"data_dir={data_dir}",
        "nodes=8",
        "rounds=40",
        "eval.every=10",
        "train.local_steps=20",
    )
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert (
        summary["num_parameters"] == (610 + 9724) * 21 + 1
    )  # factors and biases, plus the offset mu
    baseline = no_learning_baseline(tmp_path, "dataset=movielens", f"data_dir={data_dir}")["loss"]
    assert 1.0 < baseline < 1.1  # about 1.04 on this split (SPEC §6)
    assert summary["final"]["test_loss"]["mean"] < baseline - 0.05


@pytest.mark.parametrize(
    "overrides,named",
    [
        (("nodes=3", "topology.degree=4"), "topology.degree"),
        (("topology=ring", "nodes=1"), "nodes"),
        (
            ("dataset=movielens", "data_dir=/nonexistent/place"),
            "/nonexistent/place/ml-latest-small/ratings.csv",
        ),
        (("optimizer.name=lbfgs2",), "optimizer.name"),
        (("sharing.name=carrier_pigeon",), "sharing.name"),
        (("train.local_steps=0",), "train.local_steps"),
    ],
)
def test_user_mistakes_are_one_clear_paragraph(tmp_path, overrides, named):
    result = run_train(tmp_path, *overrides, check=False, timeout_s=60)
    assert result.returncode == 2
    assert named in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run" / "nodes").exists()  # no rank started training
