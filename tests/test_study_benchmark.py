"""benchmarks/study.py: the rows' commands, one CSV line per run read from its summary, reruns merged."""

from __future__ import annotations

import csv
import importlib.util
import json
import sys

import pytest

from tests.conftest import REPO, compose_config, run_train

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
    args = study.parse_args(
        ["--rows", "celeba_rwm_full", "--nodes", "8", "--rounds", "30", "--extra", "seed=3"]
    )
    overrides = study.overrides_for(args.rows[0], args)
    assert {"nodes=8", "rounds=30", "seed=3", "algorithm=rwm"} <= set(overrides)
    with pytest.raises(SystemExit):
        study.parse_args(["--rows", "no_such_row"])


def _summary(
    run_dir, metric_name, final, rounds=None, rounds_max=None, in_progress=False, diverged=None
):
    run_dir.mkdir(parents=True)
    budget = rounds or final["round"]
    (run_dir / "summary.json").write_text(
        json.dumps(
            {
                "nodes": 4,
                "test_loss_metric": metric_name,
                "wall_s": 12.34,
                "final": final,
                "rounds": budget,
                "rounds_completed": final["round"],
                "rounds_max": rounds_max or budget,
                "in_progress": in_progress,
                "diverged": diverged,
            }
        )
    )


def test_result_lines_come_from_the_summary_and_reruns_replace_only_their_line(tmp_path):
    rows = {row.name: row for row in study.ROWS}
    final = {
        "round": 370,
        "test_loss": {"mean": 0.92571},
        "test_acc": {"mean": 0.2},
        "bytes_sent": {"mean": 1e6},
    }
    _summary(tmp_path / "a", "rmse", final)
    line = study.result_line(rows["ml1_rwm_full"], tmp_path / "a", baseline=1.0413, commit="abc")
    assert line == {
        "row": "ml1_rwm_full",
        "dataset": "movielens",
        "algorithm": "rwm",
        "sharing": "full",
        "alpha": 1.0,
        "nodes": 4,
        "rounds": 370,
        "metric": "test_rmse",
        "ours": 0.9257,
        "study": 0.9754,
        "bytes_per_node": 1000000,
        "wall_s": 12.3,
        "commit": "abc",
        "baseline": 1.0413,
        "status": "complete",
    }
    _summary(
        tmp_path / "b", "cross_entropy", {**final, "round": 250, "test_acc": {"mean": 0.81234}}
    )
    image_line = study.result_line(
        rows["celeba_dpsgd_full"], tmp_path / "b", baseline=52.3, commit="abc"
    )
    assert image_line["metric"] == "test_acc_pct" and image_line["ours"] == pytest.approx(81.234)

    table = tmp_path / "study.csv"
    study.merge_into_csv(table, [image_line])
    study.merge_into_csv(table, [line])
    study.merge_into_csv(table, [{**line, "ours": 0.9}])  # a rerun of the same row
    with open(table, newline="") as file:
        lines = list(csv.DictReader(file))
    assert list(lines[0]) == list(study.COLUMNS)
    assert [(r["row"], r["ours"]) for r in lines] == [
        ("ml1_rwm_full", "0.9"),
        ("celeba_dpsgd_full", "81.234"),
    ]


def test_a_labelled_variant_has_its_own_rows_and_folders_and_a_resumed_row_keeps_its_run(
    tmp_path, monkeypatch
):
    commands = []
    monkeypatch.setattr(study.subprocess, "run", lambda command, **_: commands.append(command))
    args = study.parse_args(
        [
            "--rows",
            "ml1_dpsgd_full",
            "--label",
            "float16",
            "--extra",
            "sharing.values=float16",
            "--runs-dir",
            str(tmp_path),
        ]
    )
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
    final = {
        "round": 500,
        "test_loss": {"mean": 0.91},
        "test_acc": {"mean": 0.2},
        "bytes_sent": {"mean": 1e6},
    }
    _summary(tmp_path / "s", "rmse", final)
    plain = study.result_line(rows["ml1_dpsgd_full"], tmp_path / "s", baseline=1.04, commit="abc")
    variant = study.result_line(
        rows["ml1_dpsgd_full"],
        tmp_path / "s",
        baseline=1.04,
        commit="abc",
        name=study.row_name(rows["ml1_dpsgd_full"], args),
    )
    table = tmp_path / "values.csv"
    study.merge_into_csv(table, [variant])
    study.merge_into_csv(table, [plain])
    with open(table, newline="") as file:
        assert [line["row"] for line in csv.DictReader(file)] == [
            "ml1_dpsgd_full",
            "ml1_dpsgd_full@float16",
        ]


def _final(round_number):
    return {
        "round": round_number,
        "test_loss": {"mean": 0.9},
        "test_acc": {"mean": 0.2},
        "bytes_sent": {"mean": 1e6},
    }


def test_a_run_stopped_before_its_budget_is_recorded_with_the_round_it_reached_never_as_final(
    tmp_path,
):
    rows = {row.name: row for row in study.ROWS}
    _summary(
        tmp_path / "stopped", "rmse", _final(1800), rounds=5000, rounds_max=1803
    )  # Ctrl-C at round 1803
    line = study.result_line(
        rows["ml1_dpsgd_random"], tmp_path / "stopped", baseline=1.04, commit="abc"
    )
    assert (
        line["rounds"] == 1800
        and line["status"] == "stopped at round 1800 of 5000 (continue with --resume)"
    )
    assert (
        line["alpha"] == "random" and line["sharing"] == "random_alpha" and line["study"] == 0.3189
    )
    _summary(
        tmp_path / "killed", "rmse", _final(1800), rounds=5000, rounds_max=5000, in_progress=True
    )
    assert study.result_line(rows["ml1_dpsgd_random"], tmp_path / "killed", 1.04, "abc")[
        "status"
    ].startswith("stopped at round 1800 of 5000")
    _summary(
        tmp_path / "walked", "rmse", _final(370), rounds=500, rounds_max=500
    )  # RWM: the first node finished
    assert (
        study.result_line(rows["ml1_rwm_full"], tmp_path / "walked", 1.04, "abc")["status"]
        == "complete"
    )
    _summary(
        tmp_path / "nan", "rmse", _final(40), rounds=500, rounds_max=41, diverged={"round": 41}
    )
    assert (
        study.result_line(rows["ml1_dpsgd_full"], tmp_path / "nan", 1.04, "abc")["status"]
        == "diverged"
    )


def test_no_run_records_existing_runs_and_a_fresh_clone_keeps_the_other_rows_figures(
    tmp_path, monkeypatch
):
    commands = []
    monkeypatch.setattr(study.subprocess, "run", lambda command, **_: commands.append(command))
    monkeypatch.setattr(study, "no_learning_baseline", lambda row, data_dir: 1.0413)
    monkeypatch.setattr(study, "git_commit", lambda: "abc")
    runs, table, figures = tmp_path / "runs", tmp_path / "study.csv", tmp_path / "figures"
    _summary(runs / "ml1_dpsgd_random", "rmse", _final(1800), rounds=5000, rounds_max=1800)
    study.merge_into_csv(
        table, [{"row": "ml1_dpsgd_full", "ours": 0.9127}]
    )  # ran in another clone: no folder here
    options = [
        "--rows",
        "ml1_dpsgd_random",
        "--no-run",
        "--runs-dir",
        str(runs),
        "--csv",
        str(table),
        "--figures",
        str(figures),
    ]
    study.main(options)
    assert not any(
        "train.py" in str(part) for command in commands for part in command
    )  # nothing ran
    with open(table, newline="") as file:
        lines = {line["row"]: line for line in csv.DictReader(file)}
    assert (
        lines["ml1_dpsgd_random"]["status"].startswith("stopped at round 1800")
        and lines["ml1_dpsgd_full"]
    )
    # The data set's figures compare ml1_dpsgd_full too, whose run is not here: the new row gets its own folder.
    assert commands[-1][-2:] == ["--out", str(figures / "ml1_dpsgd_random")]
    assert str(runs / "ml1_dpsgd_random") in commands[-1]

    _summary(
        runs / "ml1_dpsgd_full", "rmse", _final(500)
    )  # with every row's run at hand, one comparison again
    commands.clear()
    study.main(options)
    assert commands[-1][-2:] == ["--out", str(figures / "movielens")]
    assert {str(runs / "ml1_dpsgd_full"), str(runs / "ml1_dpsgd_random")} <= set(commands[-1])


def test_metric_candidates_from_the_logs_agree_with_the_ones_recomputed_from_saved_models(tmp_path):
    run_train(
        tmp_path,
        "nodes=4",
        "nodes_per_rank=4",
        "rounds=6",
        "eval.every=3",
        "checkpoint.every=3",
        "sharing=random_alpha",
        "log.progress=false",
    )
    row = study.Row("tiny", "synthetic", "dpsgd", "random_alpha", 1.0, 0.5, 6, 4)
    args = study.parse_args(["--runs-dir", str(tmp_path), "--figures", str(tmp_path / "figures")])
    args.label = None
    (tmp_path / "run").rename(tmp_path / "tiny")
    out = study.metric_candidates(row, args)
    with open(out, newline="") as file:
        lines = list(csv.DictReader(file))
    logged = {
        (line["round"], line["measure"]): float(line["value"])
        for line in lines
        if line["source"] == "jsonl"
    }
    saved = {
        line["measure"]: float(line["value"]) for line in lines if line["source"] == "checkpoint"
    }
    assert {line["round"] for line in lines if line["source"] == "checkpoint"} == {"6"}
    assert {round_number for round_number, _ in logged} == {"3", "6"}
    # The logs hold each node's RMSE; the saved models, recomputed here, give the same mean MSE.
    assert saved["test_mse"] == pytest.approx(logged[("6", "test_mse")], rel=1e-4)
    assert saved["train_mse"] == pytest.approx(logged[("6", "train_mse")], rel=1e-4)
    assert logged[("6", "train_half_mse")] == pytest.approx(logged[("6", "train_mse")] / 2)
    assert saved["test_rmse_pooled"] == pytest.approx(saved["test_mse_pooled"] ** 0.5)
    assert (
        0 < saved["test_mae"] < saved["test_mse"] ** 0.5 + 1e-9
    )  # |e| averages below the root mean square
    # Clipping to the scale only brings a prediction nearer its rating; rounding moves it <= 1/4 star.
    assert 0 <= saved["test_mae_rounded"] <= saved["test_mae"] + 0.25
