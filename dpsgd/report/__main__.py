"""`python -m dpsgd.report RUN_OR_SWEEP_DIR [...] --out DIR`: figures and tables for finished runs."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dpsgd.report.compare import final_metrics
from dpsgd.report.files import (
    DEFAULT_FORMATS,
    FORMATS,
    FormatError,
    format_table,
    parse_formats,
    write_report,
)
from dpsgd.report.runs import ReportError, load_runs

EXIT_BAD_INPUT = 2


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m dpsgd.report",
        description="Compare finished dpsgd runs against rounds, wall time and bytes sent. Every directory "
        "under the given paths that holds summary.json is one run (a sweep directory gives all "
        "its jobs).",
    )
    parser.add_argument(
        "paths",
        nargs="+",
        type=Path,
        metavar="RUN_OR_SWEEP_DIR",
        help="run directories, sweep directories, or folders holding either",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("report"),
        help="folder for the figures and CSV tables (default: ./report)",
    )
    parser.add_argument(
        "--target",
        type=float,
        default=None,
        help="a test metric value (e.g. 0.95 for RMSE, 0.8 for accuracy): the table adds the "
        "first round, time and bytes at which each run reached it",
    )
    parser.add_argument(
        "--bands",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="draw a band of one std across nodes around each curve (off by default: the "
        "nodes' spread is wide, and several runs' bands hide each other's means)",
    )
    parser.add_argument(
        "--formats",
        default=",".join(DEFAULT_FORMATS),
        help=f"figure files to write, comma-separated from {', '.join(FORMATS)} "
        f"(default: {','.join(DEFAULT_FORMATS)}: PNG to look at, PDF for a paper)",
    )
    parser.add_argument(
        "--baseline",
        type=float,
        default=None,
        help="the no-learning test metric to draw for runs whose summary.json has none "
        "(runs record it since the report draws it; e.g. 1.0413 for MovieLens RMSE)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        formats = parse_formats(args.formats)
        runs = load_runs(args.paths, baseline=args.baseline)
    except (ReportError, FormatError) as error:
        print(f"dpsgd.report: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    written = write_report(runs, args.out, args.target, bands=args.bands, formats=formats)
    print(format_table([final_metrics(run, args.target) for run in runs]))
    for run in runs:
        if run.source == "summary":
            print(
                f"note: {run.label}: no node logs for every node in {run.path}/nodes; "
                f"curves come from summary.json (evaluated rounds only)"
            )
    missing = [run.label for run in runs if run.no_learning is None]
    if missing:
        print(
            f"note: no no-learning line for {', '.join(missing)}: summary.json has no `no_learning` "
            f"(a run from before it was recorded); pass --baseline VALUE to draw one"
        )
    print(f"wrote {len(written)} files:")
    for path in written:
        print(f"  {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
