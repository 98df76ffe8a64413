"""A sharing method registered outside dpsgd runs in every pattern and every grouping.

The method here (each round a node sends the coordinates of one parity, alternating: odd ones in
odd rounds, even ones in even rounds, as int32 indices) is one class and one `sharing_method`
call in this test module: nothing in dpsgd names it, and no YAML option is needed to choose it
(`sharing.name=test_alternate_halves`).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dpsgd.building import build_trainer, prepare_data
from dpsgd.checks import check_config
from dpsgd.experiment import run_node
from dpsgd.launch import spawn
from dpsgd.sharing import alpha_note, build_sharing
from dpsgd.sharing.full import FullSharing
from dpsgd.sharing.methods import SHARING_METHODS, sharing_method
from dpsgd.sharing.wire import HEADER_BYTES, Encoding, Message, encoding_problem
from dpsgd.topology import mh_weights
from tests.conftest import RANK_TEST_TIMEOUT_S, compose_settings, read_jsonl
from tests.test_dpsgd_exactness import _random_model, _rounds_from_random_models

NAME = "test_alternate_halves"


def parity_coordinates(numel: int, round_number: int) -> torch.Tensor:
    return torch.arange(round_number % 2, numel, 2)


class AlternateHalves(FullSharing):
    """Odd coordinates in odd rounds, even ones in even rounds (the round is in every header).
    Keeps no state: the no-op bookkeeping (`after_merge`, `state_dict`) is full sharing's."""

    name = NAME

    def pack(self, flat: torch.Tensor, round_number: int, degree: int, age: int = 0) -> Message:
        chosen = parity_coordinates(flat.numel(), round_number)
        self.last_sent_index = chosen
        return Message(
            round=round_number,
            degree=degree,
            age=age,
            encoding=Encoding.INDEX_INT32,
            values=flat[chosen],
            index=chosen.to(torch.int32),
        )

    def check_header(self, fields: dict[str, int]) -> str | None:
        return encoding_problem(fields, (Encoding.INDEX_INT32,), self.name)

    def decode(self, message: Message) -> tuple[torch.Tensor | None, torch.Tensor]:
        return message.index.long(), message.values


@sharing_method(NAME, alpha_unused="each message carries half of the model")
def alternate_halves(
    flat: torch.Tensor, alpha: float, options: dict, seed: int, node: int
) -> AlternateHalves:
    return AlternateHalves()


def _settings(tmp_path, *overrides: str):
    return compose_settings(
        f"sharing.name={NAME}",
        "log.progress=false",
        "checkpoint.every=0",
        "dataset.num_users=40",
        "dataset.num_items=90",
        f"cache_dir={tmp_path / 'cache'}",
        *overrides,
    )


def test_the_method_is_chosen_by_name_like_the_built_in_ones():
    assert SHARING_METHODS[NAME].build is alternate_halves
    sharing = build_sharing(NAME, torch.zeros(5), 1.0, {}, seed=0, node=0)
    assert sharing.pack(torch.arange(5.0), 1, degree=2).values.tolist() == [1.0, 3.0]
    assert alpha_note(NAME, 0.3) == (
        f"alpha=0.3 does not apply to sharing={NAME} (each message carries half of the model)"
    )
    assert alpha_note("partial", 0.3) is None  # partial's alpha is its fraction


@pytest.mark.parametrize("nodes_per_rank", [1, 3])
def test_one_round_without_training_averages_the_sent_half_only(tmp_path, nodes_per_rank):
    """Each node's odd coordinates become the Metropolis-Hastings average of its own and its
    neighbours' (float64 reference); its even coordinates, which nobody sent, stay its own."""
    nodes = 6
    cfg = _settings(
        tmp_path,
        f"nodes={nodes}",
        f"nodes_per_rank={nodes_per_rank}",
        "rounds=1",
        "optimizer.lr=0",
        "eval.every=1",
    )
    topology = _rounds_from_random_models(
        cfg, nodes // nodes_per_rank, tmp_path, nodes_per_rank=nodes_per_rank
    )
    numel = np.load(tmp_path / "after_0.npy").size
    before = [_random_model(r, numel).numpy().astype(np.float64) for r in range(nodes)]
    odd = parity_coordinates(numel, 1).numpy()
    for node in range(nodes):
        peers = topology.neighbours(node)
        self_weight, weights = mh_weights(
            topology.degree(node), {p: topology.degree(p) for p in peers}
        )
        expected = before[node].copy()
        expected[odd] = self_weight * before[node][odd] + sum(
            weights[p] * before[p][odd] for p in peers
        )
        np.testing.assert_allclose(np.load(tmp_path / f"after_{node}.npy"), expected, atol=1e-6)


PATTERNS = {
    "dpsgd": ("algorithm=dpsgd",),
    "epidemic": ("algorithm=epidemic", "algorithm.fanout=2"),
    "hybrid": ("algorithm=hybrid", "algorithm.switch_round=2"),
    "rwm": ("algorithm=rwm",),
}


SYNCHRONOUS = ("dpsgd", "epidemic")


@pytest.mark.parametrize("pattern", sorted(PATTERNS))
def test_every_pattern_runs_the_method_alike_in_every_grouping(tmp_path, pattern):
    """The same run, one node per rank and two ranks of three: every node's records agree (a
    synchronous pattern's), and every message carried half the model with its int32 index."""
    records = {}
    for nodes_per_rank in (1, 3):
        cfg = _settings(
            tmp_path,
            *PATTERNS[pattern],
            "nodes=6",
            f"nodes_per_rank={nodes_per_rank}",
            "rounds=4",
            "eval.every=2",
            "comm.timeout_s=30",
        )
        check_config(cfg, 6 // nodes_per_rank)
        dataset = prepare_data(cfg)
        run_dir = tmp_path / f"run{nodes_per_rank}"
        spawn(
            lambda ctx: run_node(cfg, ctx, run_dir, dataset),
            6 // nodes_per_rank,
            timeout_s=RANK_TEST_TIMEOUT_S,
        )
        records[nodes_per_rank] = [
            read_jsonl(run_dir / "nodes" / f"{node}.jsonl") for node in range(6)
        ]
    numel = build_numel(tmp_path)
    for alone, grouped in zip(records[1], records[3]):
        if pattern in SYNCHRONOUS:  # a walk's timing differs between runs: only rounds agree
            _assert_same_records(alone, grouped)
        for node_records in (alone, grouped):  # round 1 sends the odd coordinates, numel // 2
            data, meta = node_records[0]["bytes_sent_data"], node_records[0]["bytes_sent_meta"]
            messages = data // (4 * (numel // 2))  # float32 values: data; int32 index: meta
            assert data == messages * 4 * (numel // 2)
            assert meta == messages * (HEADER_BYTES + 4 * (numel // 2))
            assert node_records[-1]["bytes_sent_data"] > 0
            assert np.isfinite(node_records[-1]["train_loss"])


def _assert_same_records(alone: list[dict], grouped: list[dict]) -> None:
    """Bytes and words exactly; losses as a group's stacked training rounds them (float32)."""
    for a, b in zip(alone, grouped, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            if key.startswith("bytes") or not isinstance(a[key], float):
                assert a[key] == b[key], key
            elif not key.endswith("_s"):
                assert a[key] == pytest.approx(b[key], rel=1e-5), key


def build_numel(tmp_path) -> int:
    """The model's size for the test's data set (the same settings, built in this process)."""
    cfg = _settings(tmp_path, "nodes=6")
    dataset = prepare_data(cfg)
    _, flat = build_trainer(cfg, dataset, dataset.node_data(0, 6, cfg.run.seed, None), 0)
    return flat.numel()


def test_the_report_leaves_alpha_out_of_the_labels_of_the_built_in_methods_that_ignore_it():
    """The report never imports torch, so it keeps its own list: it must match the registry's."""
    from dpsgd.report.runs import SHARING_WITHOUT_ALPHA

    built_in = {"full", "partial", "random_alpha", "subsampling"}
    assert built_in <= set(SHARING_METHODS)
    assert SHARING_WITHOUT_ALPHA == {
        name for name in built_in if SHARING_METHODS[name].alpha_unused is not None
    }
