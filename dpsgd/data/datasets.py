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
from dpsgd.data.leaf import (
    LeafSplit,
    LoadReport,
    leaf_partitioner,
    leaf_samples,
    partition_summary,
)
from dpsgd.data.partition import choose_partitioner, partition_samples
from dpsgd.data.ratings import (
    RatingsTable,
    describe,
    load_movielens,
    make_synthetic,
    ratings_samples,
    split_rows,
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


RATINGS_PARTITIONER = "user_blocks"  # the study's rule for MovieLens users; synthetic uses it too


@dataclass
class RatingsDataset:
    """Users dealt to nodes (by default in contiguous blocks, the study's rule); each user's ratings split
    train:test; local test."""

    table: RatingsTable
    train_fraction: float
    # `dataset.partition`, a name in PARTITIONERS; None: the study's contiguous blocks of users.
    partitioner: str | None = None
    task = "ratings"
    _description: str | None = field(default=None, init=False, repr=False)
    _parts: dict = field(default_factory=dict, init=False, repr=False)

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
        per_user = self.table.ratings_per_user()
        for node, rows in enumerate(self._rows(nodes, seed)):
            users, counts = np.unique(np.asarray(self.table.user[rows]), return_counts=True)
            whole_block = (
                len(users) > 0
                and users[-1] - users[0] + 1 == len(users)
                and np.array_equal(counts, per_user[users])
            )
            entries.append(
                {
                    "node": node,
                    # [first, end): whole users first..end-1; else how many ratings of each user it holds.
                    "users": [int(users[0]), int(users[-1]) + 1]
                    if whole_block
                    else {str(u): int(c) for u, c in zip(users, counts)},
                    "samples": len(rows),
                }
            )
        return {"nodes": entries}

    def node_data(self, node: int, nodes: int, seed: int, test_samples: int | None) -> NodeData:
        split = split_rows(self.table, self._rows(nodes, seed)[node], seed, self.train_fraction)

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

    def _rows(self, nodes: int, seed: int) -> list[np.ndarray]:
        # Kept per (nodes, seed): a rank hosting a group of nodes asks once per node.
        if (nodes, seed) not in self._parts:
            name = self.partitioner or RATINGS_PARTITIONER
            samples = ratings_samples(self.table)
            self._parts[nodes, seed] = partition_samples(name, samples, nodes, seed)
        return self._parts[nodes, seed]


@dataclass
class LeafDataset:
    """LEAF users (writers, celebrities) dealt to nodes; one global test set for every node."""

    train: LeafSplit
    test: LeafSplit
    report: LoadReport
    num_classes: int
    split_users: bool  # with `partitioner` None: `split_users` rather than `shuffled_users`
    what: str
    # `dataset.partition`, a name in PARTITIONERS; None: LEAF's default (`leaf_partitioner`).
    partitioner: str | None = None
    task = "classification"
    _parts: dict = field(default_factory=dict, init=False, repr=False)

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
        # Kept per (nodes, seed): a rank hosting a group of nodes asks once per node.
        if (nodes, seed) not in self._parts:
            name = self.partitioner or leaf_partitioner(self.split_users)
            samples = leaf_samples(self.train, self.what)
            self._parts[nodes, seed] = partition_samples(name, samples, nodes, seed)
        return self._parts[nodes, seed]


def ratings_dataset(
    dataset: str, table: RatingsTable, train_fraction: float, partition: str | None
) -> RatingsDataset:
    """A ratings data set dealt by `dataset.partition` (null: the study's contiguous blocks of users),
    checked to apply before any rank starts."""
    choose_partitioner(partition, RATINGS_PARTITIONER, ratings_samples(table), dataset)
    return RatingsDataset(table, train_fraction, partition)


def leaf_dataset(
    dataset: str,
    loaded: tuple[LeafSplit, LeafSplit, LoadReport],
    num_classes: int,
    what: str,
    split_users: bool,
    partition: str | None,
) -> LeafDataset:
    """A LEAF data set dealt by `dataset.partition` (null: whole users at random, or split with
    `dataset.split_users=true`), checked to apply before any rank starts."""
    train, test, report = loaded
    default = leaf_partitioner(split_users)
    if split_users and partition not in (None, default):
        raise ConfigError(
            f"dataset.split_users=true and dataset.partition={partition} choose two partitioners: "
            f"split_users=true is `dataset.partition={default}`. Drop one of them (keep "
            f"`dataset.split_users=false` to use `{partition}`)."
        )
    choose_partitioner(partition, default, leaf_samples(train, what), dataset)
    return LeafDataset(train, test, report, num_classes, split_users, what, partition)


def _shared_tensor(array: np.ndarray) -> torch.Tensor:
    """A tensor over the memory-mapped cache, without a private copy per rank (read-only use)."""
    with warnings.catch_warnings():
        warnings.simplefilter(
            "ignore", UserWarning
        )  # "non-writable array": evaluation never writes
        return torch.from_numpy(array)


def _celeba(  # a function: its keys do not fit one lambda
    seed,
    cache_dir,
    train_dir,
    test_dir,
    images_dir,
    image_size,
    strict,
    split_users,
    partition=None,
) -> LeafDataset:
    loaded = load_celeba(
        Path(train_dir),
        Path(test_dir),
        Path(images_dir),
        cache_dir,
        strict=strict,
        image_size=image_size,
    )
    return leaf_dataset("celeba", loaded, CELEBA_CLASSES, "celebrities", split_users, partition)


# Each data set of dpsgd's own, by `dataset.name`: builder(seed, cache_dir, **its keys) -> Dataset. A new one is
# its module (the loader), a builder here and conf/dataset/<name>.yaml declaring its keys. `partition` is the
# name of a partitioner (`dpsgd.data.partition.PARTITIONERS`), null for the data set's own.
DATASETS: dict[str, Callable[..., Dataset]] = {
    "synthetic": lambda seed, cache_dir, train_fraction, partition=None, **shape: ratings_dataset(
        "synthetic", make_synthetic(seed, **shape), train_fraction, partition
    ),
    "movielens": lambda seed, cache_dir, path, train_fraction, partition=None: ratings_dataset(
        "movielens", load_movielens(Path(path).expanduser(), cache_dir), train_fraction, partition
    ),
    "femnist": lambda seed, cache_dir, train_dir, test_dir, split_users, partition=None: (
        leaf_dataset(
            "femnist",
            load_femnist(Path(train_dir), Path(test_dir), cache_dir),
            FEMNIST_CLASSES,
            "writers",
            split_users,
            partition,
        )
    ),
    "celeba": _celeba,
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
