"""`python -m dpsgd.report RUN_OR_SWEEP_DIR [...] --out DIR`: figures and tables for finished runs."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dpsgd.report.compare import final_metrics
from dpsgd.report.files import format_table, write_report
from dpsgd.report.runs import ReportError, load_runs

EXIT_BAD_INPUT = 2


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m dpsgd.report",
        description="Compare finished dpsgd runs against rounds, wall time and bytes sent. Every directory "
                    "under the given paths that holds summary.json is one run (a sweep directory gives all "
                    "its jobs).")
    parser.add_argument("paths", nargs="+", type=Path, metavar="RUN_OR_SWEEP_DIR",
                        help="run directories, sweep directories, or folders holding either")
    parser.add_argument("--out", type=Path, default=Path("report"),
                        help="folder for the PNG figures and CSV tables (default: ./report)")
    parser.add_argument("--target", type=float, default=None,
                        help="a test metric value (e.g. 0.95 for RMSE, 0.8 for accuracy): the table adds the "
                             "first round, time and bytes at which each run reached it")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        runs = load_runs(args.paths)
    except ReportError as error:
        print(f"dpsgd.report: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    written = write_report(runs, args.out, args.target)
    print(format_table([final_metrics(run, args.target) for run in runs]))
    for run in runs:
        if run.source == "summary":
            print(f"note: {run.label}: no node logs for every node in {run.path}/nodes; "
                  f"curves come from summary.json (evaluated rounds only)")
    print(f"wrote {len(written)} files:")
    for path in written:
        print(f"  {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
