"""The study's reference results, rerun: one `python train.py` per row, one CSV of finals.

Each row is a SPEC §6 reference result (preset, pattern, sharing method) with the number
the study reported. A row runs through the normal entry point (`train.py` with the
row's overrides, the study's rounds unless `--rounds` says otherwise), then its final
across-node mean is written to `benchmarks/results/study.csv` next to the study's
number and the task's no-learning baseline (global-mean RMSE; majority-class accuracy),
and `python -m dpsgd.report` draws each data set's rows into `results/study/<dataset>/`.

    python benchmarks/study.py --data-dir ../shared/data                   # every row, this machine's scale
    python benchmarks/study.py --rows ml1_dpsgd_full,ml1_rwm_full --rounds 100
    python benchmarks/study.py --rows celeba_dpsgd_full --nodes 8 --rounds 30 --extra eval.every=5

Rows already in the CSV that were not rerun are kept, so rows can be run one at a time.
`--list` prints the rows and the commands they would run.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dpsgd.report.files import merge_rows_into_csv  # noqa: E402 - the repository is on the path from here

RESULTS = REPO / "benchmarks" / "results"
COLUMNS = ("row", "dataset", "algorithm", "sharing", "alpha", "nodes", "rounds", "metric", "ours", "study",
           "bytes_per_node", "wall_s", "commit", "baseline")


@dataclass(frozen=True)
class Row:
    """One reference result of the study and how to rerun it."""

    name: str
    preset: str            # conf/experiment/<preset>.yaml
    algorithm: str
    sharing: str
    alpha: float
    study: float | None    # what the study reported (RMSE, or accuracy in %)
    study_rounds: int      # the study's round budget (RWM's reported round can be lower: rounds_min)
    nodes: int             # default scale on one 2-core machine (the study: 96)

    @property
    def dataset(self) -> str:
        return "movielens" if self.preset.startswith("movielens") else self.preset


# SPEC §6 "Reference results reported (96 nodes)". Partial sharing in the study used both
# accumulation switches, which are the defaults of conf/sharing/partial.yaml. CelebA runs
# one node per celebrity that has images here (29), FEMNIST 16 nodes: see README "Study".
ROWS = (
    Row("ml1_dpsgd_full", "movielens_1", "dpsgd", "full", 1.0, 0.8908, 500, 96),
    Row("ml1_rwm_full", "movielens_1", "rwm", "full", 1.0, 0.9754, 500, 96),
    Row("ml1_dpsgd_partial", "movielens_1", "dpsgd", "partial", 0.1, 0.6243, 500, 96),
    Row("ml1_rwm_partial", "movielens_1", "rwm", "partial", 0.1, 0.7460, 500, 96),  # study: at round 438
    Row("ml2_dpsgd_full", "movielens_2", "dpsgd", "full", 1.0, None, 500, 96),
    Row("celeba_dpsgd_full", "celeba", "dpsgd", "full", 1.0, 89.42, 250, 29),
    Row("celeba_rwm_full", "celeba", "rwm", "full", 1.0, 86.35, 250, 29),  # study: at round 200
    Row("femnist_dpsgd_sub05", "femnist", "dpsgd", "subsampling", 0.5, 81.03, 300, 16),
    Row("femnist_rwm_sub05", "femnist", "rwm", "subsampling", 0.5, 77.98, 300, 16),
)


def overrides_for(row: Row, args: argparse.Namespace) -> list[str]:
    """The train.py command line of a row at the requested scale."""
    return [f"experiment={row.preset}", f"algorithm={row.algorithm}", f"sharing={row.sharing}",
            f"alpha={row.alpha}", f"nodes={args.nodes or row.nodes}", f"rounds={args.rounds or row.study_rounds}",
            f"data_dir={args.data_dir}", "log.progress=false", *args.extra]


def row_name(row: Row, args: argparse.Namespace) -> str:
    """The row's name in the CSV and its run folder's name: `--label` marks a variant (e.g. ml1_dpsgd_full@float16)."""
    return f"{row.name}@{args.label}" if args.label else row.name


def run_row(row: Row, args: argparse.Namespace) -> Path:
    run_dir = args.runs_dir / row_name(row, args)
    command = [sys.executable, str(REPO / "train.py"), *overrides_for(row, args), f"hydra.run.dir={run_dir}"]
    if args.resume:
        command.append("resume=true")  # continues from the last round every node saved (a long row over sessions)
    else:
        shutil.rmtree(run_dir, ignore_errors=True)  # a rerun replaces the row's run: a run never reuses a folder
    print(f"[study] {row_name(row, args)}: {' '.join(command[1:])}", flush=True)
    started = time.monotonic()
    subprocess.run(command, cwd=REPO, check=True)
    print(f"[study] {row_name(row, args)}: done in {time.monotonic() - started:.0f} s", flush=True)
    return run_dir


def no_learning_baseline(row: Row, data_dir: str) -> float:
    """The row's task scored without learning (global train mean; majority class), on the same split."""
    from hydra import compose, initialize_config_dir

    from dpsgd.experiment import no_learning_baseline as baseline

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        cfg = compose(config_name="config", overrides=[f"experiment={row.preset}", f"data_dir={data_dir}",
                                                       "nodes=1", "eval.test_samples=null"])
    score = baseline(cfg)
    return score["loss"] if row.dataset == "movielens" else 100 * score["acc"]


def result_line(row: Row, run_dir: Path, baseline: float, commit: str, name: str | None = None) -> dict:
    summary = json.loads((run_dir / "summary.json").read_text())
    final = summary["final"]
    ratings = summary["test_loss_metric"] == "rmse"
    ours = final["test_loss"]["mean"] if ratings else 100 * final["test_acc"]["mean"]
    return {"row": name or row.name, "dataset": row.dataset, "algorithm": row.algorithm, "sharing": row.sharing,
            "alpha": row.alpha, "nodes": summary["nodes"], "rounds": final["round"],
            "metric": "test_rmse" if ratings else "test_acc_pct", "ours": round(ours, 4),
            "study": "" if row.study is None else row.study, "bytes_per_node": round(final["bytes_sent"]["mean"]),
            "wall_s": round(summary["wall_s"], 1), "commit": commit, "baseline": round(baseline, 4)}


def merge_into_csv(path: Path, lines: list[dict]) -> None:
    """Rows rerun now replace their old line; the others stay; the order follows ROWS, variants after."""
    merge_rows_into_csv(path, COLUMNS, lines, order=[row.name for row in ROWS])


def draw_reports(rows: list[Row], args: argparse.Namespace) -> None:
    for dataset in sorted({row.dataset for row in rows}):
        dirs = [str(args.runs_dir / row_name(row, args)) for row in ROWS if row.dataset == dataset
                and (args.runs_dir / row_name(row, args) / "summary.json").exists()]
        out = args.figures / (f"{dataset}@{args.label}" if args.label else dataset)  # a variant's own figures
        subprocess.run([sys.executable, "-m", "dpsgd.report", *dirs, "--out", str(out)],
                       cwd=REPO, check=True, stdout=subprocess.DEVNULL)


def git_commit() -> str:
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                           capture_output=True, text=True).stdout.strip()
    return (head.stdout.strip() or "unknown") + ("-dirty" if dirty else "")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default=",".join(row.name for row in ROWS),
                        help="comma-separated row names (default: all; --list shows them)")
    parser.add_argument("--nodes", type=int, help="nodes for every row (default: each row's own)")
    parser.add_argument("--rounds", type=int, help="rounds for every row (default: the study's)")
    parser.add_argument("--data-dir", default="../shared/data", help="folder holding the data sets")
    parser.add_argument("--runs-dir", type=Path, default=REPO / "outputs" / "study", help="run directories")
    parser.add_argument("--csv", type=Path, default=RESULTS / "study.csv", help="the results table")
    parser.add_argument("--figures", type=Path, default=RESULTS / "study", help="dpsgd.report output, per data set")
    parser.add_argument("--extra", nargs="*", default=[], help="more train.py overrides for every row")
    parser.add_argument("--label", help="a variant of the rows (with --extra): its CSV rows and run folders are "
                                         "named row@LABEL, next to the rows themselves")
    parser.add_argument("--resume", action="store_true",
                        help="continue each row's run from its checkpoints instead of starting it again")
    parser.add_argument("--list", action="store_true", help="print the rows and their commands, run nothing")
    args = parser.parse_args(argv)
    args.data_dir = str(Path(args.data_dir).resolve())
    known = {row.name: row for row in ROWS}
    unknown = [name for name in args.rows.split(",") if name not in known]
    if unknown:
        parser.error(f"unknown rows {unknown}; choose from {list(known)}")
    args.rows = [known[name] for name in args.rows.split(",")]
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.list:
        for row in args.rows:
            print(f"{row.name}: python train.py {' '.join(overrides_for(row, args))}")
        return
    commit, baselines = git_commit(), {}
    for row in args.rows:
        run_dir = run_row(row, args)
        if row.preset not in baselines:
            baselines[row.preset] = no_learning_baseline(row, args.data_dir)
        line = result_line(row, run_dir, baselines[row.preset], commit, row_name(row, args))
        merge_into_csv(args.csv, [line])
        print(f"[study] {line['row']}: {line['metric']} {line['ours']} (study {line['study'] or 'n/a'}, "
              f"no-learning {line['baseline']}) at round {line['rounds']}", flush=True)
    draw_reports(args.rows, args)


if __name__ == "__main__":
    main()
