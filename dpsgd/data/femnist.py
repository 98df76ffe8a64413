"""LEAF FEMNIST: handwritten characters, 28x28 grey, 62 classes, one writer per LEAF user. What x and y hold
and how they are stored; reading the shards, the cache and the partition are LEAF's (`dpsgd.data.leaf`)."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import numpy as np

from dpsgd.data.cache import cache_path
from dpsgd.data.leaf import (
    SPLITS,
    LeafSplit,
    LoadReport,
    bad_shard,
    build_cached,
    checked_labels,
    leaf_files,
    load_cached,
    read_split,
    save_index,
    user_offsets,
)

FEMNIST_SIDE = 28
FEMNIST_PIXELS = FEMNIST_SIDE * FEMNIST_SIDE
FEMNIST_CLASSES = 62  # digits, upper case, lower case


def _femnist_pixels(path: Path, user: str, x: list) -> np.ndarray:
    """LEAF's [0, 1] floats as uint8 (x * 255 is whole: LEAF divides bytes by 255)."""
    if not x:
        return np.zeros((0, FEMNIST_SIDE, FEMNIST_SIDE), dtype=np.uint8)
    try:
        values = np.asarray(x, dtype=np.float64)
    except (ValueError, TypeError):
        values = None
    if values is None or values.ndim != 2 or values.shape[1] != FEMNIST_PIXELS:
        shape = "ragged or not numbers" if values is None else f"shape {values.shape}"
        raise bad_shard(
            path, f"x must be rows of {FEMNIST_PIXELS} numbers (28x28), got {shape}", user
        )
    if not np.all((values >= 0.0) & (values <= 1.0)):  # also catches NaN
        raise bad_shard(path, "pixel values must lie in [0, 1]", user)
    return np.rint(values * 255.0).astype(np.uint8).reshape(-1, FEMNIST_SIDE, FEMNIST_SIDE)


def _parse_femnist_split(files: list[Path]) -> tuple[np.ndarray, np.ndarray, list[str], np.ndarray]:
    images, labels, users, counts = [], [], [], []
    for path, user, x, y in read_split(files):
        labels.append(checked_labels(path, user, y, FEMNIST_CLASSES))
        images.append(_femnist_pixels(path, user, x))
        users.append(user)
        counts.append(len(y))
    return np.concatenate(images), np.concatenate(labels), users, user_offsets(counts)


def _build_femnist_cache(train_files: list[Path], test_files: list[Path], directory: Path) -> None:
    arrays, users, samples = {}, {}, {}
    for split, files in zip(SPLITS, (train_files, test_files)):
        images, labels, users[split], offsets = _parse_femnist_split(files)
        arrays.update(
            {f"{split}_images": images, f"{split}_labels": labels, f"{split}_offsets": offsets}
        )
        samples[split] = len(labels)
    for name, array in arrays.items():
        np.save(directory / f"{name}.npy", array)
    report = LoadReport(
        len(set(users["train"]) | set(users["test"])), samples["train"], samples["test"]
    )
    save_index(directory, users, asdict(report))


def load_femnist(
    train_dir: Path, test_dir: Path, cache_dir: Path
) -> tuple[LeafSplit, LeafSplit, LoadReport]:
    """LEAF FEMNIST (train and test folders of JSON shards), parsed once and memory-mapped.

    Images are uint8 28x28 (value = round(x * 255), white background 255), labels 0..61.
    The first caller on a machine parses into `cache_dir`; later callers (other ranks,
    later runs) memory-map the cache, which is keyed by every shard's path, size and
    modification time.
    """
    train_files = leaf_files(Path(train_dir), "FEMNIST", "train")
    test_files = leaf_files(Path(test_dir), "FEMNIST", "test")
    target = cache_path(cache_dir, "femnist", train_files + test_files)
    build_cached(
        target,
        lambda d: _build_femnist_cache(train_files, test_files, d),
        Path(cache_dir),
        "FEMNIST",
        FEMNIST_CLASSES,
    )
    train, test, report, _ = load_cached(target)
    return train, test, report
