"""LEAF data: FEMNIST and CelebA loaders, the parse-once cache, partitioning users to nodes."""

import json
import multiprocessing
import os
import time
import traceback
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dpsgd.data import celeba, femnist, leaf
from dpsgd.data.celeba import load_celeba
from dpsgd.data.femnist import load_femnist
from dpsgd.data.leaf import LeafSplit, LoadReport, partition_rows, partition_summary
from dpsgd.errors import ConfigError
from tests.conftest import SHARED_DATA

FEMNIST_DIR = SHARED_DATA / "femnist"
CELEBA_DIR = SHARED_DATA / "celeba"
CELEBA_SUBSET = CELEBA_DIR / "subset_29_users_with_images"
CELEBA_IMAGES = CELEBA_DIR / "img_align_celeba"


# ---------------------------------------------------------------- fixtures


def write_shard(path: Path, users: dict[str, tuple[list, list]]) -> Path:
    """A LEAF JSON file: users in the dict's order."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        json.dumps(
            {
                "users": list(users),
                "num_samples": [len(y) for _, y in users.values()],
                "user_data": {user: {"x": x, "y": y} for user, (x, y) in users.items()},
            }
        )
    )
    return path


def femnist_user(rng: np.random.Generator, count: int) -> tuple[np.ndarray, list, list]:
    """Pixels as bytes, and as LEAF writes them (bytes / 255), with labels."""
    pixels = rng.integers(0, 256, size=(count, 784))
    labels = rng.integers(0, 62, size=count).tolist()
    return pixels, (pixels / 255.0).tolist(), labels


@pytest.fixture
def femnist_dirs(tmp_path):
    """Two shards per split; file names sort as b < c, users inside in file order."""
    rng = np.random.default_rng(0)
    truth = {}
    for split, counts in [("train", [5, 3, 4]), ("test", [2, 1, 1])]:
        users = {}
        for user, count in zip(["w9", "w1", "w5"], counts):
            pixels, x, y = femnist_user(rng, count)
            truth[split, user] = (pixels, y)
            users[user] = (x, y)
        write_shard(tmp_path / split / "c_shard.json", {"w5": users["w5"]})
        write_shard(tmp_path / split / "b_shard.json", {"w9": users["w9"], "w1": users["w1"]})
    return tmp_path / "train", tmp_path / "test", truth


def color_of(index: int) -> tuple[int, int, int]:
    return (20 + 10 * index, 200 - 7 * index, (60 + 33 * index) % 256)


def write_image(path: Path, index: int) -> None:
    """A solid-colour 30x36 image (a colour per index), so where each image went is checkable."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (30, 36), color_of(index)).save(path)


@pytest.fixture
def celeba_dirs(tmp_path):
    """Three celebrities; image i is `{i:06d}.jpg` with colour color_of(i); all present."""
    layout = {
        "train": {"ann": [1, 2, 3], "bob": [4, 5], "cy": [6, 7]},
        "test": {"ann": [8], "bob": [9], "cy": [10, 11]},
    }
    images = tmp_path / "img"
    for split, users in layout.items():
        shard = {}
        for user, indices in users.items():
            shard[user] = ([f"{i:06d}.jpg" for i in indices], [i % 2 for i in indices])
            for i in indices:
                write_image(images / f"{i:06d}.jpg", i)
        write_shard(tmp_path / split / "all_data.json", shard)
    return tmp_path / "train", tmp_path / "test", images


def load_small_celeba(dirs, cache, **kwargs):
    train_dir, test_dir, images = dirs
    return load_celeba(train_dir, test_dir, images, cache, image_size=8, **kwargs)


def assert_colors(split: LeafSplit, indices: list[int], tolerance: int) -> None:
    assert split.images.shape == (len(indices), 8, 8, 3) and split.images.dtype == np.uint8
    for row, index in enumerate(indices):
        difference = split.images[row].astype(int) - np.array(color_of(index))
        assert np.abs(difference).max() <= tolerance, (row, index)


# ---------------------------------------------------------------- FEMNIST


def test_femnist_round_trip(femnist_dirs, tmp_path):
    train_dir, test_dir, truth = femnist_dirs
    train, test, report = load_femnist(train_dir, test_dir, tmp_path / "cache")
    assert report == LoadReport(users=3, train_samples=12, test_samples=4)
    assert report.describe() == "3 users, 12 train and 4 test samples"
    for split, loaded in [("train", train), ("test", test)]:
        assert loaded.users == ["w9", "w1", "w5"]  # b_shard.json before c_shard.json
        counts = [len(truth[split, user][1]) for user in loaded.users]
        assert loaded.user_offsets.tolist() == np.concatenate([[0], np.cumsum(counts)]).tolist()
        assert loaded.user_offsets.dtype == np.int64 and loaded.labels.dtype == np.int64
        assert loaded.images.dtype == np.uint8 and loaded.images.shape == (sum(counts), 28, 28)
        assert len(loaded) == sum(counts)
        for i, user in enumerate(loaded.users):
            pixels, labels = truth[split, user]
            rows = loaded.user_rows(i)
            assert np.array_equal(loaded.images[rows].reshape(-1, 784), pixels)
            assert loaded.labels[rows].tolist() == labels
    assert isinstance(train.images, np.memmap) and not train.images.flags.writeable
    with pytest.raises(IndexError):
        train.user_rows(3)


def test_femnist_pixels_round_to_the_nearest_byte(tmp_path):
    # Copies re-saved with fewer digits (0.0039 for 1/255) must still give the same bytes.
    pixels = np.arange(784) % 256
    rounded = np.round(pixels / 255.0, 4).tolist()
    for split in ("train", "test"):
        write_shard(tmp_path / split / "a.json", {"w": ([rounded], [7])})
    train, _, _ = load_femnist(tmp_path / "train", tmp_path / "test", tmp_path / "cache")
    assert np.array_equal(train.images[0].ravel(), pixels)


def test_femnist_cache_reused_without_parsing(femnist_dirs, tmp_path, monkeypatch):
    train_dir, test_dir, _ = femnist_dirs
    first, _, first_report = load_femnist(train_dir, test_dir, tmp_path / "cache")

    def no_parsing(path):
        raise AssertionError(f"parsed {path} again")

    monkeypatch.setattr(leaf, "_read_shard", no_parsing)
    second, _, second_report = load_femnist(train_dir, test_dir, tmp_path / "cache")
    assert second_report == first_report and second.users == first.users
    assert np.array_equal(second.images, first.images)
    assert len(cache_dirs(tmp_path / "cache")) == 1  # one cache, no temporary left behind


def test_femnist_cache_rebuilt_when_a_shard_changes(femnist_dirs, tmp_path):
    train_dir, test_dir, _ = femnist_dirs
    train, _, _ = load_femnist(train_dir, test_dir, tmp_path / "cache")
    rng = np.random.default_rng(1)
    _, x, y = femnist_user(rng, 2)
    write_shard(train_dir / "c_shard.json", {"w5": (x, y)})
    changed, _, report = load_femnist(train_dir, test_dir, tmp_path / "cache")
    assert report.train_samples == len(train) - 4 + 2
    assert changed.labels[-2:].tolist() == y


def cache_dirs(cache: Path) -> list[Path]:
    return [p for p in cache.iterdir() if p.is_dir()] if cache.exists() else []


def _bad_x(rows: int = 1, width: int = 784) -> list:
    return [[0.5] * width for _ in range(rows)]


MALFORMED = {
    "invalid JSON": ('{"users": [', r"not valid JSON \(.*line 1"),
    "missing key": (json.dumps({"users": ["a"], "num_samples": [1]}), r"missing key.*user_data"),
    "x and y lengths": ({"a": (_bad_x(2), [1])}, r"user 'a': 2 x but 1 y"),
    "row width": ({"a": (_bad_x(1, 783), [1])}, r"user 'a': x must be rows of 784.*\(1, 783\)"),
    "ragged rows": ({"a": ([[0.5] * 784, [0.5]], [1, 2])}, r"user 'a'.*ragged"),
    "pixel range": ({"a": ([[2.0] * 784], [1])}, r"user 'a'.*\[0, 1\]"),
    "label range": ({"a": (_bad_x(), [62])}, r"user 'a': label 62 outside 0..61"),
    "label type": ({"a": (_bad_x(), [1.5])}, r"user 'a': y must be a list of whole numbers"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_femnist_malformed_shard_names_file_and_user(femnist_dirs, tmp_path, case):
    train_dir, test_dir, _ = femnist_dirs
    content, message = MALFORMED[case]
    bad = train_dir / "d_bad.json"
    if isinstance(content, str):
        bad.write_text(content)
    else:
        write_shard(bad, content)
    with pytest.raises(ConfigError, match=message) as error:
        load_femnist(train_dir, test_dir, tmp_path / "cache")
    assert str(bad) in str(error.value) and "preprocess.sh" in str(error.value)
    assert not cache_dirs(tmp_path / "cache")  # nothing half-built is kept


def test_femnist_num_samples_mismatch_and_duplicate_user(femnist_dirs, tmp_path):
    train_dir, test_dir, _ = femnist_dirs
    bad = train_dir / "d_bad.json"
    bad.write_text(
        json.dumps(
            {"users": ["a"], "num_samples": [3], "user_data": {"a": {"x": _bad_x(), "y": [0]}}}
        )
    )
    with pytest.raises(ConfigError, match=r"d_bad.json, user 'a': num_samples says 3"):
        load_femnist(train_dir, test_dir, tmp_path / "cache")
    write_shard(bad, {"w1": (_bad_x(), [0])})  # w1 is also in b_shard.json
    with pytest.raises(ConfigError, match=r"d_bad.json, user 'w1'.*also in b_shard.json"):
        load_femnist(train_dir, test_dir, tmp_path / "cache")


def test_femnist_missing_or_empty_folder(tmp_path, femnist_dirs):
    train_dir, test_dir, _ = femnist_dirs
    missing = tmp_path / "nowhere" / "train"
    with pytest.raises(ConfigError) as error:
        load_femnist(missing, test_dir, tmp_path / "cache")
    text = str(error.value)
    for needed in [
        str(missing),
        "does not exist",
        "preprocess.sh",
        "github.com/TalwalkarLab/leaf",
        "`data_dir`",
        "DPSGD_DATA",
        "`femnist/`",
    ]:
        assert needed in text
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match=r"empty has no .json files"):
        load_femnist(train_dir, empty, tmp_path / "cache")


def _femnist_worker(train_dir, test_dir, cache, builds, out, barrier) -> None:
    original = femnist._build_femnist_cache

    def counted(*args):
        with open(builds, "a") as file:
            file.write(f"{os.getpid()}\n")
        time.sleep(0.3)  # long enough that the other process arrives while this one builds
        original(*args)

    femnist._build_femnist_cache = counted
    barrier.wait()
    try:
        train, test, _ = load_femnist(Path(train_dir), Path(test_dir), Path(cache))
        np.save(out, np.concatenate([train.images.ravel(), test.images.ravel()]))
        code = 0 if isinstance(train.images, np.memmap) else 2
    except BaseException:
        traceback.print_exc()
        code = 1
    os._exit(code)


def test_femnist_two_processes_share_one_build(femnist_dirs, tmp_path):
    train_dir, test_dir, _ = femnist_dirs
    context = multiprocessing.get_context("fork")
    barrier = context.Barrier(2)
    builds = tmp_path / "builds.txt"
    outputs = [tmp_path / f"out{i}.npy" for i in range(2)]
    processes = [
        context.Process(
            target=_femnist_worker,
            args=(
                str(train_dir),
                str(test_dir),
                str(tmp_path / "cache"),
                str(builds),
                str(out),
                barrier,
            ),
        )
        for out in outputs
    ]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=60)
    assert [p.exitcode for p in processes] == [0, 0]
    assert len(builds.read_text().splitlines()) == 1
    first, second = (np.load(out) for out in outputs)
    assert np.array_equal(first, second)
    train, test, _ = load_femnist(train_dir, test_dir, tmp_path / "cache")
    assert np.array_equal(first, np.concatenate([train.images.ravel(), test.images.ravel()]))


# ---------------------------------------------------------------- CelebA


def test_celeba_round_trip(celeba_dirs, tmp_path):
    train, test, report = load_small_celeba(celeba_dirs, tmp_path / "cache")
    assert report == LoadReport(users=3, train_samples=7, test_samples=4)
    assert train.users == test.users == ["ann", "bob", "cy"]
    assert train.user_offsets.tolist() == [0, 3, 5, 7]
    assert test.user_offsets.tolist() == [0, 1, 2, 4]
    assert train.labels.tolist() == [i % 2 for i in range(1, 8)] and train.labels.dtype == np.int64
    assert_colors(train, list(range(1, 8)), tolerance=3)  # JPEG: close to the solid colour
    assert_colors(test, [8, 9, 10, 11], tolerance=3)
    assert isinstance(train.images, np.memmap)


def test_celeba_default_size_is_84(celeba_dirs, tmp_path):
    train_dir, test_dir, images = celeba_dirs
    train, _, _ = load_celeba(train_dir, test_dir, images, tmp_path / "cache")
    assert train.images.shape == (7, 84, 84, 3)
    with pytest.raises(ConfigError, match="dataset.image_size"):
        load_celeba(train_dir, test_dir, images, tmp_path / "cache", image_size=0)


def test_celeba_missing_image_drops_user_from_both_splits(celeba_dirs, tmp_path):
    (celeba_dirs[2] / "000005.jpg").unlink()  # one of bob's train images
    train, test, report = load_small_celeba(celeba_dirs, tmp_path / "cache")
    assert report == LoadReport(
        users=2, train_samples=5, test_samples=3, dropped_users=1, dropped_images=1
    )
    line = report.describe()
    assert "left out 1 users" in line and "1 image files not found" in line
    assert train.users == test.users == ["ann", "cy"]
    assert_colors(train, [1, 2, 3, 6, 7], tolerance=3)
    assert_colors(test, [8, 10, 11], tolerance=3)

    with pytest.raises(ConfigError) as error:
        load_small_celeba(celeba_dirs, tmp_path / "cache", strict=True)  # from the cache
    text = str(error.value)
    assert "1 of 3 CelebA users" in text and "1 image files not found" in text
    assert str(celeba_dirs[2] / "000005.jpg") in text and "`dataset.strict=false`" in text


def test_celeba_strict_fails_before_decoding(celeba_dirs, tmp_path, monkeypatch):
    (celeba_dirs[2] / "000009.jpg").unlink()  # bob's test image
    monkeypatch.setattr(celeba, "_decode_image", lambda *a: pytest.fail("decoded an image"))
    with pytest.raises(ConfigError, match=r"1 of 3 CelebA users.*000009.jpg"):
        load_small_celeba(celeba_dirs, tmp_path / "cache", strict=True)


def test_celeba_png_stands_in_for_missing_jpg(celeba_dirs, tmp_path):
    images = celeba_dirs[2]
    (images / "000004.jpg").unlink()
    write_image(images / "000004.png", 4)
    train, _, report = load_small_celeba(celeba_dirs, tmp_path / "cache")
    assert report.dropped_users == 0 and train.users == ["ann", "bob", "cy"]
    assert np.array_equal(train.images[3], np.full((8, 8, 3), color_of(4)))  # PNG: exact


def test_celeba_added_images_give_a_fresh_cache(celeba_dirs, tmp_path):
    (celeba_dirs[2] / "000005.jpg").unlink()
    _, _, report = load_small_celeba(celeba_dirs, tmp_path / "cache")
    assert report.dropped_users == 1
    write_image(celeba_dirs[2] / "000005.jpg", 5)  # the folder's mtime changes
    train, _, report = load_small_celeba(celeba_dirs, tmp_path / "cache")
    assert report.dropped_users == 0 and train.users == ["ann", "bob", "cy"]


def test_celeba_no_images_at_all(celeba_dirs, tmp_path):
    train_dir, test_dir, _ = celeba_dirs
    empty = tmp_path / "empty_images"
    empty.mkdir()
    with pytest.raises(ConfigError, match=r"None of the 3 CelebA users.*empty_images"):
        load_celeba(train_dir, test_dir, empty, tmp_path / "cache")
    with pytest.raises(ConfigError, match=r"images folder .*nowhere does not exist"):
        load_celeba(train_dir, test_dir, tmp_path / "nowhere", tmp_path / "cache")


def test_celeba_undecodable_image_names_the_file(celeba_dirs, tmp_path):
    broken = celeba_dirs[2] / "000006.jpg"
    broken.write_bytes(b"not a jpeg")
    with pytest.raises(ConfigError, match=r"Cannot decode the CelebA image .*000006.jpg"):
        load_small_celeba(celeba_dirs, tmp_path / "cache")


def test_celeba_label_out_of_range(celeba_dirs, tmp_path):
    train_dir = celeba_dirs[0]
    write_shard(train_dir / "all_data.json", {"ann": (["000001.jpg"], [2])})
    with pytest.raises(ConfigError, match=r"all_data.json, user 'ann': label 2 outside 0..1"):
        load_small_celeba(celeba_dirs, tmp_path / "cache")


# ---------------------------------------------------------------- partitioning


def make_split(counts: list[int]) -> LeafSplit:
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return LeafSplit(
        images=np.zeros((offsets[-1], 2, 2), np.uint8),
        labels=np.zeros(offsets[-1], np.int64),
        users=[f"u{i}" for i in range(len(counts))],
        user_offsets=offsets,
    )


def owner_of(split: LeafSplit, rows: np.ndarray) -> np.ndarray:
    return np.searchsorted(split.user_offsets, rows, side="right") - 1


def test_partition_whole_users_disjoint_complete_seeded():
    split = make_split([3, 7, 1, 4, 9, 2, 5, 6, 8, 2, 3])
    parts = partition_rows(split, 4, seed=3)
    assert all(p.dtype == np.int64 and np.all(np.diff(p) > 0) for p in parts)
    flat = np.concatenate(parts)
    assert sorted(flat.tolist()) == list(range(len(split)))  # disjoint and complete
    owners = [set(owner_of(split, p).tolist()) for p in parts]
    assert sorted(len(o) for o in owners) == [2, 3, 3, 3]  # near-equal numbers of users
    for node, users in enumerate(owners):  # each user whole, on one node
        for user in users:
            rows = split.user_rows(user)
            assert set(range(rows.start, rows.stop)) <= set(parts[node].tolist())
    same = partition_rows(split, 4, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(parts, same))
    others = [partition_rows(split, 4, seed=s) for s in range(4, 8)]
    assert any(not all(np.array_equal(a, b) for a, b in zip(parts, o)) for o in others)


def test_partition_fewer_users_than_nodes():
    split = make_split([3, 4, 5])
    with pytest.raises(ConfigError) as error:
        partition_rows(split, 4, seed=0, what="celebrities")
    text = str(error.value)
    for needed in ["only 3 celebrities", "`nodes`", "`dataset.split_users=true`"]:
        assert needed in text
    with pytest.raises(ConfigError, match="`nodes`"):
        partition_rows(split, 0, seed=0)


def test_partition_split_users_near_equal_blocks():
    split = make_split([3, 4, 5])
    parts = partition_rows(split, 5, seed=1, split_users=True)
    assert [len(p) for p in parts] == [3, 3, 2, 2, 2]  # 12 = 5 * 2 + 2
    assert sorted(np.concatenate(parts).tolist()) == list(range(12))
    assert all(p.dtype == np.int64 and np.all(np.diff(p) > 0) for p in parts)
    # Users are laid end to end in a shuffled order: each node's rows span at most two
    # users, and a user's rows sit on consecutive nodes.
    assert all(len(set(owner_of(split, p).tolist())) <= 2 for p in parts)
    again = partition_rows(split, 5, seed=1, split_users=True)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    with pytest.raises(ConfigError, match=r"only 12 samples"):
        partition_rows(split, 13, seed=1, split_users=True)
    # Also usable with enough users: still complete and near-equal.
    parts = partition_rows(split, 2, seed=1, split_users=True)
    assert [len(p) for p in parts] == [6, 6]


def test_partition_summary_counts_users_per_node():
    split = make_split([3, 0, 4, 5])
    parts = partition_rows(split, 2, seed=0, split_users=True)
    summary = partition_summary(split, parts)
    assert [n["node"] for n in summary["nodes"]] == [0, 1]
    assert [n["samples"] for n in summary["nodes"]] == [6, 6]
    per_user = {}
    for node in summary["nodes"]:
        assert sum(node["users"].values()) == node["samples"]
        for user, count in node["users"].items():
            per_user[user] = per_user.get(user, 0) + count
    assert per_user == {"u0": 3, "u2": 4, "u3": 5}  # the empty user u1 owns no rows
    json.dumps(summary)  # plain ints and strings: ready for partition.json


# ---------------------------------------------------------------- real data (skipped when absent)


@pytest.fixture(scope="session")
def real_cache(tmp_path_factory):
    """One cache for the session, so real CelebA images are decoded once per JSON set."""
    return tmp_path_factory.mktemp("leaf_cache")


def need(*paths: Path) -> None:
    for path in paths:
        if not path.exists():
            pytest.skip(f"real data not present at {path}")


def test_real_femnist_counts(real_cache):
    need(FEMNIST_DIR / "train", FEMNIST_DIR / "test")
    train, test, report = load_femnist(FEMNIST_DIR / "train", FEMNIST_DIR / "test", real_cache)
    assert report == LoadReport(users=110, train_samples=14_697, test_samples=1_695)
    assert len(train.users) == len(test.users) == 110 and train.users == test.users
    assert set(np.unique(train.labels).tolist()) == set(range(62))
    assert train.images.shape == (14_697, 28, 28) and test.images.shape == (1_695, 28, 28)
    # Bytes are exact: bytes / 255 gives back LEAF's floats for a whole shard.
    shard = sorted((FEMNIST_DIR / "test").glob("*.json"))[0]
    data = json.loads(shard.read_text())
    first = data["users"][0]
    x = np.array(data["user_data"][first]["x"])
    rows = test.user_rows(test.users.index(first))
    assert np.array_equal(test.images[rows].reshape(-1, 784) / 255.0, x)
    assert partition_counts_ok(partition_rows(train, 96, seed=0), len(train))


def partition_counts_ok(parts: list[np.ndarray], total: int) -> bool:
    return sum(len(p) for p in parts) == total and all(len(p) > 0 for p in parts)


def test_real_celeba_subset(real_cache):
    need(CELEBA_SUBSET / "train", CELEBA_IMAGES)
    train, test, report = load_celeba(
        CELEBA_SUBSET / "train", CELEBA_SUBSET / "test", CELEBA_IMAGES, real_cache
    )
    assert report == LoadReport(users=29, train_samples=696, test_samples=174)
    assert train.images.shape == (696, 84, 84, 3) and test.images.shape == (174, 84, 84, 3)
    assert (int(train.labels.sum()), int(test.labels.sum())) == (291, 83)  # smiling, per README
    assert 0 < train.images.mean() < 255


def test_real_celeba_full_json_keeps_users_with_images(real_cache):
    need(CELEBA_DIR / "train", CELEBA_SUBSET / "train", CELEBA_IMAGES)
    train, test, report = load_celeba(
        CELEBA_DIR / "train", CELEBA_DIR / "test", CELEBA_IMAGES, real_cache
    )
    assert (report.users, report.dropped_users) == (29, 486)
    assert (report.train_samples, report.test_samples) == (696, 174)
    assert report.dropped_images == 9_060 + 2_399 - 870  # the dropped users have no images
    assert "left out 486 users" in report.describe()
    subset, _, _ = load_celeba(
        CELEBA_SUBSET / "train", CELEBA_SUBSET / "test", CELEBA_IMAGES, real_cache
    )
    assert train.users == subset.users and np.array_equal(train.images, subset.images)
    with pytest.raises(ConfigError, match=r"486 of 515 CelebA users.*dataset.strict=false"):
        load_celeba(
            CELEBA_DIR / "train", CELEBA_DIR / "test", CELEBA_IMAGES, real_cache, strict=True
        )
