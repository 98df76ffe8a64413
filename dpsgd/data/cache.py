"""Parse a data set once per machine, then memory-map it in every rank.

With 96 ranks on a machine, parsing and holding 96 copies of a data set costs minutes
and gigabytes; instead the first rank to arrive parses into a directory of .npy files
and the rest memory-map those files, sharing the pages through the OS page cache.
"""

import fcntl
import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

# Bump when the layout of any cached directory changes, so old caches are not reused.
_CACHE_FORMAT = 1


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


def build_once(target: Path, build: Callable[[Path], None]) -> Path:
    """Return `target`, building it with `build(tmpdir)` if it does not exist yet.

    Many processes may call this at once: an exclusive flock on a sibling lock file lets
    one build while the others wait, and the build goes to a temporary directory that is
    renamed into place only when complete, so nobody ever sees a half-written cache.
    """
    target = Path(target)
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    lock_path = target.with_name(target.name + ".lock")
    with open(lock_path, "a") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            if target.exists():
                return target
            # Holding the lock, any leftover temp directory is from a builder that died.
            for stale in target.parent.glob(target.name + ".tmp-*"):
                shutil.rmtree(stale, ignore_errors=True)
            tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
            try:
                build(tmp)
                # mkdtemp makes the directory private (0700); the cache is for everyone.
                tmp.chmod(0o755)
                os.replace(tmp, target)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)
    return target


def load_arrays(directory: Path, names: list[str]) -> dict[str, np.ndarray]:
    """Memory-map `<name>.npy` for each name: read-only and shared between processes."""
    directory = Path(directory)
    return {name: np.load(directory / f"{name}.npy", mmap_mode="r") for name in names}
