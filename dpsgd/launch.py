"""How ranks come to exist: forked on this machine, or started by torchrun.

Both ways end in the same call, `fn(RankContext)`, so a node runs one code path
whoever started it. Standalone mode forks the ranks from a parent that has already
imported torch: the pages of the interpreter and of torch are shared, which is what
lets 96 ranks fit in a few GiB on a laptop (96 fresh interpreters need 20+ GiB). The
parent hosts the rendezvous store so that it outlives any rank, and it watches the
ranks so that one death ends the run with a verdict instead of a hang: it tells the
others at once through memory they share (`dpsgd.liveness.RankTable`), and once every
rank that could stop on its own has, it kills the ones they named (a frozen rank never
stops) instead of waiting out the grace period.
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing as mp
import multiprocessing.connection
import os
import signal
import socket
import sys
import time
import traceback
from collections import Counter
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable

import torch
import torch.distributed as dist

from dpsgd import liveness
from dpsgd.errors import ConfigError, NodeFailure, raise_interrupted
from dpsgd.progress import RankArrivals, rank_arrived, run_store, startup_step

LOOPBACK = "127.0.0.1"
STORE_CONNECT_TIMEOUT_S = 120.0
STORE_BACKLOG = 1024  # ranks may connect before the store serves: the kernel queues them
# Exit code of a rank that stopped because of a peer, or the user's configuration.
EXIT_NODE_FAILURE = 3
EXIT_CONFIG_ERROR = 2
PR_SET_PDEATHSIG = 1  # linux prctl option: a signal for this process when its parent dies


@dataclass
class RankContext:
    """What a rank knows about its place in the run, whoever started it."""

    rank: int
    world_size: int
    store: dist.Store
    local_rank: int = 0
    local_world_size: int = 1


class RankFailure(RuntimeError):
    """One or more forked ranks failed; `errors` maps rank to what it reported."""

    def __init__(self, message: str, errors: dict[int, str], first_failed: int | None):
        super().__init__(message)
        self.errors = errors
        self.first_failed = first_failed


def under_torchrun() -> bool:
    """torchrun (and any env:// launcher) exports these for every worker."""
    return all(key in os.environ for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def context_from_env(timeout_s: float = STORE_CONNECT_TIMEOUT_S) -> RankContext:
    """Join the store torchrun set up (its agent's store, or rank 0's).

    Ranks count themselves as started per run (`announce_start`), not here: a sweep's jobs share this store.
    """
    rendezvous = dist.rendezvous("env://", timeout=timedelta(seconds=timeout_s))
    store, rank, world_size = next(rendezvous)
    return RankContext(
        rank=rank,
        world_size=world_size,
        store=store,
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
        local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", 1)),
    )


def announce_start(ctx: RankContext, run_key: str) -> RankArrivals | None:
    """Under torchrun: count this rank as started in the run's namespace; rank 0 watches the counts
    (a thread that ends once every rank is ready; the caller stops it when the run ends earlier)."""
    store = run_store(ctx.store, run_key)
    rank_arrived(store, "started")
    return (
        RankArrivals(store, ctx.world_size).start()
        if ctx.rank == 0 and ctx.world_size > 1
        else None
    )


def free_port() -> int:
    """A TCP port that was free a moment ago on loopback (for a server started elsewhere, e.g. torchrun's).

    Another process may take it before that server binds it; `spawn` avoids the race by
    keeping its store's socket bound from the start (`loopback_listener`).
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def loopback_listener() -> socket.socket:
    """A TCP socket listening on a free port of loopback only: the rendezvous store's, before the store exists."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind((LOOPBACK, 0))
        sock.listen(STORE_BACKLOG)
    except OSError:
        sock.close()
        raise
    return sock


def loopback_store(listener: socket.socket) -> dist.TCPStore:
    """The rendezvous store's server, reachable from this machine only; it takes `listener` over.

    `TCPStore("127.0.0.1", port, is_master=True)` listens on every interface (torch 2.14,
    libuv backend): given a socket already bound to loopback, it serves that one instead.
    """
    port = listener.getsockname()[1]
    fd = listener.detach()  # the store closes it when it is destroyed
    try:
        return dist.TCPStore(
            LOOPBACK,
            port,
            world_size=None,
            is_master=True,
            wait_for_workers=False,
            timeout=timedelta(seconds=STORE_CONNECT_TIMEOUT_S),
            master_listen_fd=fd,
        )
    except BaseException:
        with contextlib.suppress(OSError):
            os.close(fd)
        raise


def spawn(
    fn: Callable[[RankContext], None],
    world_size: int,
    *,
    timeout_s: float | None = None,
    grace_s: float = 30.0,
    quiet_failures: bool = False,
    label: Callable[[int], str] = "node {}".format,
    announce_ranks: str | None = None,
) -> None:
    """Fork `world_size` ranks running `fn`, wait for all, raise RankFailure if any failed.

    `timeout_s` bounds the whole run (a hang guard for tests); `grace_s` is how long the
    others may take to stop on their own after the first rank failed before they are
    killed. No rank outlives this call. `announce_ranks`: the run's key (`dpsgd.experiment.run_key`);
    while ranks are slow to start, say now and then how many started and built their nodes, as the
    ranks count them in the run's namespace of the store (`dpsgd.progress.RankArrivals`).
    """
    listener = (
        loopback_listener()
    )  # bound before forking, so the ranks know the port and nobody can take it
    port = listener.getsockname()[1]
    table = liveness.RankTable(world_size)  # mapped before forking: shared with every rank
    context = mp.get_context("fork")
    parent = os.getpid()
    processes, error_pipes = [], []
    try:
        for rank in range(world_size):
            reader, writer = context.Pipe(duplex=False)
            process = context.Process(
                target=_rank_main,
                args=(
                    fn,
                    rank,
                    world_size,
                    port,
                    listener.fileno(),
                    writer,
                    quiet_failures,
                    parent,
                    label,
                    table,
                    announce_ranks,
                ),
                name=f"dpsgd-node-{rank}",
                daemon=True,
            )
            process.start()
            writer.close()
            processes.append(process)
            error_pipes.append(reader)
        # The store is created after forking: no server thread exists in any child.
        store = loopback_store(listener)
    except BaseException:
        _kill_all(processes)
        raise
    finally:
        listener.close()  # a no-op once the store took it over
    # Ctrl-C or SIGTERM raise Interrupted, which unwinds through the finally below: every rank is killed.
    previous = {
        number: signal.signal(number, raise_interrupted)
        for number in (signal.SIGINT, signal.SIGTERM)
    }
    killed: set[int] = set()
    reports: dict[int, tuple[str, int | None]] = {}
    arrivals = (
        RankArrivals(run_store(store, announce_ranks), world_size).start()
        if announce_ranks
        else None
    )
    try:
        _watch(processes, timeout_s, grace_s, table, error_pipes, reports)
    finally:
        if arrivals is not None:
            arrivals.stop()
        killed = _kill_all(processes)
        for number, handler in previous.items():
            signal.signal(number, handler)
        del store
    _raise_on_failure(processes, error_pipes, killed, label, table, reports)


def _die_with_parent(parent: int) -> None:
    """No rank outlives its parent, even one killed with SIGKILL (no cleanup code runs then)."""
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def _rank_main(
    fn,
    rank,
    world_size,
    port,
    listener_fd,
    error_pipe,
    quiet_failures,
    parent,
    label,
    table,
    run_key,
) -> None:
    """Body of one forked rank: connect to the parent's store, run, report how it ended."""
    _die_with_parent(parent)
    liveness.attach(table, rank)
    os.close(listener_fd)  # the parent's store socket: only the parent may hold it
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides how Ctrl-C ends the run
    torch.set_num_threads(1)
    code = 0
    try:
        store = dist.TCPStore(
            LOOPBACK,
            port,
            world_size=None,
            is_master=False,
            timeout=timedelta(seconds=STORE_CONNECT_TIMEOUT_S),
        )
        startup_step("rank started")
        if run_key:
            rank_arrived(run_store(store, run_key), "started")
        fn(
            RankContext(
                rank=rank,
                world_size=world_size,
                store=store,
                local_rank=rank,
                local_world_size=world_size,
            )
        )
    except NodeFailure as failure:
        code = EXIT_NODE_FAILURE
        _report(error_pipe, str(failure), failure.failed_node, quiet_failures)
    except ConfigError as error:
        code = EXIT_CONFIG_ERROR
        _report(error_pipe, str(error), None, quiet_failures or rank != 0)
    except BaseException:  # noqa: BLE001 - a rank must always report, then exit
        code = 1
        _report(
            error_pipe, f"{label(rank)} crashed:\n{traceback.format_exc()}", rank, quiet_failures
        )
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        # Skip interpreter teardown: torch and gloo destructors can block after a peer died.
        os._exit(code)


def _report(pipe, message: str, failed_node: int | None, quiet: bool) -> None:
    try:
        pipe.send((message, failed_node))
    except OSError:
        pass
    if not quiet:
        print(message, file=sys.stderr, flush=True)


def _watch(
    processes,
    timeout_s: float | None,
    grace_s: float,
    table: liveness.RankTable,
    error_pipes,
    reports: dict[int, tuple[str, int | None]],
) -> None:
    """Wait until every rank exited; after the first failure allow only `grace_s` more.

    A rank that dies on its own (a signal we did not send, a crash) is written to `table` at
    once, so the others blame it without waiting for its heartbeat to be confirmed silent.
    The reports of exited ranks go to `reports`. Returns when all exited, when every rank still
    running is one that the failed ranks named (it is frozen or far too slow: it will not stop
    on its own), or when the grace ran out; the caller kills the rest. Raises TimeoutError only
    when `timeout_s`, the bound on the whole run, runs out.
    """
    hard_deadline = None if timeout_s is None else time.monotonic() + timeout_s
    grace_deadline = None
    running = {p.sentinel: p for p in processes}
    while running:
        deadlines = [d for d in (hard_deadline, grace_deadline) if d is not None]
        wait_s = max(0.0, min(deadlines) - time.monotonic()) if deadlines else None
        ready = mp.connection.wait(list(running), timeout=wait_s)
        if not ready:
            if grace_deadline is not None and time.monotonic() >= grace_deadline:
                return
            raise TimeoutError(
                f"ranks still running after {timeout_s:.0f} s: "
                f"{sorted(p.name for p in running.values())}"
            )
        for sentinel in ready:
            process = running.pop(sentinel)
            process.join()
            rank = processes.index(process)
            if process.exitcode not in (0, EXIT_NODE_FAILURE, EXIT_CONFIG_ERROR):
                table.record_death(rank, process.exitcode)
            report = _read_report(error_pipes[rank])
            if report is not None:
                reports[rank] = report
            if process.exitcode != 0 and grace_deadline is None:
                grace_deadline = time.monotonic() + grace_s
        named = {failed_node for _, failed_node in reports.values()}
        if (
            grace_deadline is not None
            and running
            and all(processes.index(p) in named for p in running.values())
        ):
            return


def _kill_all(processes) -> set[int]:
    """Kill the ranks still running; return their ranks (they did not fail, they were stopped)."""
    killed = {rank for rank, process in enumerate(processes) if process.is_alive()}
    for rank in killed:
        processes[rank].kill()
    for process in processes:
        process.join()
    return killed


def _raise_on_failure(
    processes,
    error_pipes,
    killed: set[int],
    label: Callable[[int], str],
    table: liveness.RankTable,
    reports: dict[int, tuple[str, int | None]],
) -> None:
    errors: dict[int, str] = {}
    blamed_by: dict[int, int] = {}  # failing rank -> the node it blames
    for rank, (process, pipe) in enumerate(zip(processes, error_pipes)):
        report = reports.get(rank) or _read_report(pipe)
        if report is not None:
            errors[rank] = report[0]
            if report[1] is not None:
                blamed_by[rank] = report[1]
        elif rank in killed:
            errors[rank] = f"{label(rank)} was stopped: it had not ended on its own"
        elif process.exitcode != 0:
            errors[rank] = f"{label(rank)} died ({_describe_exit(process.exitcode)})"
        pipe.close()
    if not errors:
        return
    died = sorted(
        (table.death_order(rank), rank) for rank in range(len(processes)) if table.death_order(rank)
    )
    if (
        died and table.exit_code(died[0][1]) == -signal.SIGABRT
    ):  # gloo's abort: it names the sender, if one
        verdict = liveness.death_verdict(table, died[0][1], label)
        raise RankFailure(
            f"{len(errors)} rank(s) failed; the first was {label(verdict.node)}: {verdict.why}",
            errors,
            verdict.node,
        )
    first_failed = _first_failed(processes, errors, list(blamed_by.values()), killed)
    raise RankFailure(
        _failure_summary(errors, blamed_by, first_failed, killed, label), errors, first_failed
    )


def _read_report(pipe) -> tuple[str, int | None] | None:
    """The rank's own account of its failure and whom it blames, or None (success, or killed)."""
    try:
        return pipe.recv() if pipe.poll() else None
    except (EOFError, OSError):
        return None


def _first_failed(
    processes, errors: dict[int, str], named: list[int], killed: set[int]
) -> int | None:
    """A rank killed by a signal (not by us) or that crashed is the cause; else the node the others blame."""
    for rank, process in enumerate(processes):
        if rank not in killed and process.exitcode is not None and process.exitcode < 0:
            return rank
    for rank, process in enumerate(processes):
        if rank not in killed and process.exitcode not in (0, EXIT_NODE_FAILURE):
            return rank
    if named:
        return Counter(named).most_common(1)[0][0]
    return min(errors) if errors else None


def _describe_exit(exitcode: int) -> str:
    if exitcode < 0:
        return f"killed by {signal.Signals(-exitcode).name}"
    return f"exit code {exitcode}"


def _failure_summary(
    errors: dict[int, str],
    blamed_by: dict[int, int],
    first_failed: int | None,
    killed: set[int],
    label: Callable[[int], str],
) -> str:
    """One line: the first failure, in the words of a node that blamed it (it saw what happened),
    and whether the launcher had to kill it (a frozen node never stops on its own)."""
    witnesses = [rank for rank, node in blamed_by.items() if node == first_failed]
    cause = (
        errors.get(witnesses[0] if witnesses else first_failed, "")
        if first_failed is not None
        else ""
    )
    line = (
        f"{len(errors)} rank(s) failed; the first was {label(first_failed)}: "
        f"{cause.strip().splitlines()[0] if cause else 'unknown cause'}"
    )
    if first_failed in killed:
        line += f" [{label(first_failed)} did not stop on its own; the launcher killed it]"
    return line
