"""Where a run's start-up goes: seconds per phase from launch to round 1, and the rounds after.

Runs `train.py` (standalone) a few times with `DPSGD_STARTUP_TRACE` set, so that every
start-up step (`dpsgd.progress.startup_step`) appends its wall clock and its process's CPU
time to a trace file. Phases:

- `imports`: launch to the end of train.py's imports (the interpreter, torch, Hydra, dpsgd);
- `hydra`: composing the config (and Hydra's run folder and logging);
- `config_and_data`: checking the config, parsing or memory-mapping the data set, the partition;
- `fork`: forking the ranks until the last one is connected to the rendezvous store;
- `process_group`: until gloo's process group is ready;
- `build_nodes`: models, data slices, links, checkpoints, rank 0's aggregator (until the last rank is built);
- `start_barrier`: until every rank passed the start barrier;
- `launch_to_round_1`: the sum, launch to the start of round 1 (the number the README quotes);
- `first_round`, `rest`: round 1, then everything until the process exited.

Wall seconds are measured on the critical path (the last rank to reach a step); CPU seconds
are the CPU time of the process that ran the phase (the parent, else that last rank), which
the other load on a shared machine disturbs less than wall time. The median of the repeats
is reported.

    python benchmarks/startup.py                       # the issue's run: 16 grouped MovieLens nodes x 50 rounds
    python benchmarks/startup.py --repeats 5 --out /tmp/startup.json -- nodes=8 rounds=20

Writes `results/startup.json` (every repeat and the medians) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dpsgd.progress import STARTUP_TRACE_ENV  # noqa: E402 - the repository is on the path from here

DEFAULT_OVERRIDES = (
    "experiment=movielens_1",
    "nodes=16",
    "nodes_per_rank=16",
    "rounds=50",
    "checkpoint.every=0",
)
# (phase, step it starts at, step it ends at); "launch" and "exit" are the benchmark's own clock.
PHASES = (
    ("hydra", "imported", "config composed"),
    ("config_and_data", "config composed", "data ready"),
    ("fork", "spawn", "rank started"),
    ("process_group", "rank started", "process group"),
    ("build_nodes", "process group", "nodes built"),
    ("start_barrier", "nodes built", "rounds start"),
    ("first_round", "rounds start", "first round done"),
    ("rest", "first round done", "exit"),
)


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_once(overrides: list[str], scratch: Path, index: int) -> dict:
    """One traced run; returns each phase's wall and CPU seconds."""
    trace = scratch / f"trace-{index}.jsonl"
    env = {**os.environ, STARTUP_TRACE_ENV: str(trace), "DPSGD_CACHE": str(scratch / "cache")}
    command = [
        sys.executable,
        str(REPO / "train.py"),
        *overrides,
        f"hydra.run.dir={scratch / f'run-{index}'}",
    ]
    cpu_before, launched = _children_cpu_s(), time.time()
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    exited = time.time()
    if result.returncode != 0:
        raise SystemExit(
            f"train.py failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
        )
    steps = [json.loads(line) for line in trace.read_text().splitlines()]
    last = {}  # step -> the last process to reach it (the critical path)
    for entry in steps:
        if entry["step"] not in last or entry["wall"] > last[entry["step"]]["wall"]:
            last[entry["step"]] = entry
    last["exit"] = {"wall": exited, "cpu": None, "pid": None}
    imported = last["imported"]
    phases = {"imports": {"wall_s": imported["wall"] - launched, "cpu_s": imported["cpu"]}}
    for name, begin, end in PHASES:
        start, stop = last[begin], last[end]
        same_process = stop["pid"] == start["pid"] and stop["cpu"] is not None
        # A phase that crosses into a forked rank: that rank's CPU since it began (it starts at 0).
        cpu = stop["cpu"] - start["cpu"] if same_process else stop["cpu"]
        phases[name] = {"wall_s": stop["wall"] - start["wall"], "cpu_s": cpu}
    # CPU on the critical path: the parent's until it forked, then the last rank's own.
    phases["launch_to_round_1"] = {
        "wall_s": last["rounds start"]["wall"] - launched,
        "cpu_s": last["spawn"]["cpu"] + last["rounds start"]["cpu"],
    }
    phases["total"] = {"wall_s": exited - launched, "cpu_s": _children_cpu_s() - cpu_before}
    return phases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--data-dir", default=os.environ.get("DPSGD_DATA", str(REPO.parent / "shared" / "data"))
    )
    parser.add_argument(
        "--out", type=Path, default=REPO / "benchmarks" / "results" / "startup.json"
    )
    parser.add_argument(
        "overrides", nargs="*", help="train.py overrides (default: the issue's MovieLens run)"
    )
    args = parser.parse_args()
    overrides = args.overrides or [*DEFAULT_OVERRIDES, f"data_dir={args.data_dir}"]
    with tempfile.TemporaryDirectory(prefix="dpsgd-startup-") as scratch:
        scratch = Path(scratch)
        run_once(
            overrides, scratch, -1
        )  # builds the data cache; a warm cache is what a second run sees
        runs = []
        for index in range(args.repeats):
            runs.append(run_once(overrides, scratch, index))
    order = [
        "imports",
        *(name for name, _, _ in PHASES[:6]),
        "launch_to_round_1",
        *(name for name, _, _ in PHASES[6:]),
        "total",
    ]
    medians = {
        name: {kind: _median([run[name][kind] for run in runs]) for kind in ("wall_s", "cpu_s")}
        for name in order
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    # No absolute path of this machine in a result file.
    recorded = [
        "data_dir=<data_dir>" if item.startswith("data_dir=") else item for item in overrides
    ]
    args.out.write_text(
        json.dumps({"overrides": recorded, "repeats": runs, "median": medians}, indent=1) + "\n"
    )
    print(f"{'phase':<20}{'wall s':>9}{'cpu s':>9}")
    for name in order:
        cpu = medians[name]["cpu_s"]
        print(f"{name:<20}{medians[name]['wall_s']:>9.2f}{'' if cpu is None else f'{cpu:.2f}':>9}")
    print(f"(median of {args.repeats} runs; written to {args.out})")


def _median(values: list) -> float | None:
    values = [value for value in values if value is not None]
    return statistics.median(values) if values else None


if __name__ == "__main__":
    main()
