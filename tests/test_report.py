"""dpsgd.report: figures and tables from real runs, cuts on hand-made runs, the notebook, the CLI.

Numbers the report writes are checked against a recomputation from the per-node JSONL
written here independently (plain dicts and `statistics`), not against the report's
own helpers.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import matplotlib
import pytest
import yaml

from dpsgd import report
from tests.conftest import RANK_TEST_TIMEOUT_S, REPO, read_jsonl

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
NODES = 4
REAL_RUNS = {  # job directory -> overrides; the directory names mimic a Hydra sweep
    "0": ["algorithm=dpsgd", "sharing=full"],
    "1": ["algorithm=rwm", "sharing=full"],
    "2": ["algorithm=dpsgd", "sharing=partial", "alpha=0.2"],
}
REAL_LABELS = {"0": "dpsgd full", "1": "rwm full", "2": "dpsgd partial a=0.2"}
FIGURE_STEMS = [
    "test_metric_vs_rounds",
    "test_metric_vs_time",
    "test_metric_vs_bytes",
    "train_loss_vs_rounds",
    "train_loss_vs_time",
    "train_loss_vs_bytes",
    "equal_time",
    "equal_bytes",
    "bytes_data_vs_meta",
    "consensus_distance",
]
FIGURES = [f"{stem}.png" for stem in FIGURE_STEMS]
MAGIC = {"png": PNG_MAGIC, "pdf": b"%PDF-", "svg": b"<?xml"}
TABLES = ["final_metrics.csv", "curves.csv", "equal_time.csv", "equal_bytes.csv"]
MEAN_COLUMNS = [
    "test_loss",
    "test_acc",
    "train_loss",
    "bytes_sent",
    "bytes_sent_data",
    "bytes_sent_meta",
]


# ---------------------------------------------------------------- real runs


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    """Three small real runs laid out like a multirun sweep (one sub-directory per job)."""
    root = tmp_path_factory.mktemp("sweep")
    cache = tmp_path_factory.mktemp("cache")  # outside the sweep: only runs live there
    env = {**os.environ, "DPSGD_CACHE": str(cache), "GLOO_SOCKET_IFNAME": "lo"}
    for job, overrides in REAL_RUNS.items():
        command = [
            sys.executable,
            str(REPO / "train.py"),
            f"nodes={NODES}",
            "topology=ring",
            "rounds=10",
            "eval.every=5",
            "log.progress=false",
            f"hydra.run.dir={root / job}",
            *overrides,
        ]
        result = subprocess.run(
            command, cwd=REPO, env=env, capture_output=True, text=True, timeout=RANK_TEST_TIMEOUT_S
        )
        assert result.returncode == 0, (
            f"train.py {overrides} failed:\n{result.stdout}\n{result.stderr}"
        )
    return root


@pytest.fixture(scope="module")
def written(sweep: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("report")
    report.write_report(report.load_runs([sweep]), out)
    return out


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


def number(cell: str) -> float | None:
    return None if cell == "" else float(cell)


def node_records(run_dir: Path) -> dict[int, list[dict]]:
    """round -> the records of every node that logged it."""
    by_round: dict[int, list[dict]] = {}
    for path in sorted((run_dir / "nodes").glob("*.jsonl")):
        for record in read_jsonl(path):
            by_round.setdefault(record["round"], []).append(record)
    return by_round


def evaluated_by_all(run_dir: Path, key: str) -> list[tuple[int, list[dict]]]:
    return [
        (r, records)
        for r, records in sorted(node_records(run_dir).items())
        if sum(key in record for record in records) == NODES
    ]


def mean_of(records: list[dict], key: str) -> float:
    return statistics.fmean(record[key] for record in records)


def test_every_figure_is_a_png_and_a_pdf_and_every_table_is_written(written: Path):
    """The default formats: PNG to look at, PDF for a paper."""
    for stem in FIGURE_STEMS:
        for extension in ("png", "pdf"):
            data = (written / f"{stem}.{extension}").read_bytes()
            assert data.startswith(MAGIC[extension]), (stem, extension)
            assert len(data) > 10_000, f"{stem}.{extension} is only {len(data)} bytes"
        assert not (written / f"{stem}.svg").exists()
    for name in TABLES:
        assert len(read_csv(written / name)) >= len(REAL_RUNS), name


def test_labels_come_from_the_configs(sweep: Path, written: Path):
    runs = report.load_runs([sweep])
    assert {run.path.name: run.label for run in runs} == REAL_LABELS
    assert {row["label"] for row in read_csv(written / "final_metrics.csv")} == set(
        REAL_LABELS.values()
    )


def test_final_metrics_equal_a_recomputation_from_the_jsonl(sweep: Path, written: Path):
    rows = {Path(row["run_dir"]).name: row for row in read_csv(written / "final_metrics.csv")}
    for job in REAL_RUNS:
        run_dir = sweep / job
        summary = json.loads((run_dir / "summary.json").read_text())
        config = yaml.safe_load((run_dir / "config.yaml").read_text())
        row = rows[job]
        # The end of the run: every node evaluated the round it stopped after (RWM nodes stop apart).
        records = [read_jsonl(path)[-1] for path in sorted((run_dir / "nodes").glob("*.jsonl"))]
        final_round = max(record["round"] for record in records)
        assert len(records) == NODES and final_round == summary["rounds_max"]
        assert int(row["final_round"]) == final_round == summary["final"]["round"]
        assert float(row["consensus_distance"]) == pytest.approx(
            summary["final"]["consensus_distance"], rel=1e-12
        )
        for key in MEAN_COLUMNS:
            assert number(row[key]) == pytest.approx(mean_of(records, key), rel=1e-12), (job, key)
        assert (row["algorithm"], row["sharing"], float(row["alpha"])) == (
            config["algorithm"]["name"],
            config["sharing"]["name"],
            config["alpha"],
        )
        assert (int(row["nodes"]), int(row["rounds_min"]), int(row["rounds_max"])) == (
            NODES,
            summary["rounds_min"],
            summary["rounds_max"],
        )
        assert row["test_loss_metric"] == "rmse" and row["dataset"] == "synthetic"


def test_curves_equal_a_recomputation_from_the_jsonl(sweep: Path, written: Path):
    """Ratings runs plot RMSE (test_loss); only rounds every node evaluated are on a curve."""
    rows = read_csv(written / "curves.csv")
    for job in REAL_RUNS:
        for quantity, key in (("test", "test_loss"), ("train", "train_loss")):
            mine = [
                row
                for row in rows
                if Path(row["run_dir"]).name == job and row["quantity"] == quantity
            ]
            expected = evaluated_by_all(sweep / job, key)
            assert [int(row["round"]) for row in mine] == [r for r, _ in expected]
            for row, (_, records) in zip(mine, expected):
                assert row["key"] == key and int(row["nodes"]) == NODES
                assert float(row["mean"]) == pytest.approx(mean_of(records, key), rel=1e-12)
                assert float(row["std"]) == pytest.approx(
                    statistics.pstdev(r[key] for r in records), rel=1e-9, abs=1e-15
                )
                assert float(row["time_s"]) == pytest.approx(mean_of(records, "time_s"), rel=1e-12)
                assert float(row["bytes_sent"]) == pytest.approx(
                    mean_of(records, "bytes_sent"), rel=1e-12
                )


def best_cut(spans: list[tuple[float, float]]) -> float:
    """The cut rule, stated plainly: of the runs' last values, the largest among those that the
    most runs' (first, last) spans hold."""
    held = {end: sum(first <= end <= last for first, last in spans) for _, end in spans}
    most = max(held.values())
    return max(end for end, count in held.items() if count == most)


def test_equal_time_and_bytes_tables_on_real_runs(sweep: Path, written: Path):
    for table, axis in (("equal_time.csv", "time_s"), ("equal_bytes.csv", "bytes_sent")):
        finals = {job: evaluated_by_all(sweep / job, "test_loss") for job in REAL_RUNS}
        spans = {
            job: (mean_of(points[0][1], axis), mean_of(points[-1][1], axis))
            for job, points in finals.items()
            if points
        }
        cut = best_cut(list(spans.values()))
        for row in read_csv(written / table):
            job = Path(row["run_dir"]).name
            assert float(row[f"cut_{axis}"]) == pytest.approx(cut, rel=1e-12)
            within = [(r, records) for r, records in finals[job] if mean_of(records, axis) <= cut]
            if job not in spans or not spans[job][0] <= cut <= spans[job][1]:
                assert row["round"] == "" and row["metric_mean"] == ""
                continue
            last_round, records = within[-1]
            assert int(row["round"]) == last_round
            assert float(row["metric_mean"]) == pytest.approx(
                mean_of(records, "test_loss"), rel=1e-12
            )


def test_rwm_curves_stop_at_the_last_round_every_node_reached(sweep: Path):
    run = report.load_run(sweep / "1")
    summary = run.summary
    assert run.source == "jsonl"
    assert all(
        point.nodes == NODES and point.round <= summary["rounds_min"]
        for point in report.test_curve(run)
    )
    expected_final = summary["final"]["round"] if summary["final"] else None
    assert report.final_round(run) == expected_final


def test_without_node_logs_the_report_reads_summary_json(sweep: Path, tmp_path: Path):
    """On several machines rank 0's run directory lacks the other machines' JSONL."""
    shutil.copytree(sweep / "2", tmp_path / "whole")
    shutil.copytree(sweep / "2", tmp_path / "no_nodes")
    shutil.rmtree(tmp_path / "no_nodes" / "nodes")
    shutil.copytree(sweep / "2", tmp_path / "some_nodes")
    (tmp_path / "some_nodes" / "nodes" / "3.jsonl").unlink()
    whole, *partials = (
        report.load_run(tmp_path / name) for name in ("whole", "no_nodes", "some_nodes")
    )
    summary = whole.summary
    for run in partials:
        assert run.source == "summary"
        points = report.test_curve(run)
        entries = [e for e in summary["per_round"] if e["nodes_reporting"] == NODES]
        assert [p.round for p in points] == [e["round"] for e in entries]
        assert [p.mean for p in points] == [e["test_loss"]["mean"] for e in entries]
        assert [p.time_s for p in points] == [e["time_s"]["mean"] for e in entries]
        row = report.final_metrics(run)
        assert row["final_round"] == summary["final"]["round"]
        for key in MEAN_COLUMNS:
            assert row[key] == summary["final"][key]["mean"]
            assert row[key] == pytest.approx(report.final_metrics(whole)[key], rel=1e-12)


def test_notebook_runs_top_to_bottom_on_the_runs(sweep: Path, monkeypatch, tmp_path: Path):
    notebook = json.loads((REPO / "notebooks" / "study_figures.ipynb").read_text())
    assert notebook["nbformat"] == 4
    assert {cell["cell_type"] for cell in notebook["cells"]} == {"markdown", "code"}
    code_cells = [cell for cell in notebook["cells"] if cell["cell_type"] == "code"]
    assert all(cell["outputs"] == [] and cell["execution_count"] is None for cell in code_cells)
    matplotlib.use("Agg")
    monkeypatch.setenv("DPSGD_RUNS", str(sweep))
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for number, cell in enumerate(code_cells):
        exec(
            compile("".join(cell["source"]), f"study_figures.ipynb cell {number}", "exec"),
            namespace,
        )
    assert sorted(run.label for run in namespace["runs"]) == sorted(REAL_LABELS.values())


def test_cli_writes_the_report_and_prints_the_table(sweep: Path, tmp_path: Path):
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "dpsgd.report", str(sweep), "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert all(label in result.stdout for label in REAL_LABELS.values())
    assert all(str(out / name) in result.stdout for name in FIGURES + TABLES)
    header = result.stdout.splitlines()[0]
    assert header.split() == list(report.compare.FINAL_COLUMNS)
    assert all((out / name).stat().st_size > 0 for name in FIGURES + TABLES)


def test_cli_without_runs_says_what_to_pass(tmp_path: Path):
    result = subprocess.run(
        [sys.executable, "-m", "dpsgd.report", str(tmp_path), "--out", str(tmp_path / "o")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "summary.json" in result.stderr and str(tmp_path) in result.stderr


# ---------------------------------------------------------------- hand-made runs


def make_run(
    path: Path,
    algorithm: str,
    sharing: str,
    alpha: float,
    evaluated: dict[int, list[tuple]],
    metric: str = "rmse",
    dataset: str = "movielens",
    no_learning: dict | None = None,
) -> Path:
    """A run directory with known numbers: evaluated[round] = per node (time_s, bytes_sent, test value).

    Rounds in between are logged without a test value, as real runs do.
    """
    nodes = len(next(iter(evaluated.values())))
    test_key = "test_loss" if metric == "rmse" else "test_acc"
    (path / "nodes").mkdir(parents=True)
    last = max(evaluated)
    for node in range(nodes):
        lines = []
        for round_number in range(1, last + 1):
            record = {
                "node": node,
                "round": round_number,
                "time_s": 0.01 * round_number,
                "bytes_sent": round_number,
                "bytes_sent_data": round_number,
                "bytes_sent_meta": 0,
            }
            if round_number in evaluated:
                time_s, bytes_sent, value = evaluated[round_number][node]
                record.update(
                    time_s=time_s,
                    bytes_sent=bytes_sent,
                    bytes_sent_data=bytes_sent,
                    **{test_key: value, "train_loss": value},
                )
            lines.append(json.dumps(record))
        (path / "nodes" / f"{node}.jsonl").write_text("\n".join(lines) + "\n")
    summary = {
        "nodes": nodes,
        "rounds_min": last,
        "rounds_max": last,
        "rounds_per_node": [last] * nodes,
        "algorithm": algorithm,
        "sharing": sharing,
        "dataset": dataset,
        "test_loss_metric": metric,
        "wall_s": 1.0,
        "final": None,
        "per_round": [],
        "no_learning": no_learning,
    }
    (path / "summary.json").write_text(json.dumps(summary))
    config = {
        "algorithm": {"name": algorithm},
        "sharing": {"name": sharing},
        "dataset": {"name": dataset},
        "alpha": alpha,
        "nodes": nodes,
    }
    (path / "config.yaml").write_text(yaml.safe_dump(config))
    return path


def hand_made_sweep(root: Path) -> Path:
    # Means per evaluated round: (time_s, bytes_sent, test RMSE).
    # gossip:  r2 (2.0, 50, 1.0)   r4 (3.0, 200, 0.6)
    # walk:    r2 (1.0, 400, 0.8)  r4 (2.0, 800, 0.4)   <- shortest in time: cut at 2.0 s
    # partial: r2 (2.5, 30, 0.95)  r4 (5.0, 60, 0.5)    <- fewest bytes: cut at 60
    make_run(
        root / "gossip",
        "dpsgd",
        "full",
        1.0,
        {2: [(1.0, 50, 0.9), (3.0, 50, 1.1)], 4: [(2.0, 200, 0.7), (4.0, 200, 0.5)]},
    )
    make_run(
        root / "walk",
        "rwm",
        "full",
        1.0,
        {2: [(0.5, 400, 0.8), (1.5, 400, 0.8)], 4: [(2.0, 700, 0.3), (2.0, 900, 0.5)]},
    )
    make_run(
        root / "partial",
        "dpsgd",
        "partial",
        0.1,
        {2: [(2.5, 20, 0.9), (2.5, 40, 1.0)], 4: [(5.0, 60, 0.5), (5.0, 60, 0.5)]},
    )
    return root


def reached_by_label(cuts: list[report.Cut]) -> dict[str, tuple | None]:
    return {cut.run.label: (cut.point.round, cut.point.mean) if cut.point else None for cut in cuts}


def test_equal_time_cut_on_hand_made_runs(tmp_path: Path):
    """Time spans (first, last evaluation): gossip 2.0-3.0, walk 1.0-2.0, partial 2.5-5.0. No time holds all
    three; 2.0 and 3.0 each hold two, and the cut is the larger: walk ended before it."""
    runs = report.load_runs([hand_made_sweep(tmp_path)])
    cuts = report.equal_time(runs)
    assert {cut.cut for cut in cuts} == {3.0}
    # gossip's round 4 sits exactly on the cut (mean time 3.0): reached.
    assert reached_by_label(cuts) == {
        "dpsgd full": (4, pytest.approx(0.6)),
        "rwm full": None,
        "dpsgd partial a=0.1": (2, pytest.approx(0.95)),
    }
    assert {cut.run.label: cut.span for cut in cuts}["rwm full"] == (1.0, 2.0)


def test_the_first_round_reaching_a_target_on_hand_made_runs(tmp_path: Path):
    """RMSE target 0.85 (means as in hand_made_sweep): walk at round 2 (0.8), gossip at round 4 (1.0, then
    0.6), partial at round 4 (0.95, then 0.5)."""
    out = tmp_path / "out"
    report.write_report(report.load_runs([hand_made_sweep(tmp_path / "runs")]), out, target=0.85)
    rows = {row["label"]: row for row in read_csv(out / "final_metrics.csv")}
    assert (rows["rwm full"]["target_round"], rows["rwm full"]["target_bytes_sent"]) == (
        "2",
        "400.0",
    )
    assert (
        rows["dpsgd full"]["target_round"] == "4"
        and rows["dpsgd partial a=0.1"]["target_round"] == "4"
    )
    runs = {run.label: run for run in report.load_runs([tmp_path / "runs"])}
    assert report.compare.first_reaching(runs["dpsgd full"], 0.55) is None  # 0.6 at best
    assert (
        report.compare.first_reaching(runs["dpsgd partial a=0.1"], 0.5).round == 4
    )  # at the target counts


def test_consensus_distance_in_the_report_is_the_runs_own(sweep: Path, written: Path):
    """The table's and curves.csv's consensus distances are those summary.json holds for each run."""
    rows = {Path(row["run_dir"]).name: row for row in read_csv(written / "final_metrics.csv")}
    curves = read_csv(written / "curves.csv")
    for job in REAL_RUNS:
        summary = json.loads((sweep / job / "summary.json").read_text())
        expected = [
            (entry["round"], entry["consensus_distance"])
            for entry in summary["per_round"]
            if entry["consensus_distance"] is not None
        ]
        assert all(distance > 0 for _, distance in expected)
        assert {
            entry["round"] for entry in summary["per_round"] if entry["nodes_reporting"] > 1
        } == {
            round_number for round_number, _ in expected
        }  # one node alone has no distance to speak of
        got = [
            (int(row["round"]), float(row["mean"]))
            for row in curves
            if Path(row["run_dir"]).name == job and row["quantity"] == "consensus"
        ]
        assert got == expected
        final = summary["final"]
        assert float(rows[job]["consensus_distance"]) == final["consensus_distance"]


def test_equal_bytes_cut_on_hand_made_runs(tmp_path: Path):
    runs = report.load_runs([hand_made_sweep(tmp_path)])
    cuts = report.equal_bytes(runs)
    assert {cut.cut for cut in cuts} == {60.0}
    assert reached_by_label(cuts) == {
        "dpsgd full": (2, 1.0),
        "rwm full": None,
        "dpsgd partial a=0.1": (4, 0.5),
    }


def test_cut_tables_on_hand_made_runs(tmp_path: Path):
    out = tmp_path / "out"
    report.write_report(report.load_runs([hand_made_sweep(tmp_path / "runs")]), out)
    by_label = {row["label"]: row for row in read_csv(out / "equal_bytes.csv")}
    assert by_label["dpsgd partial a=0.1"]["round"] == "4"
    assert float(by_label["dpsgd partial a=0.1"]["metric_mean"]) == 0.5
    assert by_label["rwm full"]["metric_mean"] == ""
    by_label = {row["label"]: row for row in read_csv(out / "equal_time.csv")}
    assert float(by_label["dpsgd full"]["time_s"]) == 3.0
    assert float(by_label["dpsgd full"]["metric_mean"]) == pytest.approx(0.6)


def test_classification_and_ratings_runs_are_cut_separately(tmp_path: Path):
    hand_made_sweep(tmp_path)
    make_run(
        tmp_path / "images",
        "dpsgd",
        "full",
        1.0,
        {3: [(10.0, 5, 0.2), (10.0, 5, 0.4)], 6: [(20.0, 10, 0.5), (20.0, 10, 0.7)]},
        metric="cross_entropy",
        dataset="femnist",
    )
    runs = report.load_runs([tmp_path])
    images = next(run for run in runs if run.dataset == "femnist")
    assert images.metric == report.ACCURACY and images.train_key == "train_loss"
    assert {run.metric for run in runs if run is not images} == {report.RMSE}
    cuts = {cut.run.path.name: cut for cut in report.equal_time(runs)}
    # Alone in its group, the accuracy run is cut at its own end: its final accuracy.
    assert cuts["images"].cut == 20.0 and cuts["images"].point.mean == pytest.approx(0.6)
    assert cuts["walk"].cut == 3.0


def test_same_config_runs_get_their_directory_names(tmp_path: Path):
    hand_made_sweep(tmp_path / "a")
    hand_made_sweep(tmp_path / "b")
    shutil.copytree(tmp_path / "a" / "gossip", tmp_path / "a" / "gossip2")
    labels = [run.label for run in report.load_runs([tmp_path])]
    assert len(set(labels)) == len(labels) == 7
    assert "rwm full (a/walk)" in labels and "rwm full (b/walk)" in labels
    assert {"dpsgd full (gossip2)", "dpsgd full (a/gossip)", "dpsgd full (b/gossip)"} <= set(labels)


def test_label_shows_alpha_only_where_it_shapes_the_message(tmp_path: Path):
    for name, sharing in (
        ("p", "partial"),
        ("s", "subsampling"),
        ("f", "full"),
        ("r", "random_alpha"),
    ):
        make_run(tmp_path / name, "rwm", sharing, 0.5, {1: [(1.0, 1, 1.0)]})
    assert [run.label for run in report.load_runs([tmp_path])] == [
        "rwm full",
        "rwm partial a=0.5",
        "rwm random_alpha",
        "rwm subsampling a=0.5",
    ]


def test_table_columns_are_aligned():
    rows = [
        {"label": "dpsgd full", "test_loss": 1.23456789, "final_round": None},
        {"label": "rwm partial a=0.1", "test_loss": 10.0, "final_round": 20},
    ]
    header, *lines = report.format_table(rows).splitlines()
    starts = [header.index(column) for column in rows[0]]
    for line in lines:
        assert all(
            line[start] != " " and (start == 0 or line[start - 1] == " ") for start in starts
        ), line
    assert lines[0].split()[2:] == ["1.235", "-"]


# ---------------------------------------------------------------- paper-ready figures (issue 21, point 8)


def artists_labelled(figure, prefix: str) -> list:
    return [
        line
        for panel in figure.axes
        for line in panel.get_lines()
        if line.get_label().startswith(prefix)
    ]


def legend_boxes_and_panels(figure):
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(figure)
    canvas.draw()  # lay out (constrained layout places the legend) before measuring
    renderer = canvas.get_renderer()
    legends = list(figure.legends) + [
        panel.get_legend() for panel in figure.axes if panel.get_legend()
    ]
    return [legend.get_window_extent(renderer) for legend in legends], [
        panel.get_window_extent(renderer) for panel in figure.axes
    ]


def every_figure(runs: list) -> dict:
    figures = {
        f"test vs {axis}": report.curve_figure(runs, "test", axis) for axis in report.compare.AXES
    }
    figures.update(
        {
            f"train vs {axis}": report.curve_figure(runs, "train", axis)
            for axis in report.compare.AXES
        }
    )
    figures.update(
        {
            "equal time": report.cut_figure(report.equal_time(runs), runs),
            "equal bytes": report.cut_figure(report.equal_bytes(runs), runs),
            "bytes split": report.bytes_split_figure(runs),
            "consensus": report.consensus_figure(runs),
        }
    )
    return figures


def test_a_run_records_its_no_learning_baseline(sweep: Path):
    """summary.json's no_learning: the train mean rating of all nodes, scored on all their test ratings,
    recomputed here from each node's own data."""
    from omegaconf import OmegaConf

    from dpsgd.building import prepare_data
    from dpsgd.composition import settings_from

    config = settings_from(OmegaConf.create((sweep / "0" / "config.yaml").read_text()))
    dataset = prepare_data(config)
    parts = [
        dataset.node_data(node, NODES, config.run.seed, config.eval.test_samples)
        for node in range(NODES)
    ]
    train = [float(r) for part in parts for r in part.train[2]]
    test = [float(r) for part in parts for r in part.test[2]]
    mean = statistics.fmean(train)
    rmse = statistics.fmean((r - mean) ** 2 for r in test) ** 0.5
    for job in REAL_RUNS:
        summary = json.loads((sweep / job / "summary.json").read_text())
        assert summary["no_learning"]["test_loss"] == pytest.approx(rmse, rel=1e-9)
        assert 0 < summary["no_learning"]["test_acc"] < 1
        assert report.load_run(sweep / job).no_learning == summary["no_learning"]["test_loss"]


def test_every_figure_has_a_title_and_its_legend_outside_the_data(sweep: Path):
    runs = report.load_runs([sweep])
    for name, figure in every_figure(runs).items():
        assert figure.get_suptitle(), f"{name}: no title"
        assert all(panel.get_title() for panel in figure.axes), (
            f"{name}: a panel says nothing of its data"
        )
        legends, panels = legend_boxes_and_panels(figure)
        assert legends, f"{name}: no legend"
        for legend in legends:
            assert not any(legend.overlaps(panel) for panel in panels), (
                f"{name}: the legend lies on the data"
            )
    title = report.curve_figure(runs, "test", "round").get_suptitle()
    assert "RMSE" in title and "rounds" in title
    assert "synthetic, 4 nodes" in report.curve_figure(runs, "test", "round").axes[0].get_title()


def test_every_metric_figure_draws_the_no_learning_line(sweep: Path):
    runs = report.load_runs([sweep])
    baseline = json.loads((sweep / "0" / "summary.json").read_text())["no_learning"]["test_loss"]
    for name, figure in every_figure(runs).items():
        if not name.startswith(("test", "equal")):
            continue
        lines = artists_labelled(figure, "no learning")
        assert len(lines) == 1, name
        where = lines[0].get_ydata() if name.startswith("test") else lines[0].get_xdata()
        assert list(where) == [baseline, baseline], name
        assert f"{baseline:.4g}" in lines[0].get_label()


def test_equal_cuts_are_dots_on_an_axis_that_does_not_start_at_zero(sweep: Path):
    """An RMSE bar from 0 makes 0.91 and 0.93 look alike: a dot per run, the axis around the values."""
    from matplotlib.patches import Rectangle

    runs = report.load_runs([sweep])
    for cuts in (report.equal_time(runs), report.equal_bytes(runs)):
        figure = report.cut_figure(cuts, runs)
        panel = figure.axes[0]
        assert not [patch for patch in panel.patches if isinstance(patch, Rectangle)], "bars"
        low, high = panel.get_xlim()
        placed = [cut.point.mean for cut in cuts if cut.point]
        assert placed and 0 < low < min(placed) and max(placed) < high


def test_bands_are_drawn_only_when_asked(sweep: Path, tmp_path: Path):
    from matplotlib.collections import PolyCollection

    runs = report.load_runs([sweep])

    def bands(figure) -> int:
        return sum(
            isinstance(artist, PolyCollection)
            for panel in figure.axes
            for artist in panel.collections
        )

    with_curves = sum(bool(report.test_curve(run)) for run in runs)
    assert bands(report.curve_figure(runs, "test", "round", bands=True)) == with_curves > 0
    assert bands(report.curve_figure(runs, "test", "round")) == 0
    for flag, expected in (("--bands", with_curves), ("--no-bands", 0)):
        out = tmp_path / flag
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "dpsgd.report",
                str(sweep),
                "--out",
                str(out),
                flag,
                "--formats",
                "svg",
            ],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, result.stderr
        svg = (out / "test_metric_vs_rounds.svg").read_text()
        assert (
            svg.count('id="FillBetweenPolyCollection') + svg.count('id="PolyCollection') == expected
        ), flag
        assert not list(out.glob("*.png"))


def test_figures_are_written_in_every_format_asked(sweep: Path, tmp_path: Path):
    written = report.write_report(
        report.load_runs([sweep]), tmp_path, formats=("png", "pdf", "svg")
    )
    for stem in FIGURE_STEMS:
        for extension, magic in MAGIC.items():
            path = tmp_path / f"{stem}.{extension}"
            assert path in written and path.read_bytes().startswith(magic), path
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "dpsgd.report",
            str(sweep),
            "--out",
            str(tmp_path / "o"),
            "--formats",
            "png,eps",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2 and "--formats" in result.stderr and "eps" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_written_tables_name_runs_relative_to_the_input(sweep: Path, written: Path):
    for name in TABLES:
        text = (written / name).read_text()
        assert str(sweep.parent) not in text and str(Path.home()) not in text, name
        dirs = {row["run_dir"] for row in read_csv(written / name)}
        assert dirs == {f"{sweep.name}/{job}" for job in REAL_RUNS}, name


def test_a_run_given_alone_is_named_by_its_folder(sweep: Path):
    run = report.load_runs([sweep / "1"])[0]
    assert report.final_metrics(run)["run_dir"] == "1"


def test_cuts_place_the_most_runs_where_no_budget_holds_them_all(tmp_path: Path):
    """Bytes spans: walk 10-20, gossip 30-100, partial 40-120. The shortest run (walk) ended before the
    others first evaluated; a cut at its end would leave two of three without a point, 100 leaves one."""
    make_run(tmp_path / "walk", "rwm", "full", 1.0, {2: [(1.0, 10, 0.9)], 4: [(2.0, 20, 0.8)]})
    make_run(
        tmp_path / "gossip", "dpsgd", "full", 1.0, {2: [(1.0, 30, 0.95)], 4: [(2.0, 100, 0.7)]}
    )
    make_run(
        tmp_path / "partial", "dpsgd", "partial", 0.1, {2: [(1.0, 40, 0.97)], 4: [(2.0, 120, 0.75)]}
    )
    runs = report.load_runs([tmp_path])
    cuts = report.equal_bytes(runs)
    assert {cut.cut for cut in cuts} == {100.0}
    assert reached_by_label(cuts) == {
        "rwm full": None,
        "dpsgd full": (4, 0.7),
        "dpsgd partial a=0.1": (2, 0.97),
    }
    figure = report.cut_figure(cuts, runs)
    notes = [text.get_text() for text in figure.axes[0].texts]
    assert any(note.startswith("ended at 20 B per node, before the cut") for note in notes), notes


def test_the_baseline_option_draws_a_line_for_runs_that_did_not_record_one(tmp_path: Path):
    hand_made_sweep(tmp_path / "runs")
    make_run(
        tmp_path / "runs" / "recorded",
        "rwm",
        "partial",
        0.5,
        {2: [(1.0, 10, 0.9)], 4: [(2.0, 20, 0.8)]},
        no_learning={"test_loss": 1.25, "test_acc": 0.1},
    )
    runs = report.load_runs([tmp_path / "runs"], baseline=1.04)
    assert {run.label: run.no_learning for run in runs} == {
        "dpsgd full": 1.04,
        "rwm full": 1.04,
        "dpsgd partial a=0.1": 1.04,
        "rwm partial a=0.5": 1.25,
    }
    lines = artists_labelled(report.curve_figure(runs, "test", "round"), "no learning")
    assert sorted(line.get_ydata()[0] for line in lines) == [1.04, 1.25]


@pytest.mark.parametrize(
    "folder",
    sorted(path.name for path in (REPO / "benchmarks" / "results").iterdir() if path.is_dir())
    + ["."],
)
def test_committed_result_tables_hold_no_absolute_paths(folder: str):
    root = REPO / "benchmarks" / "results" / folder
    files = [
        path
        for path in (root.rglob("*") if folder != "." else root.iterdir())
        if path.suffix in (".csv", ".json", ".jsonl")
    ]
    holding = [
        str(path.relative_to(REPO))
        for path in files
        if any(prefix in path.read_text() for prefix in ("/work/", "/tmp/", "/home/", "/Users/"))
    ]
    assert not holding, f"absolute paths in {holding}"
