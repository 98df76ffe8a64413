"""What each data set gives a node: its train examples, the test examples it is judged on.

A data set is prepared once per machine (parsed into the memory-mapped cache, or
generated), before ranks fork or while other local ranks wait; each node then takes
its slice. Ratings data sets test locally (each node on its own users' held-out
ratings); LEAF data sets test globally (every node on the same shared test set).
`DATASETS` names dpsgd's own, `dataset._target_` one of the user's own (`Dataset`: what each is).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from dpsgd.data.celeba import CELEBA_CLASSES, load_celeba
from dpsgd.data.femnist import FEMNIST_CLASSES, load_femnist
from dpsgd.data.leaf import LeafSplit, LoadReport, partition_rows, partition_summary
from dpsgd.data.partition import contiguous_blocks
from dpsgd.data.ratings import (
    RatingsTable,
    describe,
    load_movielens,
    make_synthetic,
    split_node_ratings,
)
from dpsgd.errors import ConfigError
from dpsgd.seeding import torch_generator
from dpsgd.settings import builder_for, call_target


@dataclass
class NodeData:
    """A node's examples as tensors: ratings (user, item, rating) or images (pixels, label)."""

    train: tuple[torch.Tensor, ...]
    test: tuple[torch.Tensor, ...]

    def to(self, device: torch.device) -> "NodeData":
        """The same examples on `device` (a node group that trains on a GPU)."""
        return NodeData(
            tuple(t.to(device) for t in self.train), tuple(t.to(device) for t in self.test)
        )


def eval_subset(
    tensors: tuple[torch.Tensor, ...], samples: int | None, generator: torch.Generator
) -> tuple[torch.Tensor, ...]:
    """A seeded subset of `samples` test examples (all of them when None or larger than the set)."""
    size = len(tensors[0])
    if samples is None or samples >= size:
        return tensors
    chosen = torch.randperm(size, generator=generator)[:samples].sort().values
    return tuple(t[chosen] for t in tensors)


class Dataset(Protocol):
    """What DATASETS' builders, and a `dataset._target_` of the user's own, return when called as
    builder(seed, cache_dir, **the other dataset keys): once per machine, before ranks fork or while the
    machine's other ranks wait. The same seed must give every rank the same data (ranks share nothing else)."""

    task: str  # "ratings": examples are (user, item, rating) tensors; "classification": (images, labels)
    dims: dict  # what `build_model` builds for: {"num_users", "num_items"} or {"num_classes"}, and any more keys

    def describe(self) -> str:
        """One line for the log and partition.json (sizes, what was left out)."""

    def partition(self, nodes: int, seed: int) -> dict:
        """{"nodes": [{"node": i, "samples": n, ...}]}: what each node gets (partition.json); a ConfigError
        when the data cannot feed `nodes` nodes (called before ranks start)."""

    def node_data(self, node: int, nodes: int, seed: int, test_samples: int | None) -> NodeData:
        """Node `node`'s train and test examples (`eval_subset`: at most `test_samples` test examples)."""


@dataclass
class RatingsDataset:
    """Users in contiguous blocks per node; each user's ratings split train:test; local test."""

    table: RatingsTable
    train_fraction: float
    task = "ratings"
    _description: str | None = field(default=None, init=False, repr=False)

    @property
    def dims(self) -> dict:
        return {"num_users": self.table.num_users, "num_items": self.table.num_items}

    def describe(self) -> str:
        # Kept: the standalone parent says it before forking, and rank 0 writes it again (partition.json).
        if self._description is None:
            self._description = describe(self.table)
        return self._description

    def partition(self, nodes: int, seed: int) -> dict:
        entries = []
        for node, users in enumerate(contiguous_blocks(self.table.num_users, nodes)):
            rows = self.table.user_rows(users.start, users.stop)
            entries.append(
                {
                    "node": node,
                    "users": [users.start, users.stop],
                    "samples": rows.stop - rows.start,
                }
            )
        return {"nodes": entries}

    def node_data(self, node: int, nodes: int, seed: int, test_samples: int | None) -> NodeData:
        users = contiguous_blocks(self.table.num_users, nodes)[node]
        split = split_node_ratings(self.table, users, seed, self.train_fraction)

        def tensors(user, item, rating):
            return (
                torch.from_numpy(user).long(),
                torch.from_numpy(item).long(),
                torch.from_numpy(rating).float(),
            )

        test = tensors(split.test_user, split.test_item, split.test_rating)
        return NodeData(
            train=tensors(split.train_user, split.train_item, split.train_rating),
            test=eval_subset(test, test_samples, torch_generator(seed, "eval_subset", node)),
        )


@dataclass
class LeafDataset:
    """LEAF users (writers, celebrities) dealt to nodes; one global test set for every node."""

    train: LeafSplit
    test: LeafSplit
    report: LoadReport
    num_classes: int
    split_users: bool
    what: str
    task = "classification"

    @property
    def dims(self) -> dict:
        return {"num_classes": self.num_classes}

    def describe(self) -> str:
        return self.report.describe()

    def partition(self, nodes: int, seed: int) -> dict:
        return partition_summary(self.train, self._rows(nodes, seed))

    def node_data(self, node: int, nodes: int, seed: int, test_samples: int | None) -> NodeData:
        rows = self._rows(nodes, seed)[node]
        train = (
            torch.from_numpy(np.ascontiguousarray(self.train.images[rows])),
            torch.from_numpy(np.ascontiguousarray(self.train.labels[rows])),
        )
        # The same seeded subset on every node (no node in the stream key), so nodes are comparable.
        test = eval_subset(
            (_shared_tensor(self.test.images), _shared_tensor(self.test.labels)),
            test_samples,
            torch_generator(seed, "eval_subset"),
        )
        return NodeData(train=train, test=test)

    def _rows(self, nodes: int, seed: int) -> list[np.ndarray]:
        return partition_rows(self.train, nodes, seed, split_users=self.split_users, what=self.what)


def _shared_tensor(array: np.ndarray) -> torch.Tensor:
    """A tensor over the memory-mapped cache, without a private copy per rank (read-only use)."""
    with warnings.catch_warnings():
        warnings.simplefilter(
            "ignore", UserWarning
        )  # "non-writable array": evaluation never writes
        return torch.from_numpy(array)


# Each data set of dpsgd's own, by `dataset.name`: builder(seed, cache_dir, **its keys) -> Dataset. A new one is
# its module (the loader), a builder here and conf/dataset/<name>.yaml declaring its keys.
DATASETS: dict[str, Callable[..., Dataset]] = {
    "synthetic": lambda seed, cache_dir, train_fraction, **shape: RatingsDataset(
        make_synthetic(seed, **shape), train_fraction
    ),
    "movielens": lambda seed, cache_dir, path, train_fraction: RatingsDataset(
        load_movielens(Path(path).expanduser(), cache_dir), train_fraction
    ),
    "femnist": lambda seed, cache_dir, train_dir, test_dir, split_users: LeafDataset(
        *load_femnist(Path(train_dir), Path(test_dir), cache_dir),
        FEMNIST_CLASSES,
        split_users,
        "writers",
    ),
    "celeba": lambda seed, cache_dir, train_dir, test_dir, images_dir, image_size, strict, split_users: (
        LeafDataset(
            *load_celeba(
                Path(train_dir),
                Path(test_dir),
                Path(images_dir),
                cache_dir,
                strict=strict,
                image_size=image_size,
            ),
            CELEBA_CLASSES,
            split_users,
            "celebrities",
        )
    ),
}
# The dataset keys that name files or folders (under data_dir, unless set on their own).
DATA_PATH_KEYS = {
    "movielens": ("path",),
    "femnist": ("train_dir", "test_dir"),
    "celeba": ("train_dir", "test_dir", "images_dir"),
}


def dataset_builder(name: str | None, target: str | None = None) -> Callable[..., Dataset]:
    """DATASETS[name], or the callable `dataset._target_` names (`dpsgd.settings.builder_for`)."""
    return builder_for("dataset", DATASETS, name, target, ", e.g. `dataset=movielens`")


def prepare_dataset(
    name: str, options: dict, seed: int, cache_dir: Path, data_dir: str | Path | None = None
) -> Dataset:
    """The data set named by `dataset.name`, or by `dataset._target_` among `options`, parsed or generated once;
    `options` are the other dataset keys, `data_dir` the folder their paths are under (named in the message when
    it is a file)."""
    options = dict(options)
    target = options.pop("_target_", None)
    if target is not None:
        return call_target(
            "dataset",
            target,
            dataset_builder(name, target),
            {"seed": seed, "cache_dir": cache_dir},
            options,
            "a data set (dpsgd.data.datasets.Dataset: task, dims, describe, partition, node_data)",
            _is_dataset,
        )
    check_data_paths(name, options, data_dir)
    return dataset_builder(name)(seed, cache_dir, **options)


def _is_dataset(made) -> bool:
    return (
        getattr(made, "task", None) in ("ratings", "classification")
        and isinstance(getattr(made, "dims", None), dict)
        and all(
            callable(getattr(made, method, None))
            for method in ("describe", "partition", "node_data")
        )
    )


def check_data_paths(name: str, options: dict, data_dir: str | Path | None = None) -> None:
    """A file where a folder must be (data_dir set to a file, often the ratings file or a zip itself)
    is one paragraph naming it, not a "not found" about a path beneath it that cannot exist."""
    for key in DATA_PATH_KEYS.get(name, ()):
        path = Path(options[key]).expanduser()
        blocking = next(
            (parent for parent in path.parents if parent.is_file()), None
        )  # nearest first
        if blocking is None:
            continue
        below = path.relative_to(blocking)
        if data_dir is not None and blocking == Path(data_dir).expanduser():
            folder = _holding_folder(blocking, below)
            raise ConfigError(
                f"data_dir={data_dir} is a file, not a folder: dataset={name} reads {below} under data_dir "
                f"(dataset.{key}={path}). Set data_dir (or the environment variable DPSGD_DATA) to the folder that "
                f"contains {below.parts[0]}/, e.g. `data_dir={folder}`."
            )
        raise ConfigError(
            f"dataset.{key}={path}: {blocking} is a file, not a folder, so {below} cannot be under it. "
            f"Set dataset.{key} (or data_dir, the folder it is under) to where the data set is unpacked, "
            f"or move the file {blocking} out of the way."
        )


def _holding_folder(file: Path, below: Path) -> Path:
    """The folder data_dir most likely meant: above the file when the file is itself the data set's
    path under data_dir (data_dir=.../ml-latest-small/ratings.csv), else the file's own folder."""
    for depth in range(len(below.parts), 0, -1):
        if file.parts[-depth:] == below.parts[:depth] and len(file.parts) > depth:
            return file.parents[depth - 1]
    return file.parent
