"""Parse a data set once per machine, then memory-map it in every rank.

With 96 ranks on a machine, parsing and holding 96 copies of a data set costs minutes
and gigabytes; instead the first rank to arrive parses into a directory of .npy files
and the rest memory-map those files, sharing the pages through the OS page cache.

A cache lives for months on a shared disk, so it can be damaged after it was built (a
copy cut short, a file deleted or overwritten). Each build writes `manifest.json` (every
file's size, and each .npy file's shape and dtype; a checksum of the small files), and
every open checks it, plus the data set's own consistency rules, before any rank trusts
the arrays: a damaged cache is rebuilt instead of crashing every rank mid-run.
"""

import fcntl
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from dpsgd.errors import ConfigError

# Bump when the layout of any cached directory changes, so old caches are not reused.
# 2: every cache has a manifest.json.
_CACHE_FORMAT = 2
MANIFEST_NAME = "manifest.json"
# Files up to this size (sizes, offsets, users.json, report.json, the arrays of small data
# sets) are checksummed on every open; larger ones (images) only by size, shape and dtype,
# since 96 ranks hashing gigabytes at start-up would cost more than the parse saved.
_CHECKSUM_MAX_BYTES = 1 << 20

# A data set's own consistency rules: None when the cache directory is sound, else why not.
CacheCheck = Callable[[Path], str | None]


def cache_path(cache_dir: str | Path, name: str, source_files: list[Path]) -> Path:
    """The cache directory for `name` built from exactly these source files.

    Keyed by each source's absolute path, size and modification time, so a replaced or
    edited source gets a fresh cache instead of stale arrays.
    """
    identity = [f"format={_CACHE_FORMAT}", f"name={name}"]
    for source in source_files:
        source = Path(source).resolve()
        stat = source.stat()
        identity.append(f"{source}|{stat.st_size}|{stat.st_mtime_ns}")
    digest = hashlib.blake2b("\n".join(identity).encode(), digest_size=8).hexdigest()
    return Path(cache_dir) / f"{name}-{digest}"


def build_once(
    target: Path, build: Callable[[Path], None], check: CacheCheck | None = None
) -> Path:
    """Return `target`, building it with `build(tmpdir)` if absent or rebuilding it if damaged.

    Many processes may call this at once: an exclusive flock on a sibling lock file lets
    one build while the others wait, and the build goes to a temporary directory that is
    renamed into place only when complete, so nobody ever sees a half-written cache.
    Opening checks the manifest and `check` (see `cache_problem`); a damaged cache is
    rebuilt the same way, with one line on stderr saying which and why.
    """
    target = Path(target)
    if target.exists() and cache_problem(target, check) is None:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(target):
        existed = target.exists()
        problem = cache_problem(target, check) if existed else None
        if existed and problem is None:
            return target  # another process built or repaired it while this one waited
        why = "it was damaged" if existed else "first use of this data set on this machine"
        print(
            f"[dpsgd] building the data cache {target} ({why}); later runs memory-map it",
            flush=True,
        )
        started = time.monotonic()
        try:
            _build_in_place(target, build, check)
        except (OSError, ConfigError) as error:
            if problem is None:
                raise  # a first build: the caller knows what its errors mean
            raise _unrebuildable(target, problem, error) from None
    print(f"[dpsgd] data cache built in {time.monotonic() - started:.1f} s", flush=True)
    if problem is not None:
        print(
            f"[dpsgd] warning: rebuilt the data cache {target}, which was damaged: {problem}",
            file=sys.stderr,
            flush=True,
        )
    return target


@contextmanager
def _exclusive_lock(target: Path) -> Iterator[None]:
    lock_path = target.with_name(target.name + ".lock")
    with open(lock_path, "a") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


def _build_in_place(target: Path, build: Callable[[Path], None], check: CacheCheck | None) -> None:
    """Build into a temporary sibling, write its manifest, then rename it to `target`."""
    # Holding the lock, any leftover temporary directory is from a builder that died.
    for stale in target.parent.glob(target.name + ".tmp-*"):
        _remove(stale)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
    try:
        build(tmp)
        write_manifest(tmp)
        problem = cache_problem(tmp, check)
        if problem is not None:  # rebuilding would fail the same way on every open
            raise RuntimeError(f"the freshly built cache {tmp} fails its own check: {problem}")
        # mkdtemp makes the directory private (0700); the cache is for everyone.
        tmp.chmod(0o755)
        _swap_in(tmp, target)
    except BaseException:
        _remove(tmp)
        raise


def _swap_in(tmp: Path, target: Path) -> None:
    """Rename `tmp` to `target`, first renaming a damaged `target` aside.

    A rename cannot replace a non-empty directory; moving the old one aside first leaves
    only a moment without `target`, and a process that looks then waits on the lock.
    Ranks that already memory-mapped old files keep them: unlinked files stay readable.
    """
    if target.exists() or target.is_symlink():
        aside = target.with_name(f"{target.name}.tmp-old-{uuid.uuid4().hex[:12]}")
        os.replace(target, aside)
        os.replace(tmp, target)
        _remove(aside)
    else:
        os.replace(tmp, target)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _unrebuildable(target: Path, problem: str, error: BaseException) -> ConfigError:
    return ConfigError(
        f"The data cache {target} is damaged ({problem}), and rebuilding it from its source "
        f"failed: {str(error).rstrip('.')}. Make sure the source data is in place and "
        f"readable, then delete the folder {target} (it holds only arrays parsed from the "
        "source, so nothing is lost) and run again."
    )


# ---------------------------------------------------------------- the manifest


def write_manifest(directory: Path) -> None:
    """Record every file of a freshly built cache, for `cache_problem` to compare against."""
    directory = Path(directory)
    files = {
        path.name: _describe_file(path)
        for path in sorted(directory.iterdir())
        if path.is_file() and path.name != MANIFEST_NAME
    }
    manifest = {"format": _CACHE_FORMAT, "files": files}
    (directory / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1))


def _describe_file(path: Path) -> dict:
    entry: dict = {"bytes": path.stat().st_size}
    if path.suffix == ".npy":
        shape, dtype, _ = _npy_layout(path)
        entry.update(shape=list(shape), dtype=dtype.str)
    if entry["bytes"] <= _CHECKSUM_MAX_BYTES:
        entry["blake2b"] = _checksum(path)
    return entry


def _checksum(path: Path) -> str:
    return hashlib.blake2b(path.read_bytes()).hexdigest()  # only small files are checksummed


def _npy_layout(path: Path) -> tuple[tuple[int, ...], np.dtype, int]:
    """Shape, dtype and data offset of a .npy file, from its header alone (no data read)."""
    with open(path, "rb") as file:
        version = np.lib.format.read_magic(file)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(file)
        elif version == (2, 0):
            shape, _, dtype = np.lib.format.read_array_header_2_0(file)
        else:
            raise ValueError(f".npy format version {version} is not one np.save writes here")
        return tuple(shape), dtype, file.tell()


def cache_problem(directory: Path, check: CacheCheck | None = None) -> str | None:
    """None when `directory` matches its manifest and passes `check`; else what is wrong.

    Cheap by design, since every rank calls it: file sizes, .npy headers, checksums of
    the small files, then the data set's own rules (`check`, which may read index arrays
    but should not read image arrays).
    """
    directory = Path(directory)
    manifest_path = directory / MANIFEST_NAME
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
        fmt = manifest["format"]
    except FileNotFoundError:
        return f"it has no {MANIFEST_NAME} (an interrupted build, or an older dpsgd made it)"
    except (OSError, ValueError, KeyError, TypeError) as error:
        return f"{MANIFEST_NAME} cannot be read ({error})"
    if fmt != _CACHE_FORMAT:
        return f"{MANIFEST_NAME} is for cache format {fmt}, not {_CACHE_FORMAT}"
    for name, entry in files.items():
        problem = _file_problem(directory / name, entry)
        if problem is not None:
            return problem
    if check is None:
        return None
    try:
        return check(directory)
    except (OSError, ValueError, KeyError, TypeError, IndexError) as error:
        return f"its arrays cannot be read ({type(error).__name__}: {error})"


def _file_problem(path: Path, entry: dict) -> str | None:
    """What is wrong with one file of the cache, compared with its manifest entry."""
    if not path.is_file():
        return f"{path.name} is missing"
    size = path.stat().st_size
    if size != entry["bytes"]:
        return (
            f"{path.name} is {size} bytes but was written as {entry['bytes']} "
            "(cut short or overwritten)"
        )
    if path.suffix == ".npy":
        problem = _npy_problem(path, entry, size)
        if problem is not None:
            return problem
    if "blake2b" in entry and _checksum(path) != entry["blake2b"]:
        return f"{path.name} does not match its checksum (its content was changed)"
    return None


def _npy_problem(path: Path, entry: dict, size: int) -> str | None:
    try:
        shape, dtype, offset = _npy_layout(path)
    except (OSError, ValueError, SyntaxError) as error:
        return f"{path.name} is not a readable .npy file ({error})"
    if list(shape) != entry["shape"] or dtype.str != entry["dtype"]:
        return (
            f"{path.name} holds {dtype.str} {list(shape)}, but {entry['dtype']} "
            f"{entry['shape']} was written"
        )
    expected = offset + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if not dtype.hasobject and size != expected:
        return f"{path.name} is {size} bytes, but its header needs {expected}"
    return None


def load_arrays(directory: Path, names: list[str]) -> dict[str, np.ndarray]:
    """Memory-map `<name>.npy` for each name: read-only and shared between processes."""
    directory = Path(directory)
    return {name: np.load(directory / f"{name}.npy", mmap_mode="r") for name in names}
