"""Analysis of finished runs: curves, equal-time and equal-bytes comparisons, final metrics.

`python -m dpsgd.report RUN_OR_SWEEP_DIR [...] --out DIR` writes the figures and
tables; a notebook imports the same functions to draw them inline. The report reads
only what a run leaves behind (summary.json, config.yaml, nodes/*.jsonl), so it works
on runs copied off a cluster and never needs torch.
"""

from dpsgd.report.compare import (
    Cut,
    Point,
    by_metric,
    common_cut,
    curve,
    equal_bytes,
    equal_cut,
    equal_time,
    final_metrics,
    final_round,
    reached,
    test_curve,
    train_curve,
)
from dpsgd.report.files import cut_rows, format_table, write_report
from dpsgd.report.plots import bytes_split_figure, consensus_figure, curve_figure, cut_figure
from dpsgd.report.runs import (
    ACCURACY,
    RMSE,
    Metric,
    ReportError,
    Run,
    discover,
    load_run,
    load_runs,
    run_label,
)

__all__ = [
    "ACCURACY",
    "RMSE",
    "Cut",
    "Metric",
    "Point",
    "ReportError",
    "Run",
    "by_metric",
    "bytes_split_figure",
    "common_cut",
    "consensus_figure",
    "curve",
    "curve_figure",
    "cut_figure",
    "cut_rows",
    "discover",
    "equal_bytes",
    "equal_cut",
    "equal_time",
    "final_metrics",
    "final_round",
    "format_table",
    "load_run",
    "load_runs",
    "reached",
    "run_label",
    "test_curve",
    "train_curve",
    "write_report",
]
