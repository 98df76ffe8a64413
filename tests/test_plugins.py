"""One place to plug in (issue 22): data sets and models by name from registries, and a data set or model of a
user's own named by `_target_` from a package outside dpsgd (tests/plugin_example/), with one clear paragraph
when the target cannot be imported, called with the group's keys, or returns the wrong thing."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from dpsgd.checks import check_config
from dpsgd.data.datasets import DATASETS, prepare_dataset
from dpsgd.errors import ConfigError
from dpsgd.models import MODELS, build_model
from dpsgd.models.flat import flatten_model
from tests.conftest import REPO, compose_settings, run_train
from tests.plugin_example.data import Blobs
from tests.plugin_example.nets import TinyMLP

EXAMPLE_CONF = str(REPO / "tests" / "plugin_example" / "conf")
MLP = "tests.plugin_example.nets.TinyMLP"
BLOBS = "tests.plugin_example.data.Blobs"
SMALL = ("nodes=2", "checkpoint.every=0")  # one process per node: the nodes train their own models


def returns_a_string(*args, **options) -> str:
    return "not a model, not a data set"


def one_paragraph(result) -> str:
    """The stderr of a run stopped by a config error: exit code 2 and one paragraph, no traceback."""
    assert result.returncode == 2, result.stdout + result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    return lines[0]


# --- the user's own, end to end through train.py --------------------------------------------------


def test_a_data_set_and_model_of_ones_own_train_from_option_files_in_config_dir(tmp_path):
    """tests/plugin_example/conf/{dataset,model}/blobs.yaml name Blobs and TinyMLP by `_target_` with keys of
    their own; dataset=blobs picks model=blobs as dpsgd's data sets pick theirs. The nodes learn: the mean test
    accuracy ends far above always answering the most common class."""
    run_train(
        tmp_path,
        "--config-dir",
        EXAMPLE_CONF,
        "dataset=blobs",
        "rounds=5",
        "eval.every=5",
        *SMALL,
        timeout_s=180,
    )
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert (summary["model"], summary["dataset"], summary["nodes"]) == ("tiny_mlp", "blobs", 2)
    assert (
        summary["num_parameters"] == 4 * 16 + 16 + 16 * 3 + 3
    )  # TinyMLP(hidden=16) on 4 features, 3 classes
    final, no_learning = summary["final"], summary["no_learning"]["test_acc"]
    assert final["round"] == 5 and final["nodes_reporting"] == 2, final
    assert final["test_acc"]["mean"] > no_learning + 0.3, (final["test_acc"], no_learning)
    partition = json.loads((tmp_path / "run" / "partition.json").read_text())
    assert [node["samples"] for node in partition["nodes"]] == [
        240,
        240,
    ]  # 80% of 600 points, halved


def test_targets_and_their_keys_on_the_command_line(tmp_path):
    """No option file: dataset=own and model=own take a `_target_` and keys of the user's own with a +; the
    targets' dotted paths are the run's labels."""
    run_train(
        tmp_path,
        "dataset=own",
        f"dataset._target_={BLOBS}",
        "+dataset.samples=300",
        "model=own",
        f"model._target_={MLP}",
        "+model.hidden=8",
        "rounds=2",
        "eval.every=1",
        *SMALL,
        timeout_s=180,
    )
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert (summary["model"], summary["dataset"]) == (MLP, BLOBS)
    assert summary["num_parameters"] == 4 * 8 + 8 + 8 * 3 + 3
    partition = json.loads((tmp_path / "run" / "partition.json").read_text())
    assert sum(node["samples"] for node in partition["nodes"]) == 240


# --- registries --------------------------------------------------------------------------------------


def test_a_registered_data_set_and_model_are_chosen_by_name(tmp_path, monkeypatch):
    monkeypatch.setitem(DATASETS, "toy", Blobs)
    monkeypatch.setitem(MODELS, "toy_mlp", TinyMLP)
    dataset = prepare_dataset("toy", {"samples": 100, "num_classes": 2}, seed=3, cache_dir=tmp_path)
    assert isinstance(dataset, Blobs) and dataset.dims == {"num_classes": 2, "num_features": 4}
    model = build_model("toy_mlp", dataset.dims, seed=3, hidden=5)
    assert isinstance(model, TinyMLP) and model[0].out_features == 5
    # Seeded from the run seed like dpsgd's own: every node starts from the same model.
    assert torch.equal(
        flatten_model(model), flatten_model(build_model("toy_mlp", dataset.dims, seed=3, hidden=5))
    )
    assert not torch.equal(
        flatten_model(model), flatten_model(build_model("toy_mlp", dataset.dims, 4, hidden=5))
    )
    # check_config reads the registries' keys: the new names pass, and an unknown name lists them.
    check_config(
        compose_settings("dataset.name=toy", "model.name=toy_mlp", "nodes=4"), world_size=4
    )
    with pytest.raises(
        ConfigError, match=r"dataset\.name='nope' is not known; choose one of \[.*'toy'\]"
    ):
        check_config(compose_settings("dataset.name=nope", "nodes=4"), world_size=4)
    with pytest.raises(
        ConfigError, match=r"model\.name='nope' is not known; choose one of \[.*'toy_mlp'\]"
    ):
        build_model("nope", dataset.dims, 3)


def test_dpsgds_own_are_registered_under_the_names_their_option_files_give():
    def names(group: str, options: tuple[str, ...]) -> set[str]:
        return {
            yaml.safe_load((REPO / "conf" / group / f"{option}.yaml").read_text())["name"]
            for option in options
        }

    assert names("dataset", ("synthetic", "movielens", "femnist", "celeba")) == set(DATASETS)
    assert names("model", ("mf", "femnist", "celeba")) == set(MODELS)


# --- a target that does not fit: one paragraph naming the key and the fix ----------------------------


def test_a_target_that_cannot_be_imported_is_one_paragraph_before_any_rank(tmp_path):
    result = run_train(
        tmp_path,
        "model=own",
        "model._target_=tests.plugin_example.nets.NoSuchNet",
        *SMALL,
        check=False,
        timeout_s=120,
    )
    line = one_paragraph(result)
    assert "Error getting callable" not in result.stdout, (
        result.stdout
    )  # Hydra's own log of it, said again
    assert line.startswith(
        "dpsgd: model._target_=tests.plugin_example.nets.NoSuchNet cannot be imported ("
        "ModuleNotFoundError"
    ), line
    assert (
        "'NoSuchNet' is importable from module 'tests.plugin_example.nets'" in line
        and "PYTHONPATH" in line
    )


def test_a_data_set_target_that_returns_the_wrong_thing_is_one_paragraph(tmp_path):
    line = one_paragraph(
        run_train(
            tmp_path,
            "dataset=own",
            "dataset._target_=tests.test_plugins.returns_a_string",
            "model=mf",
            *SMALL,
            check=False,
            timeout_s=120,
        )
    )
    assert (
        "dataset._target_=tests.test_plugins.returns_a_string: tests.test_plugins.returns_a_string(seed, "
        "cache_dir) returned str, but dpsgd needs a data set" in line
    ), line


def test_a_model_target_that_does_not_fit_names_the_key_and_the_fix(tmp_path):
    dims = {"num_classes": 3, "num_features": 4}
    with pytest.raises(
        ConfigError,
        match=r"model\._target_=tests\.test_plugins\.returns_a_string: "
        r"tests\.test_plugins\.returns_a_string\(dims, seed, hidden=8\) returned "
        r"str, but dpsgd needs a torch\.nn\.Module with parameters",
    ):
        build_model("own", dims, 1, _target_="tests.test_plugins.returns_a_string", hidden=8)
    with pytest.raises(
        ConfigError,
        match=r"dpsgd calls tests\.plugin_example\.nets\.TinyMLP\(dims, seed, "
        r"width=8\), but got an unexpected keyword argument 'width'.*drop the "
        r"model keys it does not take",
    ):
        build_model("own", dims, 1, _target_=MLP, width=8)
    with pytest.raises(
        ConfigError,
        match=r"dataset\._target_=tests\.plugin_example\.data\.Blobs: dpsgd calls "
        r".*Blobs\(seed, cache_dir, path='x'\), but got an unexpected keyword",
    ):
        prepare_dataset("blobs", {"_target_": BLOBS, "path": "x"}, 1, tmp_path)


def test_a_target_under_dpsgds_own_name_is_refused():
    """`+model._target_` on top of model=mf would hand mf's keys to the target, and mf's special cases
    (its stacked trainer) would apply to a model that is not mf."""
    with pytest.raises(
        ConfigError,
        match=r"model\._target_=tests\.plugin_example\.nets\.TinyMLP names your own "
        r"model, so model\.name must be a label of your own, not 'mf': choose "
        r"`model=own model\._target_=tests\.plugin_example\.nets\.TinyMLP`",
    ):
        check_config(compose_settings(f"+model._target_={MLP}", "nodes=4"), world_size=4)


def test_own_without_its_target_says_which_key_and_that_dataset_own_brings_model_own():
    with pytest.raises(
        ConfigError,
        match=r"^model=own needs model\._target_, .* `model\._target_=mypkg\.nets\."
        r"TinyNet` \(dataset=own picks model=own too: `model=mf`",
    ):
        check_config(
            compose_settings("dataset=own", f"dataset._target_={BLOBS}", "nodes=4"), world_size=4
        )


def test_a_target_on_dpsgds_own_option_or_a_key_without_its_plus_says_how(tmp_path):
    """Hydra refuses both (the key is not declared); the paragraph says what to write instead."""
    line = one_paragraph(
        run_train(tmp_path, f"model._target_={MLP}", *SMALL, check=False, timeout_s=120)
    )
    assert (
        "`model._target_` belongs to model=own" in line
        and f"`model=own model._target_={MLP}`" in line
    ), line
    line = one_paragraph(
        run_train(
            tmp_path,
            "model=own",
            f"model._target_={MLP}",
            "model.hidden=8",
            *SMALL,
            check=False,
            timeout_s=120,
        )
    )
    assert "`model.hidden` is a key of your own model" in line and "`+model.hidden=8`" in line, line
