"""Writing the report: figures (PNG, PDF, SVG), CSV tables, and the final-metrics table as text.

CSV cells hold full-precision numbers (Python's shortest round-trip repr) so that a
table can be checked against the logs exactly; an empty cell means "not measured".
Tables name each run's folder relative to the folder the report was given
(`Run.shown_dir`), never by an absolute path: committed tables read the same anywhere.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Iterable, Sequence

from dpsgd.report.compare import (
    AXES,
    FINAL_COLUMNS,
    Cut,
    consensus_curve,
    equal_bytes,
    equal_time,
    final_metrics,
    test_curve,
    train_curve,
)
from dpsgd.report.plots import bytes_split_figure, consensus_figure, curve_figure, cut_figure
from dpsgd.report.runs import Run

AXIS_NAMES = {"round": "rounds", "time_s": "time", "bytes_sent": "bytes"}
CURVE_COLUMNS = (
    "label",
    "run_dir",
    "quantity",
    "key",
    "round",
    "time_s",
    "bytes_sent",
    "mean",
    "std",
    "nodes",
)
FIGURE_DPI = 150
FORMATS = ("png", "pdf", "svg")
# PNG to look at, PDF for a paper; SVG when asked (--formats png,pdf,svg).
DEFAULT_FORMATS = ("png", "pdf")
# No creation dates in vector files: a redrawn figure with the same data is the same file.
UNDATED = {"pdf": {"CreationDate": None}, "svg": {"Date": None}}


class FormatError(ValueError):
    """--formats named a format the report does not write."""


def parse_formats(text: str) -> tuple[str, ...]:
    """ "png,pdf,svg" -> ("png", "pdf", "svg"); an unknown name is a one-line error naming the choices."""
    formats = tuple(dict.fromkeys(part.strip().lower() for part in text.split(",") if part.strip()))
    unknown = [name for name in formats if name not in FORMATS]
    if unknown or not formats:
        raise FormatError(
            f"--formats {text!r}: {', '.join(unknown) or 'no format'} is not one the report writes; "
            f"give a comma-separated list of {', '.join(FORMATS)} (e.g. --formats png,pdf)"
        )
    return formats


def write_report(
    runs: list[Run],
    out: Path,
    target: float | None = None,
    bands: bool = False,
    formats: Sequence[str] = DEFAULT_FORMATS,
) -> list[Path]:
    """Every figure and table of the report into `out`; returns the files written, in order.

    `target`: a test metric value (e.g. RMSE 0.95) whose first round, time and bytes the table gives.
    `bands`: draw the +-1 std band across nodes around each curve (off: several runs' bands hide the means).
    `formats`: the figure files written per figure, from FORMATS.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = [
        write_csv(
            out / "final_metrics.csv", FINAL_COLUMNS, [final_metrics(run, target) for run in runs]
        ),
        write_csv(out / "curves.csv", CURVE_COLUMNS, curve_rows(runs)),
    ]
    for quantity, stem in (("test", "test_metric"), ("train", "train_loss")):
        for axis in AXES:
            written += save(
                curve_figure(runs, quantity, axis, bands),
                out / f"{stem}_vs_{AXIS_NAMES[axis]}",
                formats,
            )
    for name, cuts in (("equal_time", equal_time(runs)), ("equal_bytes", equal_bytes(runs))):
        written.append(write_csv(out / f"{name}.csv", cut_columns(cuts[0].axis), cut_rows(cuts)))
        written += save(cut_figure(cuts, runs), out / name, formats)
    written += save(bytes_split_figure(runs), out / "bytes_data_vs_meta", formats)
    if any(consensus_curve(run) for run in runs):
        written += save(consensus_figure(runs), out / "consensus_distance", formats)
    return written


def save(figure, stem: Path, formats: Sequence[str] = DEFAULT_FORMATS) -> list[Path]:
    """`figure` as `<stem>.<format>` for each format; the paths written."""
    paths = []
    for name in formats:
        path = Path(stem).with_name(f"{Path(stem).name}.{name}")
        figure.savefig(path, dpi=FIGURE_DPI, metadata=UNDATED.get(name))
        paths.append(path)
    return paths


def write_csv(path: Path, columns: Iterable[str], rows: Iterable[dict]) -> Path:
    with open(path, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(columns))
        writer.writeheader()
        for row in rows:
            writer.writerow({key: "" if value is None else value for key, value in row.items()})
    return path


def merge_rows_into_csv(
    path: Path, columns: Iterable[str], lines: list[dict], order: Iterable[str] = ()
) -> Path:
    """A results table kept across reruns: a line replaces the old line of the same `row`; others stay.

    Rows named in `order` come first, in that order; the rest follow by name, so a table
    rebuilt from any sequence of reruns reads the same.
    """
    path = Path(path)
    kept = {}
    if path.exists():
        with open(path, newline="") as file:
            kept = {line["row"]: line for line in csv.DictReader(file)}
    kept.update({line["row"]: line for line in lines})
    order = list(order)
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = list(columns)
    ranked = sorted(
        kept, key=lambda name: (order.index(name) if name in order else len(order), name)
    )
    return write_csv(
        path, columns, [{key: kept[name].get(key, "") for key in columns} for name in ranked]
    )


def curve_rows(runs: list[Run]) -> list[dict]:
    """Every point of every plotted curve, so figures can be redrawn with other tools."""
    rows = []
    for run in runs:
        for quantity, key, points in (
            ("test", run.metric.key, test_curve(run)),
            ("train", run.train_key, train_curve(run)),
        ):
            rows.extend(
                {
                    "label": run.label,
                    "run_dir": run.shown_dir,
                    "quantity": quantity,
                    "key": key,
                    "round": p.round,
                    "time_s": p.time_s,
                    "bytes_sent": p.bytes_sent,
                    "mean": p.mean,
                    "std": p.std,
                    "nodes": p.nodes,
                }
                for p in points
            )
        rows.extend(
            {
                "label": run.label,
                "run_dir": run.shown_dir,
                "quantity": "consensus",
                "key": "consensus_distance",
                "round": number,
                "mean": distance,
            }
            for number, distance in consensus_curve(run)
        )
    return rows


def cut_columns(axis: str) -> tuple[str, ...]:
    return (
        "label",
        "run_dir",
        "metric",
        f"cut_{axis}",
        "round",
        "time_s",
        "bytes_sent",
        "metric_mean",
        "metric_std",
        "no_learning",
    )


def cut_rows(cuts: list[Cut]) -> list[dict]:
    rows = []
    for cut in cuts:
        point = cut.point
        rows.append(
            {
                "label": cut.run.label,
                "run_dir": cut.run.shown_dir,
                "metric": cut.metric.key,
                f"cut_{cut.axis}": cut.cut,
                "round": point.round if point else None,
                "time_s": point.time_s if point else None,
                "bytes_sent": point.bytes_sent if point else None,
                "metric_mean": point.mean if point else None,
                "metric_std": point.std if point else None,
                "no_learning": cut.run.no_learning,
            }
        )
    return rows


def format_table(rows: list[dict]) -> str:
    """Rows as aligned text columns, numbers to 4 significant digits (the CSV keeps them all)."""
    if not rows:
        return "(no runs)"
    columns = list(rows[0])
    cells = [columns] + [[_cell(row[column]) for column in columns] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    return "\n".join(
        "  ".join(text.ljust(width) for text, width in zip(line, widths)).rstrip() for line in cells
    )


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.0f}" if value.is_integer() and abs(value) >= 1000 else f"{value:.4g}"
    return str(value)
