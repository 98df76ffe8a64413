"""LEAF CelebA "smiling": JSON of image file names per celebrity plus the aligned images, which are checked,
decoded into the cache, and left out with their celebrity where missing; the rest is LEAF's (`dpsgd.data.leaf`)."""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath
from typing import NamedTuple

import numpy as np
from PIL import Image

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
from dpsgd.errors import ConfigError

CELEBA_URL = "http://mmlab.ie.cuhk.edu.hk/projects/CelebA.html"
CELEBA_CLASSES = 2  # smiling or not


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
        raise bad_shard(
            path,
            f"the image name {name!r} is not a file name inside the images "
            f"folder {images_dir} (absolute names and '..' are refused)",
            user,
        )


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
            f"Cannot decode the CelebA image {path} ({error}). Replace it with the original from "
            f"img_align_celeba.zip ({CELEBA_URL}), or delete it so its celebrity is left out (with "
            "`dataset.strict=false`)."
        ) from None
    return np.asarray(rgb, dtype=np.uint8)


class _CelebaUser(NamedTuple):
    user: str
    names: list[str]  # image file names as the JSON lists them
    paths: list[Path | None]  # the file found for each name, None where missing
    labels: np.ndarray


def _parse_celeba_split(files: list[Path], images_dir: Path) -> list[_CelebaUser]:
    users = []
    for path, user, x, y in read_split(files):
        if not all(isinstance(name, str) and name for name in x):
            raise bad_shard(path, 'x must be image file names like "000001.jpg"', user)
        for name in x:
            _check_image_name(path, user, name, images_dir)
        labels = checked_labels(path, user, y, CELEBA_CLASSES)
        users.append(_CelebaUser(user, x, [_resolve_image(images_dir, n) for n in x], labels))
    return users


def _missing_images_error(images_dir: Path, stored: dict) -> ConfigError:
    return ConfigError(
        f"{stored['dropped_users']} of {stored['dropped_users'] + stored['users']} CelebA users have "
        f"missing images ({stored['dropped_images']} image files not found in {images_dir}, e.g. "
        f"{stored['missing_example']}), and `dataset.strict` is true. Add the missing images "
        f"(img_align_celeba.zip, {CELEBA_URL}), or set `dataset.strict=false` to leave those users "
        f"out and train on the {stored['users']} users whose images are all present."
    )


def _no_images_error(images_dir: Path, num_users: int, stored: dict) -> ConfigError:
    return ConfigError(
        f"None of the {num_users} CelebA users has all its images in {images_dir} "
        f"({stored['dropped_images']} image files not found, e.g. {stored['missing_example']}). "
        f"Download img_align_celeba.zip ({CELEBA_URL}) and unzip it so that "
        "celeba/img_align_celeba/000001.jpg is under `data_dir`, or point `dataset.images_dir` at the "
        "folder that holds the images."
    )


def _write_celeba_split(
    directory: Path, split: str, users: list[_CelebaUser], image_size: int
) -> int:
    """Decode the users' images straight into the cache file (a full CelebA is GBs)."""
    counts = [len(entry.labels) for entry in users]
    shape = (sum(counts), image_size, image_size, 3)
    if shape[0] == 0:  # an empty file cannot be memory-mapped for writing
        np.save(directory / f"{split}_images.npy", np.zeros(shape, dtype=np.uint8))
    else:
        images = np.lib.format.open_memmap(
            directory / f"{split}_images.npy", mode="w+", dtype=np.uint8, shape=shape
        )
        paths = [path for entry in users for path in entry.paths]
        for row, path in enumerate(paths):
            images[row] = _decode_image(path, image_size)
        images.flush()
        del images
    labels = [entry.labels for entry in users] or [np.zeros(0, dtype=np.int64)]
    np.save(directory / f"{split}_labels.npy", np.concatenate(labels))
    np.save(directory / f"{split}_offsets.npy", user_offsets(counts))
    return shape[0]


def _build_celeba_cache(
    train_files: list[Path],
    test_files: list[Path],
    images_dir: Path,
    image_size: int,
    strict: bool,
    directory: Path,
) -> None:
    parsed = {
        split: _parse_celeba_split(files, images_dir)
        for split, files in zip(SPLITS, (train_files, test_files))
    }
    # Every missing image is found before any is decoded, so strict mode fails in seconds.
    missing = [
        (entry.user, images_dir / name)
        for split in SPLITS
        for entry in parsed[split]
        for name, path in zip(entry.names, entry.paths)
        if path is None
    ]
    dropped = {user for user, _ in missing}
    all_users = {entry.user for split in SPLITS for entry in parsed[split]}
    stored = {
        "users": len(all_users - dropped),
        "dropped_users": len(dropped),
        "dropped_images": len(missing),
        "missing_example": str(missing[0][1]) if missing else None,
    }
    if not stored["users"]:
        raise _no_images_error(images_dir, len(all_users), stored)
    if strict and missing:
        raise _missing_images_error(images_dir, stored)
    users = {}
    for split in SPLITS:
        kept = [entry for entry in parsed[split] if entry.user not in dropped]
        stored[f"{split}_samples"] = _write_celeba_split(directory, split, kept, image_size)
        users[split] = [entry.user for entry in kept]
    save_index(directory, users, stored)


def load_celeba(
    train_dir: Path,
    test_dir: Path,
    images_dir: Path,
    cache_dir: Path,
    *,
    strict: bool = False,
    image_size: int = 84,
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
        raise ConfigError(
            f"`dataset.image_size` is {image_size}; it must be a positive number of pixels (the study "
            "uses 84)."
        )
    images_dir = Path(images_dir)
    train_files = leaf_files(Path(train_dir), "CelebA", "train")
    test_files = leaf_files(Path(test_dir), "CelebA", "test")
    if not images_dir.is_dir():
        raise ConfigError(
            f"The CelebA images folder {images_dir} does not exist. Download img_align_celeba.zip "
            f"({CELEBA_URL}) and unzip it so that celeba/img_align_celeba/000001.jpg is under "
            "`data_dir` (or the environment variable DPSGD_DATA), or point `dataset.images_dir` at the "
            "folder of images."
        )
    sources = train_files + test_files + [images_dir]
    target = cache_path(cache_dir, f"celeba-{image_size}px", sources)
    build_cached(
        target,
        lambda d: _build_celeba_cache(train_files, test_files, images_dir, image_size, strict, d),
        Path(cache_dir),
        "CelebA",
        CELEBA_CLASSES,
    )
    train, test, report, stored = load_cached(target)
    if strict and report.dropped_users:  # a cache built earlier without strict
        raise _missing_images_error(images_dir, stored)
    return train, test, report
