"""A run owns its folder: a fresh run never writes into a folder that holds another run's results.

Two runs sharing a folder tear each other's JSONL lines, delete each other's checkpoints
and overwrite each other's config, and both still exit 0. So a fresh run claims its
folder with an exclusive marker file (created with O_EXCL, so of two runs started at the
same moment exactly one gets it) and refuses a folder that already holds results;
`resume=true` is the only way to write into an existing run. The claim is made by a
Hydra callback (`dpsgd.composition.ClaimRunFolder`) before Hydra writes anything into the
folder, and result files that are rewritten during a run are replaced atomically (`write_atomic`).
"""

from __future__ import annotations

import json
import os
import shutil
from datetime import datetime
from pathlib import Path

from dpsgd.checkpoint import checkpoint_dir, saved_rounds
from dpsgd.errors import ConfigError

MARKER = ".dpsgd-run"
HYDRA_RECORD = (
    ".hydra"  # Hydra's record of the command, written into the folder before the run starts
)
# What a run writes into its folder; any of them means the folder holds a run.
RESULTS = ("config.yaml", "summary.json", "partition.json", "nodes", "checkpoints", MARKER)


def claim(run_dir: Path) -> None:
    """Make `run_dir` this fresh run's own, or raise ConfigError if it holds another run."""
    run_dir = Path(run_dir)
    held = [name for name in RESULTS if (run_dir / name).exists()]
    if not held:
        run_dir.mkdir(parents=True, exist_ok=True)
        try:
            descriptor = os.open(run_dir / MARKER, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            held = [MARKER]  # another run claimed it a moment ago
        else:
            os.write(descriptor, f"{os.getpid()} {datetime.now().isoformat()}\n".encode())
            os.close(descriptor)
            return
    raise ConfigError(
        f"The run folder {run_dir} already holds a run ({', '.join(held)}); a fresh run never "
        "writes into another run's folder. Leave hydra.run.dir unset for a new timestamped "
        f"folder, choose another one, or continue that run with `hydra.run.dir={run_dir} "
        "resume=true`."
    )


def check_fresh_node(run_dir: Path, node: int) -> None:
    """Under torchrun each machine has its own copy of the folder: a fresh node's files must not exist."""
    held = [
        path
        for path in (node_log_path(run_dir, node), checkpoint_dir(run_dir, node))
        if path.exists()
    ]
    if held:
        raise ConfigError(
            f"The run folder {run_dir} already holds node {node}'s results ({held[0]}) on this "
            "machine; a fresh run never writes into another run's folder. Choose another "
            f"hydra.run.dir, or continue that run with `hydra.run.dir={run_dir} resume=true`.",
            rank_specific=True,
        )


def release(run_dir: Path) -> None:
    """Give the folder back when the run stopped before writing any result (e.g. a config error).

    A folder that then holds nothing but Hydra's record of the command (`.hydra/`), or nothing,
    is removed, so a failed run or sweep job leaves no folder without results. Only this process's own claim is
    given back, and a folder holding anything else is kept as it is.
    """
    run_dir = Path(run_dir)
    if any((run_dir / name).exists() for name in RESULTS if name != MARKER):
        return
    marker = run_dir / MARKER
    try:
        ours = marker.read_text().split()[:1] == [str(os.getpid())]
    except OSError:
        ours = False
    if ours:
        marker.unlink(missing_ok=True)
    try:
        left = {entry.name for entry in run_dir.iterdir()}
        if left <= {HYDRA_RECORD} and (not left or (run_dir / HYDRA_RECORD).is_dir()):
            shutil.rmtree(run_dir / HYDRA_RECORD, ignore_errors=True)
            run_dir.rmdir()
    except OSError:
        pass  # gone already (another rank of this machine removed it), or something appeared: keep it


def resume_hint(run_dir: Path, nodes: int, argv: list[str]) -> str:
    """How far an interrupted run got and the exact command that continues it."""
    completed = min(last_logged_round(run_dir, node) for node in range(nodes))
    common = set.intersection(*(set(saved_rounds(run_dir, node)) for node in range(nodes)))
    if not common:
        return (
            f"every node completed round {completed}; no checkpoint every node saved exists "
            f"(checkpoint.every), so the run cannot be resumed. Results so far are in {run_dir}."
        )
    kept = [arg for arg in argv if not arg.startswith(("hydra.run.dir=", "resume="))]
    command = " ".join(
        ["python", "train.py", *kept, f"hydra.run.dir={Path(run_dir).resolve()}", "resume=true"]
    )
    return (
        f"every node completed round {completed}; the last checkpoint is round {max(common)}. "
        f"Continue with: {command}"
    )


# Where a node's JSONL lives and how far it got: the run folder's layout (dpsgd.run_outputs, which
# writes the logs, imports this module).
def node_log_path(run_dir: Path, node: int) -> Path:
    return Path(run_dir) / "nodes" / f"{node}.jsonl"


def last_logged_round(run_dir: Path, node: int) -> int:
    """The last round in a node's JSONL (0 if none). A line torn by a crash is no round."""
    path = node_log_path(run_dir, node)
    rounds = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            rounds.append(json.loads(line)["round"])
        except (ValueError, KeyError, TypeError):
            pass
    return max(rounds, default=0)


def write_atomic(path: Path, text: str) -> None:
    """Replace `path` with `text` so that a reader (or a crash) never sees a half-written file."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    temporary.write_text(text)
    os.replace(temporary, path)
