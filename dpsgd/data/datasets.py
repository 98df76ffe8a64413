"""What each data set gives a node: its train examples, the test examples it is judged on.

A data set is prepared once per machine (parsed into the memory-mapped cache, or
generated), before ranks fork or while other local ranks wait; each node then takes
its slice. Ratings data sets test locally (each node on its own users' held-out
ratings); LEAF data sets test globally (every node on the same shared test set).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from dpsgd.data.leaf import LeafSplit, LoadReport, load_celeba, load_femnist, partition_rows, partition_summary
from dpsgd.data.partition import contiguous_blocks
from dpsgd.data.ratings import RatingsTable, describe, load_movielens, make_synthetic, split_node_ratings
from dpsgd.errors import ConfigError
from dpsgd.seeding import torch_generator

DATASETS = ("synthetic", "movielens", "femnist", "celeba")


@dataclass
class NodeData:
    """A node's examples as tensors: ratings (user, item, rating) or images (pixels, label)."""

    train: tuple[torch.Tensor, ...]
    test: tuple[torch.Tensor, ...]

    def to(self, device: torch.device) -> "NodeData":
        """The same examples on `device` (a node group that trains on a GPU)."""
        return NodeData(tuple(t.to(device) for t in self.train), tuple(t.to(device) for t in self.test))


def eval_subset(tensors: tuple[torch.Tensor, ...], samples: int | None, generator: torch.Generator
                ) -> tuple[torch.Tensor, ...]:
    """A seeded subset of `samples` test examples (all of them when None or larger than the set)."""
    size = len(tensors[0])
    if samples is None or samples >= size:
        return tensors
    chosen = torch.randperm(size, generator=generator)[:samples].sort().values
    return tuple(t[chosen] for t in tensors)


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
            entries.append({"node": node, "users": [users.start, users.stop], "samples": rows.stop - rows.start})
        return {"nodes": entries}

    def node_data(self, node: int, nodes: int, seed: int, test_samples: int | None) -> NodeData:
        users = contiguous_blocks(self.table.num_users, nodes)[node]
        split = split_node_ratings(self.table, users, seed, self.train_fraction)

        def tensors(user, item, rating):
            return torch.from_numpy(user).long(), torch.from_numpy(item).long(), torch.from_numpy(rating).float()

        test = tensors(split.test_user, split.test_item, split.test_rating)
        return NodeData(train=tensors(split.train_user, split.train_item, split.train_rating),
                        test=eval_subset(test, test_samples, torch_generator(seed, "eval_subset", node)))


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
        train = (torch.from_numpy(np.ascontiguousarray(self.train.images[rows])),
                 torch.from_numpy(np.ascontiguousarray(self.train.labels[rows])))
        # The same seeded subset on every node (no node in the stream key), so nodes are comparable.
        test = eval_subset((_shared_tensor(self.test.images), _shared_tensor(self.test.labels)), test_samples,
                           torch_generator(seed, "eval_subset"))
        return NodeData(train=train, test=test)

    def _rows(self, nodes: int, seed: int) -> list[np.ndarray]:
        return partition_rows(self.train, nodes, seed, split_users=self.split_users, what=self.what)


def _shared_tensor(array: np.ndarray) -> torch.Tensor:
    """A tensor over the memory-mapped cache, without a private copy per rank (read-only use)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "non-writable array": evaluation never writes
        return torch.from_numpy(array)


# The dataset keys that name files or folders (under data_dir, unless set on their own).
DATA_PATH_KEYS = {"movielens": ("path",), "femnist": ("train_dir", "test_dir"),
                  "celeba": ("train_dir", "test_dir", "images_dir")}


def prepare_dataset(name: str, options: dict, seed: int, cache_dir: Path, data_dir: str | Path | None = None):
    """The data set named by `dataset.name`, parsed or generated once; `options` are the other dataset keys,
    `data_dir` the folder their paths are under (named in the message when it is a file)."""
    check_data_paths(name, options, data_dir)
    if name == "synthetic":
        table = make_synthetic(seed, num_users=options["num_users"], num_items=options["num_items"],
                               rank=options["rank"], min_ratings=options["min_ratings"],
                               max_ratings=options["max_ratings"], noise_std=options["noise_std"])
        return RatingsDataset(table, options["train_fraction"])
    if name == "movielens":
        return RatingsDataset(load_movielens(Path(options["path"]).expanduser(), cache_dir), options["train_fraction"])
    if name == "femnist":
        train, test, report = load_femnist(Path(options["train_dir"]), Path(options["test_dir"]), cache_dir)
        return LeafDataset(train, test, report, 62, options["split_users"], "writers")
    if name == "celeba":
        train, test, report = load_celeba(Path(options["train_dir"]), Path(options["test_dir"]),
                                          Path(options["images_dir"]), cache_dir, strict=options["strict"],
                                          image_size=options["image_size"])
        return LeafDataset(train, test, report, 2, options["split_users"], "celebrities")
    raise ConfigError(f"dataset.name={name!r} is not known; choose one of {list(DATASETS)}, "
                      "e.g. `dataset=movielens`.")


def check_data_paths(name: str, options: dict, data_dir: str | Path | None = None) -> None:
    """A file where a folder must be (data_dir set to a file, often the ratings file or a zip itself)
    is one paragraph naming it, not a "not found" about a path beneath it that cannot exist."""
    for key in DATA_PATH_KEYS.get(name, ()):
        path = Path(options[key]).expanduser()
        blocking = next((parent for parent in path.parents if parent.is_file()), None)  # nearest first
        if blocking is None:
            continue
        below = path.relative_to(blocking)
        if data_dir is not None and blocking == Path(data_dir).expanduser():
            folder = _holding_folder(blocking, below)
            raise ConfigError(
                f"data_dir={data_dir} is a file, not a folder: dataset={name} reads {below} under data_dir "
                f"(dataset.{key}={path}). Set data_dir (or the environment variable DPSGD_DATA) to the folder that "
                f"contains {below.parts[0]}/, e.g. `data_dir={folder}`.")
        raise ConfigError(
            f"dataset.{key}={path}: {blocking} is a file, not a folder, so {below} cannot be under it. "
            f"Set dataset.{key} (or data_dir, the folder it is under) to where the data set is unpacked, "
            f"or move the file {blocking} out of the way.")


def _holding_folder(file: Path, below: Path) -> Path:
    """The folder data_dir most likely meant: above the file when the file is itself the data set's
    path under data_dir (data_dir=.../ml-latest-small/ratings.csv), else the file's own folder."""
    for depth in range(len(below.parts), 0, -1):
        if file.parts[-depth:] == below.parts[:depth] and len(file.parts) > depth:
            return file.parents[depth - 1]
    return file.parent
