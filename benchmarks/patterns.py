"""The communication patterns side by side: D-PSGD, RWM, Epidemic Learning and hybrid on one preset.

One Hydra multirun (the command is printed) runs `algorithm=dpsgd,rwm,epidemic,hybrid` at the
study's MovieLens (1) preset (96 nodes, 500 rounds, all 96 nodes on one rank: the node groups
that make this a few minutes), then `python -m dpsgd.report` draws the figures and writes the
table with `--target` (the first round, time and bytes at which each run's mean test RMSE
reached it). Last, the consensus distances the runs logged (estimated from count sketches,
`dpsgd.consensus`) are checked against the exact ones, recomputed in float64 from the models
the nodes saved in their last two checkpoints.

    python benchmarks/patterns.py --data-dir ../shared/data             # about 5 minutes on 2 cores
    python benchmarks/patterns.py --sweep-dir outputs/patterns --no-run  # report an existing sweep again

Writes `results/patterns/` (the report's figures and CSVs, and `consensus_check.csv`).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dpsgd.checkpoint import load_checkpoint, saved_rounds  # noqa: E402 - the repository is on the path from here
from dpsgd.report.files import write_csv  # noqa: E402
from dpsgd.report.runs import shown_dir  # noqa: E402

ALGORITHMS = "dpsgd,rwm,epidemic,hybrid"
CHECK_COLUMNS = ("run_dir", "algorithm", "round", "logged", "exact", "relative_error")


def sweep_command(data_dir: str, sweep_dir: Path, extra: list[str]) -> list[str]:
    return [
        sys.executable,
        str(REPO / "train.py"),
        "-m",
        "experiment=movielens_1",
        f"algorithm={ALGORITHMS}",
        "nodes=96",
        "nodes_per_rank=96",
        "checkpoint.every=100",
        f"data_dir={data_dir}",
        f"hydra.sweep.dir={sweep_dir}",
        *extra,
    ]


def consensus_rows(sweep_dir: Path) -> list[dict]:
    """Logged against exact consensus distance at every round all nodes of a run saved a checkpoint of."""
    rows = []
    for summary_path in sorted(sweep_dir.glob("*/summary.json")):
        run_dir, summary = summary_path.parent, json.loads(summary_path.read_text())
        logged = {entry["round"]: entry["consensus_distance"] for entry in summary["per_round"]}
        common = set.intersection(
            *(set(saved_rounds(run_dir, node)) for node in range(summary["nodes"]))
        )
        for round_number in sorted(common):
            models = np.stack(
                [
                    load_checkpoint(run_dir / "checkpoints" / str(node) / f"{round_number}.pt")[
                        "flat"
                    ]
                    .double()
                    .numpy()
                    for node in range(summary["nodes"])
                ]
            )
            exact = float(np.mean(np.sum((models - models.mean(axis=0)) ** 2, axis=1)))
            # Named as the report names runs (relative to the sweep's folder): no machine's absolute path.
            rows.append(
                {
                    "run_dir": shown_dir(run_dir, [sweep_dir]),
                    "algorithm": summary["algorithm"],
                    "round": round_number,
                    "logged": logged.get(round_number),
                    "exact": exact,
                    "relative_error": None
                    if logged.get(round_number) is None
                    else logged[round_number] / exact - 1,
                }
            )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--sweep-dir", type=Path, default=REPO / "outputs" / "patterns")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "patterns")
    parser.add_argument(
        "--target", type=float, default=0.95, help="test RMSE whose first round the table gives"
    )
    parser.add_argument("--no-run", action="store_true", help="report an existing sweep directory")
    parser.add_argument("extra", nargs="*", help="more overrides for every job, e.g. rounds=100")
    args = parser.parse_args(argv)
    if not args.no_run:
        command = sweep_command(args.data_dir, args.sweep_dir, args.extra)
        print("$", " ".join(command), flush=True)
        subprocess.run(command, cwd=REPO, check=True)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "dpsgd.report",
            str(args.sweep_dir),
            "--out",
            str(args.out),
            "--target",
            str(args.target),
        ],
        cwd=REPO,
        check=True,
    )
    rows = consensus_rows(args.sweep_dir)
    write_csv(args.out / "consensus_check.csv", CHECK_COLUMNS, rows)
    for row in rows:
        print(
            f"{row['algorithm']:>8} round {row['round']}: logged {row['logged']:.6g}, exact {row['exact']:.6g}, "
            f"relative error {row['relative_error']:+.2%}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
