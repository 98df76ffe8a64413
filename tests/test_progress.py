"""What a user sees while a run starts and runs (issue 21, point 4).

Start-up says each step (the data cache being built, the ranks, the process group); during
the rounds rank 0 shows one progress line: live (tqdm) on a terminal of its own, plain lines
every `log.progress_every_s` seconds when the output is a pipe or a file. No timings are
asserted here: `benchmarks/startup.py` measures where start-up goes.
"""

from __future__ import annotations

import fcntl
import io
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time
from datetime import timedelta

import pytest
import torch.distributed as dist

from dpsgd.launch import free_port
from dpsgd.progress import ProgressLine, RankArrivals, RoundsReached, rank_arrived
from tests.conftest import MOVIELENS_CSV, RANK_TEST_TIMEOUT_S, REPO, run_train

ROUNDS = 100
# One rank of 4 synthetic nodes (one process besides the parent: cheap on a shared machine); only
# the last round is evaluated, so every progress line before it comes from the rounds themselves.
RUN = (
    "nodes=4",
    "nodes_per_rank=4",
    f"rounds={ROUNDS}",
    f"eval.every={ROUNDS}",
    "checkpoint.every=0",
    "dataset.num_users=80",
    "dataset.num_items=100",
    "topology=ring",
    "eval.consensus_sketch=0",
)
PLAIN_LINE = re.compile(
    rf"^\[dpsgd\] round (\d+)/{ROUNDS} \| [\d.]+ rounds/s \| (\d+s|\?) left \| "
    r"[\d.]+ MB sent/node",
    re.MULTILINE,
)


def test_piped_output_gets_plain_progress_lines_between_evaluated_rounds(tmp_path):
    """Output to a pipe: plain lines (round, rate, time left, MB) every progress_every_s, long before
    the only evaluated round; and the start-up steps come first, in order."""
    result = run_train(tmp_path, *RUN, "log.progress_every_s=0.1")
    rounds = [int(match.group(1)) for match in PLAIN_LINE.finditer(result.stdout)]
    between = [r for r in rounds if r < ROUNDS]
    assert between, f"no progress line before the evaluated round {ROUNDS}:\n{result.stdout}"
    assert between == sorted(between)
    assert "\r" not in result.stdout  # no live redrawing into a pipe
    assert re.search(
        rf"^\[dpsgd\] round {ROUNDS}/{ROUNDS} .*\| test rmse [\d.]+ \| test acc \(half-star match\)",
        result.stdout,
        re.M,
    )
    steps = [
        "4 nodes in 1 rank of 4 on this machine",
        "process group ready (1 rank); building 4 nodes",
        f"round {between[0]}/{ROUNDS}",
        "[dpsgd] done:",
    ]
    positions = [result.stdout.find(step) for step in steps]
    assert -1 not in positions and positions == sorted(positions), result.stdout


def test_progress_false_prints_no_progress_line(tmp_path):
    result = run_train(tmp_path, *RUN, "log.progress=false", "log.progress_every_s=0.1")
    assert not PLAIN_LINE.search(result.stdout)
    assert "[dpsgd] done:" in result.stdout


def _run_in_terminal(command: list[str], env: dict, timeout_s: float) -> str:
    """Run `command` with its output on a pseudo-terminal 160 columns wide; return what it wrote."""
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))
    process = subprocess.Popen(
        command, cwd=REPO, env=env, stdout=follower, stderr=follower, stdin=subprocess.DEVNULL
    )
    os.close(follower)
    output, deadline = b"", time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([leader], [], [], 0.5)
            if ready:
                try:
                    chunk = os.read(leader, 65536)
                except OSError:  # the terminal closed: every writer has exited
                    break
                if not chunk:
                    break
                output += chunk
            elif process.poll() is not None:
                break
        else:
            raise AssertionError(
                f"the run did not end within {timeout_s} s:\n{output.decode(errors='replace')}"
            )
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()
        os.close(leader)
    assert process.returncode == 0, output.decode(errors="replace")
    return output.decode(errors="replace")


def test_terminal_gets_one_live_tqdm_line(tmp_path):
    """On a terminal the progress is one redrawn tqdm line (carriage returns, a bar, the bytes)."""
    env = {**os.environ, "DPSGD_CACHE": str(tmp_path / "cache"), "GLOO_SOCKET_IFNAME": "lo"}
    command = [sys.executable, str(REPO / "train.py"), *RUN, f"hydra.run.dir={tmp_path / 'run'}"]
    output = _run_in_terminal(command, env, RANK_TEST_TIMEOUT_S)
    redraws = re.findall(
        rf"\r\[dpsgd\] (\d+)/{ROUNDS} rounds \|[^|]*\| [^|]*round/s \| [^|]* left, "
        r"[\d.]+ MB sent/node",
        output,
    )
    assert len(redraws) >= 2, output
    assert int(redraws[-1]) == ROUNDS
    assert not PLAIN_LINE.search(
        output.replace(f"round {ROUNDS}/{ROUNDS}", "")
    )  # no periodic plain lines


def test_progress_line_states_round_rate_time_left_bytes_and_the_last_metric():
    reached = RoundsReached()
    stream = io.StringIO()
    line = ProgressLine(100, "rmse", reached, every_s=0.0, stream=stream, live=False)
    line.start_clock()
    reached.note(5, 2_500_000)
    time.sleep(0.01)
    line.tick()
    line.evaluated(10, {"test_loss": 0.95, "test_acc": 0.2}, bytes_sent=5_000_000)
    reached.note(14, 7_000_000)
    line.tick()
    first, evaluated, later = stream.getvalue().splitlines()
    assert re.fullmatch(
        r"\[dpsgd\] round 5/100 \| [\d.]+ rounds/s \| \d+s left \| 2\.5 MB sent/node", first
    )
    assert evaluated.startswith("[dpsgd] round 10/100 |") and evaluated.endswith(
        "| 5.0 MB sent/node | test rmse 0.9500 | test acc (half-star match) 0.2000"
    )
    # Between evaluations the line keeps the last metric and says which round it is from.
    assert later.startswith("[dpsgd] round 14/100 |") and later.endswith(
        "| 7.0 MB sent/node | test rmse 0.9500 | test acc (half-star match) 0.2000 (round 10)"
    )


def test_slow_rank_start_is_announced_with_counts():
    """Ranks that are slow to start are counted out loud (k of n started, ready), then it stops."""
    port = free_port()
    store = dist.TCPStore(
        "127.0.0.1",
        port,
        world_size=None,
        is_master=True,
        wait_for_workers=False,
        timeout=timedelta(seconds=30),
    )
    stream = io.StringIO()
    rank_arrived(store, "started")
    rank_arrived(store, "started")
    arrivals = RankArrivals(store, 3, quiet_s=0.0, every_s=0.05, stream=stream).start()
    try:
        _wait_for(lambda: "2 of 3 started, 0 of 3 have built their nodes" in stream.getvalue())
        rank_arrived(store, "started")
        for _ in range(3):
            rank_arrived(store, "ready")
        _wait_for(lambda: not arrivals._thread.is_alive())  # every rank ready: it ends by itself
    finally:
        arrivals.stop()
    lines = stream.getvalue().splitlines()
    assert lines[0] == "[dpsgd] ranks: 2 of 3 started, 0 of 3 have built their nodes"
    assert not any("3 of 3 have built" in line for line in lines)


def _wait_for(condition, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


@pytest.mark.skipif(not MOVIELENS_CSV.exists(), reason="MovieLens not in ../shared/data")
def test_building_the_data_cache_is_announced_once(tmp_path, capsys):
    from dpsgd.data.ratings import load_movielens

    load_movielens(MOVIELENS_CSV, tmp_path)
    first = capsys.readouterr().out
    load_movielens(MOVIELENS_CSV, tmp_path)
    assert "[dpsgd] building the data cache" in first and "first use" in first
    assert "[dpsgd] data cache built in" in first
    assert capsys.readouterr().out == ""  # a cache that is there is memory-mapped silently


def test_start_up_imports_neither_torchvision_nor_the_compiler():
    """train.py's imports and a node's optimizer (built, zeroed, checkpointed) must not pull in
    torchvision or torch._dynamo: each doubled the start-up of a short run (`benchmarks/startup.py`)."""
    code = (
        "import sys, torch; sys.path.insert(0, '.'); import train; from dpsgd.training import build_optimizer\n"
        "model = torch.nn.Linear(2, 1)\n"
        "for name in ('sgd', 'adam'):\n"
        "    optimizer = build_optimizer(name, model.parameters(), 0.1); optimizer.zero_grad()\n"
        "    optimizer.load_state_dict(optimizer.state_dict())\n"
        "print(sorted(m for m in ('torchvision', 'torch._dynamo') if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
