"""Data loaders against a hostile world: damaged caches, cut-off ratings files, and
CelebA image names that point outside the images folder."""

import json
import multiprocessing
import os
import re
import time
import traceback
from pathlib import Path

import numpy as np
import pytest

from dpsgd.data import cache, ratings
from dpsgd.data.cache import build_once, load_arrays
from dpsgd.data.femnist import load_femnist
from dpsgd.data.ratings import load_movielens
from dpsgd.errors import ConfigError
from tests.test_leaf_data import (  # noqa: F401 (celeba_dirs and femnist_dirs are fixtures)
    cache_dirs,
    celeba_dirs,
    femnist_dirs,
    load_small_celeba,
    write_image,
    write_shard,
)
from tests.test_ratings_data import _write_csv

ROWS = ["7,500,4.0,1", "3,20,2.5,2", "7,20,5.0,3", "3,1000,0.5,4", "42,500,3.0,5"]
HEADER = "userId,movieId,rating,timestamp"


def only_cache(root: Path) -> Path:
    """The one cache folder under `root`; no temporary or set-aside folder may be left."""
    entries = [p.name for p in root.iterdir() if not p.name.endswith(".lock")]
    assert len(entries) == 1, entries
    return root / entries[0]


def rebuilt_line(capsys, directory: Path) -> str:
    """The one line saying `directory` was rebuilt, and why."""
    lines = [line for line in capsys.readouterr().err.splitlines() if "rebuilt" in line]
    assert len(lines) == 1, lines
    assert lines[0].startswith("[dpsgd] warning: rebuilt the data cache")
    assert str(directory) in lines[0]
    return lines[0]


def truncate(path: Path, drop_bytes: int = 8) -> None:
    path.write_bytes(path.read_bytes()[:-drop_bytes])


# ---------------------------------------------------------------- MovieLens cache


@pytest.fixture
def movielens(tmp_path, capsys):
    """A small ratings.csv, loaded once so its cache exists: (csv, cache root, cache folder,
    a copy of the table's arrays). A copy, since damaging a file in place changes its maps."""
    csv = _write_csv(tmp_path / "ratings.csv", ROWS)
    table = load_movielens(csv, tmp_path / "cache")
    capsys.readouterr()
    return csv, tmp_path / "cache", only_cache(tmp_path / "cache"), table_copy(table)


def table_copy(table) -> dict:
    return {
        "sizes": (table.num_users, table.num_items),
        **{name: np.array(getattr(table, name)) for name in ("user", "item", "rating")},
    }


def assert_same_table(table, expected: dict) -> None:
    assert (table.num_users, table.num_items) == expected["sizes"] == (3, 3)
    for name in ("user", "item", "rating"):
        assert np.array_equal(getattr(table, name), expected[name])


DAMAGE = {
    "truncated rating.npy": (lambda d: truncate(d / "rating.npy"), r"rating\.npy is \d+ bytes"),
    "deleted item.npy": (lambda d: (d / "item.npy").unlink(), r"item\.npy is missing"),
    "sizes.npy too small": (
        lambda d: np.save(d / "sizes.npy", np.array([1, 1])),
        r"sizes\.npy does not match its checksum",
    ),
    "no manifest (an old cache)": (lambda d: (d / "manifest.json").unlink(), r"no manifest\.json"),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_movielens_damaged_cache_is_rebuilt_with_one_line(movielens, capsys, case):
    csv, root, directory, table = movielens
    damage, why = DAMAGE[case]
    damage(directory)
    again = load_movielens(csv, root)
    assert_same_table(again, table)
    line = rebuilt_line(capsys, directory)
    assert re.search(why, line), line
    assert only_cache(root) == directory
    load_movielens(csv, root)  # the rebuilt cache is sound: opened quietly
    assert "rebuilt" not in capsys.readouterr().err


@pytest.mark.parametrize(
    "sizes, why",
    [
        ([2, 3], r"sizes\.npy says 2 users, but user\.npy has ids 0\.\.2"),
        ([3, 1], r"sizes\.npy says 1 items, but item\.npy has ids 0\.\.2"),
        ([4, 3], r"sizes\.npy says 4 users and 3 items, but user_ids\.npy"),
    ],
)
def test_movielens_sizes_must_cover_the_ids_even_with_a_matching_manifest(
    movielens, capsys, sizes, why
):
    # Every rank would otherwise crash mid-run with an IndexError in the embedding lookup.
    csv, root, directory, table = movielens
    np.save(directory / "sizes.npy", np.array(sizes, dtype=np.int64))
    cache.write_manifest(directory)  # the manifest agrees: only the consistency rules can tell
    assert_same_table(load_movielens(csv, root), table)
    assert re.search(why, rebuilt_line(capsys, directory))


def test_movielens_valid_cache_opens_without_parsing_or_printing(movielens, capsys, monkeypatch):
    csv, root, directory, table = movielens
    monkeypatch.setattr(
        ratings, "_parse_ratings_csv", lambda path: pytest.fail("a sound cache was parsed again")
    )
    assert_same_table(load_movielens(csv, root), table)
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out == ""


def test_movielens_damaged_cache_whose_source_is_gone_names_the_folder(movielens, monkeypatch):
    csv, root, directory, _ = movielens
    truncate(directory / "user.npy")

    def source_gone(path):
        raise FileNotFoundError(2, "No such file or directory", str(path))

    monkeypatch.setattr(ratings, "_parse_ratings_csv", source_gone)
    with pytest.raises(ConfigError) as error:
        load_movielens(csv, root)
    text = str(error.value)
    assert f"The data cache {directory} is damaged (user.npy is" in text
    assert "No such file or directory" in text and f"delete the folder {directory}" in text
    assert "\n" not in text
    assert only_cache(root) == directory  # the damaged cache stays for the user to delete


# ---------------------------------------------------------------- build_once, generic


def _x_check(directory: Path) -> str | None:
    x = load_arrays(directory, ["x"])["x"]
    return None if x.tolist() == list(range(10)) else "x.npy is not 0..9"


def _open_damaged(target: str, builds: str, barrier) -> None:
    def build(directory: Path) -> None:
        with open(builds, "a") as file:
            file.write(f"{os.getpid()}\n")
        time.sleep(0.3)  # long enough that every other process arrives meanwhile
        np.save(directory / "x.npy", np.arange(10))

    barrier.wait()
    try:
        result = build_once(Path(target), build, check=_x_check)
        code = 0 if load_arrays(result, ["x"])["x"].tolist() == list(range(10)) else 2
    except BaseException:
        traceback.print_exc()
        code = 1
    os._exit(code)


def test_damaged_cache_opened_by_many_processes_is_rebuilt_once(tmp_path):
    target, builds = tmp_path / "cache" / "thing", tmp_path / "builds.txt"
    build_once(target, lambda d: np.save(d / "x.npy", np.arange(10)), check=_x_check)
    truncate(target / "x.npy")
    context = multiprocessing.get_context("fork")
    num_processes = 4
    barrier = context.Barrier(num_processes)
    processes = [
        context.Process(target=_open_damaged, args=(str(target), str(builds), barrier))
        for _ in range(num_processes)
    ]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=60)
    assert [p.exitcode for p in processes] == [0] * num_processes
    assert len(builds.read_text().splitlines()) == 1
    assert only_cache(tmp_path / "cache") == target


def test_manifest_checksums_only_small_files(femnist_dirs, tmp_path, monkeypatch):
    # Opening must stay cheap for 96 ranks: image arrays are checked by size, shape, dtype.
    monkeypatch.setattr(cache, "_CHECKSUM_MAX_BYTES", 1024)
    train_dir, test_dir, _ = femnist_dirs
    load_femnist(train_dir, test_dir, tmp_path / "cache")
    directory = only_cache(tmp_path / "cache")
    files = json.loads((directory / "manifest.json").read_text())["files"]
    assert set(files) == {
        f"{s}_{k}.npy" for s in ("train", "test") for k in ("images", "labels", "offsets")
    } | {"users.json", "report.json"}
    assert files["train_images.npy"]["shape"] == [12, 28, 28]
    images = files["train_images.npy"]
    assert images["dtype"] == "|u1" and "blake2b" not in images
    for small in ("train_offsets.npy", "users.json", "report.json"):
        assert "blake2b" in files[small]


# ---------------------------------------------------------------- LEAF caches


def femnist_snapshot(train, test) -> list:
    return [
        (s.users, s.user_offsets.tolist(), s.labels.tolist(), np.array(s.images))
        for s in (train, test)
    ]


def assert_same_snapshot(first: list, second: list) -> None:
    for (users_a, offsets_a, labels_a, images_a), (users_b, offsets_b, labels_b, images_b) in zip(
        first, second
    ):
        assert (users_a, offsets_a, labels_a) == (users_b, offsets_b, labels_b)
        assert np.array_equal(images_a, images_b)


def _edit_users(directory: Path) -> None:
    users = json.loads((directory / "users.json").read_text())
    users["train"] = users["train"][::-1]  # same bytes, another order
    (directory / "users.json").write_text(json.dumps(users))


LEAF_DAMAGE = {
    "offsets not rising": (
        lambda d: np.save(d / "train_offsets.npy", np.array([0, 5, 3, 12])),
        r"train_offsets\.npy does not match its checksum",
    ),
    "truncated images": (
        lambda d: truncate(d / "train_images.npy", 784),
        r"train_images\.npy is \d+ bytes",
    ),
    "deleted labels": (lambda d: (d / "test_labels.npy").unlink(), r"test_labels\.npy is missing"),
    "users.json edited": (_edit_users, r"users\.json does not match its checksum"),
    "users.json cut short": (lambda d: truncate(d / "users.json", 3), r"users\.json is \d+ bytes"),
    "report.json deleted": (lambda d: (d / "report.json").unlink(), r"report\.json is missing"),
}


@pytest.mark.parametrize("case", list(LEAF_DAMAGE))
def test_femnist_damaged_cache_is_rebuilt(femnist_dirs, tmp_path, capsys, case):
    train_dir, test_dir, _ = femnist_dirs
    root = tmp_path / "cache"
    expected = femnist_snapshot(*load_femnist(train_dir, test_dir, root)[:2])
    directory = only_cache(root)
    damage, why = LEAF_DAMAGE[case]
    damage(directory)
    capsys.readouterr()
    assert_same_snapshot(femnist_snapshot(*load_femnist(train_dir, test_dir, root)[:2]), expected)
    assert re.search(why, rebuilt_line(capsys, directory))
    assert only_cache(root) == directory


def _labels_outside(directory: Path) -> None:
    labels = np.load(directory / "test_labels.npy")
    labels[0] = 62
    np.save(directory / "test_labels.npy", labels)


LEAF_INCONSISTENT = {
    "offsets not rising": (
        lambda d: np.save(d / "train_offsets.npy", np.array([0, 5, 3, 12])),
        r"train_offsets\.npy does not rise from 0",
    ),
    "offsets end short": (
        lambda d: np.save(d / "train_offsets.npy", np.array([0, 5, 8, 11])),
        r"train_offsets\.npy ends at 11, but .* hold 12 and 12 rows",
    ),
    "offsets do not start at 0": (
        lambda d: np.save(d / "test_offsets.npy", np.array([1, 2, 3, 4])),
        r"test_offsets\.npy does not rise from 0",
    ),
    "offsets one short": (
        lambda d: np.save(d / "test_offsets.npy", np.array([0, 2, 4])),
        r"test_offsets\.npy has shape \(3,\), but users\.json lists 3",
    ),
    "labels shorter than images": (
        lambda d: np.save(d / "train_labels.npy", np.load(d / "train_labels.npy")[:-1]),
        r"train_offsets\.npy ends at 12, but .* hold 11 and 12 rows",
    ),
    "label outside the classes": (_labels_outside, r"test_labels\.npy has labels outside 0\.\.61"),
}


@pytest.mark.parametrize("case", list(LEAF_INCONSISTENT))
def test_femnist_consistency_rules_catch_what_a_matching_manifest_misses(
    femnist_dirs, tmp_path, capsys, case
):
    train_dir, test_dir, _ = femnist_dirs
    root = tmp_path / "cache"
    expected = femnist_snapshot(*load_femnist(train_dir, test_dir, root)[:2])
    directory = only_cache(root)
    damage, why = LEAF_INCONSISTENT[case]
    damage(directory)
    cache.write_manifest(directory)
    capsys.readouterr()
    assert_same_snapshot(femnist_snapshot(*load_femnist(train_dir, test_dir, root)[:2]), expected)
    assert re.search(why, rebuilt_line(capsys, directory))


def test_celeba_damaged_cache_is_rebuilt(celeba_dirs, tmp_path, capsys):
    root = tmp_path / "cache"
    train, test, report = load_small_celeba(celeba_dirs, root)
    images, offsets = np.array(test.images), test.user_offsets.tolist()
    directory = only_cache(root)
    (directory / "test_offsets.npy").unlink()
    truncate(directory / "train_images.npy", 100)
    capsys.readouterr()
    again_train, again_test, again_report = load_small_celeba(celeba_dirs, root)
    assert again_report == report and again_test.user_offsets.tolist() == offsets
    assert np.array_equal(again_test.images, images) and len(again_train) == 7
    assert "test_offsets.npy is missing" in rebuilt_line(capsys, directory)


# ---------------------------------------------------------------- ratings.csv cut short


def test_ratings_file_cut_inside_its_last_field_warns(tmp_path, capsys):
    csv = tmp_path / "ratings.csv"
    csv.write_bytes(f"{HEADER}\n1,1,4.0,964982703\n610,170875,3.0,14931".encode())
    table = load_movielens(csv, tmp_path / "cache")
    assert table.num_ratings == 2  # kept: the row itself is well formed
    warning = capsys.readouterr().err
    assert warning.startswith("[dpsgd] warning: ") and len(warning.splitlines()) == 1
    assert f"{csv}, line 3" in warning and "truncated" in warning
    assert "'610,170875,3.0,14931'" in warning


@pytest.mark.parametrize("newline", ["\n", "\r\n"])
def test_ratings_file_ending_with_a_newline_does_not_warn(tmp_path, capsys, newline):
    load_movielens(_write_csv(tmp_path / "ratings.csv", ROWS, newline), tmp_path / "cache")
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize(
    "last, why",
    [
        ("610,170875,3.0,", r"line 3: a field is not a number"),  # cut right after the comma
        ("610,170875,3.", r"line 3: expected 4 fields, got 3"),
        ("610,170875", r"line 3: expected 4 fields, got 2"),
    ],
)
def test_ratings_last_line_cut_before_its_last_field_is_an_error(tmp_path, last, why):
    csv = tmp_path / "ratings.csv"
    csv.write_bytes(f"{HEADER}\n1,1,4.0,964982703\n{last}".encode())
    with pytest.raises(ConfigError, match=why):
        load_movielens(csv, tmp_path / "cache")


def test_ratings_file_not_utf8_names_the_line(tmp_path):
    csv = tmp_path / "ratings.csv"
    csv.write_bytes(f"{HEADER}\n1,1,4.0,1\n2,1,3.0,1\xff\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"ratings\.csv, line 3: the file is not UTF-8"):
        load_movielens(csv, tmp_path / "cache")


# ---------------------------------------------------------------- CelebA image names


def escaping_names(tmp_path: Path) -> dict[str, str]:
    return {
        "parent": "../outside.jpg",
        "absolute": str(tmp_path / "outside.jpg"),
        "system file": "/etc/passwd",
        "dot-dot inside": "sub/../000001.jpg",
        "deep parent": "a/b/../../../outside.jpg",
    }


@pytest.mark.parametrize(
    "case", ["parent", "absolute", "system file", "dot-dot inside", "deep parent"]
)
def test_celeba_image_name_outside_the_images_folder_is_refused(celeba_dirs, tmp_path, case):
    train_dir, _, images = celeba_dirs
    write_image(tmp_path / "outside.jpg", 99)  # a real image, so only the name check can stop it
    name = escaping_names(tmp_path)[case]
    shard = write_shard(train_dir / "all_data.json", {"ann": (["000001.jpg", name], [1, 0])})
    with pytest.raises(ConfigError) as error:
        load_small_celeba(celeba_dirs, tmp_path / "cache")
    text = str(error.value)
    assert f"{shard}, user 'ann'" in text and repr(name) in text
    assert str(images) in text and "\n" not in text
    assert not cache_dirs(tmp_path / "cache")


def test_celeba_image_name_in_a_subfolder_is_accepted(celeba_dirs, tmp_path):
    train_dir, _, images = celeba_dirs
    write_image(images / "sub" / "000012.jpg", 12)
    write_shard(train_dir / "all_data.json", {"ann": (["000001.jpg", "sub/000012.jpg"], [1, 0])})
    train, _, report = load_small_celeba(celeba_dirs, tmp_path / "cache")
    assert report.dropped_users == 0 and len(train) == 2
