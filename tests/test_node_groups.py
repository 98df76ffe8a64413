"""Node groups: a rank hosting several nodes gives each node exactly the numbers it has alone."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

from dpsgd import averaging
from dpsgd.averaging import Contribution, merge_fill_own, mix_rows_into
from dpsgd.launch import EXIT_NODE_FAILURE
from tests.conftest import (
    REPO,
    children_of,
    compose_settings,
    read_jsonl,
    run_train,
    wait_for_rounds,
)

TIMINGS = {"time_s", "train_s", "comm_s", "eval_s"}
COMMON = ("nodes=8", "rounds=6", "eval.every=2", "checkpoint.every=0", "log.progress=false")
SHARING = {
    "full": ("sharing=full",),
    "partial": ("sharing=partial", "alpha=0.3"),
    "partial_renormalize": ("sharing=partial", "alpha=0.3", "sharing.merge=renormalize"),
    "random_alpha": ("sharing=random_alpha",),
    "subsampling": ("sharing=subsampling", "alpha=0.5"),
    "full_adam": (
        "sharing=full",
        "optimizer=adam",
        "optimizer.lr=0.01",
    ),  # stacked gradients, one Adam per row
    "full_momentum": ("sharing=full", "optimizer.momentum=0.9"),  # stacked gradients, SGD per row
    "full_float16": ("sharing=full", "sharing.values=float16"),  # neighbours on one rank round too
    "partial_bfloat16": ("sharing=partial", "alpha=0.1", "sharing.values=bfloat16"),
}


def _records(run_dir, node):
    return [
        {k: v for k, v in r.items() if k not in TIMINGS}
        for r in read_jsonl(run_dir / "nodes" / f"{node}.jsonl")
    ]


def _assert_same(a: list[dict], b: list[dict]) -> None:
    assert [sorted(r) for r in a] == [sorted(r) for r in b]
    for left, right in zip(a, b):
        for key, value in left.items():
            if isinstance(value, float):
                assert right[key] == pytest.approx(value, rel=1e-4, abs=1e-5), key
            else:
                assert right[key] == value, key  # bytes, rounds: exactly what the node sent alone


@pytest.mark.parametrize("sharing", sorted(SHARING))
def test_grouped_nodes_log_what_they_log_alone(tmp_path, sharing):
    runs = {}
    for per_rank in (1, 4, 8):
        run_train(
            tmp_path / str(per_rank), *COMMON, *SHARING[sharing], f"nodes_per_rank={per_rank}"
        )
        runs[per_rank] = tmp_path / str(per_rank) / "run"
    for node in range(8):
        alone = _records(runs[1], node)
        assert len(alone) == 6
        for per_rank in (4, 8):
            _assert_same(alone, _records(runs[per_rank], node))
    summaries = [json.loads((runs[p] / "summary.json").read_text()) for p in (1, 4, 8)]
    assert summaries[0]["final"]["test_loss"]["mean"] == pytest.approx(
        summaries[1]["final"]["test_loss"]["mean"], rel=1e-5
    )


@pytest.mark.parametrize(
    "optimizer", [(), ("optimizer=adam", "optimizer.lr=0.01")]
)  # sparse SGD; dense Adam
def test_grouped_checkpoints_resume_exactly(tmp_path, optimizer):
    common = (
        *COMMON[:1],
        "eval.every=2",
        "checkpoint.every=3",
        "nodes_per_rank=4",
        "log.progress=false",
        *optimizer,
    )
    run_train(tmp_path / "whole", *common, "rounds=9")
    run_train(tmp_path / "parts", *common, "rounds=6")
    result = run_train(tmp_path / "parts", *common, "rounds=9", "resume=true")
    assert "resumed after round 6" in result.stdout
    for node in range(8):
        _assert_same(
            _records(tmp_path / "whole" / "run", node), _records(tmp_path / "parts" / "run", node)
        )


# the CPU's blocked sparse product, and the loop other devices run
@pytest.mark.parametrize(
    "mix", [mix_rows_into, averaging._mix_row_by_row], ids=["blocked_sparse", "row_by_row"]
)
def test_mixing_rows_is_metropolis_hastings_like_fill_own(mix):
    rng = np.random.default_rng(5)
    count, numel = 12, 40_000  # more columns than one block, and a last block cut short
    rows = torch.from_numpy(rng.normal(size=(count, numel)).astype(np.float32))
    weights = {
        target: {
            source: rng.uniform(0.05, 0.2)
            for source in rng.choice(count, 4, replace=False)
            if source != target
        }
        for target in range(count)
    }
    entries = [(t, t, 1 - sum(w.values())) for t, w in weights.items()]
    entries += [(t, s, w) for t, ws in weights.items() for s, w in ws.items()]
    out = torch.full_like(rows, float("nan"))  # never read: spare rows hold whatever was there
    mix(out, rows, entries)
    reference = np.zeros((count, numel))
    for target, source, weight in entries:
        reference[target] += weight * rows[source].double().numpy()
    np.testing.assert_allclose(out.numpy(), reference, atol=1e-6)
    for target, ws in weights.items():  # the same as the rule a node alone applies
        alone = rows[target].clone()
        merge_fill_own(
            alone, 1 - sum(ws.values()), [Contribution(w, rows[s]) for s, w in ws.items()]
        )
        np.testing.assert_allclose(out[target].numpy(), alone.numpy(), atol=1e-6)


@pytest.mark.parametrize(
    "overrides,words",
    [
        (("nodes=10", "nodes_per_rank=4"), "cannot be split"),
        (("nodes=8", "nodes_per_rank=3"), "cannot be split"),
        (("nodes=8", "nodes_per_rank=1", "device=cuda"), "device=cuda trains node groups"),
        (
            ("nodes=8", "nodes_per_rank=4", "device=cuda", "sharing=partial", "alpha=0.1"),
            "sharing=full",
        ),
        (("nodes=8", "nodes_per_rank=4", "device=tpu"), "not known"),
    ],
)
def test_impossible_groupings_are_one_paragraph(overrides, words):
    from dpsgd.checks import check_config
    from dpsgd.errors import ConfigError

    with pytest.raises(ConfigError, match=words):
        check_config(compose_settings(*overrides))


def test_a_killed_rank_is_named_by_the_nodes_it_hosted(tmp_path):
    env = {**os.environ, "DPSGD_CACHE": str(tmp_path / "cache"), "GLOO_SOCKET_IFNAME": "lo"}
    command = [
        sys.executable,
        str(REPO / "train.py"),
        "nodes=8",
        "nodes_per_rank=4",
        "rounds=1000000",
        "comm.timeout_s=20",
        "log.progress=false",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    process = subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        wait_for_rounds(tmp_path / "run", 8, 1, timeout_s=90)
        ranks = children_of(process.pid)
        assert len(ranks) == 2
        os.kill(ranks[1], signal.SIGKILL)
        _, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
        process.wait()
    assert process.returncode == EXIT_NODE_FAILURE
    assert "the first was rank 1 (nodes 4-7)" in stderr.splitlines()[0], stderr
    assert "Traceback" not in stderr


def test_grouped_rwm_runs_never_hang_and_send_one_message_per_node_per_round(tmp_path):
    from dpsgd.building import prepare_data
    from dpsgd.checks import check_config
    from dpsgd.experiment import run_node
    from dpsgd.launch import spawn
    from tests.conftest import RANK_TEST_TIMEOUT_S

    cfg = compose_settings(
        "algorithm=rwm",
        "nodes=8",
        "nodes_per_rank=4",
        "rounds=6",
        "eval.every=3",
        "log.progress=false",
        "checkpoint.every=0",
        "dataset.num_users=80",
        "dataset.num_items=100",
        "train.local_steps=3",
        "comm.timeout_s=30",
        f"cache_dir={tmp_path / 'cache'}",
    )
    check_config(cfg)
    dataset = prepare_data(cfg)
    model_bytes = None
    for attempt in range(20):
        run_dir = tmp_path / f"run{attempt}"
        spawn(lambda ctx: run_node(cfg, ctx, run_dir, dataset), 2, timeout_s=RANK_TEST_TIMEOUT_S)
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["rounds_max"] == 6 and not summary["in_progress"]
        for node in range(8):
            records = read_jsonl(run_dir / "nodes" / f"{node}.jsonl")
            assert [r["round"] for r in records] == list(range(1, len(records) + 1))
            model_bytes = model_bytes or records[0]["bytes_sent_data"]
            assert [r["bytes_sent_data"] for r in records] == [
                model_bytes * r["round"] for r in records
            ]
            assert all(r["sent_to"] in range(8) and r["sent_to"] != node for r in records)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_a_group_on_the_gpu_logs_what_it_logs_on_the_cpu(tmp_path):
    for device in ("cpu", "cuda"):
        run_train(tmp_path / device, *COMMON, "nodes_per_rank=8", f"device={device}")
    for node in range(8):
        _assert_same(
            _records(tmp_path / "cpu" / "run", node), _records(tmp_path / "cuda" / "run", node)
        )
