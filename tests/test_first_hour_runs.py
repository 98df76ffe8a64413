"""What a new user meets in a first hour (issue 21): a diverged run says one clear line and nothing
else, a data_dir that is a file is named as one, and nothing in the repository unpickles code."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import warnings

import numpy as np
import pytest

from dpsgd.consensus import consensus_distance
from dpsgd.data.datasets import check_data_paths
from dpsgd.errors import ConfigError
from tests.conftest import REPO, run_train

# --- a diverged run -------------------------------------------------------------------------------


def test_a_diverged_run_prints_its_one_line_and_no_numpy_warnings(tmp_path):
    """optimizer.lr=30 blows the models up to inf within a round; evaluating every round publishes their
    sketches, whose consensus distance used to make numpy warn (inf - inf) before the clear line."""
    result = run_train(
        tmp_path,
        "optimizer.lr=30",
        "rounds=6",
        "eval.every=1",
        "nodes=4",
        "topology=ring",
        "checkpoint.every=0",
    )
    output = result.stdout + result.stderr
    assert "Warning" not in output, output
    assert sum("training diverged at round" in line for line in output.splitlines()) == 1, output


@pytest.mark.parametrize(
    "eval_every", [10, 1]
)  # the stop round unevaluated, then evaluated on schedule
def test_a_diverged_run_reports_no_metrics_of_its_non_finite_models_as_final(tmp_path, eval_every):
    """optimizer.lr=1000 makes every model non-finite in round 1 and the run stops at round 3: a model of
    NaNs scores accuracy 0.0, which summary.json's `final` must not show as the run's result."""
    run_train(
        tmp_path,
        "nodes=4",
        "rounds=30",
        "optimizer.lr=1000",
        f"eval.every={eval_every}",
        "checkpoint.every=0",
    )
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["diverged"]["round"] == 1 and summary["diverged"]["stop_after"] == 3, summary[
        "diverged"
    ]
    final = summary["final"]
    assert final["round"] == 3 and final["bytes_sent"]["n"] == 4, final
    assert not {"test_acc", "test_loss", "train_loss"} & set(final), final


def test_the_consensus_distance_of_non_finite_models_is_nan_without_a_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a RuntimeWarning fails the test
        for bad in (np.inf, -np.inf, np.nan):
            assert np.isnan(consensus_distance([np.array([bad, 1.0]), np.array([np.inf, 2.0])]))
        assert (
            consensus_distance([np.array([0.0, 1.0]), np.array([2.0, 1.0])]) == 1.0
        )  # finite: as before


# --- data_dir pointing at a file ------------------------------------------------------------------


def test_a_data_dir_that_is_a_file_is_one_paragraph_naming_it(tmp_path):
    data_file = tmp_path / "ratings.csv"
    data_file.write_text("userId,movieId,rating,timestamp\n")
    result = run_train(
        tmp_path, "dataset=movielens", f"data_dir={data_file}", "rounds=2", "nodes=4", check=False
    )
    assert result.returncode == 2, result.stdout + result.stderr
    paragraph = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(paragraph) == 1, result.stderr
    assert f"data_dir={data_file} is a file, not a folder" in paragraph[0]
    assert "contains ml-latest-small/" in paragraph[0] and f"`data_dir={tmp_path}`" in paragraph[0]


def test_a_file_in_place_of_a_folder_names_the_file_and_the_fix(tmp_path):
    ratings = tmp_path / "data" / "ml-latest-small" / "ratings.csv"
    ratings.parent.mkdir(parents=True)
    ratings.write_text("")
    # data_dir set to the ratings file itself: the fix is the folder above ml-latest-small/.
    with pytest.raises(ConfigError, match=rf"e\.g\. `data_dir={tmp_path / 'data'}`"):
        check_data_paths(
            "movielens", {"path": f"{ratings}/ml-latest-small/ratings.csv"}, data_dir=str(ratings)
        )
    # A dataset path set on its own, under a file: the key and the file are named.
    with pytest.raises(
        ConfigError, match=rf"dataset\.train_dir=.*: {ratings} is a file, not a folder"
    ):
        check_data_paths(
            "femnist", {"train_dir": f"{ratings}/train", "test_dir": str(tmp_path)}, data_dir=None
        )
    # Folders that do not exist yet are the loaders' to report ("not found, download it from ...").
    check_data_paths(
        "movielens", {"path": str(tmp_path / "absent" / "ratings.csv")}, data_dir=str(tmp_path)
    )


# --- torch.load ------------------------------------------------------------------------------------


def test_every_torch_load_in_the_repository_says_weights_only():
    """torch.load without weights_only=True may run code from the file it reads (a pickle)."""
    unsafe = []
    for path in sorted(REPO.rglob("*.py")):
        if any(
            part.startswith(".") or part in ("build", "dist")
            for part in path.relative_to(REPO).parts
        ):
            continue  # .venv, .git
        for call in ast.walk(ast.parse(path.read_text(), str(path))):
            if (
                isinstance(call, ast.Call)
                and isinstance(call.func, ast.Attribute)
                and call.func.attr == "load"
                and isinstance(call.func.value, ast.Name)
                and call.func.value.id == "torch"
                and not any(
                    kw.arg == "weights_only"
                    and isinstance(kw.value, ast.Constant)
                    and kw.value.value is True
                    for kw in call.keywords
                )
            ):
                unsafe.append(f"{path.relative_to(REPO)}:{call.lineno}")
    assert not unsafe, f"torch.load without weights_only=True at {unsafe}"


# --- the optimizer start-up patch -----------------------------------------------------------------

_PATCHED_METHODS = """
import json
import torch
import dpsgd.training
def patched():
    return sorted(name for name, value in vars(torch.optim.Optimizer).items()
                  if getattr(getattr(value, "__wrapped__", None), "__dynamo_disable", None) is not None)
before = patched()
dpsgd.training.optimizers_without_compiler()
print(json.dumps([before, patched()]))
"""


def test_importing_dpsgd_training_leaves_torch_optim_as_torch_made_it():
    """Only train.py (the composition root) lets optimizers skip torch._dynamo: code that imports dpsgd
    and uses torch.compile must not find torch patched."""
    result = subprocess.run(
        [sys.executable, "-c", _PATCHED_METHODS],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    before, after = json.loads(result.stdout.splitlines()[-1])
    if not after:
        pytest.skip("this torch wraps optimizer methods differently: the patch leaves it alone")
    assert before == [], f"importing dpsgd.training patched torch.optim.Optimizer's {before}"
