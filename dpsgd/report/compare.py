"""The numbers the study compares runs by: curves, equal-time and equal-bytes cuts, final metrics.

Only rounds that every node reached are compared, so a mean never silently changes
which nodes it averages over (RWM nodes stop at different rounds). Time and bytes
are the across-node means of each node's own clock and cumulative counter.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from dpsgd.report.runs import Metric, Run

Axis = Literal["round", "time_s", "bytes_sent"]
AXES: tuple[Axis, ...] = ("round", "time_s", "bytes_sent")
FINAL_COLUMNS = (
    "label",
    "run_dir",
    "algorithm",
    "sharing",
    "alpha",
    "dataset",
    "nodes",
    "rounds_min",
    "rounds_max",
    "wall_s",
    "final_round",
    "test_loss",
    "test_acc",
    "train_loss",
    "bytes_sent",
    "bytes_sent_data",
    "bytes_sent_meta",
    "test_loss_metric",
    "no_learning",
    "consensus_distance",
    "target",
    "target_round",
    "target_time_s",
    "target_bytes_sent",
)
FINAL_MEANS = (
    "test_loss",
    "test_acc",
    "train_loss",
    "bytes_sent",
    "bytes_sent_data",
    "bytes_sent_meta",
)


@dataclass(frozen=True)
class Point:
    """One round of a curve: where it lies on each x axis, and the metric across nodes."""

    round: int
    time_s: float
    bytes_sent: float
    mean: float
    std: float
    nodes: int

    def at(self, axis: Axis) -> float:
        return float(getattr(self, axis))


@dataclass(frozen=True)
class Cut:
    """What one run had reached when cut at a common time or byte budget.

    `point` is None when the run cannot be placed at the cut: its first evaluation came after
    it, or the run ended before it; `span` (its first and last evaluation on `axis`) says which.
    """

    run: Run
    metric: Metric
    axis: Axis
    cut: float
    point: Point | None
    span: tuple[float, float] | None = (
        None  # None: the run has no evaluated round every node reached
    )


def curve(run: Run, key: str) -> list[Point]:
    """`key` per round across nodes: rounds every node reported, or the most that ever did."""
    rows = [
        (number, stats)
        for number, stats in run.rounds.items()
        if key in stats and "time_s" in stats and "bytes_sent" in stats
    ]
    if not rows:
        return []
    required = min(run.nodes, max(stats[key].n for _, stats in rows))
    return [
        Point(
            number,
            stats["time_s"].mean,
            stats["bytes_sent"].mean,
            stats[key].mean,
            stats[key].std,
            stats[key].n,
        )
        for number, stats in rows
        if stats[key].n >= required
    ]


def test_curve(run: Run) -> list[Point]:
    return curve(run, run.metric.key)


def train_curve(run: Run) -> list[Point]:
    return curve(run, run.train_key)


def by_metric(runs: list[Run]) -> dict[Metric, list[Run]]:
    """Runs grouped by test metric: accuracy and RMSE never share an axis or a cut."""
    groups: dict[Metric, list[Run]] = {}
    for run in runs:
        groups.setdefault(run.metric, []).append(run)
    return groups


def equal_cut(runs: list[Run], axis: Axis) -> list[Cut]:
    """Each run's test metric at one time or byte budget per metric, chosen where every run has data.

    A run can be placed at budget c when it had an evaluation at or before c and ran at least
    until c: then its last evaluation within c is what that budget bought, and no run is judged
    with more of the resource than the others had. The cut is the largest c at which every run
    can be placed (the shortest run's end, when all runs had evaluated by then). Where no c
    places them all (one run's first evaluation cost more than another's whole run), it is the
    largest c that places the most; the others get no point.
    """
    cuts: list[Cut] = []
    for metric, group in by_metric(runs).items():
        curves = [test_curve(run) for run in group]
        spans = [(points[0].at(axis), points[-1].at(axis)) if points else None for points in curves]
        limit = common_cut([span for span in spans if span is not None])
        cuts.extend(
            Cut(
                run,
                metric,
                axis,
                limit,
                reached(points, axis, limit) if _covers(span, limit) else None,
                span,
            )
            for run, points, span in zip(group, curves, spans)
        )
    return cuts


def common_cut(spans: list[tuple[float, float]]) -> float:
    """The largest value lying within the most (first, last) spans; NaN when there are none.

    The best value is always one of the spans' ends: moving right from any point, the count
    of spans holding it only drops at an end.
    """
    if not spans:
        return float("nan")
    return max((sum(_covers(span, end) for span in spans), end) for _, end in spans)[1]


def _covers(span: tuple[float, float] | None, value: float) -> bool:
    return span is not None and span[0] <= value <= span[1]


def equal_time(runs: list[Run]) -> list[Cut]:
    return equal_cut(runs, "time_s")


def equal_bytes(runs: list[Run]) -> list[Cut]:
    return equal_cut(runs, "bytes_sent")


def consensus_curve(run: Run) -> list[tuple[int, float]]:
    """(round, consensus distance) of every evaluated round that has one (summary.json; `dpsgd.consensus`)."""
    return [
        (int(entry["round"]), float(entry["consensus_distance"]))
        for entry in run.summary.get("per_round", [])
        if entry.get("consensus_distance") is not None
    ]


def first_reaching(run: Run, target: float) -> Point | None:
    """The first evaluated round whose mean test metric is at or beyond `target` (RMSE at or below it,
    accuracy at or above it), among rounds every node reached; None when the run never got there."""
    better = (
        (lambda mean: mean >= target)
        if run.metric.higher_is_better
        else (lambda mean: mean <= target)
    )
    return next(
        (point for point in test_curve(run) if point.nodes >= run.nodes and better(point.mean)),
        None,
    )


def reached(points: list[Point], axis: Axis, limit: float) -> Point | None:
    """The last evaluated round at or below `limit` on `axis`."""
    within = [point for point in points if point.at(axis) <= limit]
    return within[-1] if within else None


def final_round(run: Run) -> int | None:
    """The end of the run (what summary.json calls `final`): the last round any node ran, every node
    measured at the round it stopped after; for runs written before nodes evaluated when they
    stopped, the last evaluated round every node reached."""
    if run.final is not None:
        return run.final[0]
    key = run.metric.key
    complete = [
        number for number, stats in run.rounds.items() if key in stats and stats[key].n >= run.nodes
    ]
    return complete[-1] if complete else None


def final_metrics(run: Run, target: float | None = None) -> dict:
    """One row of final_metrics.csv: the run's identity, its means at the final round, and with a
    `target` (e.g. RMSE 0.95) when it first reached it."""
    number = final_round(run)
    stats = (
        run.final[1]
        if run.final is not None
        else run.rounds.get(number, {})
        if number is not None
        else {}
    )
    summary = run.summary
    row = {
        "label": run.label,
        "run_dir": run.shown_dir,
        "algorithm": run.algorithm,
        "sharing": run.sharing,
        "alpha": run.alpha,
        "dataset": run.dataset,
        "nodes": run.nodes,
        "rounds_min": summary.get("rounds_min"),
        "rounds_max": summary.get("rounds_max"),
        "wall_s": summary.get("wall_s"),
        "final_round": number,
        "test_loss_metric": summary.get("test_loss_metric"),
        "no_learning": run.no_learning,
    }
    row.update({key: stats[key].mean if key in stats else None for key in FINAL_MEANS})
    final = summary.get("final") or {}  # at the end of the run: the models as the nodes stopped
    row["consensus_distance"] = (
        final.get("consensus_distance")
        if final.get("round") == number
        else dict(consensus_curve(run)).get(number)
    )
    hit = first_reaching(run, target) if target is not None else None
    row.update(
        target=target,
        target_round=hit and hit.round,
        target_time_s=hit and hit.time_s,
        target_bytes_sent=hit and hit.bytes_sent,
    )
    return {column: row[column] for column in FINAL_COLUMNS}
