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
import csv
import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dpsgd.report.files import merge_rows_into_csv, write_csv  # noqa: E402 - the repository is on the path from here

RESULTS = REPO / "benchmarks" / "results"
COLUMNS = (
    "row",
    "dataset",
    "algorithm",
    "sharing",
    "alpha",
    "nodes",
    "rounds",
    "metric",
    "ours",
    "study",
    "bytes_per_node",
    "wall_s",
    "commit",
    "baseline",
    "status",
)
COMPLETE = "complete"


@dataclass(frozen=True)
class Row:
    """One reference result of the study and how to rerun it."""

    name: str
    preset: str  # conf/experiment/<preset>.yaml
    algorithm: str
    sharing: str
    alpha: float
    study: float | None  # what the study reported (RMSE, or accuracy in %)
    study_rounds: int  # the study's round budget (RWM's reported round can be lower: rounds_min)
    nodes: int  # default scale on one 2-core machine (the study: 96)

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
    Row(
        "ml1_rwm_partial", "movielens_1", "rwm", "partial", 0.1, 0.7460, 500, 96
    ),  # study: at round 438
    Row("ml2_dpsgd_full", "movielens_2", "dpsgd", "full", 1.0, None, 500, 96),
    Row(
        "ml1_dpsgd_random", "movielens_1", "dpsgd", "random_alpha", 1.0, 0.3189, 5000, 96
    ),  # alpha drawn per round
    Row("celeba_dpsgd_full", "celeba", "dpsgd", "full", 1.0, 89.42, 250, 29),
    Row(
        "celeba_dpsgd_partial", "celeba", "dpsgd", "partial", 0.3, 88.87, 170, 29
    ),  # the study reports round 170
    Row("celeba_rwm_full", "celeba", "rwm", "full", 1.0, 86.35, 250, 29),  # study: at round 200
    Row("femnist_dpsgd_sub05", "femnist", "dpsgd", "subsampling", 0.5, 81.03, 300, 16),
    Row("femnist_rwm_sub05", "femnist", "rwm", "subsampling", 0.5, 77.98, 300, 16),
)


def overrides_for(row: Row, args: argparse.Namespace) -> list[str]:
    """The train.py command line of a row at the requested scale."""
    return [
        f"experiment={row.preset}",
        f"algorithm={row.algorithm}",
        f"sharing={row.sharing}",
        f"alpha={row.alpha}",
        f"nodes={args.nodes or row.nodes}",
        f"rounds={args.rounds or row.study_rounds}",
        f"data_dir={args.data_dir}",
        "log.progress=false",
        *args.extra,
    ]


def row_name(row: Row, args: argparse.Namespace) -> str:
    """The row's name in the CSV and its run folder's name: `--label` marks a variant (e.g. ml1_dpsgd_full@float16)."""
    return f"{row.name}@{args.label}" if args.label else row.name


def run_row(row: Row, args: argparse.Namespace) -> Path:
    run_dir = args.runs_dir / row_name(row, args)
    command = [
        sys.executable,
        str(REPO / "train.py"),
        *overrides_for(row, args),
        f"hydra.run.dir={run_dir}",
    ]
    if args.resume:
        command.append(
            "resume=true"
        )  # continues from the last round every node saved (a long row over sessions)
    else:
        shutil.rmtree(
            run_dir, ignore_errors=True
        )  # a rerun replaces the row's run: a run never reuses a folder
    print(f"[study] {row_name(row, args)}: {' '.join(command[1:])}", flush=True)
    started = time.monotonic()
    subprocess.run(command, cwd=REPO, check=True)
    print(f"[study] {row_name(row, args)}: done in {time.monotonic() - started:.0f} s", flush=True)
    return run_dir


def no_learning_baseline(row: Row, data_dir: str) -> float:
    """The row's task scored without learning (global train mean; majority class), on the same split."""
    from hydra import compose, initialize_config_dir

    from dpsgd.building import no_learning_baseline as baseline
    from dpsgd.composition import settings_from

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        cfg = compose(
            config_name="config",
            overrides=[
                f"experiment={row.preset}",
                f"data_dir={data_dir}",
                "nodes=1",
                "eval.test_samples=null",
            ],
        )
    score = baseline(settings_from(cfg))
    return score["loss"] if row.dataset == "movielens" else 100 * score["acc"]


def run_status(summary: dict) -> str:
    """Whether a run's final row is the end of the run: a run stopped before its budget (Ctrl-C,
    a session's end) must never read as the row's result, so its line says how far it got."""
    if summary.get("diverged"):
        return "diverged"
    if summary.get("in_progress") or summary["rounds_max"] < summary["rounds"]:
        return f"stopped at round {summary['rounds_completed']} of {summary['rounds']} (continue with --resume)"
    return COMPLETE


def result_line(
    row: Row, run_dir: Path, baseline: float, commit: str, name: str | None = None
) -> dict:
    summary = json.loads((run_dir / "summary.json").read_text())
    final = summary["final"]
    if final is None:
        raise SystemExit(
            f"{run_dir / 'summary.json'} has no round that every node evaluated yet: let the run "
            f"reach its first evaluated round (eval.every) before recording it."
        )
    ratings = summary["test_loss_metric"] == "rmse"
    ours = final["test_loss"]["mean"] if ratings else 100 * final["test_acc"]["mean"]
    return {
        "row": name or row.name,
        "dataset": row.dataset,
        "algorithm": row.algorithm,
        "sharing": row.sharing,
        "alpha": "random"
        if row.sharing == "random_alpha"
        else row.alpha,  # drawn per round from alpha_list
        "nodes": summary["nodes"],
        "rounds": final["round"],
        "metric": "test_rmse" if ratings else "test_acc_pct",
        "ours": round(ours, 4),
        "study": "" if row.study is None else row.study,
        "bytes_per_node": round(final["bytes_sent"]["mean"]),
        "wall_s": round(summary["wall_s"], 1),
        "commit": commit,
        "baseline": round(baseline, 4),
        "status": run_status(summary),
    }


# What a single MovieLens number of the study could measure: every error our runs log per node and
# evaluated round (test_loss and train_loss are RMSE; test_acc the share of exact half-star matches;
# batch_loss the training objective, half the squared error plus the factor penalty), and the squares.
LOGGED_CANDIDATES = (
    "test_rmse",
    "test_mse",
    "train_rmse",
    "train_mse",
    "train_half_mse",
    "test_acc",
    "batch_loss",
)


def _measures(record: dict) -> dict[str, float]:
    test, train = record["test_loss"], record.get("train_loss")
    found = {
        "test_rmse": test,
        "test_mse": test**2,
        "test_acc": record.get("test_acc"),
        "batch_loss": record.get("batch_loss"),
    }
    if train is not None:
        found.update(train_rmse=train, train_mse=train**2, train_half_mse=train**2 / 2)
    return {name: value for name, value in found.items() if value is not None}


def logged_candidates(run_dir: Path) -> list[dict]:
    """Per evaluated round, each candidate measure as the mean over nodes, from the per-node JSONL
    (a square is taken per node before averaging, as a node reporting its own MSE would)."""
    per_round: dict[int, dict[str, list[float]]] = {}
    for path in sorted((run_dir / "nodes").glob("*.jsonl")):
        for text in path.read_text().splitlines():
            record = json.loads(text)
            if record.get("test_loss") is None:
                continue  # a round without evaluation
            values = per_round.setdefault(record["round"], {})
            for name, value in _measures(record).items():
                values.setdefault(name, []).append(value)
    return [
        {"round": number, **{name: sum(v) / len(v) for name, v in values.items()}}
        for number, values in sorted(per_round.items())
    ]


def checkpoint_candidates(run_dir: Path) -> dict:
    """Measures the JSONL cannot give, from the models every node saved at its latest common
    checkpoint: mean absolute error (also of predictions clipped and rounded to half stars),
    and errors pooled over all ratings rather than averaged over nodes, on each node's own
    train and test ratings."""
    import torch
    from omegaconf import OmegaConf

    from dpsgd.building import build_trainer, prepare_data
    from dpsgd.checkpoint import checkpoint_dir, load_checkpoint, saved_rounds
    from dpsgd.composition import settings_from

    cfg = settings_from(OmegaConf.load(run_dir / "config.yaml"))
    common = set.intersection(*(set(saved_rounds(run_dir, node)) for node in range(cfg.run.nodes)))
    if not common:
        raise SystemExit(
            f"{run_dir / 'checkpoints'} has no round that every node saved: run the row with "
            f"checkpoint.every=N (--extra) to compute measures from its models."
        )
    at, dataset = max(common), prepare_data(cfg)
    per_node = {
        f"{split}_{what}": []
        for split in ("train", "test")
        for what in ("mae", "mse", "mae_rounded")
    }
    pooled = {split: [0.0, 0.0, 0] for split in ("train", "test")}  # sum |e|, sum e^2, count
    for node in range(cfg.run.nodes):
        data = dataset.node_data(node, cfg.run.nodes, cfg.run.seed, cfg.eval.test_samples)
        trainer, flat = build_trainer(cfg, dataset, data, node)
        flat.copy_(
            load_checkpoint(checkpoint_dir(run_dir, node) / f"{at}.pt", flat.numel())["flat"]
        )
        trainer.model.eval()
        for split, (user, item, rating) in (("train", data.train), ("test", data.test)):
            with torch.no_grad():
                prediction = trainer.model(user, item)
            error = (prediction - rating).double()
            snapped = (
                prediction.clamp(0.5, 5.0) * 2
            ).round() / 2  # clipped to the scale, to the nearest half star
            per_node[f"{split}_mae_rounded"].append((snapped - rating).abs().double().mean().item())
            per_node[f"{split}_mae"].append(error.abs().mean().item())
            per_node[f"{split}_mse"].append(error.pow(2).mean().item())
            pooled[split][0] += error.abs().sum().item()
            pooled[split][1] += error.pow(2).sum().item()
            pooled[split][2] += len(error)
    found = {"round": at, **{name: sum(v) / len(v) for name, v in per_node.items()}}
    for split, (absolute, squared, count) in pooled.items():
        found.update(
            {
                f"{split}_mae_pooled": absolute / count,
                f"{split}_mse_pooled": squared / count,
                f"{split}_rmse_pooled": (squared / count) ** 0.5,
            }
        )
    return found


def metric_candidates(row: Row, args: argparse.Namespace) -> Path:
    """Which measure a rating row's study number can be: writes every candidate per evaluated round
    (and, at the last checkpoint, MAE and pooled errors) to `<figures>/<row>/metric_candidates.csv`
    and prints, per candidate, its last value and the round where it came nearest the study's."""
    run_dir = args.runs_dir / row_name(row, args)
    curve = logged_candidates(run_dir)
    if not curve:
        raise SystemExit(f"{run_dir / 'nodes'} holds no evaluated round: run the row first.")
    at_checkpoint = checkpoint_candidates(run_dir)
    lines = [
        {
            "source": "jsonl",
            "round": point["round"],
            "measure": name,
            "value": round(point[name], 6),
        }
        for point in curve
        for name in LOGGED_CANDIDATES
        if name in point
    ]
    lines += [
        {
            "source": "checkpoint",
            "round": at_checkpoint["round"],
            "measure": name,
            "value": round(value, 6),
        }
        for name, value in at_checkpoint.items()
        if name != "round"
    ]
    out = args.figures / row_name(row, args) / "metric_candidates.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    write_csv(out, ("source", "round", "measure", "value"), lines)
    print(
        f"[study] {row_name(row, args)}: the study's {row.study}; each measure at round {curve[-1]['round']} "
        f"and where it came nearest (curve: {out.relative_to(REPO) if out.is_relative_to(REPO) else out})"
    )
    for name in LOGGED_CANDIDATES:
        points = [(point["round"], point[name]) for point in curve if name in point]
        if points and row.study is not None:
            nearest = min(points, key=lambda point: abs(point[1] - row.study))
            print(
                f"  {name:<18} {points[-1][1]:.4f}   nearest {nearest[1]:.4f} at round {nearest[0]}"
            )
    for name, value in at_checkpoint.items():
        if name != "round":
            print(f"  {name:<18} {value:.4f}   (models saved at round {at_checkpoint['round']})")
    return out


def merge_into_csv(path: Path, lines: list[dict]) -> None:
    """Rows rerun now replace their old line; the others stay; the order follows ROWS, variants after."""
    merge_rows_into_csv(path, COLUMNS, lines, order=[row.name for row in ROWS])


def report_groups(rows: list[Row], args: argparse.Namespace) -> list[tuple[Path, list[Row]]]:
    """Which runs `dpsgd.report` draws into which folder after `rows` ran.

    A data set's figures (`<figures>/<dataset>/`) compare all its rows in the table, so they are
    redrawn only when every one of those rows has its run folder here. In a fresh clone the
    other rows' runs are gone: redrawing would replace their curves by the rerun rows' alone,
    so each rerun row is drawn into its own folder (`<figures>/<row>/`) and the data set's
    figures stay as they were.
    """
    in_table = set()
    if args.csv.exists():
        with open(args.csv, newline="") as file:
            in_table = {line["row"] for line in csv.DictReader(file)}
    has_run = {
        row.name for row in ROWS if (args.runs_dir / row_name(row, args) / "summary.json").exists()
    }
    groups = []
    for dataset in sorted({row.dataset for row in rows}):
        wanted = [
            row
            for row in ROWS
            if row.dataset == dataset and (row in rows or row_name(row, args) in in_table)
        ]
        drawn = [row for row in wanted if row.name in has_run]
        if len(drawn) == len(wanted):
            groups.append(
                (args.figures / (f"{dataset}@{args.label}" if args.label else dataset), drawn)
            )
            continue
        missing = [row_name(row, args) for row in wanted if row.name not in has_run]
        print(
            f"[study] {dataset}: no run folder in {args.runs_dir} for {', '.join(missing)}, so the data set's "
            f"figures stay as they are; the rows run now get their own folders",
            flush=True,
        )
        groups.extend(
            (args.figures / row_name(row, args), [row])
            for row in rows
            if row.dataset == dataset and row.name in has_run
        )
    return groups


def draw_reports(rows: list[Row], args: argparse.Namespace) -> None:
    for out, drawn in report_groups(rows, args):
        dirs = [str(args.runs_dir / row_name(row, args)) for row in drawn]
        subprocess.run(
            [sys.executable, "-m", "dpsgd.report", *dirs, "--out", str(out)],
            cwd=REPO,
            check=True,
            stdout=subprocess.DEVNULL,
        )


def git_commit() -> str:
    head = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
    )
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"],
        cwd=REPO,
        capture_output=True,
        text=True,
    ).stdout.strip()
    return (head.stdout.strip() or "unknown") + ("-dirty" if dirty else "")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--rows",
        default=",".join(row.name for row in ROWS),
        help="comma-separated row names (default: all; --list shows them)",
    )
    parser.add_argument("--nodes", type=int, help="nodes for every row (default: each row's own)")
    parser.add_argument("--rounds", type=int, help="rounds for every row (default: the study's)")
    parser.add_argument("--data-dir", default="../shared/data", help="folder holding the data sets")
    parser.add_argument(
        "--runs-dir", type=Path, default=REPO / "outputs" / "study", help="run directories"
    )
    parser.add_argument("--csv", type=Path, default=RESULTS / "study.csv", help="the results table")
    parser.add_argument(
        "--figures", type=Path, default=RESULTS / "study", help="dpsgd.report output, per data set"
    )
    parser.add_argument(
        "--extra", nargs="*", default=[], help="more train.py overrides for every row"
    )
    parser.add_argument(
        "--label",
        help="a variant of the rows (with --extra): its CSV rows and run folders are "
        "named row@LABEL, next to the rows themselves",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue each row's run from its checkpoints instead of starting it again",
    )
    parser.add_argument(
        "--no-run",
        action="store_true",
        help="record the rows from their existing run folders without running them (a run "
        "stopped early is recorded with the round it reached, its status saying so)",
    )
    parser.add_argument(
        "--metrics",
        action="store_true",
        help="rating rows: print and write every measure the study's number could be "
        "(<figures>/<row>/metric_candidates.csv), from the run folder; runs nothing",
    )
    parser.add_argument(
        "--list", action="store_true", help="print the rows and their commands, run nothing"
    )
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
    if args.metrics:
        for row in args.rows:
            metric_candidates(row, args)
        return
    commit, baselines = git_commit(), {}
    for row in args.rows:
        run_dir = args.runs_dir / row_name(row, args) if args.no_run else run_row(row, args)
        if row.preset not in baselines:
            baselines[row.preset] = no_learning_baseline(row, args.data_dir)
        line = result_line(row, run_dir, baselines[row.preset], commit, row_name(row, args))
        merge_into_csv(args.csv, [line])
        print(
            f"[study] {line['row']}: {line['metric']} {line['ours']} (study {line['study'] or 'n/a'}, "
            f"no-learning {line['baseline']}) at round {line['rounds']}",
            flush=True,
        )
    draw_reports(args.rows, args)


if __name__ == "__main__":
    main()
