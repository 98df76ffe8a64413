"""One D-PSGD round with no training over real gloo ranks is exactly x <- W x."""

from __future__ import annotations

import json
from datetime import timedelta

import numpy as np
import pytest
import torch
import torch.distributed as dist

from dpsgd.building import build_rank, prepare_data
from dpsgd.checks import check_config
from dpsgd.launch import spawn
from dpsgd.topology import mh_matrix
from tests.conftest import RANK_TEST_TIMEOUT_S, compose_settings


def _random_model(rank: int, numel: int) -> torch.Tensor:
    return torch.from_numpy(
        np.random.default_rng(1000 + rank).normal(size=numel).astype(np.float32)
    )


def _rounds_from_random_models(cfg, nodes, tmp_path, rounds=1, peers=None, nodes_per_rank=1):
    """Real ranks (`nodes` of them, hosting `nodes_per_rank` nodes each), each node starting from its own
    random model, run D-PSGD rounds (by default one, on the config's plan; `peers` for another);
    each node's model and byte counts are saved after."""
    topology = check_config(cfg, nodes)
    dataset = prepare_data(cfg)

    def rank_main(ctx):
        store = dist.PrefixStore("test", ctx.store)
        dist.init_process_group(
            "gloo",
            store=store,
            rank=ctx.rank,
            world_size=ctx.world_size,
            timeout=timedelta(seconds=60),
        )
        group, run = build_rank(cfg, ctx, topology, dataset, store, tmp_path, peers=peers)
        for node in group.nodes:
            node.flat.copy_(_random_model(node.rank, node.flat.numel()))
        run(rounds)
        for node in group.nodes:
            np.save(tmp_path / f"after_{node.rank}.npy", node.flat.numpy())
            (tmp_path / f"bytes_{node.rank}.json").write_text(json.dumps(vars(node.link.bytes)))
        dist.barrier()
        dist.destroy_process_group()

    spawn(rank_main, nodes, timeout_s=RANK_TEST_TIMEOUT_S)
    return topology


@pytest.mark.parametrize(
    "nodes,topology", [(4, "ring"), (6, "regular"), (8, "regular"), (5, "star")]
)
def test_one_round_without_training_is_w_times_x(tmp_path, nodes, topology):
    degree = "topology.degree=3" if nodes == 8 else "topology.degree=2"
    cfg = compose_settings(
        f"nodes={nodes}",
        "rounds=1",
        "optimizer.lr=0",
        "eval.every=1",
        "log.progress=false",
        f"topology={topology}",
        degree,
        "dataset.num_users=40",
        "dataset.num_items=90",
    )
    topology_graph = _rounds_from_random_models(cfg, nodes, tmp_path)
    numel = np.load(tmp_path / "after_0.npy").size
    before = np.stack([_random_model(r, numel).numpy().astype(np.float64) for r in range(nodes)])
    after = np.stack([np.load(tmp_path / f"after_{r}.npy") for r in range(nodes)])
    expected = mh_matrix(topology_graph) @ before
    np.testing.assert_allclose(after, expected, atol=1e-6, rtol=0)
    assert not np.allclose(after, before, atol=1e-3)  # the round did move the models


@pytest.mark.parametrize("merge", ["fill_own", "renormalize"])
def test_one_round_of_partial_messages_follows_the_configured_merge_rule(tmp_path, merge):
    """Sub-sampled messages (a different random mask per node) through real ranks and the configured rule."""
    from dpsgd.seeding import stream_key
    from dpsgd.sharing.subsampling import subsampling_mask
    from dpsgd.topology import mh_weights
    from tests.test_sharing import _renormalize_reference

    nodes, alpha = 6, 0.5
    cfg = compose_settings(
        f"nodes={nodes}",
        "rounds=1",
        "optimizer.lr=0",
        "eval.every=1",
        "log.progress=false",
        "sharing=subsampling",
        f"alpha={alpha}",
        f"sharing.merge={merge}",
        "topology.degree=3",
        "dataset.num_users=40",
        "dataset.num_items=90",
    )
    topology = _rounds_from_random_models(cfg, nodes, tmp_path)
    numel = np.load(tmp_path / "after_0.npy").size
    models = [_random_model(r, numel).numpy().astype(np.float64) for r in range(nodes)]
    masks = [
        subsampling_mask(stream_key(cfg.run.seed, "subsampling", r, 1), numel, alpha).numpy()
        for r in range(nodes)
    ]
    for node in range(nodes):
        peers = topology.neighbours(node)
        self_weight, weights = mh_weights(
            topology.degree(node), {p: topology.degree(p) for p in peers}
        )
        w = np.array([weights[p] for p in peers])
        values, peer_masks = (
            np.stack([models[p] for p in peers]),
            np.stack([masks[p] for p in peers]),
        )
        if merge == "fill_own":
            expected = self_weight * models[node] + sum(
                wj * np.where(m, v, models[node]) for wj, m, v in zip(w, peer_masks, values)
            )
        else:
            degrees = np.array([topology.degree(p) for p in peers])
            expected = _renormalize_reference(
                models[node], degrees, w, peer_masks, values, masks[node]
            )
        np.testing.assert_allclose(np.load(tmp_path / f"after_{node}.npy"), expected, atol=1e-5)


def test_whole_models_from_another_rank_are_averaged_as_they_arrive(tmp_path, monkeypatch):
    """Grouped ranks add another rank's whole models into the average a bounded chunk at a time
    (the round's messages are never held whole); at one model a chunk the round is still W x."""
    from dpsgd.transport import rounds

    monkeypatch.setattr(rounds, "STREAM_BYTES", 1)  # every chunk holds one model
    posted = tmp_path / "posted.txt"
    receive_values = rounds.RoundTransport._receive_values

    def spy(self, other, batch, into, where):
        with posted.open("a") as out:
            out.write(f"{len(batch)}\n")
        return receive_values(self, other, batch, into, where)

    monkeypatch.setattr(rounds.RoundTransport, "_receive_values", spy)
    nodes = 8
    cfg = compose_settings(
        f"nodes={nodes}",
        "nodes_per_rank=4",
        "rounds=1",
        "optimizer.lr=0",
        "eval.every=1",
        "log.progress=false",
        "topology.degree=3",
        "dataset.num_users=40",
        "dataset.num_items=90",
    )
    graph = _rounds_from_random_models(cfg, 2, tmp_path)
    numel = np.load(tmp_path / "after_0.npy").size
    before = np.stack([_random_model(r, numel).numpy().astype(np.float64) for r in range(nodes)])
    after = np.stack([np.load(tmp_path / f"after_{r}.npy") for r in range(nodes)])
    np.testing.assert_allclose(after, mh_matrix(graph) @ before, atol=1e-6, rtol=0)
    chunks = [int(line) for line in posted.read_text().split()]
    assert len(chunks) > 2 and set(chunks) == {1}, chunks  # models from the other rank, one by one
