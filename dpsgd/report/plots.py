"""The study's figures, as matplotlib Figures rendered by Agg.

Figures are built with `matplotlib.figure.Figure`, not pyplot: nothing global is
switched, so the same functions save PNGs from a headless CLI and show inline in a
notebook. Each run keeps one colour across every figure (its position in the run list).
Runs with different test metrics (accuracy, RMSE) get side-by-side panels.
"""

from __future__ import annotations

from typing import Callable, Literal

try:
    from matplotlib.figure import Figure
except ImportError as error:  # matplotlib is the optional `plot` extra
    raise ImportError("dpsgd.report draws with matplotlib, which is not installed: "
                      "pip install matplotlib (or pip install -e '.[plot]')") from error

from dpsgd.report.compare import Axis, Cut, Point, by_metric, consensus_curve, final_metrics, test_curve, train_curve
from dpsgd.report.runs import Run

Quantity = Literal["test", "train"]
CURVES: dict[Quantity, Callable[[Run], list[Point]]] = {"test": test_curve, "train": train_curve}
X_LABELS: dict[Axis, str] = {"round": "round", "time_s": "wall time (s, mean over nodes)",
                             "bytes_sent": "MB sent per node (mean)"}
BAND_ALPHA = 0.2
PANEL_SIZE = (6.4, 4.4)


def curve_figure(runs: list[Run], quantity: Quantity, axis: Axis) -> Figure:
    """Test metric or train loss against rounds, time or bytes: mean line, +-std band, one line per run."""
    groups = by_metric(runs)
    figure, panels = _panels(len(groups))
    for panel, (metric, group) in zip(panels, groups.items()):
        for run in group:
            _draw_curve(panel, CURVES[quantity](run), axis, run.label, _colour(runs, run))
        panel.set_xlabel(X_LABELS[axis])
        panel.set_ylabel(metric.name if quantity == "test" else _train_label(group))
        _finish(panel)
    return figure


def cut_figure(cuts: list[Cut], runs: list[Run]) -> Figure:
    """Bars of the metric each run had reached at the common time or byte budget."""
    groups: dict = {}
    for cut in cuts:
        groups.setdefault(cut.metric, []).append(cut)
    figure, panels = _panels(len(groups))
    for panel, (metric, group) in zip(panels, groups.items()):
        heights = [cut.point.mean if cut.point else 0.0 for cut in group]
        errors = [cut.point.std if cut.point else 0.0 for cut in group]
        bars = panel.bar([cut.run.label for cut in group], heights, yerr=errors, capsize=3,
                         color=[_colour(runs, cut.run) for cut in group])
        panel.bar_label(bars, labels=[_cut_note(cut) for cut in group], fontsize=8)
        panel.set_ylabel(metric.name)
        panel.set_title(_cut_title(group[0]))
        panel.margins(y=0.15)  # room for the two-line value notes above the bars
        _tilt(panel)
    return figure


def bytes_split_figure(runs: list[Run]) -> Figure:
    """Data (parameter values) versus metadata (indices, seeds, headers) bytes per node, final round."""
    figure, panels = _panels(1)
    panel = panels[0]
    rows = [final_metrics(run) for run in runs]
    positions = range(len(runs))
    width = 0.4
    for offset, key, hatch in ((-width / 2, "bytes_sent_data", ""), (width / 2, "bytes_sent_meta", "//")):
        values = [row[key] or 0.0 for row in rows]
        bars = panel.bar([p + offset for p in positions], values, width, hatch=hatch, label=key,
                         color=[_colour(runs, run) for run in runs], edgecolor="black")
        panel.bar_label(bars, labels=[_bytes_text(v) for v in values], fontsize=7)
    panel.set_xticks(list(positions), [run.label for run in runs])
    # Metadata is often three orders of magnitude below data; a log scale shows both.
    panel.set_yscale("log")
    panel.set_ylabel("bytes sent per node at the final round (mean)")
    panel.legend(fontsize=8)
    _tilt(panel)
    return figure


def consensus_figure(runs: list[Run]) -> Figure:
    """The consensus distance (mean squared distance of the models to their average) against rounds,
    on a log scale: how well each pattern mixes the models it trains."""
    figure, panels = _panels(1)
    panel = panels[0]
    for run in runs:
        points = consensus_curve(run)
        if points:
            panel.plot([r for r, _ in points], [d for _, d in points], marker="o" if len(points) < 30 else None,
                       markersize=3, label=run.label, color=_colour(runs, run))
    panel.set_yscale("log")
    panel.set_xlabel("round")
    panel.set_ylabel("consensus distance (mean ||x_i - x_mean||^2)")
    _finish(panel)
    return figure


def _draw_curve(panel, points: list[Point], axis: Axis, label: str, colour: str) -> None:
    if not points:
        return
    scale = 1e-6 if axis == "bytes_sent" else 1.0
    x = [point.at(axis) * scale for point in points]
    mean = [point.mean for point in points]
    panel.plot(x, mean, marker="o" if len(points) < 30 else None, markersize=3, label=label, color=colour)
    panel.fill_between(x, [p.mean - p.std for p in points], [p.mean + p.std for p in points],
                       alpha=BAND_ALPHA, color=colour, linewidth=0)


def _panels(count: int):
    count = max(count, 1)
    figure = Figure(figsize=(PANEL_SIZE[0] * count, PANEL_SIZE[1]), layout="constrained")
    return figure, list(figure.subplots(1, count, squeeze=False)[0])


def _finish(panel) -> None:
    panel.grid(alpha=0.3)
    if panel.get_legend_handles_labels()[0]:
        panel.legend(fontsize=8)


def _tilt(panel) -> None:
    """Config labels are long; tilted they stay readable under many bars."""
    for tick in panel.get_xticklabels():
        tick.set_rotation(25)
        tick.set_horizontalalignment("right")
    panel.grid(axis="y", alpha=0.3)


def _colour(runs: list[Run], run: Run) -> str:
    return f"C{runs.index(run) % 10}"


def _train_label(group: list[Run]) -> str:
    keys = sorted({run.train_key for run in group})
    return "train loss" if keys == ["train_loss"] else "train loss (" + ", ".join(keys) + ")"


def _cut_title(cut: Cut) -> str:
    if cut.axis == "time_s":
        return f"equal time: each run at {cut.cut:.3g} s\n(n/a: no evaluation by then)"
    return f"equal bytes: each run at {_bytes_text(cut.cut)} per node\n(n/a: no evaluation by then)"


def _cut_note(cut: Cut) -> str:
    if cut.point is None:
        return "n/a"  # short: neighbouring bars' notes must not overlap
    return f"{cut.point.mean:.4g}\n(round {cut.point.round})"


def _bytes_text(value: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if value >= size:
            return f"{value / size:.3g} {unit}"
    return f"{value:.0f} B"
