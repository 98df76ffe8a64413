"""Entry point: `python train.py [overrides]` or `torchrun ... train.py [overrides]`.

torch is imported before anything else so that ranks forked in standalone mode share
its pages with the parent. Under torchrun every rank runs this file; the ranks agree
on one start time through the rendezvous store before Hydra names the run directory,
so a run has exactly one directory, and only rank 0 keeps Hydra's own logs.
"""

import sys

if __name__ == "__main__" and any(arg in ("--help", "-h") for arg in sys.argv[1:]):
    from dpsgd.config_help import help_text  # the keys' meanings need only the conf files: no torch

    print(help_text())
    sys.exit(0)

import os
import signal
import time
import traceback
from datetime import datetime
from pathlib import Path

import hydra
import torch  # noqa: F401  (first: forked ranks share the imported pages)
from hydra.core.hydra_config import HydraConfig
from hydra.errors import CompactHydraException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from dpsgd import launch, run_folder
from dpsgd.building import prepare_data
from dpsgd.checkpoint import check_resumable
from dpsgd.checks import check_config, config_notes, ranks_for
from dpsgd.composition import settings_from
from dpsgd.config_help import composition_error
from dpsgd.errors import (
    ConfigError,
    Interrupted,
    NodeFailure,
    raise_interrupted,
    write_torchrun_error_file,
)
from dpsgd.experiment import run_key, run_node
from dpsgd.node_group import rank_label
from dpsgd.progress import startup_step
from dpsgd.settings import Settings
from dpsgd.training import optimizers_without_compiler

optimizers_without_compiler()  # here, before ranks fork, not at import of dpsgd.training (see its docstring)

START_TIME_KEY = "dpsgd/start_time"
EXIT_KEY = "dpsgd/config_error_exit"
SIBLINGS_WAIT_S = 30.0  # how long a machine's first rank waits for its other ranks to leave first
RANK_CONTEXT: launch.RankContext | None = None
JOBS_RUN = 0
FAILED_JOBS: list[
    tuple[int, str, str, int]
] = []  # failed sweep jobs: (number, overrides, first line, exit code)


class JobFailed(Exception):
    """This run (or sweep job) cannot go on; a single run exits with `code`, a sweep records it and goes on."""

    def __init__(
        self,
        message: str,
        code: int,
        show: bool = True,
        shared: bool = True,
        sweep_goes_on: bool = True,
    ):
        """`sweep_goes_on`: the next job can start. Under torchrun only if every rank surely failed the same
        way before joining the job's process group; otherwise ranks would drift into different jobs."""
        super().__init__(message)
        self.code, self.show, self.shared, self.sweep_goes_on = code, show, shared, sweep_goes_on


@hydra.main(config_path="conf", config_name="config", version_base=None)
def task(cfg: DictConfig) -> None:
    global JOBS_RUN
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    sweep = HydraConfig.get().mode == RunMode.MULTIRUN
    JOBS_RUN += 1
    try:
        if RANK_CONTEXT is not None:
            _run_under_torchrun(cfg, RANK_CONTEXT, run_dir)
        else:
            _run_standalone(cfg, run_dir)
    except JobFailed as failure:
        if not sweep or not failure.sweep_goes_on:
            _exit(str(failure), failure.code, show=failure.show, shared=failure.shared)
        _record_failed_job(str(failure), failure.code, failure.show)
    except Exception as crash:  # a bug in one job of a sweep must not cost the others
        if not sweep or RANK_CONTEXT is not None:
            raise  # under torchrun the ranks' process group may be left broken: the sweep ends
        traceback.print_exc()
        _record_failed_job(f"crashed: {type(crash).__name__}: {crash}", 1, show=False)


def _record_failed_job(message: str, code: int, show: bool) -> None:
    """One failed job of a sweep: said now, listed again when the sweep ends (`_end_sweep`)."""
    if show:
        print(f"dpsgd: {message}", file=sys.stderr, flush=True)
    hydra_cfg = HydraConfig.get()
    overrides = " ".join(arg for arg in hydra_cfg.overrides.task if not arg.startswith("hydra."))
    FAILED_JOBS.append(
        (hydra_cfg.job.num, overrides or "no overrides", message.splitlines()[0], code)
    )


def _end_sweep() -> None:
    """After the last job: list the failed jobs with their first error line; exit with the first one's code."""
    if not FAILED_JOBS:
        return
    rows = "\n".join(
        f"  job {number} ({overrides}): {line}" for number, overrides, line, _ in FAILED_JOBS
    )
    _exit(
        f"{len(FAILED_JOBS)} of {JOBS_RUN} sweep jobs failed (the others ran):\n{rows}",
        FAILED_JOBS[0][3],
        show=RANK_CONTEXT is None or RANK_CONTEXT.rank == 0,
    )


def _run_under_torchrun(cfg: DictConfig, ctx: launch.RankContext, run_dir: Path) -> None:
    signal.signal(
        signal.SIGTERM, raise_interrupted
    )  # torchrun forwards the user's signal to every rank
    arrivals = launch.announce_start(
        ctx, run_key(run_dir)
    )  # counted per run: a sweep's jobs share the store
    try:
        settings = settings_from(cfg, HydraConfig.get().runtime.choices)
        check_config(settings, ctx.world_size)  # run_node checks again; here to say the notes once
    except (
        ConfigError
    ) as error:  # the config and world size alone: every rank finds it, a sweep goes on
        if not cfg.resume:
            run_folder.release(
                run_dir
            )  # nothing was written: no folder is left holding only .hydra/
        raise JobFailed(str(error), launch.EXIT_CONFIG_ERROR, show=ctx.rank == 0) from None
    try:
        if ctx.rank == 0:
            _print_notes(settings)
        run_node(settings, ctx, run_dir)
    except (
        ConfigError
    ) as error:  # files or data: maybe not on every rank or machine, so a sweep ends here
        sweep_ends = (
            " (a sweep under torchrun ends at a job that fails on its files or data)"
            if (HydraConfig.get().mode == RunMode.MULTIRUN)
            else ""
        )
        raise JobFailed(
            str(error) + sweep_ends,
            launch.EXIT_CONFIG_ERROR,
            show=ctx.rank == 0 or error.rank_specific,
            shared=not error.rank_specific,
            sweep_goes_on=False,
        ) from None
    except NodeFailure as error:
        _exit(str(error), launch.EXIT_NODE_FAILURE, hard=True)
    except (KeyboardInterrupt, Interrupted) as stop:
        stop = stop if isinstance(stop, Interrupted) else Interrupted(signal.SIGINT)
        _exit(_stopped_line(stop, settings, run_dir), stop.exit_code, show=ctx.rank == 0, hard=True)
    finally:
        if arrivals is not None:
            arrivals.stop()


def _run_standalone(cfg: DictConfig, run_dir: Path) -> None:
    startup_step("config composed")  # imports and Hydra are done (benchmarks/startup.py)
    try:
        if HydraConfig.get().mode == RunMode.MULTIRUN and not cfg.resume:
            run_folder.claim(run_dir)  # a single run's folder was claimed by the Hydra callback
        settings = settings_from(cfg, HydraConfig.get().runtime.choices)
        check_config(settings)  # standalone: the ranks follow from nodes and nodes_per_rank
        _print_notes(settings)
        if settings.run.resume:
            check_resumable(settings, run_dir, all_nodes_local=True)
        dataset = prepare_data(settings)  # before forking: ranks inherit or memory-map it
        dataset.partition(
            settings.run.nodes, settings.run.seed
        )  # too few users for the nodes is a user error, found here
    except ConfigError as error:
        if not cfg.resume:
            run_folder.release(run_dir)  # nothing was written: the same folder may be used again
        raise JobFailed(str(error), launch.EXIT_CONFIG_ERROR) from None
    startup_step("data ready", f"{settings.dataset.name}: {dataset.describe()}")
    ranks, per_rank = ranks_for(settings), settings.run.nodes_per_rank
    grouping = f" in {ranks} rank{'s' if ranks > 1 else ''} of {per_rank}" if per_rank > 1 else ""
    startup_step(
        "spawn", f"{settings.run.nodes} nodes{grouping} on this machine, results in {run_dir}"
    )
    if ranks > 1:
        # torch.optim's step imports it (2 s of CPU): imported once here, every forked rank shares it.
        import torch._dynamo  # noqa: F401
    try:
        launch.spawn(
            lambda ctx: run_node(settings, ctx, run_dir, dataset),
            ranks,
            grace_s=settings.comm.timeout_s + 30,
            quiet_failures=True,
            label=rank_label(per_rank),
            announce_ranks=run_key(run_dir),
        )
    except launch.RankFailure as failure:
        details = failure.errors.get(failure.first_failed, "")
        raise JobFailed(
            f"{failure}\n{details}" if "crashed" in details else str(failure),
            launch.EXIT_NODE_FAILURE,
        ) from None
    except Interrupted as stop:  # spawn has stopped every rank
        _exit(_stopped_line(stop, settings, run_dir), stop.exit_code)


def _stopped_line(stop: Interrupted, settings: Settings, run_dir: Path) -> str:
    """One line: what stopped the run, how far it got, and the command that continues it."""
    how = "Ctrl-C" if stop.signal_number == signal.SIGINT else str(stop)
    return f"stopped by {how}: {run_folder.resume_hint(run_dir, settings.run.nodes, sys.argv[1:])}"


def _print_notes(settings: Settings) -> None:
    for note in config_notes(settings):
        print(f"[dpsgd] note: {note}", flush=True)


def _exit(
    message: str, code: int, show: bool = True, hard: bool = False, shared: bool = True
) -> None:
    """Report and exit; `hard` skips interpreter teardown, which can block on gloo after a peer died.

    `shared`: every rank has the same message (a configuration error): under torchrun it is said once.
    """
    if RANK_CONTEXT is not None and code == launch.EXIT_CONFIG_ERROR and shared:
        _exit_config_error_under_torchrun(RANK_CONTEXT, message)
    if show:
        print(f"dpsgd: {message}", file=sys.stderr, flush=True)
    if hard:
        sys.stdout.flush()
        os._exit(code)
    sys.exit(code)


def _exit_config_error_under_torchrun(ctx: launch.RankContext, message: str) -> None:
    """Make a configuration error the one failure torchrun reports, with the paragraph as its cause.

    torchrun prints its own traceback and a box listing every worker that exited non-zero,
    each with "To enable traceback see ...". So on each machine one rank (its first) fails,
    after the others have left with 0, and hands the paragraph to torchrun through the error
    file torchrun gives every worker (TORCHELASTIC_ERROR_FILE): the box then names one failure
    whose cause is the paragraph, said once, at the end of the output. torchrun itself exits 1.
    """
    counter = f"{EXIT_KEY}/{os.environ.get('GROUP_RANK', '0')}/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    if ctx.local_rank != 0:
        ctx.store.add(counter, 1)
        sys.stdout.flush()
        os._exit(0)  # this machine's first rank reports for it
    deadline = time.monotonic() + SIBLINGS_WAIT_S
    while ctx.store.add(counter, 0) < ctx.local_world_size - 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    if not write_torchrun_error_file(message):
        print(f"dpsgd: {message}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(launch.EXIT_CONFIG_ERROR)


def _agree_start_time(ctx: launch.RankContext | None) -> datetime:
    """Rank 0's clock, shared through the store, so every rank resolves the same run directory."""
    if ctx is None:
        return datetime.now()
    if ctx.rank == 0:
        ctx.store.set(START_TIME_KEY, repr(time.time()))
    return datetime.fromtimestamp(float(ctx.store.get(START_TIME_KEY)))


def _add_overrides(overrides: list[str]) -> None:
    """Append overrides, but before a trailing -m/--multirun (after it they would be rejected)."""
    position = len(sys.argv) - 1 if sys.argv[-1] in ("-m", "--multirun") else len(sys.argv)
    sys.argv[position:position] = overrides


def main() -> None:
    global RANK_CONTEXT
    startup_step("imported")  # benchmarks/startup.py: the imports above are done
    if launch.under_torchrun():
        RANK_CONTEXT = launch.context_from_env()
        given = {arg.split("=")[0] for arg in sys.argv[1:] if "=" in arg}
        if "nodes" not in given:
            # `torchrun --nnodes 4 --nproc_per_node 24 train.py ...` means 96 nodes: the world decides.
            _add_overrides([f"nodes={RANK_CONTEXT.world_size}"])
        elif "nodes_per_rank" not in given:
            # `torchrun --nproc_per_node 4 train.py nodes=1000`: 250 nodes on each rank.
            nodes = next(arg.split("=", 1)[1] for arg in sys.argv[1:] if arg.startswith("nodes="))
            if nodes.isdigit() and int(nodes) % RANK_CONTEXT.world_size == 0:
                _add_overrides([f"nodes_per_rank={int(nodes) // RANK_CONTEXT.world_size}"])
        if RANK_CONTEXT.rank != 0:
            _add_overrides(
                [
                    "hydra.output_subdir=null",
                    "hydra/job_logging=disabled",
                    "hydra/hydra_logging=disabled",
                ]
            )
    start = _agree_start_time(RANK_CONTEXT)
    OmegaConf.register_new_resolver(
        "dpsgd_start", lambda pattern: start.strftime(pattern), replace=True
    )
    os.environ["HYDRA_FULL_ERROR"] = (
        "1"  # Hydra raises instead of printing and exiting 1: a config mistake exits 2
    )
    try:
        task()
    except CompactHydraException as error:  # an unknown key, group option or override syntax
        _exit(
            composition_error(error, sys.argv[1:]),
            launch.EXIT_CONFIG_ERROR,
            show=RANK_CONTEXT is None or RANK_CONTEXT.rank == 0,
        )
    _end_sweep()


if __name__ == "__main__":
    main()
