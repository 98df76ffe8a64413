"""What LEAF's data sets share: reading its JSON shards, the parse-once cache, its samples for partitioners.

LEAF's preprocess.sh writes each data set as JSON shards, a train/ and a test/ folder,
where a "user" is a FEMNIST writer or a CelebA celebrity. Parsing 77 MB of JSON (or
decoding thousands of JPEGs) in each of 96 ranks would cost minutes and gigabytes, so
the first rank on a machine parses into a cache of .npy files and every rank
memory-maps it (`dpsgd.data.cache`). Loading counts what it kept and what it left out
(`LoadReport`): LEAF preprocessing is easy to get subtly wrong, and CelebA image sets
are often incomplete. What x and y hold differs: `dpsgd.data.femnist`, `dpsgd.data.celeba`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dpsgd.data.cache import build_once, load_arrays
from dpsgd.data.partition import Samples, partition_samples
from dpsgd.errors import ConfigError

LEAF_URL = "https://github.com/TalwalkarLab/leaf"

SPLITS = ("train", "test")
_ARRAYS = [f"{split}_{kind}" for split in SPLITS for kind in ("images", "labels", "offsets")]


@dataclass(frozen=True, eq=False)
class LeafSplit:
    """One split (train or test) of a LEAF data set, memory-mapped from the cache.

    Rows are grouped by user so a user's samples are one slice, which is what lets
    nodes own whole users without copying or index lists per user.
    """

    images: np.ndarray  # uint8: (N, 28, 28) for FEMNIST, (N, S, S, 3) for CelebA
    labels: np.ndarray  # int64 (N,)
    users: list[str]  # in file order: shards sorted by file name, users in each file's order
    user_offsets: np.ndarray  # int64 (len(users)+1,): rows of user i are [i]:[i+1]

    def user_rows(self, i: int) -> slice:
        """The rows of user i (its index in `users`), as a slice (no copy)."""
        if not 0 <= i < len(self.users):
            raise IndexError(f"user index {i} outside 0..{len(self.users) - 1}")
        return slice(int(self.user_offsets[i]), int(self.user_offsets[i + 1]))

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class LoadReport:
    """What a load kept and what it left out, to be said once, so a bad load is visible.

    `dropped_images` counts image files listed in the JSON but not found; the dropped
    users' other samples are left out with them.
    """

    users: int
    train_samples: int
    test_samples: int
    dropped_users: int = 0
    dropped_images: int = 0

    def describe(self) -> str:
        """One line of counts for the log."""
        line = (
            f"{self.users} users, {self.train_samples} train and {self.test_samples} test samples"
        )
        if self.dropped_users or self.dropped_images:
            line += (
                f"; left out {self.dropped_users} users whose images are incomplete "
                f"({self.dropped_images} image files not found; `dataset.strict=true` "
                "makes this an error)"
            )
        return line


# ---------------------------------------------------------------- reading LEAF JSON


def leaf_files(folder: Path, dataset: str, split: str) -> list[Path]:
    """The JSON shards of one split, sorted by name, or a ConfigError saying how to get them."""
    files = sorted(p for p in folder.glob("*.json") if p.is_file()) if folder.is_dir() else []
    if not files:
        problem = "has no .json files" if folder.is_dir() else "does not exist"
        raise ConfigError(
            f"The LEAF {dataset} {split} folder {folder} {problem}. These JSON files come from LEAF's "
            f"preprocess.sh ({LEAF_URL}, data/{dataset.lower()}/); set `data_dir` (or the environment "
            f"variable DPSGD_DATA) to the folder that contains `{dataset.lower()}/`, so that "
            f"{dataset.lower()}/train/*.json and {dataset.lower()}/test/*.json are inside it."
        )
    return files


def bad_shard(path: Path, why: str, user: str | None = None) -> ConfigError:
    where = f"{path}, user {user!r}" if user is not None else str(path)
    return ConfigError(
        f'{where}: {why}. A LEAF file holds {{"users": [...], "num_samples": [...], "user_data": '
        '{user: {"x": [...], "y": [...]}}}; restore the original file or recreate it with LEAF\'s '
        f"preprocess.sh ({LEAF_URL})."
    )


def _load_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as file:
            data = json.load(file)
    except json.JSONDecodeError as error:
        raise bad_shard(
            path, f"not valid JSON ({error.msg} at line {error.lineno}, column {error.colno})"
        ) from None
    except UnicodeDecodeError:
        raise bad_shard(path, "not UTF-8 text") from None
    except OSError as error:  # else a PermissionError here would read as an unwritable cache
        raise ConfigError(
            f"Cannot read the LEAF file {path} ({error.strerror}). Make it "
            "readable by the user that runs dpsgd."
        ) from None
    if not isinstance(data, dict):
        raise bad_shard(path, "the top level is not a JSON object")
    missing = [key for key in ("users", "num_samples", "user_data") if key not in data]
    if missing:
        raise bad_shard(path, f"missing key(s) {missing}")
    return data


def _read_shard(path: Path) -> list[tuple[str, list, list]]:
    """(user, x, y) for each user of one LEAF file, in the file's order, checked for shape.

    Only structure is checked here; what x and y must hold differs per data set.
    """
    data = _load_json(path)
    users, num_samples, user_data = data["users"], data["num_samples"], data["user_data"]
    if not isinstance(users, list) or not isinstance(num_samples, list):
        raise bad_shard(path, "`users` and `num_samples` must be lists")
    if len(users) != len(num_samples):
        raise bad_shard(path, f"{len(users)} users but {len(num_samples)} num_samples")
    if not isinstance(user_data, dict):
        raise bad_shard(path, "`user_data` must be an object keyed by user")
    unlisted = sorted(set(user_data) - set(map(str, users)))
    if unlisted:
        raise bad_shard(path, f"user_data has users not listed in `users`, e.g. {unlisted[0]!r}")
    rows = []
    for user, count in zip(users, num_samples):
        entry = user_data.get(user) if isinstance(user, str) else None
        if not isinstance(entry, dict) or "x" not in entry or "y" not in entry:
            raise bad_shard(path, 'no {"x", "y"} entry in user_data', user)
        x, y = entry["x"], entry["y"]
        if not isinstance(x, list) or not isinstance(y, list):
            raise bad_shard(path, "x and y must be lists", user)
        if len(x) != len(y):
            raise bad_shard(path, f"{len(x)} x but {len(y)} y", user)
        if count != len(y):
            raise bad_shard(path, f"num_samples says {count} but there are {len(y)} samples", user)
        rows.append((user, x, y))
    return rows


def read_split(files: list[Path]) -> list[tuple[Path, str, list, list]]:
    """(file, user, x, y) for every user of a split, in file order; a user appears once."""
    seen: dict[str, Path] = {}
    rows = []
    for path in files:
        for user, x, y in _read_shard(path):
            if user in seen:
                raise bad_shard(
                    path,
                    f"the user is also in {seen[user].name}; shards from "
                    "different preprocessing runs were mixed",
                    user,
                )
            seen[user] = path
            rows.append((path, user, x, y))
    if not rows:
        raise ConfigError(
            f"The LEAF files in {files[0].parent} list no users. Recreate them with LEAF's "
            f"preprocess.sh ({LEAF_URL}); with `-k` (minimum samples per user) set too high every user "
            "is filtered out."
        )
    return rows


def checked_labels(path: Path, user: str, y: list, num_classes: int) -> np.ndarray:
    labels = np.asarray(y) if y else np.zeros(0, dtype=np.int64)
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise bad_shard(path, "y must be a list of whole numbers", user)
    outside = labels[(labels < 0) | (labels >= num_classes)]
    if outside.size:
        raise bad_shard(path, f"label {outside[0]} outside 0..{num_classes - 1}", user)
    return labels.astype(np.int64)


def user_offsets(counts: list[int]) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(counts, dtype=np.int64)]).astype(np.int64)


# ---------------------------------------------------------------- the cache


def build_cached(
    target: Path, build: Callable[[Path], None], cache_dir: Path, dataset: str, num_classes: int
) -> None:
    try:
        build_once(target, build, check=lambda d: _check_cache(d, num_classes))
    except PermissionError as error:
        # The data folder is often read-only and shared; the cache must live elsewhere.
        raise ConfigError(
            f"Cannot write the parsed {dataset} cache under {cache_dir} ({error.strerror}). Point the "
            "cache directory setting at a writable folder on this machine (it may differ from "
            "`data_dir`, which can stay read-only)."
        ) from None


def save_index(directory: Path, users: dict[str, list[str]], report: dict) -> None:
    """Users per split and the report (with any extras), next to the .npy arrays."""
    (directory / "users.json").write_text(json.dumps(users))
    (directory / "report.json").write_text(json.dumps(report))


def _check_cache(directory: Path, num_classes: int) -> str | None:
    """What makes a cached LEAF data set unusable, or None. Reads the index arrays and
    labels, never the images: offsets that do not cover the rows exactly would otherwise
    show up only mid-run, as a wrong slice or an IndexError in some rank."""
    arrays = load_arrays(directory, _ARRAYS)
    users = json.loads((directory / "users.json").read_text())
    report = json.loads((directory / "report.json").read_text())
    for split in SPLITS:
        problem = _split_problem(split, arrays, users[split], report, num_classes)
        if problem is not None:
            return problem
    return None


def _split_problem(
    split: str, arrays: dict, users: list, report: dict, num_classes: int
) -> str | None:
    """The first broken rule of one split, or None; cheapest rules first."""
    images, labels, offsets = (
        arrays[f"{split}_{kind}"] for kind in ("images", "labels", "offsets")
    )
    if not isinstance(users, list) or offsets.shape != (len(users) + 1,):
        return (
            f"{split}_offsets.npy has shape {offsets.shape}, but users.json lists "
            f"{len(users)} {split} users (it needs one more entry than users)"
        )
    if offsets[0] != 0 or np.any(offsets[1:] < offsets[:-1]):
        return f"{split}_offsets.npy does not rise from 0"
    if labels.ndim != 1 or not int(offsets[-1]) == len(labels) == len(images):
        return (
            f"{split}_offsets.npy ends at {offsets[-1]}, but {split}_labels.npy and "
            f"{split}_images.npy hold {len(labels)} and {len(images)} rows"
        )
    if report.get(f"{split}_samples") != len(labels):
        return (
            f"report.json says {report.get(f'{split}_samples')} {split} samples, but "
            f"{split}_labels.npy holds {len(labels)}"
        )
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        return f"{split}_labels.npy has labels outside 0..{num_classes - 1}"
    return None


def load_cached(target: Path) -> tuple[LeafSplit, LeafSplit, LoadReport, dict]:
    """The two memory-mapped splits, the report and the report's extras, from a built cache."""
    arrays = load_arrays(target, _ARRAYS)
    users = json.loads((target / "users.json").read_text())
    stored = json.loads((target / "report.json").read_text())
    fields = LoadReport.__dataclass_fields__
    report = LoadReport(**{k: v for k, v in stored.items() if k in fields})
    train, test = (
        LeafSplit(arrays[f"{s}_images"], arrays[f"{s}_labels"], users[s], arrays[f"{s}_offsets"])
        for s in SPLITS
    )
    return train, test, report, stored


# ---------------------------------------------------------------- partitioning


def leaf_samples(split: LeafSplit, what: str = "writers") -> Samples:
    """The samples of `split` as partitioners see them: grouped by user, with their labels."""
    return Samples(len(split), split.user_offsets, split.labels, what)


def leaf_partitioner(split_users: bool) -> str:
    """The partitioner a LEAF data set uses when `dataset.partition` is null (`dataset.split_users`)."""
    return "split_users" if split_users else "shuffled_users"


def partition_rows(
    split: LeafSplit, nodes: int, seed: int, *, split_users: bool = False, what: str = "writers"
) -> list[np.ndarray]:
    """Row indices (int64, sorted) of `split` for each node, as LEAF data sets deal them by default.

    Whole users are dealt to nodes (`shuffled_users`: disjoint, seeded, near-equal numbers
    of users), since LEAF's non-IID setting is that one user's data stays on one device.
    `split_users` is for runs with more nodes than users (`split_users`): users are shuffled
    (seeded), their rows laid end to end, and cut into `nodes` near-equal contiguous blocks,
    so a user may span several nodes. `what` names the users in error messages.
    """
    return partition_samples(leaf_partitioner(split_users), leaf_samples(split, what), nodes, seed)


def partition_summary(split: LeafSplit, parts: list[np.ndarray]) -> dict:
    """Per node: its sample count and how many samples of each user it holds (partition.json)."""
    nodes = []
    for node, rows in enumerate(parts):
        owners = np.searchsorted(split.user_offsets, rows, side="right") - 1
        users, counts = np.unique(owners, return_counts=True)
        nodes.append(
            {
                "node": node,
                "samples": int(len(rows)),
                "users": {split.users[u]: int(c) for u, c in zip(users, counts)},
            }
        )
    return {"nodes": nodes}
