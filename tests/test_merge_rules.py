"""A merge rule registered outside dpsgd works in every pattern and every grouping.

The rule here (coordinate-wise median of the node's own vector and what it received, a
coordinate a sender did not send counting as the receiver's own) is registered by this test
module alone: the forked ranks inherit the registry, so nothing in dpsgd names it.
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from dpsgd.averaging import MERGE_RULES, Contribution, merge_rule
from dpsgd.building import prepare_data
from dpsgd.checks import check_config
from dpsgd.experiment import run_node
from dpsgd.launch import spawn
from tests.conftest import RANK_TEST_TIMEOUT_S, compose_settings, read_jsonl

CALLS_DIR: Path | None = (
    None  # set by a test before the ranks fork: where each call of the rule is kept
)
_calls = itertools.count()


@merge_rule("test_median")
def coordinate_median(
    flat: torch.Tensor,
    self_weight: float,
    contributions: list[Contribution],
    own_index: torch.Tensor | None = None,
) -> None:
    """Per coordinate, the median of the node's own value and every sender's (weights play no part)."""
    inputs = [flat.clone()]
    for contribution in contributions:
        filled = flat.clone()
        if contribution.index is None:
            filled.copy_(contribution.values)
        else:
            filled[contribution.index] = contribution.values
        inputs.append(filled)
    flat.copy_(torch.stack(inputs).median(dim=0).values)
    if CALLS_DIR is not None:
        torch.save(
            {"inputs": torch.stack(inputs), "out": flat.clone(), "senders": len(contributions)},
            CALLS_DIR / f"{os.getpid()}_{next(_calls):06d}.pt",
        )


def _calls_by_rank(directory: Path) -> dict[str, list[dict]]:
    calls: dict[str, list[dict]] = {}
    for path in sorted(directory.glob("*.pt")):
        calls.setdefault(path.name.split("_")[0], []).append(torch.load(path, weights_only=True))
    return calls


PATTERNS = {
    "dpsgd": ("algorithm=dpsgd",),
    "epidemic": ("algorithm=epidemic", "algorithm.fanout=2"),
    "hybrid": ("algorithm=hybrid", "algorithm.switch_round=3"),
    "rwm": ("algorithm=rwm",),
}


@pytest.mark.parametrize("nodes_per_rank", [1, 4])
@pytest.mark.parametrize("pattern", sorted(PATTERNS))
def test_a_merge_rule_registered_by_a_test_runs_in_every_pattern_and_grouping(
    tmp_path, pattern, nodes_per_rank
):
    global CALLS_DIR
    CALLS_DIR = tmp_path / "calls"
    CALLS_DIR.mkdir()
    cfg = compose_settings(
        *PATTERNS[pattern],
        "sharing.merge=test_median",
        "nodes=8",
        f"nodes_per_rank={nodes_per_rank}",
        "rounds=6",
        "eval.every=3",
        "topology.degree=3",
        "log.progress=false",
        "checkpoint.every=0",
        "dataset.num_users=80",
        "dataset.num_items=100",
        "comm.timeout_s=30",
        f"cache_dir={tmp_path / 'cache'}",
    )
    try:
        check_config(cfg, 8 // nodes_per_rank)
        dataset = prepare_data(cfg)
        spawn(
            lambda ctx: run_node(cfg, ctx, tmp_path / "run", dataset),
            8 // nodes_per_rank,
            timeout_s=RANK_TEST_TIMEOUT_S,
        )
    finally:
        CALLS_DIR = None
    calls = _calls_by_rank(tmp_path / "calls")
    assert len(calls) == 8 // nodes_per_rank  # every rank merged with the test's rule
    for call in itertools.chain(*calls.values()):
        expected = np.median(
            call["inputs"].double().numpy(), axis=0
        )  # odd counts: a true median of the inputs
        if call["inputs"].shape[0] % 2:
            np.testing.assert_allclose(call["out"].numpy(), expected, rtol=0, atol=1e-6)
    senders = {call["senders"] for call in itertools.chain(*calls.values())}
    expected_senders = {"dpsgd": {3}, "hybrid": {1, 3}, "rwm": {1}}.get(pattern)
    if expected_senders is not None:
        assert (
            senders == expected_senders
        )  # graph neighbours when averaging, one model at a time when walking
    else:
        assert max(senders) >= 1  # epidemic: however many drew the node this round
    summary_finals = [read_jsonl(tmp_path / "run" / "nodes" / f"{n}.jsonl")[-1] for n in range(8)]
    assert all(np.isfinite(record["test_loss"]) for record in summary_finals)


def test_under_dpsgd_the_rule_s_result_is_the_model_the_next_round_starts_from(tmp_path):
    """No training (lr=0): what the rule wrote is exactly the own vector it gets the next round."""
    global CALLS_DIR
    CALLS_DIR = tmp_path / "calls"
    CALLS_DIR.mkdir()
    cfg = compose_settings(
        "sharing.merge=test_median",
        "nodes=8",
        "nodes_per_rank=4",
        "rounds=2",
        "optimizer.lr=0",
        "topology.degree=3",
        "log.progress=false",
        "checkpoint.every=0",
        "dataset.num_users=80",
        "dataset.num_items=100",
        f"cache_dir={tmp_path / 'cache'}",
    )
    try:
        check_config(cfg, 2)
        dataset = prepare_data(cfg)
        spawn(
            lambda ctx: run_node(cfg, ctx, tmp_path / "run", dataset),
            2,
            timeout_s=RANK_TEST_TIMEOUT_S,
        )
    finally:
        CALLS_DIR = None
    moved = []
    for calls in _calls_by_rank(tmp_path / "calls").values():
        assert len(calls) == 8  # 4 nodes x 2 rounds, node after node
        for first, second in zip(calls[:4], calls[4:]):
            assert torch.equal(second["inputs"][0], first["out"])
            moved.append(not torch.equal(first["out"], first["inputs"][0]))
    assert any(moved)  # the median did move models (those whose own values were not the median)


def test_the_rule_is_chosen_by_name_like_the_built_in_ones():
    assert MERGE_RULES["test_median"] is coordinate_median
    check_config(compose_settings("sharing.merge=test_median", "algorithm=rwm", "nodes=8"), 8)
