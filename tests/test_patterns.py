"""The patterns beyond the study: Epidemic Learning, a resampled graph, hybrid RWM -> D-PSGD, and the
consensus distance, each against a plain reference."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from dpsgd import consensus
from dpsgd.algorithms.peers import EpidemicDraws
from dpsgd.building import round_peers
from dpsgd.checkpoint import load_checkpoint
from dpsgd.checks import check_config
from dpsgd.consensus import ModelSketch, consensus_distance
from dpsgd.errors import ConfigError
from dpsgd.topology import mh_weights
from tests.conftest import compose_settings, read_jsonl, run_train
from tests.test_dpsgd_exactness import _random_model, _rounds_from_random_models
from tests.test_node_groups import _assert_same, _records

SMALL = (
    "dataset.num_users=80",
    "dataset.num_items=100",
    "checkpoint.every=0",
    "log.progress=false",
    "comm.timeout_s=30",
)


# ---- Epidemic Learning -------------------------------------------------------------------------------


def test_epidemic_receive_sets_are_exactly_the_senders_draws():
    """What every rank computes alone: each node's draw, and who sends to each node (its inverse)."""
    nodes, fanout = 12, 3
    on_one_rank, on_another = (
        EpidemicDraws(nodes, fanout, seed=5),
        EpidemicDraws(nodes, fanout, seed=5),
    )
    received = np.zeros(nodes)
    for round_number in range(1, 61):
        targets, senders = on_one_rank.targets(round_number), on_one_rank.senders(round_number)
        assert targets == on_another.targets(round_number) and senders == on_another.senders(
            round_number
        )
        for node in range(nodes):
            draw = on_one_rank.draw(node, round_number)
            assert (
                draw == targets[node] == sorted(set(draw))
                and len(draw) == fanout
                and node not in draw
            )
            assert senders[node] == [
                s for s in range(nodes) if node in on_another.draw(s, round_number)
            ]
            received[node] += len(senders[node])
    assert targets != on_one_rank.targets(1)  # a fresh draw every round
    assert EpidemicDraws(nodes, fanout, seed=6).targets(1) != EpidemicDraws(
        nodes, fanout, seed=5
    ).targets(1)
    assert received.sum() == 60 * nodes * fanout
    assert np.all(
        np.abs(received / 60 - fanout) < 1.2
    )  # uniform: every node hears from about fanout a round


def test_epidemic_rounds_over_real_ranks_are_the_float64_reference(tmp_path):
    """Three rounds without training: node j's model becomes the plain mean of its own and its senders'."""
    nodes, fanout, rounds = 6, 2, 3
    cfg = compose_settings(
        f"nodes={nodes}",
        "algorithm=epidemic",
        f"algorithm.fanout={fanout}",
        f"rounds={rounds}",
        "optimizer.lr=0",
        "eval.every=1",
        "dataset.num_users=40",
        "dataset.num_items=90",
        "log.progress=false",
        f"cache_dir={tmp_path / 'cache'}",
    )
    _rounds_from_random_models(
        cfg, nodes, tmp_path, rounds, EpidemicDraws(nodes, fanout, cfg.run.seed)
    )
    numel = np.load(tmp_path / "after_0.npy").size
    models = np.stack([_random_model(r, numel).numpy().astype(np.float64) for r in range(nodes)])
    draws = EpidemicDraws(nodes, fanout, cfg.run.seed)
    for round_number in range(1, rounds + 1):
        mixing = np.zeros((nodes, nodes))
        for node, senders in enumerate(draws.senders(round_number)):
            mixing[node, [node, *senders]] = 1.0 / (len(senders) + 1)
        models = mixing @ models
    after = np.stack([np.load(tmp_path / f"after_{r}.npy") for r in range(nodes)])
    np.testing.assert_allclose(after, models, atol=1e-5, rtol=0)
    model_bytes = numel * 4
    for rank in range(nodes):
        sent = json.loads((tmp_path / f"bytes_{rank}.json").read_text())
        assert (
            sent["sent_data"] == rounds * fanout * model_bytes
        )  # fanout messages a round, whatever was drawn
        heard = sum(len(draws.senders(r)[rank]) for r in range(1, rounds + 1))
        assert sent["recv_data"] == heard * model_bytes


@pytest.mark.parametrize(
    "pattern",
    [
        ("algorithm=epidemic", "algorithm.fanout=2"),
        ("algorithm=dpsgd", "topology.resample_every=2", "topology.degree=3"),
    ],
)
@pytest.mark.parametrize(
    "sharing",
    [
        ("sharing=full",),
        ("sharing=partial", "alpha=0.3", "sharing.merge=renormalize"),
        ("sharing=subsampling", "alpha=0.5"),
    ],
    ids=["full", "partial", "subsampling"],
)
def test_epidemic_and_resampled_nodes_log_in_groups_what_they_log_alone(tmp_path, pattern, sharing):
    runs = {}
    for per_rank in (1, 4):
        run_train(
            tmp_path / str(per_rank),
            "nodes=8",
            "rounds=6",
            "eval.every=2",
            *SMALL,
            *pattern,
            *sharing,
            f"nodes_per_rank={per_rank}",
        )
        runs[per_rank] = tmp_path / str(per_rank) / "run"
    for node in range(8):
        alone = _records(runs[1], node)
        assert len(alone) == 6
        _assert_same(alone, _records(runs[4], node))
        if sharing == ("sharing=full",):
            messages_per_round = 2 if "algorithm=epidemic" in pattern else 3
            per_message = alone[0]["bytes_sent_data"] // messages_per_round
            assert [r["bytes_sent_data"] for r in alone] == [
                per_message * messages_per_round * r["round"] for r in alone
            ]
    summary = json.loads((runs[1] / "summary.json").read_text())
    assert summary["spectral_gap"] is None  # the mixing matrix changes, so it has no one gap


@pytest.mark.parametrize(
    "pattern",
    [
        ("algorithm=epidemic", "algorithm.fanout=2"),
        ("algorithm=dpsgd", "topology.resample_every=2", "topology.degree=3"),
    ],
)
def test_epidemic_and_resampled_runs_resume_exactly(tmp_path, pattern):
    """Draws and graphs are functions of the seed and the round, so a resumed run is the uninterrupted one."""
    common = (
        "nodes=6",
        "eval.every=2",
        *SMALL[:2],
        "log.progress=false",
        "checkpoint.every=3",
        *pattern,
    )
    run_train(tmp_path / "whole", *common, "rounds=9")
    run_train(tmp_path / "parts", *common, "rounds=6")
    assert (
        "resumed after round 6"
        in run_train(tmp_path / "parts", *common, "rounds=9", "resume=true").stdout
    )
    for node in range(6):
        _assert_same(
            _records(tmp_path / "whole" / "run", node), _records(tmp_path / "parts" / "run", node)
        )


# ---- A resampled graph --------------------------------------------------------------------------------


def test_a_resampled_graph_is_the_same_on_every_rank_and_its_weights_stay_doubly_stochastic():
    cfg = compose_settings("nodes=12", "topology.degree=3", "topology.resample_every=3")
    run_graph = check_config(cfg, 12)
    on_one_rank, on_another = round_peers(cfg, run_graph), round_peers(cfg, run_graph)
    graphs = []
    for round_number in range(1, 13):
        targets = on_one_rank.targets(round_number)
        assert targets == on_another.targets(round_number)
        assert on_one_rank.senders(round_number) == targets  # undirected
        if (round_number - 1) % 3 == 0:
            graphs.append(targets)
        else:
            assert targets == graphs[-1]  # one graph per period
        mixing = np.zeros((12, 12))
        for node in range(12):
            assert len(targets[node]) == 3 and node not in targets[node]
            self_weight, weights = on_one_rank.weigh(
                3, {peer: len(targets[peer]) for peer in targets[node]}
            )
            mixing[node, node] = self_weight
            for peer, weight in weights.items():
                mixing[node, peer] = weight
        np.testing.assert_allclose(mixing, mixing.T)
        np.testing.assert_allclose(mixing.sum(axis=0), 1.0)
        np.testing.assert_allclose(mixing.sum(axis=1), 1.0)
        assert mixing.min() >= 0
    assert graphs[0] == [
        run_graph.neighbours(node) for node in range(12)
    ]  # period 0: the run's own graph
    assert len({json.dumps(graph) for graph in graphs}) == len(
        graphs
    )  # every period draws a new one


def test_mh_weights_of_a_resampled_period_follow_its_degrees():
    cfg = compose_settings(
        "nodes=10", "topology=smallworld", "topology.degree=4", "topology.resample_every=1"
    )
    peers = round_peers(cfg, check_config(cfg, 10))
    targets = peers.targets(5)
    self_weight, weights = peers.weigh(len(targets[0]), {p: len(targets[p]) for p in targets[0]})
    expected = mh_weights(len(targets[0]), {p: len(targets[p]) for p in targets[0]})
    assert (self_weight, weights) == expected


# ---- Hybrid -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("nodes_per_rank", [1, 4])
def test_hybrid_switches_at_one_round_on_every_node(tmp_path, nodes_per_rank):
    """Before the switch one message per node per round (RWM), after it one per neighbour (D-PSGD)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_train(
        tmp_path,
        "algorithm=hybrid",
        "algorithm.switch_round=4",
        "nodes=8",
        "rounds=10",
        "eval.every=2",
        f"nodes_per_rank={nodes_per_rank}",
        "train.local_steps=2",
        *SMALL,
    )
    run_dir = tmp_path / "run"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["switch_round"] == 4 and summary["rounds_min"] == 10
    walked = []
    for node in range(8):
        records = read_jsonl(run_dir / "nodes" / f"{node}.jsonl")
        walk = [r for r in records if r["phase"] == "rwm"]
        average = [r for r in records if r["phase"] == "dpsgd"]
        assert [r["round"] for r in walk] == list(range(1, len(walk) + 1)) and len(walk) <= 4
        assert [r["round"] for r in average] == list(range(5, 11))
        model = walk[0]["bytes_sent_data"]
        assert [r["bytes_sent_data"] for r in walk] == [model * r["round"] for r in walk]
        after_walk = walk[-1]["bytes_sent_data"]
        assert [r["bytes_sent_data"] for r in average] == [
            after_walk + 4 * model * (r["round"] - 4) for r in average
        ]
        walked.append(len(walk))
    assert max(walked) == 4  # the first node to complete the switch round ended the walk
    phase = EventAccumulator(str(run_dir / "tb")).Reload().Scalars("phase")
    assert [(event.step, event.value) for event in phase] == [
        (2, 0.0),
        (4, 0.0),
        (6, 1.0),
        (8, 1.0),
        (10, 1.0),
    ]


@pytest.mark.parametrize(
    "sharing",
    [
        ("sharing=partial", "alpha=0.2", "sharing.merge=renormalize"),
        ("sharing=subsampling", "alpha=0.5"),
        ("sharing=random_alpha",),
    ],
)
def test_hybrid_runs_with_every_sharing_method(tmp_path, sharing):
    """The walk merges by age on the coordinates a message carries; the averaging phase by the merge rule."""
    run_train(
        tmp_path,
        "algorithm=hybrid",
        "algorithm.switch_round=3",
        "nodes=6",
        "rounds=6",
        "eval.every=3",
        "topology.degree=3",
        *SMALL,
        *sharing,
    )
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["switch_round"] == 3 and summary["final"]["round"] == 6
    assert (
        summary["final"]["test_loss"]["n"] == 6
    )  # every node's loss is finite (a non-finite one is left out)
    for node in range(6):
        assert [r["phase"] for r in read_jsonl(tmp_path / "run" / "nodes" / f"{node}.jsonl")][
            -3:
        ] == ["dpsgd"] * 3


def test_a_hybrid_run_resumed_after_the_switch_goes_on_with_dpsgd(tmp_path):
    common = (
        "algorithm=hybrid",
        "algorithm.switch_round=2",
        "nodes=6",
        "eval.every=2",
        "topology.degree=3",
        *SMALL[:2],
        "log.progress=false",
        "checkpoint.every=4",
    )
    run_train(tmp_path, *common, "rounds=4")
    assert "resumed after round 4" in run_train(tmp_path, *common, "rounds=8", "resume=true").stdout
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["switch_round"] == 2 and summary["rounds_min"] == 8
    for node in range(6):
        records = read_jsonl(tmp_path / "run" / "nodes" / f"{node}.jsonl")
        assert [r["round"] for r in records if r["phase"] == "dpsgd"] == [3, 4, 5, 6, 7, 8]
        after = [r["bytes_sent_data"] for r in records if r["round"] >= 4]
        assert np.all(
            np.diff(after) == after[1] - after[0]
        )  # 3 messages a round, after the resume too


def test_a_resumed_hybrid_run_says_again_which_unaggregated_rounds_a_node_skipped():
    """Skipped rounds live only in the store: a resume after the switch must publish them again, or rank 0
    would wait for them until the end (no progress, TensorBoard or summary meanwhile)."""
    from types import SimpleNamespace

    from dpsgd.algorithms.hybrid import skip_unaggregated
    from dpsgd.metrics import EvalSchedule
    from dpsgd.run_outputs import RESUME_AGGREGATED_KEY

    store = torch.distributed.HashStore()
    store.set(RESUME_AGGREGATED_KEY, "2")  # rank 0 had aggregated rounds 1-2 when the run stopped

    def node(rank, walked):
        log = SimpleNamespace(
            kept_records=[{"round": r} for r in range(1, walked + 1)] + [{"round": 9}]
        )
        return SimpleNamespace(
            rank=rank,
            schedule=EvalSchedule(every=2, rounds=12),
            recorder=SimpleNamespace(store=store, log=log),
        )

    skip_unaggregated([node(0, 8), node(1, 3)], switch=8)  # node 1 walked 3 rounds, node 0 all 8
    published = {(r, n) for r in range(1, 13) for n in (0, 1) if store.check([f"metrics/{r}/{n}"])}
    assert published == {(4, 1), (6, 1), (8, 1)}  # evaluated, after round 2, never run by node 1
    assert json.loads(store.get("metrics/6/1")) == {"node": 1, "round": 6, "skipped": True}


def test_training_that_diverges_during_a_hybrid_walk_ends_the_walk_at_once(tmp_path):
    """As in RWM: the walk stops, and no averaging phase follows."""
    run_train(
        tmp_path,
        "algorithm=hybrid",
        "algorithm.switch_round=6",
        "nodes=6",
        "rounds=12",
        "eval.every=2",
        "topology.degree=3",
        "optimizer.lr=1000",
        *SMALL,
    )
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["diverged"] is not None and summary["rounds_max"] < 6
    for node in range(6):
        assert {r["phase"] for r in read_jsonl(tmp_path / "run" / "nodes" / f"{node}.jsonl")} == {
            "rwm"
        }


def test_a_hybrid_byte_budget_ends_the_walk_when_the_first_node_has_sent_it(tmp_path):
    probe = tmp_path / "probe"
    run_train(
        probe, "algorithm=rwm", "nodes=6", "rounds=1", "eval.every=1", "topology.degree=3", *SMALL
    )
    message = read_jsonl(probe / "run" / "nodes" / "0.jsonl")[0]
    per_message = (
        message["bytes_sent_data"] + message["bytes_sent_meta"]
    )  # values and header (END comes later)
    run_train(
        tmp_path,
        "algorithm=hybrid",
        "algorithm.switch_round=null",
        f"algorithm.byte_budget={3 * per_message}",
        "nodes=6",
        "rounds=8",
        "eval.every=1",
        "topology.degree=3",
        *SMALL,
    )
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert (
        summary["switch_round"] == 3
    )  # the first node over budget sent its third message in round 3
    for node in range(6):
        walk = [
            r
            for r in read_jsonl(tmp_path / "run" / "nodes" / f"{node}.jsonl")
            if r["phase"] == "rwm"
        ]
        assert len(walk) <= 3


# ---- Consensus distance -------------------------------------------------------------------------------


def _direct_consensus(models: np.ndarray) -> float:
    return float(np.mean(np.sum((models - models.mean(axis=0)) ** 2, axis=1)))


def test_consensus_sketch_is_exact_for_small_models_and_close_for_large_ones(monkeypatch):
    rng = np.random.default_rng(3)
    small = rng.normal(size=(5, 300))
    sketch = ModelSketch(300, 512, seed=1)
    assert sketch.exact
    assert consensus_distance([sketch(torch.from_numpy(m)) for m in small]) == pytest.approx(
        _direct_consensus(small), rel=1e-12
    )
    common = rng.normal(
        size=40_000
    )  # nodes near agreement: the distance is small next to the models
    large = common + 0.01 * rng.normal(size=(16, 40_000))
    exact = _direct_consensus(large)
    estimates = []
    for seed in range(4):
        sketch = ModelSketch(40_000, 2048, seed=seed)
        estimates.append(consensus_distance([sketch(torch.from_numpy(m).float()) for m in large]))
    assert all(estimate == pytest.approx(exact, rel=0.05) for estimate in estimates)
    assert len(set(estimates)) == 4  # a real sketch, not the models
    monkeypatch.setattr(
        consensus, "CHUNK", 7_000
    )  # hashed in chunks, and redrawn each time when not cached
    monkeypatch.setattr(consensus, "CACHE_LIMIT", 10_000)
    redrawn = ModelSketch(40_000, 2048, seed=0)
    cached = ModelSketch.__new__(ModelSketch)
    cached.__dict__.update(redrawn.__dict__, _cached=list(redrawn._chunks()))
    model = torch.from_numpy(large[0]).float()
    np.testing.assert_array_equal(redrawn(model), cached(model))
    assert redrawn._cached is None


@pytest.mark.parametrize("sketch_size,tolerance", [(100_000, 1e-9), (2048, 0.05)])
def test_consensus_distance_of_a_run_is_the_distance_of_its_gathered_models(
    tmp_path, sketch_size, tolerance
):
    """summary.json, consensus.jsonl and TensorBoard against the models the nodes saved at the same rounds."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_train(
        tmp_path,
        "nodes=6",
        "rounds=4",
        "eval.every=2",
        "topology.degree=3",
        *SMALL[:2],
        "log.progress=false",
        "checkpoint.every=2",
        f"eval.consensus_sketch={sketch_size}",
        "dataset.rank=3",
    )
    run_dir = tmp_path / "run"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["num_parameters"] > 2048  # the small sketch is a sketch
    lines = read_jsonl(run_dir / "consensus.jsonl")
    board = EventAccumulator(str(run_dir / "tb")).Reload().Scalars("consensus_distance")
    for entry, line, event in zip(summary["per_round"], lines, board):
        round_number = entry["round"]
        models = np.stack(
            [
                load_checkpoint(run_dir / "checkpoints" / str(node) / f"{round_number}.pt")["flat"]
                .double()
                .numpy()
                for node in range(6)
            ]
        )
        exact = _direct_consensus(models)
        assert exact > 0
        assert entry["consensus_distance"] == pytest.approx(exact, rel=tolerance)
        assert line == {
            "round": round_number,
            "consensus_distance": entry["consensus_distance"],
            "nodes_reporting": 6,
        }
        assert (event.step, event.value) == (
            round_number,
            pytest.approx(entry["consensus_distance"], rel=1e-6),
        )
    assert [entry["round"] for entry in summary["per_round"]] == [2, 4]


def test_epidemic_ignores_the_topology_keys():
    """Peers come from all nodes: a degree that no 4-node regular graph has is no error."""
    graph = check_config(
        compose_settings("nodes=4", "algorithm=epidemic", "algorithm.fanout=2", "topology.degree=4")
    )
    assert [graph.neighbours(node) for node in range(4)] == [
        [1, 2, 3],
        [0, 2, 3],
        [0, 1, 3],
        [0, 1, 2],
    ]


# ---- Configuration ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides,words",
    [
        (("algorithm=epidemic", "algorithm.fanout=8", "nodes=8"), "fanout must be below nodes"),
        (("algorithm=hybrid", "algorithm.switch_round=null"), "neither algorithm.switch_round"),
        (("algorithm=hybrid", "algorithm.switch_round=200", "rounds=200"), "leaves no round for"),
        (("algorithm=rwm", "topology.resample_every=5"), "needs `algorithm=dpsgd`"),
        (("algorithm=epidemic", "topology.resample_every=5"), "needs `algorithm=dpsgd`"),
        (("topology=ring", "topology.resample_every=5"), "a random graph"),
        (("algorithm=epidemic", "algorithm.fanout=0"), "algorithm.fanout=0 must be >= 1"),
        (("topology.resample_every=5", "topology.degree=2"), "degree below 3"),
        (("algorithm.name=hybrid",), "needs the keys ['every', 'switch_round', 'byte_budget']"),
    ],
)
def test_pattern_mistakes_are_one_paragraph(overrides, words):
    with pytest.raises(ConfigError, match="(?s).*" + re.escape(words)):
        check_config(compose_settings("nodes=8", *overrides))
