"""Statistics of one round across nodes: the single definition used by a run and by the report.

A run's aggregator (summary.json, TensorBoard) and `dpsgd.report` (reading the per-node
JSONL afterwards) must agree to the last digit, so both call `across_nodes`. Non-finite
values (a diverged node, written as null) are left out rather than poisoning the mean.
Free of torch, so the report can be used without it.
"""

from __future__ import annotations

import math
import statistics

# Per-node record keys that are aggregated across nodes when present.
AGGREGATED_KEYS = (
    "train_loss",
    "batch_loss",
    "test_loss",
    "test_acc",
    "bytes_sent",
    "bytes_sent_data",
    "bytes_sent_meta",
    "bytes_recv",
    "bytes_recv_data",
    "bytes_recv_meta",
    "time_s",
    "train_s",
    "comm_s",
    "eval_s",
    "age",
)


def across_nodes(records: list[dict]) -> dict[str, dict[str, float]]:
    """Per key: mean, population std, min, max over the nodes that gave a finite value, and n."""
    stats = {}
    for key in AGGREGATED_KEYS:
        values = [float(record[key]) for record in records if is_finite_number(record.get(key))]
        if values:
            stats[key] = {
                "mean": statistics.fmean(values),
                "std": statistics.pstdev(values),
                "min": min(values),
                "max": max(values),
                "n": len(values),
            }
    return stats


def is_finite_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
