"""Ratings data: partitioning, the parse-once cache, synthetic and MovieLens sets, split."""

import multiprocessing
import os
import time
from pathlib import Path

import numpy as np
import pytest

from dpsgd.data import ratings
from dpsgd.data.cache import build_once, cache_path, load_arrays
from dpsgd.data.partition import contiguous_blocks, partition_counts, shuffled_partition
from dpsgd.data.ratings import (
    RatingsTable,
    describe,
    load_movielens,
    make_synthetic,
    make_synthetic_with_truth,
    split_node_ratings,
)
from dpsgd.errors import ConfigError

MOVIELENS_CSV = Path("/work/shared/data/ml-latest-small/ratings.csv")


# ---------------------------------------------------------------- partitioning


def test_contiguous_blocks_first_parts_get_the_extra_one():
    blocks = contiguous_blocks(10, 3)
    assert blocks == [range(0, 4), range(4, 7), range(7, 10)]
    assert partition_counts(blocks) == [4, 3, 3]


def test_contiguous_blocks_movielens_96_nodes():
    blocks = contiguous_blocks(610, 96)
    counts = partition_counts(blocks)
    assert counts == [7] * 34 + [6] * 62  # 610 = 96 * 6 + 34
    assert [u for block in blocks for u in block] == list(range(610))


def test_contiguous_blocks_even_split():
    assert partition_counts(contiguous_blocks(12, 4)) == [3, 3, 3, 3]
    assert contiguous_blocks(5, 5) == [range(i, i + 1) for i in range(5)]


def test_contiguous_blocks_too_few_users_names_nodes_and_count():
    with pytest.raises(ConfigError, match=r"`nodes`.*only 5 users"):
        contiguous_blocks(5, 6)
    with pytest.raises(ConfigError, match="`nodes`"):
        contiguous_blocks(5, 0)


def test_shuffled_partition_disjoint_complete_near_equal():
    ids = [f"writer{i}" for i in range(103)]
    parts = shuffled_partition(ids, 10, seed=7, stream="partition", what="writers")
    flat = [x for part in parts for x in part]
    assert sorted(flat) == sorted(ids)
    assert len(set(flat)) == len(flat)
    assert partition_counts(parts) == [11, 11, 11] + [10] * 7
    # Groups keep input order; membership is random, not the first 11 ids.
    assert all(part == sorted(part, key=ids.index) for part in parts)
    assert parts[0] != ids[:11]


def test_shuffled_partition_seeded():
    ids = list(range(50))
    first = shuffled_partition(ids, 4, seed=1, stream="partition")
    assert first == shuffled_partition(ids, 4, seed=1, stream="partition")
    assert first != shuffled_partition(ids, 4, seed=2, stream="partition")
    assert first != shuffled_partition(ids, 4, seed=1, stream="other")


def test_shuffled_partition_too_few_ids():
    with pytest.raises(ConfigError, match=r"`nodes`.*only 3 writers"):
        shuffled_partition(["a", "b", "c"], 4, seed=0, stream="p", what="writers")


# ---------------------------------------------------------------- cache


def test_cache_path_follows_source_identity(tmp_path):
    source = tmp_path / "src.csv"
    source.write_text("a")
    first = cache_path(tmp_path / "cache", "movielens", [source])
    assert first == cache_path(tmp_path / "cache", "movielens", [source])
    assert first.parent == tmp_path / "cache" and first.name.startswith("movielens-")
    assert first != cache_path(tmp_path / "cache", "other", [source])
    source.write_text("ab")  # new size and mtime: a fresh cache
    assert first != cache_path(tmp_path / "cache", "movielens", [source])


def test_build_once_builds_once_and_reuses(tmp_path):
    builds = []

    def build(directory: Path) -> None:
        builds.append(directory)
        np.save(directory / "x.npy", np.arange(5))

    target = tmp_path / "cache" / "thing"
    assert build_once(target, build) == target
    assert build_once(target, build) == target
    assert len(builds) == 1 and not builds[0].exists()  # temp dir was renamed away
    arrays = load_arrays(target, ["x"])
    assert isinstance(arrays["x"], np.memmap) and not arrays["x"].flags.writeable
    assert arrays["x"].tolist() == [0, 1, 2, 3, 4]


def test_build_once_failed_build_leaves_nothing(tmp_path):
    target = tmp_path / "thing"

    def broken(directory: Path) -> None:
        (directory / "half.npy").write_text("partial")
        raise RuntimeError("parser crashed")

    with pytest.raises(RuntimeError):
        build_once(target, broken)
    assert not target.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["thing.lock"]
    build_once(target, lambda d: (d / "ok").write_text("1"))
    assert (target / "ok").read_text() == "1"


def _concurrent_builder(target: str, counter: str, barrier) -> None:
    def build(directory: Path) -> None:
        with open(counter, "a") as f:
            f.write(f"{os.getpid()}\n")
        time.sleep(0.3)  # long enough that every other process arrives meanwhile
        (directory / "data.txt").write_text("built")

    barrier.wait()
    result = build_once(Path(target), build)
    os._exit(0 if (result / "data.txt").read_text() == "built" else 1)


def test_build_once_concurrent_processes_build_exactly_once(tmp_path):
    context = multiprocessing.get_context("fork")
    target, counter = tmp_path / "cache" / "shared", tmp_path / "builds.txt"
    num_processes = 6
    barrier = context.Barrier(num_processes)
    processes = [
        context.Process(target=_concurrent_builder, args=(str(target), str(counter), barrier))
        for _ in range(num_processes)
    ]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=30)
    assert [p.exitcode for p in processes] == [0] * num_processes
    assert len(counter.read_text().splitlines()) == 1
    assert (target / "data.txt").read_text() == "built"


# ---------------------------------------------------------------- synthetic


def test_synthetic_deterministic_per_seed():
    first, second, other = make_synthetic(3), make_synthetic(3), make_synthetic(4)
    for name in ["user", "item", "rating"]:
        assert np.array_equal(getattr(first, name), getattr(second, name))
    assert not np.array_equal(first.item[:100], other.item[:100])
    assert not np.array_equal(first.rating[:100], other.rating[:100])


def test_synthetic_shape_and_scale():
    start = time.perf_counter()
    table = make_synthetic(0)
    assert time.perf_counter() - start < 1.0
    assert (table.num_users, table.num_items) == (400, 600)
    assert table.user.dtype == np.int32 and table.item.dtype == np.int32
    assert table.rating.dtype == np.float32
    assert np.all(np.diff(table.user) >= 0)
    per_user = table.ratings_per_user()
    assert per_user.min() >= 20 and per_user.max() <= 80 and per_user.sum() == table.num_ratings
    # Distinct items per user: no (user, item) pair twice.
    pairs = table.user.astype(np.int64) * table.num_items + table.item
    assert len(np.unique(pairs)) == len(pairs)
    assert table.item.min() >= 0 and table.item.max() < table.num_items
    # Half-star scale, 0.5..5.0.
    assert np.all(table.rating * 2 == np.round(table.rating * 2))
    assert table.rating.min() >= 0.5 and table.rating.max() <= 5.0
    assert 3.2 < table.rating.mean() < 3.8


def test_synthetic_min_ratings_respected_for_other_settings():
    table = make_synthetic(1, num_users=50, num_items=30, min_ratings=25, max_ratings=30)
    assert table.ratings_per_user().min() >= 25
    with pytest.raises(ConfigError, match="min_ratings"):
        make_synthetic(1, num_items=10, min_ratings=20)


def test_synthetic_signal_dominates_noise():
    table, expected = make_synthetic_with_truth(0)
    rating = table.rating.astype(np.float64)
    global_mean_rmse = np.sqrt(np.mean((rating - rating.mean()) ** 2))
    truth_rmse = np.sqrt(np.mean((rating - expected) ** 2))
    assert global_mean_rmse > 0.8  # about 0.91: as hard as MovieLens (about 1.04)
    assert truth_rmse < 0.5 * global_mean_rmse  # about 0.32: much to learn


def _ridge_rows(owner, features, target, num_rows, lam):
    # For each row r: argmin_w sum (target - <w, f>)^2 + lam |w|^2, all rows at once.
    k = features.shape[1]
    outer = np.einsum("ni,nj->nij", features, features).reshape(len(owner), k * k)
    gram = np.stack([np.bincount(owner, outer[:, c], num_rows) for c in range(k * k)], 1)
    gram = gram.reshape(num_rows, k, k) + lam * np.eye(k)
    rhs = np.stack([np.bincount(owner, features[:, c] * target, num_rows) for c in range(k)], 1)
    return np.linalg.solve(gram, rhs[..., None])[..., 0]


def test_synthetic_learnable_by_matrix_factorization():
    """A small biased MF (alternating ridge regressions) clearly beats the global mean."""
    table = make_synthetic(0)
    node = split_node_ratings(table, range(table.num_users), seed=0)
    u, i, r = node.train_user, node.train_item, node.train_rating.astype(np.float64)
    mean = r.mean()
    rng = np.random.default_rng(0)
    user_f = rng.normal(0, 0.1, (table.num_users, 5))
    item_f = rng.normal(0, 0.1, (table.num_items, 5))
    user_b, item_b = np.zeros(table.num_users), np.zeros(table.num_items)
    ones = np.ones((len(r), 1))
    for _ in range(10):
        w = _ridge_rows(u, np.hstack([item_f[i], ones]), r - mean - item_b[i], table.num_users, 2.0)
        user_f, user_b = w[:, :-1], w[:, -1]
        w = _ridge_rows(i, np.hstack([user_f[u], ones]), r - mean - user_b[u], table.num_items, 2.0)
        item_f, item_b = w[:, :-1], w[:, -1]
    tu, ti = node.test_user, node.test_item
    pred = np.clip(mean + user_b[tu] + item_b[ti] + np.sum(user_f[tu] * item_f[ti], 1), 0.5, 5)
    mf_rmse = np.sqrt(np.mean((pred - node.test_rating) ** 2))
    global_rmse = np.sqrt(np.mean((mean - node.test_rating) ** 2))
    assert mf_rmse < 0.7 * global_rmse  # measured: about 0.47 vs 0.92


# ---------------------------------------------------------------- split


def _row_keys(users, items, num_items):
    return set((users.astype(np.int64) * num_items + items).tolist())


def test_split_disjoint_complete_and_70_30():
    table = make_synthetic(0)
    users = range(10, 30)
    node = split_node_ratings(table, users, seed=5)
    assert node.users == users
    assert (node.num_users, node.num_items) == (table.num_users, table.num_items)
    for user in users:
        rows = table.user_rows(user, user + 1)
        count = rows.stop - rows.start
        train = node.train_user == user
        test = node.test_user == user
        assert train.sum() == round(0.7 * count) and test.sum() == count - round(0.7 * count)
        train_keys = set(node.train_item[train].tolist())
        test_keys = set(node.test_item[test].tolist())
        assert not train_keys & test_keys
        assert train_keys | test_keys == set(table.item[rows].tolist())
    assert set(node.train_user.tolist()) | set(node.test_user.tolist()) == set(users)
    # Ratings travel with their (user, item).
    lookup = {(int(a), int(b)): float(c) for a, b, c in zip(table.user, table.item, table.rating)}
    test_rows = zip(node.test_user.tolist(), node.test_item.tolist(), node.test_rating.tolist())
    assert all(lookup[(a, b)] == c for a, b, c in test_rows)


def test_split_dtypes_and_fresh_arrays():
    table = make_synthetic(0)
    node = split_node_ratings(table, range(0, 5), seed=0)
    assert node.train_user.dtype == np.int64 and node.train_item.dtype == np.int64
    assert node.test_user.dtype == np.int64 and node.test_rating.dtype == np.float32
    assert node.train_rating.dtype == np.float32
    assert not np.shares_memory(node.train_rating, table.rating)
    empty = split_node_ratings(table, range(3, 3), seed=0)
    assert empty.num_train == 0 and empty.num_test == 0


def test_split_seeded_and_independent_of_node_range():
    table = make_synthetic(0)
    a = split_node_ratings(table, range(0, 20), seed=1)
    b = split_node_ratings(table, range(10, 40), seed=1)
    again = split_node_ratings(table, range(0, 20), seed=1)
    other = split_node_ratings(table, range(0, 20), seed=2)
    assert np.array_equal(a.train_item, again.train_item)
    assert not np.array_equal(a.train_item, other.train_item)
    for user in range(10, 20):
        for kind in ["train", "test"]:
            items_a = getattr(a, f"{kind}_item")[getattr(a, f"{kind}_user") == user]
            items_b = getattr(b, f"{kind}_item")[getattr(b, f"{kind}_user") == user]
            assert np.array_equal(items_a, items_b)


def test_split_bad_fraction():
    with pytest.raises(ConfigError, match="train_fraction"):
        split_node_ratings(make_synthetic(0), range(0, 2), seed=0, train_fraction=1.0)


def test_user_rows_slices():
    table = RatingsTable(
        user=np.array([0, 0, 2, 2, 2], dtype=np.int32),
        item=np.array([1, 2, 0, 1, 3], dtype=np.int32),
        rating=np.ones(5, dtype=np.float32),
        num_users=4,
        num_items=4,
    )
    assert table.user_rows(0, 1) == slice(0, 2)
    assert table.user_rows(1, 2) == slice(2, 2)  # user 1 has no ratings
    assert table.user_rows(0, 4) == slice(0, 5)
    assert table.user_rows(3, 4) == slice(5, 5)
    with pytest.raises(ValueError, match="sorted"):
        RatingsTable(table.user[::-1].copy(), table.item, table.rating, 4, 4)


# ---------------------------------------------------------------- movielens


def _write_csv(path: Path, rows: list[str], newline: str = "\n") -> Path:
    path.write_bytes(newline.join(["userId,movieId,rating,timestamp", *rows, ""]).encode())
    return path


@pytest.mark.parametrize("newline", ["\n", "\r\n"])
def test_movielens_small_file_ids_and_order(tmp_path, newline):
    rows = ["7,500,4.0,1", "3,20,2.5,2", "7,20,5.0,3", "3,1000,0.5,4", "42,500,3.0,5"]
    csv = _write_csv(tmp_path / "ratings.csv", rows, newline)
    table = load_movielens(csv, tmp_path / "cache")
    assert (table.num_users, table.num_items, table.num_ratings) == (3, 3, 5)
    # Users 3, 7, 42 -> 0, 1, 2; movies 20, 500, 1000 -> 0, 1, 2; rows by (user, item).
    assert table.user.tolist() == [0, 0, 1, 1, 2]
    assert table.item.tolist() == [0, 2, 0, 1, 1]
    assert table.rating.tolist() == [2.5, 0.5, 5.0, 4.0, 3.0]
    assert isinstance(table.rating, np.memmap)


def test_movielens_second_load_uses_cache(tmp_path, monkeypatch):
    csv = _write_csv(tmp_path / "ratings.csv", ["1,1,4.0,1", "2,1,3.0,1"])
    first = load_movielens(csv, tmp_path / "cache")

    def no_parsing(path):
        raise AssertionError("the CSV was parsed again")

    monkeypatch.setattr(ratings, "_parse_ratings_csv", no_parsing)
    second = load_movielens(csv, tmp_path / "cache")
    assert np.array_equal(first.rating, second.rating)


def test_movielens_malformed_row_names_file_and_line(tmp_path):
    csv = _write_csv(tmp_path / "ratings.csv", ["1,1,4.0,1", "2,x,3.0,1"])
    with pytest.raises(ConfigError, match=r"ratings\.csv, line 3"):
        load_movielens(csv, tmp_path / "cache")
    bad_rating = _write_csv(tmp_path / "r2.csv", ["1,1,7.0,1"])
    with pytest.raises(ConfigError, match="line 2.*outside"):
        load_movielens(bad_rating, tmp_path / "cache")
    bad_header = tmp_path / "r3.csv"
    bad_header.write_text("user,movie\n1,1\n")
    with pytest.raises(ConfigError, match="line 1.*header"):
        load_movielens(bad_header, tmp_path / "cache")
    # Failed parses leave only lock files: no cache and no half-built temp directory.
    assert all(p.name.endswith(".lock") for p in (tmp_path / "cache").iterdir())


def test_movielens_unwritable_cache_is_a_config_error(tmp_path, monkeypatch):
    csv = _write_csv(tmp_path / "ratings.csv", ["1,1,4.0,1"])

    def denied(target, build, **_):  # what mkdir or mkdtemp raise on a read-only folder
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(ratings, "build_once", denied)
    with pytest.raises(ConfigError, match=r"cache under .*Permission denied.*writable"):
        load_movielens(csv, tmp_path / "cache")


def test_movielens_missing_file_says_where_and_how(tmp_path):
    missing = tmp_path / "data" / "ml-latest-small" / "ratings.csv"
    with pytest.raises(ConfigError) as error:
        load_movielens(missing, tmp_path / "cache")
    message = str(error.value)
    assert str(missing) in message
    assert "grouplens.org/datasets/movielens" in message and "ml-latest-small.zip" in message
    assert "data_dir" in message and "DPSGD_DATA" in message


@pytest.mark.skipif(not MOVIELENS_CSV.is_file(), reason="ml-latest-small not present")
def test_movielens_real_counts(tmp_path):
    table = load_movielens(MOVIELENS_CSV, tmp_path / "cache")
    assert (table.num_ratings, table.num_users, table.num_items) == (100_836, 610, 9_724)
    assert table.rating.min() == 0.5 and table.rating.max() == 5.0
    assert table.ratings_per_user().min() >= 20
    line = describe(table)
    assert "100836 ratings" in line and "610 users" in line and "9724 items" in line
    node = split_node_ratings(table, contiguous_blocks(table.num_users, 96)[0], seed=0)
    assert node.users == range(0, 7)
    for array in [node.train_user, node.train_item, node.train_rating, node.test_rating]:
        assert type(array) is np.ndarray and array.flags.owndata
    assert node.num_train + node.num_test == table.user_rows(0, 7).stop
