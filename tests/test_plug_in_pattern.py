"""A synchronous pattern registered outside dpsgd runs through the one D-PSGD loop, in every grouping.

The pattern (each round every node sends to one other node, a different one every round, and
the receiver averages the two models equally) is a `RoundPeers` plan and one `register_pattern`
call in this test module: nothing in dpsgd names it.
"""

from __future__ import annotations

import numpy as np
import pytest

from dpsgd.algorithms.dpsgd import run_dpsgd
from dpsgd.algorithms.patterns import PATTERNS, Pattern, register_pattern
from tests.conftest import compose_settings, read_jsonl
from tests.test_dpsgd_exactness import _random_model, _rounds_from_random_models


class RotatingPartner:
    """Round r: node i sends to node (i + 1 + r mod (n - 1)) mod n, so each node hears from exactly one."""

    def __init__(self, nodes: int):
        self.nodes = nodes
        self.stop_margin = nodes

    def targets(self, round_number: int) -> list[list[int]]:
        shift = 1 + round_number % (self.nodes - 1)
        return [[(node + shift) % self.nodes] for node in range(self.nodes)]

    def senders(self, round_number: int) -> list[list[int]]:
        shift = 1 + round_number % (self.nodes - 1)
        return [[(node - shift) % self.nodes] for node in range(self.nodes)]

    def weigh(
        self, own_degree: int, sender_degrees: dict[int, int]
    ) -> tuple[float, dict[int, float]]:
        return 0.5, {sender: 0.5 for sender in sender_degrees}

    def mixing_gap(self) -> float | None:
        return None


register_pattern(
    "test_rotating_partner",
    Pattern(run_dpsgd, plan=lambda nodes, seed, options, graph: RotatingPartner(nodes)),
)


@pytest.mark.parametrize("nodes_per_rank", [1, 3])
def test_a_registered_synchronous_pattern_averages_with_its_planned_partner(
    tmp_path, nodes_per_rank
):
    nodes = 6
    cfg = compose_settings(
        "algorithm.name=test_rotating_partner",
        f"nodes={nodes}",
        f"nodes_per_rank={nodes_per_rank}",
        "rounds=1",
        "optimizer.lr=0",
        "eval.every=1",
        "log.progress=false",
        "checkpoint.every=0",
        "dataset.num_users=40",
        "dataset.num_items=90",
        f"cache_dir={tmp_path / 'cache'}",
    )
    _rounds_from_random_models(
        cfg, nodes // nodes_per_rank, tmp_path, nodes_per_rank=nodes_per_rank
    )
    numel = np.load(tmp_path / "after_0.npy").size
    before = [_random_model(r, numel).numpy().astype(np.float64) for r in range(nodes)]
    sender = RotatingPartner(nodes).senders(1)
    for node in range(nodes):
        expected = (before[node] + before[sender[node][0]]) / 2
        np.testing.assert_allclose(np.load(tmp_path / f"after_{node}.npy"), expected, atol=1e-6)
    assert "test_rotating_partner" in PATTERNS


def test_the_registered_pattern_runs_from_the_command_line_config(tmp_path):
    """Through run_node, as train.py runs it: every node sends one message a round."""
    from dpsgd.building import prepare_data
    from dpsgd.checks import check_config
    from dpsgd.experiment import run_node
    from dpsgd.launch import spawn
    from tests.conftest import RANK_TEST_TIMEOUT_S

    cfg = compose_settings(
        "algorithm.name=test_rotating_partner",
        "nodes=6",
        "nodes_per_rank=2",
        "rounds=4",
        "eval.every=2",
        "log.progress=false",
        "checkpoint.every=0",
        "dataset.num_users=40",
        "dataset.num_items=90",
        f"cache_dir={tmp_path / 'cache'}",
    )
    check_config(cfg, 3)
    dataset = prepare_data(cfg)
    spawn(
        lambda ctx: run_node(cfg, ctx, tmp_path / "run", dataset), 3, timeout_s=RANK_TEST_TIMEOUT_S
    )
    for node in range(6):
        records = read_jsonl(tmp_path / "run" / "nodes" / f"{node}.jsonl")
        assert [r["round"] for r in records] == [1, 2, 3, 4]
        per_round = records[-1]["bytes_sent"] / 4
        assert (
            records[0]["bytes_sent"] == per_round
        )  # one message a round, the same size every round
