"""LEAF image data sets (FEMNIST, CelebA): parse once, memory-map, deal users to nodes.

LEAF's preprocess.sh writes each data set as JSON shards, a train/ and a test/ folder,
where a "user" is a FEMNIST writer or a CelebA celebrity. Parsing 77 MB of JSON (or
decoding thousands of JPEGs) in each of 96 ranks would cost minutes and gigabytes, so
the first rank on a machine parses into a cache of .npy files and every rank
memory-maps it (`dpsgd.data.cache`). Loading counts what it kept and what it left out
(`LoadReport`): LEAF preprocessing is easy to get subtly wrong, and CelebA image sets
are often incomplete.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath
from typing import NamedTuple

import numpy as np
from PIL import Image

from dpsgd.data.cache import build_once, cache_path, load_arrays
from dpsgd.data.partition import contiguous_blocks, shuffled_partition
from dpsgd.errors import ConfigError
from dpsgd.seeding import numpy_rng

LEAF_URL = "https://github.com/TalwalkarLab/leaf"
CELEBA_URL = "http://mmlab.ie.cuhk.edu.hk/projects/CelebA.html"
FEMNIST_SIDE = 28
FEMNIST_PIXELS = FEMNIST_SIDE * FEMNIST_SIDE
FEMNIST_CLASSES = 62  # digits, upper case, lower case
CELEBA_CLASSES = 2  # smiling or not

_SPLITS = ("train", "test")
_ARRAYS = [f"{split}_{kind}" for split in _SPLITS for kind in ("images", "labels", "offsets")]


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
        line = (f"{self.users} users, {self.train_samples} train and "
                f"{self.test_samples} test samples")
        if self.dropped_users or self.dropped_images:
            line += (f"; left out {self.dropped_users} users whose images are incomplete "
                     f"({self.dropped_images} image files not found; `dataset.strict=true` "
                     "makes this an error)")
        return line


# ---------------------------------------------------------------- reading LEAF JSON


def _leaf_files(folder: Path, dataset: str, split: str) -> list[Path]:
    """The JSON shards of one split, sorted by name, or a ConfigError saying how to get them."""
    files = sorted(p for p in folder.glob("*.json") if p.is_file()) if folder.is_dir() else []
    if not files:
        problem = "has no .json files" if folder.is_dir() else "does not exist"
        raise ConfigError(
            f"The LEAF {dataset} {split} folder {folder} {problem}. These JSON files come "
            f"from LEAF's preprocess.sh ({LEAF_URL}, data/{dataset.lower()}/); set "
            "`data_dir` (or the environment variable DPSGD_DATA) to the folder that "
            f"contains `{dataset.lower()}/`, so that {dataset.lower()}/train/*.json and "
            f"{dataset.lower()}/test/*.json are inside it."
        )
    return files


def _bad_shard(path: Path, why: str, user: str | None = None) -> ConfigError:
    where = f"{path}, user {user!r}" if user is not None else str(path)
    return ConfigError(
        f"{where}: {why}. A LEAF file holds {{\"users\": [...], \"num_samples\": [...], "
        "\"user_data\": {user: {\"x\": [...], \"y\": [...]}}}; restore the original file "
        f"or recreate it with LEAF's preprocess.sh ({LEAF_URL})."
    )


def _load_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as file:
            data = json.load(file)
    except json.JSONDecodeError as error:
        raise _bad_shard(path, f"not valid JSON ({error.msg} at line {error.lineno}, "
                               f"column {error.colno})") from None
    except UnicodeDecodeError:
        raise _bad_shard(path, "not UTF-8 text") from None
    except OSError as error:  # else a PermissionError here would read as an unwritable cache
        raise ConfigError(f"Cannot read the LEAF file {path} ({error.strerror}). Make it "
                          "readable by the user that runs dpsgd.") from None
    if not isinstance(data, dict):
        raise _bad_shard(path, "the top level is not a JSON object")
    missing = [key for key in ("users", "num_samples", "user_data") if key not in data]
    if missing:
        raise _bad_shard(path, f"missing key(s) {missing}")
    return data


def _read_shard(path: Path) -> list[tuple[str, list, list]]:
    """(user, x, y) for each user of one LEAF file, in the file's order, checked for shape.

    Only structure is checked here; what x and y must hold differs per data set.
    """
    data = _load_json(path)
    users, num_samples, user_data = data["users"], data["num_samples"], data["user_data"]
    if not isinstance(users, list) or not isinstance(num_samples, list):
        raise _bad_shard(path, "`users` and `num_samples` must be lists")
    if len(users) != len(num_samples):
        raise _bad_shard(path, f"{len(users)} users but {len(num_samples)} num_samples")
    if not isinstance(user_data, dict):
        raise _bad_shard(path, "`user_data` must be an object keyed by user")
    unlisted = sorted(set(user_data) - set(map(str, users)))
    if unlisted:
        raise _bad_shard(path, f"user_data has users not listed in `users`, e.g. {unlisted[0]!r}")
    rows = []
    for user, count in zip(users, num_samples):
        entry = user_data.get(user) if isinstance(user, str) else None
        if not isinstance(entry, dict) or "x" not in entry or "y" not in entry:
            raise _bad_shard(path, "no {\"x\", \"y\"} entry in user_data", user)
        x, y = entry["x"], entry["y"]
        if not isinstance(x, list) or not isinstance(y, list):
            raise _bad_shard(path, "x and y must be lists", user)
        if len(x) != len(y):
            raise _bad_shard(path, f"{len(x)} x but {len(y)} y", user)
        if count != len(y):
            raise _bad_shard(path, f"num_samples says {count} but there are {len(y)} samples", user)
        rows.append((user, x, y))
    return rows


def _read_split(files: list[Path]) -> list[tuple[Path, str, list, list]]:
    """(file, user, x, y) for every user of a split, in file order; a user appears once."""
    seen: dict[str, Path] = {}
    rows = []
    for path in files:
        for user, x, y in _read_shard(path):
            if user in seen:
                raise _bad_shard(path, f"the user is also in {seen[user].name}; shards from "
                                       "different preprocessing runs were mixed", user)
            seen[user] = path
            rows.append((path, user, x, y))
    if not rows:
        raise ConfigError(
            f"The LEAF files in {files[0].parent} list no users. Recreate them with LEAF's "
            f"preprocess.sh ({LEAF_URL}); with `-k` (minimum samples per user) set too high "
            "every user is filtered out."
        )
    return rows


def _labels(path: Path, user: str, y: list, num_classes: int) -> np.ndarray:
    labels = np.asarray(y) if y else np.zeros(0, dtype=np.int64)
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise _bad_shard(path, "y must be a list of whole numbers", user)
    outside = labels[(labels < 0) | (labels >= num_classes)]
    if outside.size:
        raise _bad_shard(path, f"label {outside[0]} outside 0..{num_classes - 1}", user)
    return labels.astype(np.int64)


def _offsets(counts: list[int]) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(counts, dtype=np.int64)]).astype(np.int64)


# ---------------------------------------------------------------- the cache


def _build_cached(target: Path, build: Callable[[Path], None], cache_dir: Path,
                  dataset: str, num_classes: int) -> None:
    try:
        build_once(target, build, check=lambda d: _check_cache(d, num_classes))
    except PermissionError as error:
        # The data folder is often read-only and shared; the cache must live elsewhere.
        raise ConfigError(
            f"Cannot write the parsed {dataset} cache under {cache_dir} ({error.strerror}). "
            "Point the cache directory setting at a writable folder on this machine (it "
            "may differ from `data_dir`, which can stay read-only)."
        ) from None


def _save_index(directory: Path, users: dict[str, list[str]], report: dict) -> None:
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
    for split in _SPLITS:
        problem = _split_problem(split, arrays, users[split], report, num_classes)
        if problem is not None:
            return problem
    return None


def _split_problem(split: str, arrays: dict, users: list, report: dict, num_classes: int
                   ) -> str | None:
    """The first broken rule of one split, or None; cheapest rules first."""
    images, labels, offsets = (arrays[f"{split}_{kind}"] for kind in ("images", "labels",
                                                                       "offsets"))
    if not isinstance(users, list) or offsets.shape != (len(users) + 1,):
        return (f"{split}_offsets.npy has shape {offsets.shape}, but users.json lists "
                f"{len(users)} {split} users (it needs one more entry than users)")
    if offsets[0] != 0 or np.any(offsets[1:] < offsets[:-1]):
        return f"{split}_offsets.npy does not rise from 0"
    if labels.ndim != 1 or not int(offsets[-1]) == len(labels) == len(images):
        return (f"{split}_offsets.npy ends at {offsets[-1]}, but {split}_labels.npy and "
                f"{split}_images.npy hold {len(labels)} and {len(images)} rows")
    if report.get(f"{split}_samples") != len(labels):
        return (f"report.json says {report.get(f'{split}_samples')} {split} samples, but "
                f"{split}_labels.npy holds {len(labels)}")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        return f"{split}_labels.npy has labels outside 0..{num_classes - 1}"
    return None


def _load_cached(target: Path) -> tuple[LeafSplit, LeafSplit, LoadReport, dict]:
    """The two memory-mapped splits, the report and the report's extras, from a built cache."""
    arrays = load_arrays(target, _ARRAYS)
    users = json.loads((target / "users.json").read_text())
    stored = json.loads((target / "report.json").read_text())
    fields = LoadReport.__dataclass_fields__
    report = LoadReport(**{k: v for k, v in stored.items() if k in fields})
    train, test = (
        LeafSplit(arrays[f"{s}_images"], arrays[f"{s}_labels"], users[s], arrays[f"{s}_offsets"])
        for s in _SPLITS
    )
    return train, test, report, stored


# ---------------------------------------------------------------- FEMNIST


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
        raise _bad_shard(path, f"x must be rows of {FEMNIST_PIXELS} numbers (28x28), "
                               f"got {shape}", user)
    if not np.all((values >= 0.0) & (values <= 1.0)):  # also catches NaN
        raise _bad_shard(path, "pixel values must lie in [0, 1]", user)
    return np.rint(values * 255.0).astype(np.uint8).reshape(-1, FEMNIST_SIDE, FEMNIST_SIDE)


def _parse_femnist_split(files: list[Path]) -> tuple[np.ndarray, np.ndarray, list[str], np.ndarray]:
    images, labels, users, counts = [], [], [], []
    for path, user, x, y in _read_split(files):
        labels.append(_labels(path, user, y, FEMNIST_CLASSES))
        images.append(_femnist_pixels(path, user, x))
        users.append(user)
        counts.append(len(y))
    return np.concatenate(images), np.concatenate(labels), users, _offsets(counts)


def _build_femnist_cache(train_files: list[Path], test_files: list[Path], directory: Path) -> None:
    arrays, users, samples = {}, {}, {}
    for split, files in zip(_SPLITS, (train_files, test_files)):
        images, labels, users[split], offsets = _parse_femnist_split(files)
        arrays.update({f"{split}_images": images, f"{split}_labels": labels,
                       f"{split}_offsets": offsets})
        samples[split] = len(labels)
    for name, array in arrays.items():
        np.save(directory / f"{name}.npy", array)
    report = LoadReport(len(set(users["train"]) | set(users["test"])),
                        samples["train"], samples["test"])
    _save_index(directory, users, asdict(report))


def load_femnist(train_dir: Path, test_dir: Path, cache_dir: Path
                 ) -> tuple[LeafSplit, LeafSplit, LoadReport]:
    """LEAF FEMNIST (train and test folders of JSON shards), parsed once and memory-mapped.

    Images are uint8 28x28 (value = round(x * 255), white background 255), labels 0..61.
    The first caller on a machine parses into `cache_dir`; later callers (other ranks,
    later runs) memory-map the cache, which is keyed by every shard's path, size and
    modification time.
    """
    train_files = _leaf_files(Path(train_dir), "FEMNIST", "train")
    test_files = _leaf_files(Path(test_dir), "FEMNIST", "test")
    target = cache_path(cache_dir, "femnist", train_files + test_files)
    _build_cached(target, lambda d: _build_femnist_cache(train_files, test_files, d),
                  Path(cache_dir), "FEMNIST", FEMNIST_CLASSES)
    train, test, report, _ = _load_cached(target)
    return train, test, report


# ---------------------------------------------------------------- CelebA


def _check_image_name(path: Path, user: str, name: str, images_dir: Path) -> None:
    """Refuse a name that would read a file outside `images_dir`.

    Names come from the JSON and are joined onto the folder, so "/etc/passwd" or
    "../../x.jpg" would reach anywhere the user can read. The check is on the name
    itself, not on symlinks inside the folder: those were put there by whoever set
    the folder up, and a folder of links to a shared image store is a fair layout.
    """
    root = os.path.abspath(images_dir)
    inside = os.path.normpath(os.path.join(root, name)).startswith(root + os.sep)
    relative = PurePosixPath(name)
    if relative.is_absolute() or ".." in relative.parts or "\0" in name or not inside:
        raise _bad_shard(path, f"the image name {name!r} is not a file name inside the images "
                               f"folder {images_dir} (absolute names and '..' are refused)", user)


def _resolve_image(images_dir: Path, name: str) -> Path | None:
    """The file for a JSON image name; a .png with the same stem stands in for a missing .jpg."""
    path = images_dir / name
    if path.is_file():
        return path
    png = path.with_suffix(".png")
    return png if png.is_file() else None


def _decode_image(path: Path, image_size: int) -> np.ndarray:
    try:
        with Image.open(path) as image:
            rgb = image.convert("RGB").resize((image_size, image_size), Image.Resampling.BILINEAR)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise ConfigError(
            f"Cannot decode the CelebA image {path} ({error}). Replace it with the original "
            f"from img_align_celeba.zip ({CELEBA_URL}), or delete it so its celebrity is "
            "left out (with `dataset.strict=false`)."
        ) from None
    return np.asarray(rgb, dtype=np.uint8)


class _CelebaUser(NamedTuple):
    user: str
    names: list[str]  # image file names as the JSON lists them
    paths: list[Path | None]  # the file found for each name, None where missing
    labels: np.ndarray


def _parse_celeba_split(files: list[Path], images_dir: Path) -> list[_CelebaUser]:
    users = []
    for path, user, x, y in _read_split(files):
        if not all(isinstance(name, str) and name for name in x):
            raise _bad_shard(path, "x must be image file names like \"000001.jpg\"", user)
        for name in x:
            _check_image_name(path, user, name, images_dir)
        labels = _labels(path, user, y, CELEBA_CLASSES)
        users.append(_CelebaUser(user, x, [_resolve_image(images_dir, n) for n in x], labels))
    return users


def _missing_images_error(images_dir: Path, stored: dict) -> ConfigError:
    return ConfigError(
        f"{stored['dropped_users']} of {stored['dropped_users'] + stored['users']} CelebA "
        f"users have missing images ({stored['dropped_images']} image files not found in "
        f"{images_dir}, e.g. {stored['missing_example']}), and `dataset.strict` is true. "
        f"Add the missing images (img_align_celeba.zip, {CELEBA_URL}), or set "
        f"`dataset.strict=false` to leave those users out and train on the "
        f"{stored['users']} users whose images are all present."
    )


def _no_images_error(images_dir: Path, num_users: int, stored: dict) -> ConfigError:
    return ConfigError(
        f"None of the {num_users} CelebA users has all its images in {images_dir} "
        f"({stored['dropped_images']} image files not found, e.g. "
        f"{stored['missing_example']}). Download img_align_celeba.zip ({CELEBA_URL}) and "
        "unzip it so that celeba/img_align_celeba/000001.jpg is under `data_dir`, or "
        "point `dataset.images_dir` at the folder that holds the images."
    )


def _write_celeba_split(directory: Path, split: str, users: list[_CelebaUser],
                        image_size: int) -> int:
    """Decode the users' images straight into the cache file (a full CelebA is GBs)."""
    counts = [len(entry.labels) for entry in users]
    shape = (sum(counts), image_size, image_size, 3)
    if shape[0] == 0:  # an empty file cannot be memory-mapped for writing
        np.save(directory / f"{split}_images.npy", np.zeros(shape, dtype=np.uint8))
    else:
        images = np.lib.format.open_memmap(directory / f"{split}_images.npy", mode="w+",
                                           dtype=np.uint8, shape=shape)
        paths = [path for entry in users for path in entry.paths]
        for row, path in enumerate(paths):
            images[row] = _decode_image(path, image_size)
        images.flush()
        del images
    labels = [entry.labels for entry in users] or [np.zeros(0, dtype=np.int64)]
    np.save(directory / f"{split}_labels.npy", np.concatenate(labels))
    np.save(directory / f"{split}_offsets.npy", _offsets(counts))
    return shape[0]


def _build_celeba_cache(train_files: list[Path], test_files: list[Path], images_dir: Path,
                        image_size: int, strict: bool, directory: Path) -> None:
    parsed = {split: _parse_celeba_split(files, images_dir)
              for split, files in zip(_SPLITS, (train_files, test_files))}
    # Every missing image is found before any is decoded, so strict mode fails in seconds.
    missing = [(entry.user, images_dir / name)
               for split in _SPLITS for entry in parsed[split]
               for name, path in zip(entry.names, entry.paths) if path is None]
    dropped = {user for user, _ in missing}
    all_users = {entry.user for split in _SPLITS for entry in parsed[split]}
    stored = {"users": len(all_users - dropped), "dropped_users": len(dropped),
              "dropped_images": len(missing),
              "missing_example": str(missing[0][1]) if missing else None}
    if not stored["users"]:
        raise _no_images_error(images_dir, len(all_users), stored)
    if strict and missing:
        raise _missing_images_error(images_dir, stored)
    users = {}
    for split in _SPLITS:
        kept = [entry for entry in parsed[split] if entry.user not in dropped]
        stored[f"{split}_samples"] = _write_celeba_split(directory, split, kept, image_size)
        users[split] = [entry.user for entry in kept]
    _save_index(directory, users, stored)


def load_celeba(train_dir: Path, test_dir: Path, images_dir: Path, cache_dir: Path, *,
                strict: bool = False, image_size: int = 84
                ) -> tuple[LeafSplit, LeafSplit, LoadReport]:
    """LEAF CelebA (JSON of image names, "smiling" labels) with the images, parsed once.

    Images are RGB uint8 image_size x image_size (bilinear resize); labels 0..1. A user
    with any image missing (train or test) is left out of both splits and counted in
    the report; `strict` makes that a ConfigError instead.

    The cache is keyed by the JSON files and by `images_dir` itself: a directory's
    modification time changes when files are added, removed or renamed in it, which is
    how an incomplete image set gets completed, so a fuller folder gets a fresh cache.
    An image rewritten in place under the same name is not noticed; CelebA is a fixed
    published set, and stat-ing 200k images on every start would cost more than it saves.
    """
    if image_size < 1:
        raise ConfigError(f"`dataset.image_size` is {image_size}; it must be a positive "
                          "number of pixels (the study uses 84).")
    images_dir = Path(images_dir)
    train_files = _leaf_files(Path(train_dir), "CelebA", "train")
    test_files = _leaf_files(Path(test_dir), "CelebA", "test")
    if not images_dir.is_dir():
        raise ConfigError(
            f"The CelebA images folder {images_dir} does not exist. Download "
            f"img_align_celeba.zip ({CELEBA_URL}) and unzip it so that "
            "celeba/img_align_celeba/000001.jpg is under `data_dir` (or the environment "
            "variable DPSGD_DATA), or point `dataset.images_dir` at the folder of images."
        )
    sources = train_files + test_files + [images_dir]
    target = cache_path(cache_dir, f"celeba-{image_size}px", sources)
    _build_cached(
        target,
        lambda d: _build_celeba_cache(train_files, test_files, images_dir, image_size, strict, d),
        Path(cache_dir), "CelebA", CELEBA_CLASSES,
    )
    train, test, report, stored = _load_cached(target)
    if strict and report.dropped_users:  # a cache built earlier without strict
        raise _missing_images_error(images_dir, stored)
    return train, test, report


# ---------------------------------------------------------------- partitioning


def _rows_of_users(split: LeafSplit, users: list[int]) -> np.ndarray:
    ranges = [np.arange(split.user_offsets[u], split.user_offsets[u + 1], dtype=np.int64)
              for u in users]
    return np.concatenate(ranges) if ranges else np.zeros(0, dtype=np.int64)


def partition_rows(split: LeafSplit, nodes: int, seed: int, *, split_users: bool = False,
                   what: str = "writers") -> list[np.ndarray]:
    """Row indices (int64, sorted) of `split` for each node.

    By default whole users are dealt to nodes (disjoint, seeded, near-equal numbers of
    users), since LEAF's non-IID setting is that one user's data stays on one device.
    `split_users` is for runs with more nodes than users: users are shuffled (seeded),
    their rows laid end to end, and cut into `nodes` near-equal contiguous blocks, so a
    user may span several nodes. `what` names the users in error messages.
    """
    num_users = len(split.users)
    if split_users:
        order = numpy_rng(seed, "leaf_user_order").permutation(num_users)
        rows = _rows_of_users(split, order.tolist())
        blocks = contiguous_blocks(len(rows), nodes, what="samples")
        return [np.sort(rows[block.start:block.stop]) for block in blocks]
    if 1 <= nodes and num_users < nodes:
        raise ConfigError(
            f"`nodes` is {nodes}, but the data set has only {num_users} {what}, and by "
            f"default no one's samples are split across nodes: use at most {num_users} "
            f"`nodes`, or set `dataset.split_users=true` to cut the {len(split)} samples "
            f"into {nodes} near-equal blocks."
        )
    groups = shuffled_partition(range(num_users), nodes, seed, "leaf_users", what=what)
    # Users keep ascending order within a group, so their row ranges are already sorted.
    return [_rows_of_users(split, group) for group in groups]


def partition_summary(split: LeafSplit, parts: list[np.ndarray]) -> dict:
    """Per node: its sample count and how many samples of each user it holds (partition.json)."""
    nodes = []
    for node, rows in enumerate(parts):
        owners = np.searchsorted(split.user_offsets, rows, side="right") - 1
        users, counts = np.unique(owners, return_counts=True)
        nodes.append({"node": node, "samples": int(len(rows)),
                      "users": {split.users[u]: int(c) for u, c in zip(users, counts)}})
    return {"nodes": nodes}
