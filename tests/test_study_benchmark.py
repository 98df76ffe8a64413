"""benchmarks/study.py: the rows' commands, one CSV line per run read from its summary, reruns merged."""

from __future__ import annotations

import csv
import importlib.util
import json
import sys

import pytest

from tests.conftest import REPO, compose_config

spec = importlib.util.spec_from_file_location("study", REPO / "benchmarks" / "study.py")
study = importlib.util.module_from_spec(spec)
sys.modules["study"] = study  # dataclasses look their module up while the file runs
spec.loader.exec_module(study)


def test_every_row_composes_into_a_valid_config_with_the_study_settings():
    args = study.parse_args(["--data-dir", "/data"])
    assert [row.name for row in args.rows] == [row.name for row in study.ROWS]
    for row in args.rows:
        overrides = study.overrides_for(row, args)
        cfg = compose_config(*overrides)
        assert cfg.algorithm.name == row.algorithm and cfg.sharing.name == row.sharing
        assert cfg.rounds == row.study_rounds and cfg.nodes == row.nodes and cfg.data_dir == "/data"
        assert cfg.dataset.name == row.dataset


def test_scale_options_apply_to_every_row_and_unknown_rows_are_refused():
    args = study.parse_args(["--rows", "celeba_rwm_full", "--nodes", "8", "--rounds", "30", "--extra", "seed=3"])
    overrides = study.overrides_for(args.rows[0], args)
    assert {"nodes=8", "rounds=30", "seed=3", "algorithm=rwm"} <= set(overrides)
    with pytest.raises(SystemExit):
        study.parse_args(["--rows", "no_such_row"])


def _summary(run_dir, metric_name, final):
    run_dir.mkdir(parents=True)
    (run_dir / "summary.json").write_text(json.dumps({"nodes": 4, "test_loss_metric": metric_name, "wall_s": 12.34,
                                                      "final": final}))


def test_result_lines_come_from_the_summary_and_reruns_replace_only_their_line(tmp_path):
    rows = {row.name: row for row in study.ROWS}
    final = {"round": 370, "test_loss": {"mean": 0.92571}, "test_acc": {"mean": 0.2}, "bytes_sent": {"mean": 1e6}}
    _summary(tmp_path / "a", "rmse", final)
    line = study.result_line(rows["ml1_rwm_full"], tmp_path / "a", baseline=1.0413, commit="abc")
    assert line == {"row": "ml1_rwm_full", "dataset": "movielens", "algorithm": "rwm", "sharing": "full",
                    "alpha": 1.0, "nodes": 4, "rounds": 370, "metric": "test_rmse", "ours": 0.9257,
                    "study": 0.9754, "bytes_per_node": 1000000, "wall_s": 12.3, "commit": "abc", "baseline": 1.0413}
    _summary(tmp_path / "b", "cross_entropy", {**final, "round": 250, "test_acc": {"mean": 0.81234}})
    image_line = study.result_line(rows["celeba_dpsgd_full"], tmp_path / "b", baseline=52.3, commit="abc")
    assert image_line["metric"] == "test_acc_pct" and image_line["ours"] == pytest.approx(81.234)

    table = tmp_path / "study.csv"
    study.merge_into_csv(table, [image_line])
    study.merge_into_csv(table, [line])
    study.merge_into_csv(table, [{**line, "ours": 0.9}])  # a rerun of the same row
    with open(table, newline="") as file:
        lines = list(csv.DictReader(file))
    assert list(lines[0]) == list(study.COLUMNS)
    assert [(r["row"], r["ours"]) for r in lines] == [("ml1_rwm_full", "0.9"), ("celeba_dpsgd_full", "81.234")]


def test_a_labelled_variant_has_its_own_rows_and_folders_and_a_resumed_row_keeps_its_run(tmp_path, monkeypatch):
    commands = []
    monkeypatch.setattr(study.subprocess, "run", lambda command, **_: commands.append(command))
    args = study.parse_args(["--rows", "ml1_dpsgd_full", "--label", "float16", "--extra", "sharing.values=float16",
                             "--runs-dir", str(tmp_path)])
    kept = tmp_path / "ml1_dpsgd_full@float16" / "checkpoints"
    kept.mkdir(parents=True)
    assert study.run_row(args.rows[0], args) == tmp_path / "ml1_dpsgd_full@float16"
    assert not kept.exists()  # a fresh variant run replaces its own folder only
    kept.mkdir(parents=True)
    args.resume = True
    study.run_row(args.rows[0], args)
    assert kept.exists() and commands[-1][-1] == "resume=true" and "resume=true" not in commands[0]
    assert "sharing.values=float16" in commands[0]

    rows = {row.name: row for row in study.ROWS}
    final = {"round": 500, "test_loss": {"mean": 0.91}, "test_acc": {"mean": 0.2}, "bytes_sent": {"mean": 1e6}}
    _summary(tmp_path / "s", "rmse", final)
    plain = study.result_line(rows["ml1_dpsgd_full"], tmp_path / "s", baseline=1.04, commit="abc")
    variant = study.result_line(rows["ml1_dpsgd_full"], tmp_path / "s", baseline=1.04, commit="abc",
                                name=study.row_name(rows["ml1_dpsgd_full"], args))
    table = tmp_path / "values.csv"
    study.merge_into_csv(table, [variant])
    study.merge_into_csv(table, [plain])
    with open(table, newline="") as file:
        assert [line["row"] for line in csv.DictReader(file)] == ["ml1_dpsgd_full", "ml1_dpsgd_full@float16"]
