"""Issue 21, a researcher's first hour with the configuration: the README's sweep runs to its
end, small torchrun worlds get a graph that fits, config mistakes exit 2 as one paragraph
(under torchrun: torchrun's one reported cause), `--help` explains every key and metric, and
the run folder holds nothing unexplained."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from dpsgd import config_help
from dpsgd.checks import check_config, config_notes
from dpsgd.composition import check_known_keys, settings_from
from dpsgd.errors import ConfigError
from dpsgd.launch import EXIT_CONFIG_ERROR
from dpsgd.topology import default_degree
from tests.conftest import RANK_TEST_TIMEOUT_S, REPO, compose_settings, run_train

README = (REPO / "README.md").read_text()


def _compose_with_choices(*overrides: str):
    """The config as train.py composes it, and Hydra's runtime choices (group -> option)."""
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        full = compose(config_name="config", overrides=list(overrides), return_hydra_config=True)
    choices = dict(full.hydra.runtime.choices)
    with open_dict(full):
        del full["hydra"]
    return full, choices


def _torchrun(tmp_path: Path, ranks: int, *overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "DPSGD_CACHE": str(tmp_path / "cache")}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        str(ranks),
        str(REPO / "train.py"),
        *overrides,
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    return subprocess.run(
        command,
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=RANK_TEST_TIMEOUT_S,
        check=False,
    )


# ---------------------------------------------------------------- 1. the README's sweep


@pytest.mark.parametrize("sharing", ["full", "random_alpha"])
def test_alpha_with_a_method_it_does_not_apply_to_is_accepted_and_noted(sharing):
    cfg = compose_settings(f"sharing={sharing}", "alpha=0.1")
    check_config(cfg, 16)  # before: "alpha=0.1 has no effect with sharing=full"
    assert any(
        f"alpha=0.1 does not apply to sharing={sharing}" in note for note in config_notes(cfg)
    )
    assert config_notes(compose_settings("sharing=partial", "alpha=0.1")) == []


def test_a_sweep_runs_every_job_and_lists_the_failed_ones_at_its_end(tmp_path):
    """Job 0 fails (a typed degree that no 4-node graph has); job 1 (alpha with full sharing) still runs."""
    sweep = tmp_path / "sweep"
    result = run_train(
        tmp_path,
        "-m",
        "nodes=4",
        "rounds=2",
        "log.progress=false",
        "topology.degree=4,3",
        "sharing=full",
        "alpha=0.1",
        f"hydra.sweep.dir={sweep}",
        check=False,
    )
    assert result.returncode == EXIT_CONFIG_ERROR, result.stderr
    assert json.loads((sweep / "1" / "summary.json").read_text())["rounds_completed"] == 2
    assert "1 of 2 sweep jobs failed" in result.stderr
    assert re.search(
        r"job 0 \(.*topology\.degree=4.*\): topology\.degree is 4 with nodes=4", result.stderr
    )
    assert "Traceback" not in result.stderr
    assert "alpha=0.1 does not apply to sharing=full" in (sweep / "1" / "config.yaml").read_text()
    # Point 7: no 0-byte train.log from Hydra's job logging; .hydra/ is documented.
    assert (
        not (sweep / "1" / "train.log").exists()
        and (sweep / "1" / ".hydra" / "overrides.yaml").exists()
    )
    left_behind = README.split("## What a run leaves behind")[1].split("\n## ")[0]
    assert "`.hydra/`" in left_behind and "overrides.yaml" in left_behind
    assert not (
        sweep / "0"
    ).exists()  # review 7: the failed job wrote nothing, so it leaves no folder


# ---------------------------------------------------------------- 3. small torchrun worlds


def test_the_default_degree_fits_small_worlds_and_a_typed_one_is_checked():
    assert [default_degree("regular", n) for n in (2, 3, 4, 5, 6, 96)] == [1, 2, 3, 4, 4, 4]
    assert [default_degree("smallworld", n) for n in (3, 4, 5)] == [2, 2, 4]
    topology = check_config(compose_settings("nodes=4"), 4)  # before: no 4-regular graph on 4 nodes
    assert {topology.degree(node) for node in range(4)} == {3}
    assert config_notes(compose_settings("nodes=4")) == [
        "topology.degree=3: the largest valid degree up to 4 for 4 nodes (set topology.degree to choose one)"
    ]
    assert config_notes(compose_settings("nodes=16")) == []
    with pytest.raises(ConfigError, match="topology.degree is 4 with nodes=4"):
        check_config(compose_settings("nodes=4", "topology.degree=4"), 4)


def test_plain_torchrun_with_four_ranks_runs_the_default_graph(tmp_path):
    result = _torchrun(tmp_path, 4, "rounds=2", "eval.every=1", "log.progress=false")
    assert result.returncode == 0, result.stdout + result.stderr
    assert (
        result.stdout.count("topology.degree=3: the largest valid degree up to 4 for 4 nodes") == 1
    )
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["rounds_completed"] == 2


def test_a_config_error_under_torchrun_is_its_one_reported_cause(tmp_path):
    result = _torchrun(tmp_path, 4, "topology.degree=4", "rounds=2")
    output = result.stdout + result.stderr
    assert result.returncode != 0
    paragraph = "topology.degree is 4 with nodes=4, but a d-regular graph needs"
    assert output.count(paragraph) == 1, output
    assert "<NO_OTHER_FAILURES>" in output and "To enable traceback" not in output, output
    root_cause = output.split("Root Cause (first observed failure):")[1]
    assert paragraph in root_cause  # the last thing torchrun prints, not buried above its traceback
    assert not (tmp_path / "run").exists()  # review 7: no folder holding only Hydra's record


# ---------------------------------------------------------------- unknown and undeclared keys


@pytest.mark.parametrize(
    "overrides,says",
    [
        (("foo=1",), "`foo` is not a key of the configuration"),
        (("rond=5",), "Did you mean `rounds`?"),
        (
            ("optimizer=adam", "optimizer.momentum=0.9"),
            "`optimizer.momentum` belongs to optimizer=sgd",
        ),
        (("dataset=foo",), "the config group dataset has no option foo"),
    ],
)
def test_an_unknown_key_or_option_exits_2_with_one_paragraph(tmp_path, overrides, says):
    result = run_train(tmp_path, *overrides, check=False, timeout_s=60)
    assert result.returncode == EXIT_CONFIG_ERROR, result.stderr  # before: 1, Hydra's message
    assert says in result.stderr
    assert result.stderr.strip().startswith("dpsgd: ") and result.stderr.strip().count("\n") == 0, (
        result.stderr
    )
    assert "HYDRA_FULL_ERROR" not in result.stderr


def test_a_key_no_config_file_declares_is_refused():
    cfg, choices = _compose_with_choices("+train.bogus=1")
    with pytest.raises(ConfigError) as error:
        check_config(settings_from(cfg, choices), 16)  # before: accepted and silently ignored
    message = str(error.value)
    assert message.startswith("train.bogus=1 is not a key") and "\n" not in message


def test_every_group_option_and_preset_declares_the_keys_it_composes():
    for group in config_help.GROUPS:
        for option in config_help.group_options(group):
            check_known_keys(*_compose_with_choices(f"{group}={option}"))
    check_known_keys(
        *_compose_with_choices("experiment=celeba", "model=mf")
    )  # a preset's keys on another model


# ---------------------------------------------------------------- 6. --help


def test_help_gives_every_key_its_doc_and_every_metric_its_meaning():
    result = subprocess.run(
        [sys.executable, str(REPO / "train.py"), "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        check=False,
    )
    assert result.returncode == 0
    assert re.search(r"train\.local_steps=20 +optimizer steps per round", result.stdout)
    assert re.search(r"sharing\.accumulation=true +score = training changes", result.stdout)
    assert "rounding it to the nearest half star" in result.stdout
    for metric in config_help.METRICS:
        assert re.search(rf"^  {metric} ", result.stdout, re.MULTILINE), metric


def test_every_key_of_every_conf_file_has_a_doc_comment():
    """The comments are the one source of --help: a key without one would be listed unexplained."""
    files = [Path("config.yaml")] + [
        Path(group) / f"{option}.yaml"
        for group in config_help.GROUPS
        if group != "experiment"
        for option in config_help.group_options(group)
    ]
    for path in files:
        conf = config_help.read_conf(str(path))
        body = yaml.safe_load((config_help.CONF_DIR / path).read_text())
        written = config_help.leaf_keys(
            {k: v for k, v in body.items() if k not in ("defaults", "hydra")}
        )
        documented = {k.key for k in conf.keys if k.doc}
        assert written - {"name"} <= documented, (path, sorted(written - documented))


def test_the_readme_says_what_test_acc_means_for_ratings():
    metrics = README.split("## What a run leaves behind")[1]
    assert re.search(r"`test_acc`[^.]*half star", metrics)


# ---------------------------------------------------------------- review 9: start-up counters per run


def test_start_up_counters_are_counted_per_run_in_a_shared_store():
    """A torchrun sweep's jobs share one store: each job's ranks count in its own namespace (run_key)."""
    import torch.distributed as dist

    from dpsgd.launch import RankContext, announce_start
    from dpsgd.progress import RankArrivals, rank_arrived, run_store

    store = dist.HashStore()
    watcher = announce_start(RankContext(rank=0, world_size=2, store=store), "sweep/0")
    assert watcher is not None  # rank 0 watches its run's counts
    watcher.stop()
    assert announce_start(RankContext(rank=1, world_size=2, store=store), "sweep/0") is None
    for _ in range(2):  # job 0: both ranks built their nodes
        rank_arrived(run_store(store, "sweep/0"), "ready")
    watcher = announce_start(RankContext(rank=1, world_size=2, store=store), "sweep/1")
    assert watcher is None  # only rank 0 watches
    assert RankArrivals(run_store(store, "sweep/0"), 2).counts() == (2, 2)
    assert RankArrivals(run_store(store, "sweep/1"), 2).counts() == (
        1,
        0,
    )  # job 1 starts from nothing


# ---------------------------------------------------------------- review 4: options from --config-dir


def test_an_option_from_a_users_config_dir_declares_its_keys(tmp_path):
    """`--config-dir` adds a folder of options: their keys are declared keys, not refused ones."""
    own = tmp_path / "myconf"
    (own / "topology").mkdir(parents=True)
    text = (config_help.CONF_DIR / "topology" / "regular.yaml").read_text()
    (own / "topology" / "deg3.yaml").write_text(
        re.sub(r"(?m)^degree: null", "degree: 3", text) + "extra: 1\n"
    )
    result = run_train(
        tmp_path,
        "--config-dir",
        str(own),
        "topology=deg3",
        "nodes=4",
        "rounds=1",
        "log.progress=false",
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["topology"]["degree"] == 3
    # A typo is still refused with the user's option chosen.
    refused = run_train(
        tmp_path / "second",
        "--config-dir",
        str(own),
        "topology=deg3",
        "nodes=4",
        "+topology.degre=3",
        check=False,
    )
    assert (
        refused.returncode == EXIT_CONFIG_ERROR
        and "topology.degre=3 is not a key" in refused.stderr
    )
    # An option dpsgd cannot read (not in any config folder) leaves its group unchecked.
    declared = config_help.declared_keys(
        {"topology": "from_a_package"}, roots=(config_help.CONF_DIR,)
    )
    assert "topology.anything" in declared and "train.bogus" not in declared


# ---------------------------------------------------------------- review 1: torchrun sweeps and one rank's failure


def test_a_torchrun_sweep_ends_at_a_failure_that_only_some_ranks_see(tmp_path):
    """Only rank 1 finds its results in job 0's folder: the sweep ends there with that paragraph, instead
    of rank 1 moving on to job 1 while rank 0 waits in job 0's process group (a stall, then a traceback)."""
    sweep = tmp_path / "sweep"
    (sweep / "0" / "nodes").mkdir(parents=True)
    (sweep / "0" / "nodes" / "1.jsonl").touch()
    result = _torchrun(
        tmp_path,
        2,
        "-m",
        "nodes=2",
        "rounds=2,3",
        "comm.timeout_s=10",
        "log.progress=false",
        f"hydra.sweep.dir={sweep}",
    )
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "already holds node 1's results" in output and "a sweep under torchrun ends" in output
    assert "DistStoreError" not in output and "sweep jobs failed" not in output
    assert not (sweep / "1" / "nodes").exists()


# ---------------------------------------------------------------- review 7: no folder holding only .hydra/


def test_releasing_a_folder_removes_it_only_when_it_holds_nothing_but_hydras_record(tmp_path):
    from dpsgd import run_folder

    lone = tmp_path / "lone"
    (lone / ".hydra").mkdir(parents=True)
    (lone / ".hydra" / "overrides.yaml").write_text("[]\n")
    run_folder.claim(lone)
    run_folder.release(lone)
    assert not lone.exists()
    kept = tmp_path / "kept"  # a folder the user put something else in
    (kept / ".hydra").mkdir(parents=True)
    (kept / "notes.txt").write_text("mine\n")
    run_folder.claim(kept)
    run_folder.release(kept)
    assert sorted(p.name for p in kept.iterdir()) == [".hydra", "notes.txt"]
    other = tmp_path / "other"  # another process's claim is not this run's to give back
    (other / ".hydra").mkdir(parents=True)
    (other / run_folder.MARKER).write_text("1 2026-01-01T00:00:00\n")
    run_folder.release(other)
    assert (other / run_folder.MARKER).exists() and (other / ".hydra").is_dir()
