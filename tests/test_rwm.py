"""RWM: the age-weighted merge against float64, hang-free shutdown, bytes, reproducible walks."""

from __future__ import annotations

import json
import os
import shutil
import signal
import time

import numpy as np
import pytest
import torch
import torch.distributed as dist

from dpsgd.averaging import merge_by_age
from dpsgd.building import prepare_data
from dpsgd.checks import check_config
from dpsgd.experiment import run_node
from dpsgd.launch import RankFailure, spawn
from dpsgd.seeding import numpy_rng
from dpsgd.sharing.wire import HEADER_BYTES
from dpsgd.training import Trainer
from tests.conftest import RANK_TEST_TIMEOUT_S, compose_settings, read_jsonl, run_train

# --- the merge rule ---------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
def test_full_message_merge_is_the_age_weighted_mean(seed):
    rng = np.random.default_rng(seed)
    own, received = rng.normal(size=50), rng.normal(size=50)
    own_age, received_age = (int(a) for a in rng.integers(1, 500, size=2))
    flat = torch.from_numpy(own.astype(np.float32))
    merge_by_age(flat, own_age, received_age, torch.from_numpy(received.astype(np.float32)))
    expected = (own_age * own + received_age * received) / (own_age + received_age)
    np.testing.assert_allclose(flat.numpy(), expected, atol=1e-6)


@pytest.mark.parametrize("seed", range(5))
def test_partial_message_merges_only_the_received_coordinates(seed):
    rng = np.random.default_rng(seed)
    own, received = rng.normal(size=50), rng.normal(size=50)
    index = np.sort(rng.choice(50, 12, replace=False))
    own_age, received_age = 30, 90
    flat = torch.from_numpy(own.astype(np.float32))
    merge_by_age(
        flat,
        own_age,
        received_age,
        torch.from_numpy(received[index].astype(np.float32)),
        torch.from_numpy(index),
    )
    expected = own.copy()
    expected[index] = (own_age * own[index] + received_age * received[index]) / (
        own_age + received_age
    )
    np.testing.assert_allclose(flat.numpy(), expected, atol=1e-6)


# --- whole runs ----------------------------------------------------------------------------------


def _rwm_config(*overrides):
    return compose_settings(
        "algorithm=rwm",
        "nodes=8",
        "rounds=6",
        "eval.every=3",
        "log.progress=false",
        "dataset.num_users=80",
        "dataset.num_items=100",
        "train.local_steps=3",
        "comm.timeout_s=30",
        *overrides,
    )


def test_repeated_short_runs_never_hang_and_leave_complete_logs(tmp_path):
    cfg = _rwm_config()
    topology = check_config(cfg, 8)
    dataset = prepare_data(cfg)
    for attempt in range(20):
        run_dir = tmp_path / str(attempt)
        spawn(
            lambda ctx: run_node(cfg, ctx, run_dir, dataset), 8, timeout_s=60
        )  # raises on failure or hang
        summary = json.loads((run_dir / "summary.json").read_text())
        per_node = summary["rounds_per_node"]
        assert max(per_node) == 6 and summary["rounds_max"] == 6
        assert summary["rounds_min"] == min(per_node) >= 1
        for node in range(8):
            records = read_jsonl(run_dir / "nodes" / f"{node}.jsonl")
            assert [r["round"] for r in records] == list(range(1, per_node[node] + 1))
            ages = [r["age"] for r in records]
            assert ages == sorted(ages) and ages[0] == 3  # one round of 3 local steps
            assert all(r["sent_to"] in topology.neighbours(node) for r in records)
    # spawn raised had any rank failed, hung, or needed killing: all 8 exited 0, 20 times.


def test_rwm_sends_one_message_per_round_and_walks_reproducibly(tmp_path):
    """Full sharing: each round puts exactly one full message on the wire (D-PSGD: degree of them)."""
    cfg = _rwm_config("rounds=10")
    dataset = prepare_data(cfg)
    topology = check_config(cfg, 8)
    spawn(lambda ctx: run_node(cfg, ctx, tmp_path, dataset), 8, timeout_s=RANK_TEST_TIMEOUT_S)
    numel = json.loads((tmp_path / "summary.json").read_text())["num_parameters"]
    for node in range(8):
        records = read_jsonl(tmp_path / "nodes" / f"{node}.jsonl")
        for r in records:
            assert r["bytes_sent"] == r["round"] * (HEADER_BYTES + 4 * numel)
        neighbours = topology.neighbours(node)
        rng = numpy_rng(cfg.run.seed, "neighbour_choice", node)
        assert [r["sent_to"] for r in records] == [
            neighbours[rng.integers(len(neighbours))] for _ in records
        ]


def test_rwm_bytes_per_node_are_about_one_over_degree_of_dpsgd(tmp_path):
    common = (
        "nodes=8",
        "rounds=12",
        "eval.every=4",
        "sharing=partial",
        "alpha=0.2",
        "dataset.num_users=80",
        "dataset.num_items=100",
    )
    run_train(tmp_path / "rwm", "algorithm=rwm", *common)
    run_train(tmp_path / "dpsgd", "algorithm=dpsgd", *common)

    def bytes_per_round(run):
        records = [read_jsonl(run / "run" / "nodes" / f"{n}.jsonl")[-1] for n in range(8)]
        return sum(r["bytes_sent"] for r in records) / sum(r["round"] for r in records)

    ratio = bytes_per_round(tmp_path / "rwm") / bytes_per_round(tmp_path / "dpsgd")
    assert ratio == pytest.approx(1 / 4, rel=0.01)  # 4-regular graph, same message size every round


def test_a_crashed_node_ends_an_rwm_run_naming_it(tmp_path, monkeypatch):
    cfg = _rwm_config("rounds=100000", "comm.timeout_s=20")
    check_config(cfg, 8)
    dataset = prepare_data(cfg)
    original = Trainer.train_round

    def train_round_then_die(self):
        self.rounds_trained = getattr(self, "rounds_trained", 0) + 1
        if dist.get_rank() == 5 and self.rounds_trained == 3:
            os.kill(os.getpid(), signal.SIGKILL)
        return original(self)

    monkeypatch.setattr(Trainer, "train_round", train_round_then_die)
    started = time.monotonic()
    with pytest.raises(RankFailure) as failure:
        spawn(
            lambda ctx: run_node(cfg, ctx, tmp_path, dataset),
            8,
            timeout_s=RANK_TEST_TIMEOUT_S,
            grace_s=50,
            quiet_failures=True,
        )
    assert time.monotonic() - started < 20 + 50
    assert failure.value.first_failed == 5
    assert sorted(failure.value.errors) == list(range(8))
    for rank, message in failure.value.errors.items():
        if rank != 5:
            assert "node 5 failed" in message, message


def test_one_rwm_step_merges_by_age_and_ages_by_max_plus_local_steps(tmp_path):
    """run_rwm with a scripted transport: round 1 trains and sends; round 2 receives, merges, trains, sends;
    then the neighbour stops the walk and the node evaluates round 2 once (it was not an evaluated round)."""
    from types import SimpleNamespace

    from dpsgd.algorithms.rwm import run_rwm
    from dpsgd.algorithms.stopping import evaluate_at_stop
    from dpsgd.averaging import merge_fill_own
    from dpsgd.communication import ByteCounters
    from dpsgd.metrics import EvalSchedule, PhaseClock
    from dpsgd.run_outputs import STOP_PREFIX, NodeLog
    from dpsgd.sharing.full import FullSharing
    from dpsgd.sharing.wire import Encoding, Message

    own, incoming = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([10.0, 20.0, 30.0])

    class ScriptedTransport:
        sent: list = []

        def start(self):
            pass

        def ready(self):
            return (
                {0: Message(round=1, degree=2, age=10, encoding=Encoding.FULL, values=incoming)}
                if not self.sent[1:]
                else None
            )

        def send(self, sender, peer, message):
            self.sent.append((peer, message.age, message.values.clone()))

        def close(self):
            self.closed = True

    records, evaluations, published = [], [], {}
    log = NodeLog(tmp_path, 0)

    def record(round_number, clock, **metrics):
        records.append(metrics)
        log.write({"node": 0, "round": round_number, **clock.seconds, **metrics})

    transport = ScriptedTransport()
    flat = own.clone()
    node = SimpleNamespace(
        rank=0,
        flat=flat,
        link=SimpleNamespace(bytes=ByteCounters()),
        sharing=FullSharing(),
        merge=merge_fill_own,
        degree=2,
        neighbours=[4, 9],
        trainer=SimpleNamespace(steps_per_round=3),  # training leaves x unchanged
        schedule=EvalSchedule(every=100, rounds=5),
        evaluate=lambda: evaluations.append(2) or {"test_loss": 0.5},
        rng=numpy_rng(0, "test", 0),
        checkpoint=lambda round_number, state: None,
        note_divergence=lambda round_number, batch_loss: None,
        divergence=SimpleNamespace(must_stop=lambda r: False),
        clock=PhaseClock,
        record=record,
        recorder=SimpleNamespace(
            log=log, sketch=None, store=SimpleNamespace(set=published.__setitem__)
        ),
    )
    group = SimpleNamespace(
        nodes=[node],
        transport=transport,
        clock=PhaseClock,
        train_round=lambda only: [0.0 for _ in only],
        evaluate_at_stop=lambda: evaluate_at_stop(node),
    )
    assert run_rwm(group, rounds=5) == {
        0: 2
    }  # the scripted neighbour stops the walk before round 3
    log.close()
    assert evaluations == [2]  # once, when the walk stopped it after round 2
    lines = read_jsonl(tmp_path / "nodes" / "0.jsonl")
    assert [line["round"] for line in lines] == [1, 2] and "test_loss" not in lines[0]
    assert lines[1]["test_loss"] == 0.5 and lines[1]["age"] == 13  # round 2's line, now evaluated
    assert (
        json.loads(published[f"{STOP_PREFIX}/0"]) == lines[1]
    )  # what rank 0 aggregates as `final`
    assert [r["age"] for r in records] == [3, 10 + 3]  # max(3, 10), then 3 more local steps
    assert [age for _, age, _ in transport.sent] == [3, 13]


@pytest.mark.parametrize("nodes_per_rank", [1, 4])
def test_periodic_rwm_sends_only_after_every_kth_round(tmp_path, nodes_per_rank):
    """algorithm.every=3: a node trains three rounds per model it holds and sends after rounds 3, 6, 9;
    each message goes to the neighbour its seeded stream draws, as in plain RWM."""
    run_train(
        tmp_path,
        "algorithm=rwm",
        "algorithm.every=3",
        "nodes=8",
        f"nodes_per_rank={nodes_per_rank}",
        "rounds=9",
        "eval.every=3",
        "dataset.num_users=80",
        "dataset.num_items=100",
        "train.local_steps=2",
        "checkpoint.every=0",
        "comm.timeout_s=30",
    )
    run_dir = tmp_path / "run"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["rounds_max"] == 9 and summary["rounds_min"] >= 3
    message_bytes = HEADER_BYTES + 4 * summary["num_parameters"]
    config = compose_settings("nodes=8")
    topology = check_config(config, 8)
    for node in range(8):
        records = read_jsonl(run_dir / "nodes" / f"{node}.jsonl")
        assert [r["round"] for r in records] == list(range(1, len(records) + 1))
        assert [r["round"] for r in records if "sent_to" in r] == [
            r["round"] for r in records if r["round"] % 3 == 0
        ]
        assert all(r["bytes_sent"] == (r["round"] // 3) * message_bytes for r in records)
        assert [r["age"] for r in records] == sorted(r["age"] for r in records)
        neighbours = topology.neighbours(node)
        rng = numpy_rng(config.run.seed, "neighbour_choice", node)
        sent = [r["sent_to"] for r in records if "sent_to" in r]
        assert sent == [neighbours[rng.integers(len(neighbours))] for _ in sent]


def test_tensorboard_has_a_histogram_of_model_ages_per_evaluated_round(tmp_path):
    """Each evaluated round's histogram holds exactly the ages the nodes logged for that round."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_train(
        tmp_path,
        "algorithm=rwm",
        "nodes=6",
        "rounds=8",
        "eval.every=2",
        "dataset.num_users=60",
        "dataset.num_items=80",
        "train.local_steps=2",
        "checkpoint.every=0",
        "comm.timeout_s=30",
    )
    run_dir = tmp_path / "run"
    events = (
        EventAccumulator(str(run_dir / "tb"), size_guidance={"histograms": 0})
        .Reload()
        .Histograms("age")
    )
    logs = [read_jsonl(run_dir / "nodes" / f"{node}.jsonl") for node in range(6)]
    assert [event.step for event in events] == [2, 4, 6, 8]
    for event in events:
        ages = [record["age"] for log in logs for record in log if record["round"] == event.step]
        histogram = event.histogram_value
        assert histogram.num == len(ages) >= 1
        assert (histogram.sum, histogram.min, histogram.max) == (sum(ages), min(ages), max(ages))


@pytest.mark.parametrize("nodes_per_rank", [1, 4])
def test_every_node_evaluates_the_round_it_stops_after_so_final_is_the_end_of_the_run(
    tmp_path, nodes_per_rank
):
    """Nodes stop wherever they are when the first completes 12 rounds (evaluations at 5, 10, 12): each
    evaluates its last round once, and summary.json's `final` aggregates those, at round 12 with all
    8 nodes (before: the last evaluated round every node reached, 5 or 10)."""
    import statistics

    run_train(
        tmp_path,
        "algorithm=rwm",
        "nodes=8",
        f"nodes_per_rank={nodes_per_rank}",
        "rounds=12",
        "eval.every=5",
        "dataset.num_users=80",
        "dataset.num_items=100",
        "train.local_steps=2",
        "checkpoint.every=0",
        "comm.timeout_s=30",
    )
    run_dir = tmp_path / "run"
    summary = json.loads((run_dir / "summary.json").read_text())
    final, per_node = summary["final"], summary["rounds_per_node"]
    assert final["round"] == summary["rounds_max"] == 12 and final["nodes_reporting"] == 8
    last_records = []
    for node in range(8):
        records = read_jsonl(run_dir / "nodes" / f"{node}.jsonl")
        assert [r["round"] for r in records] == list(
            range(1, per_node[node] + 1)
        )  # one line per round
        evaluated = [r["round"] for r in records if "test_loss" in r]
        assert evaluated == [r for r in (5, 10) if r < per_node[node]] + [per_node[node]]
        last_records.append(records[-1])
    for key in ("test_loss", "test_acc", "train_loss", "bytes_sent", "time_s"):
        assert final[key]["mean"] == pytest.approx(
            statistics.fmean(r[key] for r in last_records), rel=1e-12
        ), key
    assert final["consensus_distance"] > 0  # of the models as the nodes stopped
    # The report says the same from the JSONL, and from summary.json alone (the other machines' logs absent).
    from dpsgd import report

    from_jsonl = report.final_metrics(report.load_run(run_dir))
    shutil.rmtree(run_dir / "nodes")
    from_summary = report.final_metrics(report.load_run(run_dir))
    for row in (from_jsonl, from_summary):
        assert row["final_round"] == 12 and row["consensus_distance"] == final["consensus_distance"]
        assert row["test_loss"] == pytest.approx(final["test_loss"]["mean"], rel=1e-12)
