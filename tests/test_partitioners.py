"""Partitioners by name: every registered one deals disjoint parts covering every sample, each data set's
default is the rule it used before the registry, and one registered here is chosen by `dataset.partition`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from dpsgd.data.datasets import DATASETS, leaf_dataset, prepare_dataset
from dpsgd.data.leaf import LeafSplit, LoadReport
from dpsgd.data.partition import (
    PARTITIONER_NEEDS,
    PARTITIONERS,
    Samples,
    contiguous_blocks,
    partitioner,
    shuffled_partition,
)
from dpsgd.data.ratings import RatingsTable, load_movielens, make_synthetic
from dpsgd.errors import ConfigError
from dpsgd.seeding import numpy_rng
from tests.conftest import compose_config

CALLS: list[tuple[int, int]] = []  # (nodes, seed) of each call of the partitioner registered here


@partitioner("test_round_robin")
def round_robin(samples: Samples, nodes: int, seed: int) -> list[np.ndarray]:
    """Sample i to node (i + seed) % nodes: needs nothing, so it applies to every data set."""
    CALLS.append((nodes, seed))
    owner = (np.arange(samples.count) + seed) % nodes
    return [np.flatnonzero(owner == node) for node in range(nodes)]


@partitioner("test_by_label", needs=("labels",))
def by_label(samples: Samples, nodes: int, seed: int) -> list[np.ndarray]:
    """Samples sorted by label and cut into near-equal blocks: the simplest label skew."""
    order = np.argsort(samples.labels, kind="stable")
    return [order[block.start : block.stop] for block in contiguous_blocks(samples.count, nodes)]


def random_samples(rng: np.random.Generator, max_users: int = 40) -> Samples:
    """Users with 0..12 samples each (some empty), each sample with one of 5 labels."""
    counts = rng.integers(0, 13, rng.integers(1, max_users + 1))
    counts[rng.integers(len(counts))] += 1  # at least one sample
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    labels = rng.integers(0, 5, offsets[-1]).astype(np.int64)
    return Samples(int(offsets[-1]), offsets, labels, "writers")


@pytest.mark.parametrize("name", sorted(PARTITIONERS))
def test_every_registered_partitioner_gives_disjoint_parts_that_cover_every_sample(name):
    rng = np.random.default_rng(20)
    for trial in range(30):
        samples = random_samples(rng)
        nodes = int(rng.integers(1, min(samples.num_users, samples.count) + 1))
        seed = int(rng.integers(0, 1000))
        parts = PARTITIONERS[name](samples, nodes, seed)
        assert len(parts) == nodes, (trial, nodes)
        dealt = np.concatenate([np.asarray(part, dtype=np.int64) for part in parts])
        assert np.array_equal(np.sort(dealt), np.arange(samples.count)), trial  # disjoint, complete
        again = PARTITIONERS[name](samples, nodes, seed)
        assert all(
            np.array_equal(a, b) for a, b in zip(parts, again)
        )  # a pure function of the seed


def test_the_built_in_partitioners_need_users_and_keep_them_whole_where_they_say_so():
    assert {
        PARTITIONER_NEEDS[name] for name in ("user_blocks", "shuffled_users", "split_users")
    } == {("users",)}
    samples = random_samples(np.random.default_rng(3))
    for name in ("user_blocks", "shuffled_users"):
        for part in PARTITIONERS[name](samples, 4, seed=9):
            owners = np.searchsorted(samples.user_offsets, part, side="right") - 1
            for user in set(owners.tolist()):  # every sample of each user it holds
                assert np.sum(owners == user) == np.diff(samples.user_offsets)[user]


# ---------------------------------------------------------------- each data set's default, unchanged


def old_ratings_node(table: RatingsTable, nodes: int, node: int, seed: int, fraction: float):
    """What a ratings node held before partitioners had names: its block of users (`contiguous_blocks`),
    each user's ratings shuffled by ("split", user) and the first round(fraction * n) trained on."""
    users = contiguous_blocks(table.num_users, nodes)[node]
    train, test = [], []
    for user in users:
        rows = table.user_rows(user, user + 1)
        shuffled = rows.start + numpy_rng(seed, "split", user).permutation(rows.stop - rows.start)
        cut = int(round(fraction * (rows.stop - rows.start)))
        train.append(np.sort(shuffled[:cut]))
        test.append(np.sort(shuffled[cut:]))
    return users, np.concatenate(train), np.concatenate(test)


def old_leaf_rows(split: LeafSplit, nodes: int, seed: int, split_users: bool) -> list[np.ndarray]:
    """LEAF's rule before partitioners had names (`dpsgd.data.leaf.partition_rows` then)."""

    def rows_of(users):
        return np.concatenate(
            [np.arange(split.user_offsets[u], split.user_offsets[u + 1]) for u in users]
        ).astype(np.int64)

    if split_users:
        rows = rows_of(numpy_rng(seed, "leaf_user_order").permutation(len(split.users)).tolist())
        blocks = contiguous_blocks(len(rows), nodes, what="samples")
        return [np.sort(rows[block.start : block.stop]) for block in blocks]
    groups = shuffled_partition(range(len(split.users)), nodes, seed, "leaf_users")
    return [rows_of(group) for group in groups]


def assert_ratings_default_unchanged(dataset, table: RatingsTable, nodes: int, seed: int) -> None:
    summary = dataset.partition(nodes, seed)["nodes"]
    for node in range(nodes):
        users, train, test = old_ratings_node(table, nodes, node, seed, 0.7)
        assert summary[node] == {
            "node": node,
            "users": [users.start, users.stop],
            "samples": len(train) + len(test),
        }
        data = dataset.node_data(node, nodes, seed, None)
        assert np.array_equal(data.train[0].numpy(), table.user[train])
        assert np.array_equal(data.train[1].numpy(), table.item[train])
        assert np.array_equal(data.train[2].numpy(), table.rating[train])
        assert np.array_equal(data.test[1].numpy(), table.item[test])
        assert np.array_equal(data.test[2].numpy(), table.rating[test])


@pytest.mark.parametrize("nodes", [1, 7, 40])
def test_synthetic_keeps_the_study_s_contiguous_blocks_of_users(tmp_path, nodes):
    shape = dict(num_users=40, num_items=60, rank=3, min_ratings=5, max_ratings=20, noise_std=0.3)
    dataset = DATASETS["synthetic"](4, tmp_path, train_fraction=0.7, partition=None, **shape)
    assert_ratings_default_unchanged(dataset, make_synthetic(4, **shape), nodes, seed=4)


def test_movielens_keeps_the_study_s_contiguous_blocks_of_users(tmp_path, movielens_csv):
    dataset = DATASETS["movielens"](1, tmp_path, str(movielens_csv), 0.7, partition=None)
    table = load_movielens(movielens_csv, tmp_path)
    assert_ratings_default_unchanged(dataset, table, 96, seed=1)


def leaf_split(counts: list[int], seed: int) -> LeafSplit:
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    rng = np.random.default_rng(seed)
    return LeafSplit(
        images=rng.integers(0, 256, (offsets[-1], 2, 2), dtype=np.uint8),
        labels=rng.integers(0, 3, offsets[-1]).astype(np.int64),
        users=[f"w{i}" for i in range(len(counts))],
        user_offsets=offsets,
    )


def small_leaf(split_users: bool = False, partition: str | None = None):
    train = leaf_split([3, 7, 1, 4, 9, 2, 5, 6, 8, 2, 3], seed=0)
    test = leaf_split([2, 2, 2], seed=1)
    loaded = (train, test, LoadReport(11, len(train), len(test)))
    return leaf_dataset("femnist", loaded, 3, "writers", split_users, partition)


@pytest.mark.parametrize("split_users", [False, True])
@pytest.mark.parametrize("nodes", [1, 4, 11])
def test_leaf_data_sets_keep_their_shuffled_writers(nodes, split_users):
    dataset = small_leaf(split_users)
    for seed in (0, 5):
        old = old_leaf_rows(dataset.train, nodes, seed, split_users)
        assert [entry["samples"] for entry in dataset.partition(nodes, seed)["nodes"]] == [
            len(rows) for rows in old
        ]
        for node in range(nodes):
            train_images, train_labels = dataset.node_data(node, nodes, seed, None).train
            assert np.array_equal(train_labels.numpy(), dataset.train.labels[old[node]])
            assert np.array_equal(train_images.numpy(), dataset.train.images[old[node]])


def test_each_data_set_declares_the_key_null_by_default():
    for name in ("synthetic", "movielens", "femnist", "celeba"):
        cfg = compose_config(f"dataset={name}")
        assert "partition" in cfg.dataset and cfg.dataset.partition is None, name


# ---------------------------------------------------------------- chosen by name


def prepared(tmp_path: Path, *overrides: str):
    """The data set of the composed config, prepared as a run prepares it (its group's keys as options)."""
    cfg = compose_config(*overrides)
    options = OmegaConf.to_container(cfg.dataset, resolve=True)
    name = options.pop("name")
    return prepare_dataset(name, options, cfg.seed, tmp_path / "cache", data_dir=cfg.data_dir)


def test_a_partitioner_registered_here_is_chosen_by_name_through_the_data_set(tmp_path):
    dataset = prepared(
        tmp_path, "dataset.partition=test_round_robin", "dataset.num_users=30", "seed=2"
    )
    CALLS.clear()
    summary = dataset.partition(4, 2)
    assert CALLS == [(4, 2)]
    table = dataset.table
    held = [set() for _ in range(4)]
    for node in range(4):
        data = dataset.node_data(node, 4, 2, None)
        for user, item in zip(
            [*data.train[0].tolist(), *data.test[0].tolist()],
            [*data.train[1].tolist(), *data.test[1].tolist()],
        ):
            held[node].add((user, item))
        assert summary["nodes"][node]["samples"] == len(held[node])
    assert CALLS == [(4, 2)]  # once per (nodes, seed), however many nodes ask
    for node in range(4):  # exactly the rows the partitioner gave the node
        expected = np.flatnonzero((np.arange(table.num_ratings) + 2) % 4 == node)
        assert held[node] == set(zip(table.user[expected].tolist(), table.item[expected].tolist()))
    # Users span nodes now: the summary counts each one's ratings instead of a block of users.
    assert isinstance(summary["nodes"][0]["users"], dict)


def test_a_user_s_train_test_split_does_not_depend_on_the_partitioner(tmp_path):
    """A user's ratings fall on the same side of its split whichever node holds them."""
    split_by = {}
    for partition in ("null", "test_round_robin", "split_users"):
        dataset = prepared(tmp_path, f"dataset.partition={partition}", "dataset.num_users=30")
        train = set()
        for node in range(5):
            user, item, _ = dataset.node_data(node, 5, 1, None).train
            train |= set(zip(user.tolist(), item.tolist()))
        split_by[partition] = train
    assert split_by["null"] == split_by["test_round_robin"] == split_by["split_users"]


def test_a_label_partitioner_applies_to_classification_data_and_not_to_ratings(tmp_path):
    dataset = small_leaf(partition="test_by_label")
    labels = [dataset.node_data(node, 3, 0, None).train[1] for node in range(3)]
    assert [int(part.max()) for part in labels] == sorted(int(part.max()) for part in labels)
    assert sum(len(part) for part in labels) == len(dataset.train)
    with pytest.raises(ConfigError) as error:
        prepared(tmp_path, "dataset.partition=test_by_label")
    text = str(error.value)
    for needed in ("dataset.partition=test_by_label", "labels", "dataset=synthetic", "user_blocks"):
        assert needed in text, needed


def test_an_unknown_name_is_one_paragraph_naming_the_key_the_value_and_the_known_names(tmp_path):
    with pytest.raises(ConfigError) as error:
        prepared(tmp_path, "dataset.partition=dirichlet")
    text = str(error.value)
    assert "\n" not in text
    for needed in ("dataset.partition='dirichlet'", "user_blocks", "shuffled_users", "split_users"):
        assert needed in text, needed
    assert "@partitioner(" in text  # the fix: another name, or register one


def test_split_users_and_another_partitioner_are_refused_together():
    assert small_leaf(split_users=True, partition="split_users").partition(2, 0)
    with pytest.raises(
        ConfigError, match="dataset.split_users=true and dataset.partition=user_blocks"
    ):
        small_leaf(split_users=True, partition="user_blocks")
