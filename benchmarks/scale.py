"""Node groups at scale: seconds per round and peak memory as nodes and groupings change.

Each row runs `train.py` under `../shared/tools/peakmem` (wall time and the peak PSS of the
whole process tree, so forked ranks are not counted twice) and reads the run's own
summary. Rows:

- `ml1_96x500_g<G>`: the study's MovieLens (1) preset, 96 nodes, 500 rounds, G nodes per
  rank (G=1 is one process per node, the default);
- `synthetic_<N>x100`: N = 96, 250, 500, 1000 nodes on a synthetic ratings set the size of
  MovieLens's item side (2,000 users, 9,724 items: MovieLens's 610 users cannot feed
  1,000 nodes), 100 rounds, two ranks (one per core);
- `ml1_96x100_g96_partial`: MovieLens (1) on one rank of 96 with top-alpha messages (alpha 0.1);
- `synthetic_1000x20_332k_r<R>`: 1,000 nodes with a 332k-parameter model each on R ranks, 20
  rounds: the memory a round's messages between ranks hold;
- `synthetic_10000x10_r2`: 10,000 nodes of a MovieLens-sized model (10,000 users and 334 items:
  217k parameters) on two ranks, 10 rounds: the machine's 20 GiB must hold them;
- `femnist_96`: FEMNIST, 96 nodes, a few rounds, next to `femnist_floor`: the same 96 nodes'
  forward and backward passes and optimizer steps alone, in one process per core, the
  compute this machine cannot avoid.

Every row runs with the defaults besides its own keys (a checkpoint every 50 rounds, the
progress lines): the figures are what a user's run pays.

    python benchmarks/scale.py                         # every row (about 30 minutes on 2 cores)
    python benchmarks/scale.py --rows synthetic_1000x100 femnist_96 femnist_floor
    python benchmarks/scale.py --list

Writes `results/scale.csv` (rows merged by name).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dpsgd.report.files import merge_rows_into_csv  # noqa: E402 - the repository is on the path from here

PEAKMEM = REPO.parent / "shared" / "tools" / "peakmem"
COLUMNS = (
    "row",
    "nodes",
    "nodes_per_rank",
    "ranks",
    "rounds",
    "wall_s",
    "run_s",
    "s_per_round",
    "peak_mb",
    "final_test_rmse",
    "final_test_acc",
    "note",
)
MEMORY_LIMIT_MB = (
    21_000  # a row that would exhaust this machine's 24 GiB is stopped (peakmem), not the machine
)
SYNTHETIC = (
    "dataset=synthetic",
    "dataset.num_users=2000",
    "dataset.num_items=9724",
    "optimizer.lr=0.25",
    "train.local_steps=9",
    "train.batch_size=8",
)


def _rows(data_dir: str) -> dict[str, list[str]]:
    ml1 = ["experiment=movielens_1", "nodes=96", "rounds=500", f"data_dir={data_dir}"]
    rows = {f"ml1_96x500_g{g}": [*ml1, f"nodes_per_rank={g}"] for g in (1, 48, 96)}
    for nodes in (96, 250, 500, 1000):
        rows[f"synthetic_{nodes}x100"] = [
            *SYNTHETIC,
            f"nodes={nodes}",
            f"nodes_per_rank={nodes // 2}",
            "rounds=100",
        ]
    rows["ml1_96x100_g96_partial"] = [  # top-alpha messages between the nodes of one rank
        *ml1[:2],
        "rounds=100",
        ml1[3],
        "nodes_per_rank=96",
        "sharing=partial",
        "alpha=0.1",
    ]
    for ranks in (2, 4):  # memory held for messages between ranks: a 332k-parameter model per node
        rows[f"synthetic_1000x20_332k_r{ranks}"] = [
            "dataset=synthetic",
            "dataset.num_users=6100",
            "dataset.num_items=9724",
            "nodes=1000",
            f"nodes_per_rank={1000 // ranks}",
            "rounds=20",
        ]
    rows[
        "synthetic_10000x10_r2"
    ] = [  # the goal: 10,000 nodes of a MovieLens-sized model (217k) in 20 GiB
        "dataset=synthetic",
        "dataset.num_users=10000",
        "dataset.num_items=334",
        "nodes=10000",
        "nodes_per_rank=5000",
        "rounds=10",
    ]
    rows["femnist_96"] = [
        "experiment=femnist",
        "nodes=96",
        "nodes_per_rank=48",
        "rounds=3",
        "eval.every=1000",
        f"data_dir={data_dir}",
    ]
    return rows


def run_row(name: str, overrides: list[str], runs_dir: Path) -> dict:
    run_dir = runs_dir / name
    shutil.rmtree(
        run_dir, ignore_errors=True
    )  # this script's own scratch: a run never reuses a folder
    command = [
        str(PEAKMEM),
        "--limit-mb",
        str(MEMORY_LIMIT_MB),
        "--",
        sys.executable,
        str(REPO / "train.py"),
        *overrides,  # otherwise the defaults, checkpoints included: what a user's run pays
        f"hydra.run.dir={run_dir}",
    ]
    print("[scale]", name, " ".join(overrides), flush=True)
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{name} failed:\n{result.stdout}\n{result.stderr}")
    peak = re.search(r"wall ([\d.]+) s, peak tree PSS (\d+) MB", result.stderr + result.stdout)
    summary = json.loads((run_dir / "summary.json").read_text())
    final = summary["final"] or {}
    values = dict(o.split("=", 1) for o in overrides)
    per_rank = int(values.get("nodes_per_rank", 1))
    return {
        "row": name,
        "nodes": summary["nodes"],
        "nodes_per_rank": per_rank,
        "ranks": summary["nodes"] // per_rank,
        "rounds": summary["rounds_completed"],
        "wall_s": float(peak.group(1)),
        "run_s": round(summary["wall_s"], 1),
        "s_per_round": round(summary["wall_s"] / max(1, summary["rounds_completed"]), 4),
        "peak_mb": int(peak.group(2)),
        "final_test_rmse": _mean(final, "test_loss") if summary["dataset"] != "femnist" else "",
        "final_test_acc": _mean(final, "test_acc") if summary["dataset"] == "femnist" else "",
        "note": "",
    }


def _mean(final: dict, key: str):
    return round(final[key]["mean"], 4) if key in final else ""


def femnist_floor(data_dir: str, nodes: int = 96) -> dict:
    """Seconds per round of the 96 FEMNIST nodes' training alone: one process per core, each
    training half the nodes with the preset's optimizer and batches, no communication."""
    code = f"""
import sys, time, torch
sys.path.insert(0, {str(REPO)!r})
torch.set_num_threads(1)
from tests.conftest import compose_settings
from dpsgd.building import build_trainer, prepare_data
cfg = compose_settings("experiment=femnist", "nodes={nodes}", "data_dir={data_dir}", "cache_dir=" + sys.argv[3])
dataset = prepare_data(cfg)
part, parts = int(sys.argv[1]), int(sys.argv[2])
trainers = [build_trainer(cfg, dataset, dataset.node_data(n, {nodes}, cfg.run.seed, None), n)[0]
            for n in range(part, {nodes}, parts)]
for t in trainers: t.train_round()  # warm up
start = time.perf_counter()
for t in trainers: t.train_round()
print(time.perf_counter() - start)
"""
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as cache:
        cache_dir = os.environ.get("DPSGD_CACHE", cache)
        workers = [
            subprocess.Popen(
                [sys.executable, "-c", code, str(i), str(cores), cache_dir],
                cwd=REPO,
                stdout=subprocess.PIPE,
                text=True,
            )
            for i in range(cores)
        ]
        seconds = [float(w.communicate()[0].strip().splitlines()[-1]) for w in workers]
    return {
        "row": "femnist_floor",
        "nodes": nodes,
        "nodes_per_rank": nodes // cores,
        "ranks": cores,
        "rounds": 1,
        "wall_s": "",
        "run_s": "",
        "s_per_round": round(max(seconds), 4),
        "peak_mb": "",
        "final_test_rmse": "",
        "final_test_acc": "",
        "note": "training alone (47 SGD steps of 16 images per node), no communication",
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", nargs="*", help="row names (default: all)")
    parser.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--runs-dir", default=str(REPO / "outputs" / "scale"))
    parser.add_argument("--csv", default=str(REPO / "benchmarks" / "results" / "scale.csv"))
    parser.add_argument("--list", action="store_true")
    args = parser.parse_args(argv)
    rows = _rows(args.data_dir)
    names = args.rows or [*rows, "femnist_floor"]
    if args.list:
        for name in [*rows, "femnist_floor"]:
            print(name, " ".join(rows.get(name, ["(training alone, see femnist_floor)"])))
        return
    for name in names:
        started = time.monotonic()
        line = (
            femnist_floor(args.data_dir)
            if name == "femnist_floor"
            else run_row(name, rows[name], Path(args.runs_dir))
        )
        merge_rows_into_csv(Path(args.csv), COLUMNS, [line], order=[row for row in rows])
        print(f"[scale] {name}: {line} ({time.monotonic() - started:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
