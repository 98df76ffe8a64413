"""Every command the README shows, run here at a small scale, so the README cannot drift from the code.

The commands are read from README.md itself: every line of a command block (indented or fenced) and
every inline `code span` that starts like a command (`python ...`, `torchrun ...`, `.venv/...`). The
table COMMANDS says for each one how it runs here: which overrides shrink it (two rounds, a node
group instead of a process per node) and, where a command cannot run on one machine (SLURM, a
second host, the set-up itself), what is checked instead. A README command missing from the table
fails `test_every_readme_command_has_a_check`, and a table entry whose command left the README
fails too: the README and this table change together.

Data sets are named as the README names them (`data_dir=../shared/data`, from the repository
root); those commands skip where the data is absent. Every run writes under pytest's tmp_path
and parses data into one cache per module.
"""

from __future__ import annotations

import ast
import configparser
import json
import math
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement

from dpsgd.launch import free_port
from tests.conftest import REPO, SHARED_DATA

README = REPO / "README.md"
VENV_BIN = Path(sys.executable).parent  # what `. .venv/bin/activate` puts first on PATH
COMMAND_TIMEOUT_S = 240  # one command at a small scale; a hang fails the test, it never blocks CI
CONFIG_GROUPS = ("dataset", "model", "sharing", "algorithm", "topology", "optimizer")
SMALL = ("rounds=2", "eval.every=1")  # every run: two rounds, both evaluated
# Lines of the README that start like a command; `launch/` alone names a folder.
COMMAND_START = re.compile(
    r"^(\.venv/|\. \.venv/|python3? |torchrun |tensorboard |sbatch |pip |launch/\S+ )"
)


# ---------------------------------------------------------------------------------------------
# Reading the README


@dataclass(frozen=True)
class ReadmeCommand:
    """One command as the README writes it (trailing `# comment` removed, spaces collapsed)."""

    text: str
    line: int
    inline: bool  # an inline `code span` in prose rather than a line of a command block

    @property
    def argv(self) -> list[str]:
        return shlex.split(self.text)


def readme_commands(markdown: str) -> list[ReadmeCommand]:
    """Every line of every command block, and every inline code span that starts like a command.

    Every non-blank line of a block counts, command or not: a block the table does not know about
    (output, an `export`) must be classified there too.
    """
    lines = markdown.splitlines()
    commands: list[ReadmeCommand] = []
    block_lines: set[int] = set()
    fenced, in_indented, previous_blank = False, False, True
    for number, line in enumerate(lines, 1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
            block_lines.add(number)
            continue
        blank = not line.strip()
        if fenced or (line.startswith("    ") and not blank and (in_indented or previous_blank)):
            in_indented = not fenced
            block_lines.add(number)
            text = " ".join(re.sub(r"\s+#.*$", "", line.strip()).split())
            if text:
                commands.append(ReadmeCommand(text, number, inline=False))
        elif not blank:
            in_indented = False
        previous_blank = blank
    prose = "\n".join("" if number in block_lines else line for number, line in enumerate(lines, 1))
    # A code span may wrap onto the next line but never crosses a blank line (a paragraph's end).
    for match in re.finditer(r"`((?:[^`\n]|\n(?!\s*\n))+)`", prose):
        text = " ".join(match.group(1).split())
        if COMMAND_START.match(text + " "):
            commands.append(
                ReadmeCommand(text, prose.count("\n", 0, match.start()) + 1, inline=True)
            )
    return commands


COMMANDS_IN_README = readme_commands(README.read_text())


# ---------------------------------------------------------------------------------------------
# Running a command


def _env(cache: Path) -> dict[str, str]:
    """The environment of a user who activated the venv; data parsed once into the module's cache."""
    return {
        **os.environ,
        "DPSGD_CACHE": str(cache),
        "GLOO_SOCKET_IFNAME": "lo",
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    }


def with_overrides(args: list[str], *overrides: str) -> list[str]:
    """args with each `key=value` of overrides replacing the README's value of that key, or appended."""
    result = list(args)
    for override in overrides:
        key = override.split("=", 1)[0]
        at = [i for i, arg in enumerate(result) if "=" in arg and arg.split("=", 1)[0] == key]
        if at:
            result[at[0]] = override
        else:
            result.append(override)
    return result


def with_option(args: list[str], option: str, value: str) -> list[str]:
    """args with the value after `option` (e.g. --nproc_per_node 8) replaced."""
    at = args.index(option)
    return [*args[: at + 1], value, *args[at + 2 :]]


def python_argv(command: ReadmeCommand | str) -> list[str]:
    """The command with `python`, `python3` or `.venv/bin/python` as this venv's interpreter."""
    argv = shlex.split(command) if isinstance(command, str) else command.argv
    assert argv[0] in ("python", "python3", ".venv/bin/python"), argv
    return [sys.executable, *argv[1:]]


def run(argv: list[str], env: dict[str, str], cwd: Path = REPO) -> str:
    """Runs argv; fails with the command and its output's tail unless it exits 0."""
    result = subprocess.run(
        argv,
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT_S,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, (
        f"`{shlex.join(argv)}` exited {result.returncode}:\n{output[-4000:]}"
    )
    return output


def assert_complete_run(run_dir: Path, nodes: int, rounds: int) -> dict:
    """The run finished: summary.json says so, for every node, with no divergence."""
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["in_progress"] is False and summary["diverged"] is None, run_dir
    assert (summary["nodes"], summary["rounds"]) == (nodes, rounds), run_dir
    assert summary["final"]["nodes_reporting"] == nodes, run_dir
    assert sorted(p.name for p in (run_dir / "nodes").iterdir()) == sorted(
        f"{n}.jsonl" for n in range(nodes)
    )
    return summary


def _value(args: list[str], key: str, default: str) -> str:
    values = [arg.split("=", 1)[1] for arg in args if arg.startswith(f"{key}=")]
    return values[-1] if values else default


def sweep_jobs(args: list[str]) -> int:
    """How many jobs `-m` makes of these overrides: the product of the comma lists' lengths."""
    return math.prod(
        len(arg.split("=", 1)[1].split(","))
        for arg in args
        if "=" in arg and not arg.split("=", 1)[1].startswith("[")
    )


def needs_data(args: list[str]) -> None:
    """Commands that name ../shared/data run from the repository root; skipped where it is absent."""
    if (
        any(arg in ("data_dir=../shared/data", "../shared/data") for arg in args)
        and not SHARED_DATA.exists()
    ):
        pytest.skip(f"the data sets are not at {SHARED_DATA}")


@dataclass
class Context:
    """What a check gets: a fresh folder, the environment, and the module's shared runs."""

    tmp: Path
    env: dict[str, str]
    request: pytest.FixtureRequest

    def shared(self, name: str):
        return self.request.getfixturevalue(name)


# ---------------------------------------------------------------------------------------------
# The checks, one kind of command each


def train(*small: str) -> Callable[[ReadmeCommand, Context], None]:
    """`python train.py ...` as written, plus `small` (replacing the README's value of a key).

    The run must exit 0 and be complete: every node's log, summary.json final and not diverged.
    A sweep (-m) must complete every job it makes.
    """

    def check(command: ReadmeCommand, ctx: Context) -> None:
        argv = with_overrides(python_argv(command), *small)
        needs_data(argv)
        expected_nodes = int(_value(argv, "nodes", "16"))  # 16: conf/config.yaml's default
        rounds = int(_value(argv, "rounds", "200"))
        if "-m" in argv:
            run([*argv, f"hydra.sweep.dir={ctx.tmp / 'sweep'}"], ctx.env)
            jobs = sweep_jobs(argv[2:])
            assert sorted(
                p.name for p in (ctx.tmp / "sweep").iterdir() if p.is_dir() and p.name.isdigit()
            ) == sorted(str(j) for j in range(jobs))
            for job in range(jobs):
                assert_complete_run(ctx.tmp / "sweep" / str(job), expected_nodes, rounds)
        else:
            run([*argv, f"hydra.run.dir={ctx.tmp / 'run'}"], ctx.env)
            assert_complete_run(ctx.tmp / "run", expected_nodes, rounds)

    return check


def torchrun(
    nproc: int, *small: str, nodes: int | None = None
) -> Callable[[ReadmeCommand, Context], None]:
    """`torchrun ...` with the venv's torchrun, `--nproc_per_node nproc` ranks on this machine.

    Without --standalone torchrun rendezvouses on port 29500: the test gives it a free port, so a
    second run on the machine (another test) cannot meet this one.
    """

    def check(command: ReadmeCommand, ctx: Context) -> None:
        argv = with_overrides(
            with_option(command.argv, "--nproc_per_node", str(nproc)), *SMALL, *small
        )
        assert argv[0] == "torchrun" and (VENV_BIN / "torchrun").exists()
        argv[0] = str(VENV_BIN / "torchrun")
        if "--standalone" not in argv:
            argv[1:1] = ["--master-port", str(free_port())]
        run([*argv, f"hydra.run.dir={ctx.tmp / 'run'}"], ctx.env)
        assert_complete_run(ctx.tmp / "run", nodes or nproc, 2)

    return check


def multinode_agents(ctx: Context, script_args: list[str]) -> list[str]:
    """launch/multinode.sh as two machines run it, both here: 127.0.0.1 hosts the c10d rendezvous."""
    env = {
        **ctx.env,
        "DPSGD_PORT": str(free_port()),
        "DPSGD_RUN_ID": f"readme-{os.getpid()}",
        "PYTHON": sys.executable,
    }
    argv = ["bash", str(REPO / "launch" / "multinode.sh"), *script_args]
    agents = [
        subprocess.Popen(
            argv, cwd=ctx.tmp, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for _ in range(2)
    ]
    try:
        outputs = [agent.communicate(timeout=COMMAND_TIMEOUT_S)[0] for agent in agents]
    finally:
        for agent in agents:
            agent.kill()
            agent.wait()
    assert all(agent.returncode == 0 for agent in agents), "\n".join(o[-3000:] for o in outputs)
    return outputs


def check_multinode(command: ReadmeCommand, ctx: Context) -> None:
    """`launch/multinode.sh HEAD_HOST 4 24 <overrides>` run for real as 2 machines x 1 rank on
    loopback (HEAD_HOST: 127.0.0.1): one world of 2 ranks, one run folder, every node complete."""
    args = command.argv
    assert args[0] == "launch/multinode.sh" and args[1] == "HEAD_HOST"
    overrides = with_overrides(args[4:], *SMALL, f"hydra.run.dir={ctx.tmp / 'run'}")
    multinode_agents(ctx, ["127.0.0.1", "2", "1", *overrides])
    assert_complete_run(ctx.tmp / "run", 2, 2)


def launched_command(env: dict[str, str], argv: list[str], cwd: Path) -> list[str]:
    """What a launch script would finally run, with PYTHON=echo: the torchrun command, as words."""
    output = run(argv, {**env, "PYTHON": "echo"}, cwd=cwd)
    return output.split()


def check_torchrun_on_machines(command: ReadmeCommand, ctx: Context) -> None:
    """The hand-written multi-machine torchrun line needs a second host. Checked: it is word for word
    the command launch/multinode.sh runs (which check_multinode runs for real on loopback), except
    the run id the script adds and torchrun's module form."""
    args = command.argv
    endpoint = args.index("--rdzv-endpoint") + 1
    host, port = args[endpoint].rsplit(":", 1)
    train_at = args.index("train.py")
    machines, procs = args[args.index("--nnodes") + 1], args[args.index("--nproc_per_node") + 1]
    script = launched_command(
        ctx.env,
        [
            "bash",
            str(REPO / "launch" / "multinode.sh"),
            host,
            machines,
            procs,
            *args[train_at + 1 :],
        ],
        ctx.tmp,
    )
    assert script[:2] == ["-m", "torch.distributed.run"], script
    rdzv_id = script.index("--rdzv-id")
    script = ["torchrun", *script[2:rdzv_id], *script[rdzv_id + 2 :]]
    script = [word if word != str(REPO / "train.py") else "train.py" for word in script]
    assert script == args, f"README: {args}\nlaunch/multinode.sh: {script}"
    assert port == "29500"  # the script's default DPSGD_PORT, as the README says


def check_sbatch(command: ReadmeCommand, ctx: Context) -> None:
    """No SLURM here. Checked: the script parses (`bash -n`); run under a fake allocation of 4 hosts
    (scontrol and srun stubs on PATH) it starts launch/multinode.sh once per host with the first host
    as HEAD_HOST, 24 ranks per machine and the overrides, which end in the torchrun command for 4 x 24
    ranks; and the overrides compose (`train.py ... --cfg job`)."""
    args = command.argv
    assert args[:4] == ["sbatch", "--nodes", "4", "launch/slurm.sbatch"], args
    script = REPO / "launch" / "slurm.sbatch"
    run(["bash", "-n", str(script)], ctx.env)
    stubs = ctx.tmp / "bin"
    stubs.mkdir()
    (stubs / "scontrol").write_text("#!/bin/sh\nprintf 'host-a\\nhost-b\\nhost-c\\nhost-d\\n'\n")
    # srun runs its command once (for one host): the launch script prints what it would exec.
    (stubs / "srun").write_text(
        '#!/bin/sh\nwhile [ "${1#--}" != "$1" ]; do shift; done\nexec "$@"\n'
    )
    for stub in stubs.iterdir():
        stub.chmod(0o755)
    env = {
        **ctx.env,
        "PATH": f"{stubs}{os.pathsep}{ctx.env['PATH']}",
        "SLURM_JOB_NODELIST": "host-[a-d]",
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NUM_NODES": args[2],
        "SLURM_SUBMIT_DIR": str(REPO),
    }
    words = launched_command(env, ["bash", str(script), *args[4:]], ctx.tmp)
    expected = [
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "4",
        "--nproc_per_node",
        "24",
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        f"host-a:{20000 + 4242}",
        "--rdzv-id",
        "slurm-4242",
        str(REPO / "train.py"),
        *args[5:],
    ]
    assert words == expected, words
    composed = yaml.safe_load(run([sys.executable, "train.py", *args[5:], "--cfg", "job"], ctx.env))
    for override in args[5:]:
        key, value = override.split("=", 1)
        node = composed
        for part in key.split("."):
            node = node[part]
        assert str(node) == value or (isinstance(node, dict) and node.get("name") == value), (
            key,
            node,
        )


def check_setup(command: ReadmeCommand, ctx: Context) -> None:
    """The set-up is not rerun (no installs in a test). Checked: it makes `.venv` and installs the
    torch and torchvision this venv has, at the pins `.ci/run` installs, then `-e .` (whose
    install_requires cover every import: test_install_requires_cover_every_import_of_the_readme_commands);
    its last part, the default run, runs (two rounds, its 16 nodes on one rank)."""
    parts = [part.strip() for part in command.text.split("&&")]
    assert parts[0] == "python3 -m venv .venv", parts
    pins = _pins(parts[1])
    assert pins == {name: metadata.version(name) for name in pins}, (
        "README pins differ from the installed ones"
    )
    assert shlex.split(parts[1])[-2:] == ["-e", "."], parts[1]
    assert pins == _pins((REPO / ".ci" / "run").read_text()), (
        ".ci/run installs other torch pins than the README"
    )
    assert parts[2] == ".venv/bin/python train.py", parts
    ctx.shared("default_run")


def _pins(text: str) -> dict[str, str]:
    return dict(re.findall(r"\b(torch|torchvision)==(\S+)", text))


def check_cpu_torch(command: ReadmeCommand, ctx: Context) -> None:
    """The CPU-only install (no network here): the same pins as the set-up command, from PyTorch's
    CPU index, a command that the set-up's own pip line then finds satisfied."""
    setup = next(c for c in COMMANDS_IN_README if COMMANDS.get(c.text) is check_setup)
    assert _pins(command.text) == _pins(setup.text), command.text
    make, install = [shlex.split(part) for part in command.text.split("&&")]
    assert make == shlex.split(setup.text.split("&&")[0])  # the same environment
    assert install[:2] == [".venv/bin/pip", "install"] and "-e" not in install
    assert install[install.index("--index-url") + 1] == "https://download.pytorch.org/whl/cpu"


def check_test_command(command: ReadmeCommand, ctx: Context) -> None:
    """Not rerun from inside the suite it starts. Checked: `.ci/run` runs it verbatim, the `test`
    extra brings pytest and pytest-timeout, and pytest's testpaths hold this file (so CI runs it)."""
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    assert command.text in ci, ".ci/run does not run the README's test command verbatim"
    config = configparser.ConfigParser()
    config.read(REPO / "setup.cfg")
    extra = config["options.extras_require"]["test"].split()
    assert {"pytest", "pytest-timeout"} <= set(extra), extra
    assert Path(__file__).parent == REPO / config["tool:pytest"]["testpaths"].strip()
    assert command.argv[:3] == [".venv/bin/pip", "install", "-e"]


def check_activate(command: ReadmeCommand, ctx: Context) -> None:
    """The venv has the script, and the commands the README runs after it are in its bin/."""
    assert (VENV_BIN / "activate").exists()
    for program in ("python", "torchrun", "tensorboard"):
        assert (VENV_BIN / program).exists(), program


def check_help(command: ReadmeCommand, ctx: Context) -> None:
    """Runs as written (it trains nothing) and names every config group."""
    output = run(python_argv(command), ctx.env)
    missing = [group for group in CONFIG_GROUPS if group not in output]
    assert not missing, f"--help does not name the config groups {missing}:\n{output}"


def check_cfg_job(command: ReadmeCommand, ctx: Context) -> None:
    """Prints the composed config: YAML with the default's 16 nodes and every group."""
    composed = yaml.safe_load(run(python_argv(command), ctx.env))
    assert composed["nodes"] == 16
    assert set(CONFIG_GROUPS) <= set(composed)


def check_study_list(command: ReadmeCommand, ctx: Context) -> None:
    """benchmarks/study.py reruns whole study rows (hours). Checked: its arguments are accepted and
    name real rows (`--list` prints each row's train.py command and runs nothing) and `--extra`
    reaches every row (tests/test_study_benchmark.py composes every row)."""
    argv = [
        arg for arg in python_argv(command) if arg != "..."
    ]  # "...": the rest of a study command
    needs_data(argv)
    listed = [
        line.split(": ", 1)[1]
        for line in run([*argv, "--list"], ctx.env).splitlines()
        if ": python " in line
    ]
    assert listed, "study.py --list printed no rows"
    extra = argv[argv.index("--extra") + 1 :] if "--extra" in argv else []
    extra = extra[: next((i for i, a in enumerate(extra) if a.startswith("--")), len(extra))]
    for line in listed:
        assert all(override in line.split() for override in extra), line


def check_patterns(command: ReadmeCommand, ctx: Context) -> None:
    """benchmarks/patterns.py: the sweep of the four patterns at the MovieLens (1) preset, its report
    and its consensus check, into tmp folders (its results folder is left alone): 16 nodes instead of
    96, 101 rounds of one local step (hybrid switches at its default round 100; the check reads the
    round-100 checkpoints)."""
    argv = python_argv(command)
    needs_data(argv)
    out = ctx.tmp / "report"
    run(
        [
            *argv,
            "--sweep-dir",
            str(ctx.tmp / "sweep"),
            "--out",
            str(out),
            "nodes=16",
            "nodes_per_rank=16",
            "rounds=101",
            "train.local_steps=1",
        ],
        ctx.env,
    )
    for job in range(4):
        assert_complete_run(ctx.tmp / "sweep" / str(job), 16, 101)
    assert (out / "consensus_check.csv").exists()
    assert list(out.glob("*.png")) and list(out.glob("*.csv"))


def check_startup(command: ReadmeCommand, ctx: Context) -> None:
    """benchmarks/startup.py times the issue's MovieLens run three times. Checked at a small scale (one
    repeat of the default synthetic run, two rounds, its result into tmp): it runs and reports every
    phase from launch to round 1 with non-negative seconds."""
    out = ctx.tmp / "startup.json"
    run(
        [*python_argv(command), "--repeats", "1", "--out", str(out), "--", ONE_RANK, *SMALL],
        ctx.env,
    )
    medians = json.loads(out.read_text())["median"]
    assert medians["launch_to_round_1"]["wall_s"] > 0, medians
    assert all(phase["wall_s"] >= 0 for phase in medians.values()), medians


def check_resume(command: ReadmeCommand, ctx: Context) -> None:
    """`<same overrides>`: a small run with checkpoints; the README's resume line with those overrides
    and that folder continues it (exit 0, says from which round)."""
    same = ["nodes_per_rank=16", *SMALL, "checkpoint.every=1"]
    run([sys.executable, "train.py", *same, f"hydra.run.dir={ctx.tmp / 'run'}"], ctx.env)
    text = command.text.replace("<same overrides>", " ".join(same)).replace(
        "<run>", str(ctx.tmp / "run")
    )
    argv = python_argv(text)
    assert "resumed after round 2" in run(argv, ctx.env)
    assert_complete_run(ctx.tmp / "run", 16, 2)


def check_tensorboard(command: ReadmeCommand, ctx: Context) -> None:
    """No server in a test. Checked: `tensorboard` is in the venv, and what it would show, the default
    run's tb/ folder, holds event files with the mean test loss at both rounds."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert command.argv[:2] == ["tensorboard", "--logdir"] and (VENV_BIN / "tensorboard").exists()
    tb = ctx.shared("default_run") / "tb"
    assert list(tb.glob("events.out.tfevents.*")), tb
    events = EventAccumulator(str(tb))
    events.Reload()
    losses = [tag for tag in events.Tags()["scalars"] if "test_loss" in tag]
    assert losses and [e.step for e in events.Scalars(losses[0])] == [1, 2], events.Tags()[
        "scalars"
    ]


def check_report(command: ReadmeCommand, ctx: Context) -> None:
    """`python -m dpsgd.report multirun/<date>/<time> --out figures` on the folder the README's sweep
    above made (run by the readme_sweep fixture): figures and tables for its every job."""
    sweep = ctx.shared("readme_sweep")
    argv = [
        {"multirun/<date>/<time>": str(sweep), "figures": str(ctx.tmp / "figures")}.get(a, a)
        for a in python_argv(command)
    ]
    run(argv, ctx.env)
    assert list((ctx.tmp / "figures").glob("*.png")) and list((ctx.tmp / "figures").glob("*.csv"))


def check_readme_sweep(command: ReadmeCommand, ctx: Context) -> None:
    """The README's sweep (12 jobs) at two rounds, 16 nodes on one rank: every job completes (the
    readme_sweep fixture runs it once for this check and the report's)."""
    ctx.shared("readme_sweep")


# ---------------------------------------------------------------------------------------------
# The table: every command of the README and how it runs here. A new README command needs a line.

ONE_RANK = (
    "nodes_per_rank=16"  # the default 16 nodes as one node group: seconds instead of a minute
)

COMMANDS: dict[str, Callable[[ReadmeCommand, Context], None]] = {
    # Set up
    "python3 -m venv .venv && .venv/bin/pip install torch==2.14.1 torchvision==0.29.1 -e . && "
    ".venv/bin/python train.py": check_setup,
    "python3 -m venv .venv && .venv/bin/pip install torch==2.14.1 torchvision==0.29.1 "
    "--index-url https://download.pytorch.org/whl/cpu": check_cpu_torch,
    '.venv/bin/pip install -e ".[test]" && .venv/bin/python -m pytest -q': check_test_command,
    # Running
    "python train.py nodes=96 dataset=movielens data_dir=../shared/data rounds=100": train(
        *SMALL, "nodes_per_rank=96"
    ),
    ". .venv/bin/activate": check_activate,
    "torchrun --standalone --nproc_per_node 8 train.py": torchrun(2),
    "torchrun --nnodes 4 --nproc_per_node 24 --rdzv-backend c10d --rdzv-endpoint HOST:29500 train.py "
    "sharing=partial alpha=0.1": check_torchrun_on_machines,
    "launch/multinode.sh HEAD_HOST 4 24 sharing=partial alpha=0.1": check_multinode,
    "sbatch --nodes 4 launch/slurm.sbatch 24 sharing=partial alpha=0.1": check_sbatch,
    "python train.py --help": check_help,
    "python train.py --cfg job": check_cfg_job,
    # Node groups
    "python train.py experiment=movielens_1 nodes=96 nodes_per_rank=48 data_dir=../shared/data": train(
        *SMALL
    ),
    # 1,000 nodes in 2 groups of 500 -> 100 nodes in 2 groups of 50, as many users per node
    "python train.py dataset=synthetic dataset.num_users=2000 nodes=1000 nodes_per_rank=500": train(
        *SMALL, "dataset.num_users=200", "nodes=100", "nodes_per_rank=50"
    ),
    # 4 ranks hosting 1,000 nodes -> 2 ranks hosting 8
    "torchrun --nproc_per_node 4 train.py nodes=1000": torchrun(2, "nodes=8", nodes=8),
    # Communication patterns
    "python train.py algorithm=rwm sharing=partial alpha=0.1": train(*SMALL, ONE_RANK),
    "python train.py algorithm=rwm algorithm.every=5": train(
        "rounds=4", "eval.every=1", "algorithm.every=2", ONE_RANK
    ),
    "python train.py algorithm=epidemic algorithm.fanout=7": train(*SMALL, ONE_RANK),
    "python train.py algorithm=hybrid algorithm.switch_round=50": train(
        "rounds=4", "eval.every=1", "algorithm.switch_round=2", ONE_RANK
    ),
    # hybrid needs more rounds than its default switch round (100): 101 rounds of one local step
    "python train.py -m algorithm=dpsgd,rwm,epidemic,hybrid": train(
        "rounds=101", "eval.every=101", "train.local_steps=1", "checkpoint.every=0", ONE_RANK
    ),
    # Sharing methods
    "python train.py sharing=partial alpha=0.1": train(*SMALL, ONE_RANK),
    "python train.py sharing=partial alpha=0.1 sharing.accumulation=false": train(*SMALL, ONE_RANK),
    "python train.py sharing=random_alpha sharing.alpha_list=[0.1,0.5,1.0]": train(
        *SMALL, ONE_RANK
    ),
    "python train.py sharing=subsampling alpha=0.5 sharing.merge=renormalize": train(
        *SMALL, ONE_RANK
    ),
    "python benchmarks/study.py --label float16 --extra sharing.values=float16 ...": check_study_list,
    # Sweeps and analysis
    "python train.py -m algorithm=dpsgd,rwm sharing=full,partial,subsampling alpha=0.1,0.5 dataset=movielens "
    "data_dir=../shared/data": check_readme_sweep,
    "python -m dpsgd.report multirun/<date>/<time> --out figures": check_report,
    # Reproducing the study, the patterns
    "python benchmarks/study.py --data-dir ../shared/data": check_study_list,
    "python benchmarks/study.py --rows ml2_dpsgd_full --extra nodes_per_rank=48 checkpoint.every=25": check_study_list,
    "python benchmarks/patterns.py --data-dir ../shared/data": check_patterns,
    # What a run leaves behind
    "python train.py <same overrides> hydra.run.dir=<run> resume=true": check_resume,
    "tensorboard --logdir outputs": check_tensorboard,
    "python benchmarks/startup.py": check_startup,
    # Your own model or data set (a process per node: a node group builds its template by model.name alone)
    "python train.py --config-dir tests/plugin_example/conf dataset=blobs nodes=4": train(*SMALL),
}

README_SWEEP = next(
    (c for c in COMMANDS_IN_README if COMMANDS.get(c.text) is check_readme_sweep), None
)


# ---------------------------------------------------------------------------------------------
# Fixtures: runs that more than one check reads


@pytest.fixture(scope="module")
def data_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def default_run(tmp_path_factory: pytest.TempPathFactory, data_cache: Path) -> Path:
    """The set-up's `.venv/bin/python train.py`: the embedded default, two rounds, one rank."""
    run_dir = tmp_path_factory.mktemp("default") / "run"
    run(
        [sys.executable, "train.py", ONE_RANK, *SMALL, f"hydra.run.dir={run_dir}"], _env(data_cache)
    )
    assert_complete_run(run_dir, 16, 2)
    return run_dir


@pytest.fixture(scope="module")
def readme_sweep(tmp_path_factory: pytest.TempPathFactory, data_cache: Path) -> Path:
    """The README's 12-job sweep at two rounds, its 16 nodes on one rank; every job completes."""
    assert README_SWEEP is not None, "the README's sweep line is gone: update COMMANDS"
    argv = with_overrides(python_argv(README_SWEEP), *SMALL, ONE_RANK)
    needs_data(argv)
    sweep = tmp_path_factory.mktemp("sweep") / "sweep"
    run([*argv, f"hydra.sweep.dir={sweep}"], _env(data_cache))
    jobs = sweep_jobs(argv[2:])
    for job in range(jobs):
        assert_complete_run(sweep / str(job), 16, 2)
    return sweep


# ---------------------------------------------------------------------------------------------
# Tests


def test_every_readme_command_has_a_check():
    """A command added to the README without a line in COMMANDS fails here; so does a stale line."""
    in_readme = {c.text: c.line for c in COMMANDS_IN_README}
    unknown = {text: line for text, line in in_readme.items() if text not in COMMANDS}
    assert not unknown, (
        "README commands that tests/test_readme.py does not run; add each to COMMANDS with "
        f"how it runs at a small scale: {unknown}"
    )
    stale = [text for text in COMMANDS if text not in in_readme]
    assert not stale, (
        f"COMMANDS lines whose command is no longer in the README (remove or update them): {stale}"
    )


def test_the_reader_finds_blocks_spans_and_comments():
    """The parser the drift check relies on: indented and fenced blocks, comments, spans across lines."""
    markdown = (
        "Intro `python train.py\n--help` and `launch/`.\n\n    python train.py a=1   # why\n"
        "    launch/multinode.sh H 2 2\n\nText\n    not code (a continuation)\n\n```\nexport X=1\n```\n"
    )
    found = [(c.text, c.inline) for c in readme_commands(markdown)]
    assert found == [
        ("python train.py a=1", False),
        ("launch/multinode.sh H 2 2", False),
        ("export X=1", False),
        ("python train.py --help", True),
    ]


@pytest.mark.timeout(2 * COMMAND_TIMEOUT_S + 60)
@pytest.mark.parametrize("command", COMMANDS_IN_README, ids=lambda c: c.text[:90])
def test_readme_command(
    command: ReadmeCommand, tmp_path: Path, data_cache: Path, request: pytest.FixtureRequest
):
    check = COMMANDS.get(command.text)
    if check is None:
        pytest.fail(f"README line {command.line}: `{command.text}` has no check in COMMANDS")
    check(command, Context(tmp_path, _env(data_cache), request))


def _third_party_imports(paths: list[Path]) -> set[str]:
    """Top-level modules imported anywhere in these files, less the standard library and the repo's own."""
    names = set()
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return {
        n
        for n in names
        if n not in sys.stdlib_module_names and n not in ("dpsgd", "tests", "benchmarks")
    }


def _normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _installed_closure(names: set[str]) -> set[str]:
    """These distributions and everything they require here (no extras): what `pip install -e .` brings."""
    seen, todo = set(), list(names)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            requirements = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue  # in install_requires but not installed: test_readme_command fails on its import
        for requirement in map(Requirement, requirements):
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(_normalized(requirement.name))
    return seen


def test_install_requires_cover_every_import_of_the_readme_commands():
    """The set-up's `pip install ... -e .` gives a user every module the README's commands import:
    train.py, the dpsgd package (dpsgd.report included: matplotlib), the benchmark scripts the README
    runs, and tensorboard (the README's viewer; torch.utils.tensorboard imports it only when used)."""
    config = configparser.ConfigParser()
    config.read(REPO / "setup.cfg")
    install_requires = {
        _normalized(Requirement(r).name)
        for r in config["options"]["install_requires"].split("\n")
        if r.strip()
    }
    scripts = {REPO / arg for c in COMMANDS_IN_README for arg in c.argv if arg.endswith(".py")}
    files = [
        REPO / "train.py",
        *sorted((REPO / "dpsgd").rglob("*.py")),
        *sorted(p for p in scripts if p.exists()),
    ]
    modules = _third_party_imports(files) | {"tensorboard"}
    provided = metadata.packages_distributions()
    closure = _installed_closure(install_requires)
    missing = {
        m: provided.get(m)
        for m in modules
        if not {_normalized(d) for d in provided.get(m, [m])} & closure
    }
    assert not missing, (
        f"modules the README's commands import that setup.cfg's install_requires do not "
        f"bring: {missing}; add their distributions to install_requires"
    )
