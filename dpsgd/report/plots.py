"""The study's figures, as matplotlib Figures rendered by Agg.

Figures are built with `matplotlib.figure.Figure`, not pyplot: nothing global is
switched, so the same functions save PNG, PDF and SVG from a headless CLI and show
inline in a notebook. Each run keeps one colour across every figure (its position in the
run list). Runs with different test metrics (accuracy, RMSE) get side-by-side panels.

What a reader of a paper needs from each figure is on it: a title saying what is plotted
on which data, the no-learning line every metric is judged against (runs record it in
summary.json), and a legend outside the axes so that it never hides a curve. Comparisons
of one number per run are dot plots with the no-learning line, not bars: an RMSE bar
drawn from 0 makes 0.91 and 0.93 look the same.
"""

from __future__ import annotations

from typing import Callable, Literal

try:
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator
except ImportError as error:  # matplotlib is the optional `plot` extra
    raise ImportError(
        "dpsgd.report draws with matplotlib, which is not installed: "
        "pip install matplotlib (or pip install -e '.[plot]')"
    ) from error

from dpsgd.report.compare import (
    Axis,
    Cut,
    Point,
    by_metric,
    consensus_curve,
    final_metrics,
    test_curve,
    train_curve,
)
from dpsgd.report.runs import Metric, Run

Quantity = Literal["test", "train"]
CURVES: dict[Quantity, Callable[[Run], list[Point]]] = {"test": test_curve, "train": train_curve}
X_LABELS: dict[Axis, str] = {
    "round": "round",
    "time_s": "wall time (s, mean over nodes)",
    "bytes_sent": "MB sent per node (mean over nodes)",
}
AXIS_WORDS: dict[Axis, str] = {"round": "rounds", "time_s": "wall time", "bytes_sent": "bytes sent"}
BAND_ALPHA = 0.15
PANEL_SIZE = (6.0, 4.0)
LEGEND_COLUMNS = 3
LEGEND_ROW_HEIGHT = 0.22  # inches per legend row below the panels
BASELINE_STYLE = {"color": "0.35", "linewidth": 1.2, "zorder": 1}
BASELINE_DASHES = ("--", ":", "-.")  # one per distinct no-learning value on a panel


def curve_figure(runs: list[Run], quantity: Quantity, axis: Axis, bands: bool = False) -> Figure:
    """Test metric or train loss against rounds, time or bytes: the mean over nodes per run, a band of
    one std across nodes (`bands`), and on test figures each data set's no-learning line."""
    groups = by_metric(runs)
    figure, panels = _panels(len(groups), legend_entries=len(runs) + 1)
    for panel, (metric, group) in zip(panels, groups.items()):
        for run in group:
            _draw_curve(panel, CURVES[quantity](run), axis, run.label, _colour(runs, run), bands)
        if quantity == "test":
            _baseline_lines(panel, group, horizontal=True)
        panel.set_xlabel(X_LABELS[axis])
        if axis == "round":
            panel.xaxis.set_major_locator(MaxNLocator(integer=True))
        panel.set_ylabel(_metric_label(metric) if quantity == "test" else _train_label(group))
        panel.set_title(
            _data_line(group)
            + ("; mean, band: 1 std over nodes" if bands else "; mean over nodes"),
            fontsize=9,
        )
        panel.grid(alpha=0.3)
    what = _what(groups) if quantity == "test" else "Train loss"
    figure.suptitle(f"{what} against {AXIS_WORDS[axis]}")
    _legend_outside(figure, panels)
    return figure


def cut_figure(cuts: list[Cut], runs: list[Run]) -> Figure:
    """A dot per run: the test metric it had reached at the common time or byte budget (error bar:
    1 std over nodes), with the no-learning line; runs that cannot be placed at the cut say why."""
    groups: dict[Metric, list[Cut]] = {}
    for cut in cuts:
        groups.setdefault(cut.metric, []).append(cut)
    rows = max((len(group) for group in groups.values()), default=1)
    figure, panels = _panels(
        len(groups), legend_entries=1, height=max(PANEL_SIZE[1], 1.6 + 0.45 * rows)
    )
    for panel, (metric, group) in zip(panels, groups.items()):
        positions = list(range(len(group)))[::-1]  # the first run on top
        for y, cut in zip(positions, group):
            colour = _colour(runs, cut.run)
            if cut.point is None:
                continue
            # The tick labels name the runs: the legend holds only the no-learning line.
            panel.errorbar(
                [cut.point.mean],
                [y],
                xerr=[cut.point.std],
                fmt="o",
                color=colour,
                capsize=3,
                markersize=6,
            )
            panel.annotate(
                f"{cut.point.mean:.4g} (round {cut.point.round})",
                (cut.point.mean, y),
                xytext=(0, 7),
                textcoords="offset points",
                ha="center",
                fontsize=7,
            )
        _baseline_lines(panel, [cut.run for cut in group], horizontal=False)
        _note_unplaced(panel, group, positions)
        panel.set_yticks(positions, [cut.run.label for cut in group], fontsize=8)
        panel.set_ylim(-0.7, len(group) - 0.3)
        panel.set_xlabel(_metric_label(metric))
        panel.margins(x=0.12)
        panel.grid(axis="x", alpha=0.3)
        panel.set_title(
            f"{_cut_text(group[0])}, the most every run reached\n"
            f"{_data_line([cut.run for cut in group])}; error bar: 1 std over nodes",
            fontsize=9,
        )
    figure.suptitle(
        f"{_what(groups)} at equal {'wall time' if cuts and cuts[0].axis == 'time_s' else 'bytes sent'}"
    )
    _legend_outside(figure, panels)
    return figure


def bytes_split_figure(runs: list[Run]) -> Figure:
    """Data (parameter values) and metadata (indices, seeds, headers) bytes per node by the final round,
    as dots on a log axis: metadata is often three orders of magnitude below data."""
    figure, panels = _panels(1, legend_entries=2, height=max(PANEL_SIZE[1], 1.4 + 0.45 * len(runs)))
    panel = panels[0]
    positions = list(range(len(runs)))[::-1]
    rows = [final_metrics(run) for run in runs]
    for key, marker in (("bytes_sent_data", "o"), ("bytes_sent_meta", "D")):
        for y, run, row in zip(positions, runs, rows):
            if row[key]:  # 0 or unmeasured has no place on a log axis
                panel.plot([row[key]], [y], marker, color=_colour(runs, run), markersize=7)
                panel.annotate(
                    _bytes_text(row[key]),
                    (row[key], y),
                    xytext=(0, 7),
                    textcoords="offset points",
                    ha="center",
                    fontsize=7,
                )
    panel.set_xscale("log")
    panel.set_yticks(positions, [run.label for run in runs], fontsize=8)
    panel.set_ylim(-0.7, len(runs) - 0.3)
    panel.margins(x=0.1)
    panel.set_xlabel("bytes sent per node by the final round (mean over nodes; log scale)")
    panel.grid(axis="x", alpha=0.3)
    panel.set_title(_data_line(runs), fontsize=9)
    figure.suptitle("Bytes sent per node: data against metadata")
    handles = [
        Line2D([], [], marker="o", linestyle="", color="0.3", label="data (values)"),
        Line2D([], [], marker="D", linestyle="", color="0.3", label="metadata (indices, headers)"),
    ]
    figure.legend(handles=handles, loc="outside lower center", ncols=2, fontsize=8, frameon=False)
    return figure


def consensus_figure(runs: list[Run]) -> Figure:
    """The consensus distance (mean squared distance of the models to their average) against rounds,
    on a log scale: how well each pattern mixes the models it trains."""
    shown = [run for run in runs if consensus_curve(run)]
    figure, panels = _panels(1, legend_entries=len(shown))
    panel = panels[0]
    for run in shown:
        points = consensus_curve(run)
        panel.plot(
            [r for r, _ in points],
            [d for _, d in points],
            marker="o" if len(points) < 30 else None,
            markersize=3,
            label=run.label,
            color=_colour(runs, run),
        )
    panel.set_yscale("log")
    panel.xaxis.set_major_locator(MaxNLocator(integer=True))
    panel.set_xlabel("round")
    panel.set_ylabel("consensus distance (mean ||x_i - x_mean||^2)")
    panel.grid(alpha=0.3)
    panel.set_title(_data_line(shown or runs), fontsize=9)
    figure.suptitle("Consensus distance of the nodes' models against rounds")
    _legend_outside(figure, panels)
    return figure


def _draw_curve(
    panel, points: list[Point], axis: Axis, label: str, colour: str, bands: bool
) -> None:
    if not points:
        return
    scale = 1e-6 if axis == "bytes_sent" else 1.0
    x = [point.at(axis) * scale for point in points]
    mean = [point.mean for point in points]
    panel.plot(
        x,
        mean,
        marker="o" if len(points) < 30 else None,
        markersize=3,
        label=label,
        color=colour,
        zorder=3,
    )
    if bands:
        panel.fill_between(
            x,
            [p.mean - p.std for p in points],
            [p.mean + p.std for p in points],
            alpha=BAND_ALPHA,
            color=colour,
            linewidth=0,
            zorder=2,
        )


def _baseline_lines(panel, runs: list[Run], horizontal: bool) -> None:
    """One line per distinct no-learning value among `runs` (one per data set, in practice)."""
    values: dict[float, list[str]] = {}
    for run in runs:
        if run.no_learning is not None:
            values.setdefault(run.no_learning, [])
            if run.dataset not in values[run.no_learning]:
                values[run.no_learning].append(run.dataset)
    for dashes, (value, datasets) in zip(BASELINE_DASHES * len(values), values.items()):
        label = f"no learning ({', '.join(datasets)}): {value:.4g}"
        line = panel.axhline if horizontal else panel.axvline
        line(value, linestyle=dashes, label=label, **BASELINE_STYLE)


def _note_unplaced(panel, group: list[Cut], positions: list[int]) -> None:
    """Where a run has no point at the cut, the reason, in the row it would sit in."""
    for y, cut in zip(positions, group):
        if cut.point is not None:
            continue
        if cut.span is None:
            why = "no round evaluated by every node"
        elif cut.span[0] > cut.cut:
            why = f"first evaluated at {_amount(cut.axis, cut.span[0])}, after the cut (lower eval.every)"
        else:
            why = f"ended at {_amount(cut.axis, cut.span[1])}, before the cut"
        panel.annotate(
            why,
            (0.02, y),
            xycoords=("axes fraction", "data"),
            va="center",
            fontsize=7,
            color="0.3",
            style="italic",
        )


def _panels(count: int, legend_entries: int = 0, height: float = PANEL_SIZE[1]):
    """Side-by-side panels, the figure taller by the rows of the legend drawn below them."""
    count = max(count, 1)
    legend_rows = -(-legend_entries // LEGEND_COLUMNS)
    figure = Figure(
        figsize=(PANEL_SIZE[0] * count, height + LEGEND_ROW_HEIGHT * legend_rows),
        layout="constrained",
    )
    return figure, list(figure.subplots(1, count, squeeze=False)[0])


def _legend_outside(figure: Figure, panels: list) -> None:
    """One legend for the whole figure, below the panels (constrained layout makes room for it):
    it never hides a curve, and long run labels get the figure's whole width."""
    handles, labels = [], []
    for panel in panels:
        for handle, label in zip(*panel.get_legend_handles_labels()):
            if label not in labels:
                handles.append(handle)
                labels.append(label)
    if handles:
        figure.legend(
            handles,
            labels,
            loc="outside lower center",
            ncols=min(LEGEND_COLUMNS, len(handles)),
            fontsize=8,
            frameon=False,
        )


def _colour(runs: list[Run], run: Run) -> str:
    return f"C{runs.index(run) % 10}"


def _what(groups: dict) -> str:
    """'Test RMSE', or 'Test metric' when panels show different metrics."""
    names = [metric.name for metric in groups]
    return names[0][0].upper() + names[0][1:] if len(names) == 1 else "Test metric"


def _metric_label(metric: Metric) -> str:
    return f"{metric.name} ({'higher' if metric.higher_is_better else 'lower'} is better)"


def _data_line(runs: list[Run]) -> str:
    """What the runs ran on: "movielens, 96 nodes" ("femnist, celeba; 16-29 nodes" when they differ)."""
    datasets = list(dict.fromkeys(run.dataset for run in runs))
    nodes = sorted({run.nodes for run in runs})
    count = f"{nodes[0]} nodes" if len(nodes) == 1 else f"{nodes[0]}-{nodes[-1]} nodes"
    return (
        f"{', '.join(datasets)}, {count}"
        if len(datasets) == 1
        else f"{', '.join(datasets)}; {count}"
    )


def _train_label(group: list[Run]) -> str:
    keys = sorted({run.train_key for run in group})
    return "train loss" if keys == ["train_loss"] else "train loss (" + ", ".join(keys) + ")"


def _cut_text(cut: Cut) -> str:
    return f"each run at {_amount(cut.axis, cut.cut)}"


def _amount(axis: Axis, value: float) -> str:
    return f"{value:.3g} s" if axis == "time_s" else f"{_bytes_text(value)} per node"


def _bytes_text(value: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if value >= size:
            return f"{value / size:.3g} {unit}"
    return f"{value:.0f} B"
