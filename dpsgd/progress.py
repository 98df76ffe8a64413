"""What a user sees while a run starts and runs: start-up steps and one progress line.

Start-up (parsing a data set, starting ranks, joining the process group) can take longer
than the rounds of a short run, so each step says what is happening when it begins
(`startup_step`). With `DPSGD_STARTUP_TRACE=<file>` in the environment every step also
appends its wall and CPU time to that file, which `benchmarks/startup.py` turns into a
table of phases.

During the rounds rank 0 shows one progress line (`ProgressLine`): a live tqdm bar when
its output is a terminal of its own, else a plain line every `log.progress_every_s`
seconds (a log file or a pipe, or a terminal that several local torchrun ranks share, where
a redrawn line would be torn by the other ranks' output). Either way the line says the
round, rounds per second, time left, megabytes sent per node and the last evaluated metric.
The round and bytes are rank 0's first node's (`RoundsReached`), read without any message:
every node of a synchronous pattern is within a round of it.
"""

from __future__ import annotations

import json
import math
import os
import sys
import threading
import time
from typing import TextIO

STARTUP_TRACE_ENV = "DPSGD_STARTUP_TRACE"


def startup_step(step: str, message: str | None = None, show: bool = True) -> None:
    """Say which start-up step begins now (`message`, printed when `show`), and trace it when asked.

    `step` is the step's short name in the trace file (`benchmarks/startup.py`).
    """
    if message is not None and show:
        print(f"[dpsgd] {message}", flush=True)
    path = os.environ.get(STARTUP_TRACE_ENV)
    if path:
        line = json.dumps(
            {"step": step, "pid": os.getpid(), "wall": time.time(), "cpu": time.process_time()}
        )
        # One short write in append mode: the lines of several processes do not interleave.
        with open(path, "a") as trace:
            trace.write(line + "\n")


# + "started" / "ready": how many ranks got that far (`RankArrivals`), counted in the run's own
# namespace of the store (`run_store`): a torchrun sweep's jobs and restarts share one store.
STARTUP_KEY = "startup/"
STARTUP_QUIET_S = 2.0  # a start-up quicker than this says nothing about ranks
STARTUP_EVERY_S = 5.0  # then a line at least this often while ranks are still starting


def run_store(store, run_key: str):
    """The run's namespace in the rendezvous store (`dpsgd.experiment.run_key`): its start-up
    counters and its process group live there, so no other job or restart of the same store counts."""
    import torch.distributed as dist  # here: this module imports no torch (train.py --help path)

    return dist.PrefixStore(f"dpsgd/{run_key}", store)


def rank_arrived(store, step: str) -> None:
    """Count this rank as `started` (began this run) or `ready` (its nodes built), in the run's store (`run_store`)."""
    store.add(STARTUP_KEY + step, 1)


class RankArrivals:
    """While ranks start, one line now and then: how many started and how many have built their nodes.

    Run by whoever watches the start (the standalone parent, or rank 0 under torchrun) in a
    thread of its own, reading two counters in the rendezvous store. A start quicker than
    `quiet_s` prints nothing; a slow one (96 ranks on a loaded machine) prints a line when the
    counts change, at most every `every_s` seconds, until every rank is ready.
    """

    def __init__(
        self,
        store,
        world_size: int,
        quiet_s: float = STARTUP_QUIET_S,
        every_s: float = STARTUP_EVERY_S,
        stream: TextIO | None = None,
    ):
        self.store = store
        self.world_size = world_size
        self.quiet_s = quiet_s
        self.every_s = every_s
        self.stream = stream
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dpsgd-rank-arrivals", daemon=True)

    def start(self) -> "RankArrivals":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def counts(self) -> tuple[int, int]:
        """(ranks started, ranks ready) so far."""
        return self.store.add(STARTUP_KEY + "started", 0), self.store.add(STARTUP_KEY + "ready", 0)

    def _run(self) -> None:
        if self._stop.wait(self.quiet_s):
            return
        said = None
        while True:
            try:
                started, ready = self.counts()
            except (RuntimeError, OSError):  # the store went away: the run is over
                return
            if ready >= self.world_size:
                return
            if (started, ready) != said:
                n = self.world_size
                print(
                    f"[dpsgd] ranks: {started} of {n} started, {ready} of {n} have built their nodes",
                    file=self.stream or sys.stdout,
                    flush=True,
                )
                said = (started, ready)
            if self._stop.wait(self.every_s):
                return


class RoundsReached:
    """The last round a node recorded and the bytes it had sent by then, for rank 0's progress line.

    Written by the node's own thread every round (two attribute stores), read by the
    aggregator's thread: a torn read is impossible because the pair is replaced at once.
    """

    def __init__(self) -> None:
        self.latest: tuple[int, int] = (0, 0)  # (round, bytes sent)

    def note(self, round_number: int, bytes_sent: int) -> None:
        self.latest = (round_number, bytes_sent)


def shares_console() -> bool:
    """Whether other ranks of this machine write to the same console (torchrun's local ranks)."""
    return "TORCHELASTIC_RUN_ID" in os.environ and int(os.environ.get("LOCAL_WORLD_SIZE", "1")) > 1


class ProgressLine:
    """Rank 0's one progress line: a live tqdm bar on a terminal, else plain lines every `every_s`."""

    def __init__(
        self,
        rounds: int,
        metric_name: str,
        reached: RoundsReached | None,
        first_round: int = 0,
        every_s: float = 10.0,
        stream: TextIO | None = None,
        live: bool | None = None,
    ):
        """`first_round`: the round a resumed run starts after (rounds per second count this process's own).

        `live`: None decides from the stream (a terminal no other rank writes to).
        """
        self.rounds = rounds
        self.metric_name = metric_name
        self.reached = reached
        self.first_round = first_round
        self.every_s = every_s
        self.stream = stream if stream is not None else sys.stdout
        if live is None:
            live = _is_terminal(self.stream) and not shares_console()
        self.live = live
        self._lock = threading.Lock()
        self._metric: dict[str, float] = {}
        self._metric_round = 0
        self._round = first_round
        self._bytes = 0
        self._started = time.monotonic()
        self._last_line = self._started
        self._bar = None

    def start_clock(self) -> None:
        """Rounds per second count from the moment every node starts training (after the start barrier)."""
        self._started = self._last_line = time.monotonic()
        if self.live:
            from tqdm import tqdm  # imported here: only a live line needs it

            self._bar = tqdm(
                total=self.rounds,
                initial=self.first_round,
                unit="round",
                file=self.stream,
                desc="[dpsgd]",
                dynamic_ncols=True,
                leave=True,
                mininterval=0.2,
                bar_format="{desc} {n_fmt}/{total_fmt} rounds |{bar}| {rate_fmt} | {remaining} left"
                "{postfix}",
            )

    def tick(self) -> None:
        """Called often (every poll of the aggregator): redraw the live line, or print a plain line when due."""
        with self._lock:
            self._update_round()
            if self._bar is not None:
                self._bar.set_postfix_str(self._bar_postfix(), refresh=False)
                self._bar.update(self._round - self._bar.n)
            elif (
                time.monotonic() - self._last_line >= self.every_s
                and self._round > self.first_round
            ):
                self._print(self.line())

    def evaluated(
        self, round_number: int, metrics: dict[str, float], bytes_sent: float | None = None
    ) -> None:
        """An evaluated round every node reported: its line is printed (kept above a live bar).

        `metrics`: the across-node means of test_loss and test_acc; `bytes_sent`: the mean bytes a
        node had sent by that round (the line states that round, not the round rank 0 is at now).
        """
        with self._lock:
            self._metric, self._metric_round = metrics, round_number
            self._update_round(at_least=round_number)
            self._print(self.line(round_number, bytes_sent))
            if self._bar is not None:
                self._bar.set_postfix_str(self._bar_postfix(), refresh=True)

    def close(self) -> None:
        with self._lock:
            if self._bar is not None:
                self._update_round()
                self._bar.update(self._round - self._bar.n)
                self._bar.close()
                self._bar = None

    def line(self, round_number: int | None = None, bytes_sent: float | None = None) -> str:
        """The plain progress line: round, rounds/s, time left, MB sent per node, last metric.

        Without arguments it states the round rank 0's first node reached and its bytes.
        """
        shown = self._round if round_number is None else round_number
        rate = self._rate()
        left = (self.rounds - self._round) / rate if rate > 0 else math.nan
        left_text = "?" if math.isnan(left) else f"{left:.0f}s"
        parts = [f"round {shown}/{self.rounds}", f"{rate:.2f} rounds/s", f"{left_text} left"]
        extras = self._extras(shown, bytes_sent)
        return "[dpsgd] " + " | ".join(parts) + (f" | {extras}" if extras else "")

    def _bar_postfix(self) -> str:
        return self._extras(self._round).replace(" | ", ", ")  # tqdm puts ", " before a postfix

    def _extras(self, shown_round: int, bytes_sent: float | None = None) -> str:
        """MB sent per node, then the last evaluated metric, with its round when the line states another."""
        if bytes_sent is None and self.reached is not None:
            bytes_sent = self._bytes
        parts = [] if bytes_sent is None else [f"{bytes_sent / 1e6:.1f} MB sent/node"]
        # For ratings, test_acc is an exact match after rounding to the nearest half star.
        acc_label = "test acc (half-star match)" if self.metric_name == "rmse" else "test acc"
        for key, label in (("test_loss", f"test {self.metric_name}"), ("test_acc", acc_label)):
            if key in self._metric:
                parts.append(f"{label} {self._metric[key]:.4f}")
        if self._metric and shown_round != self._metric_round:
            parts[-1] += f" (round {self._metric_round})"
        return " | ".join(parts)

    def _update_round(self, at_least: int = 0) -> None:
        if self.reached is not None:
            round_number, self._bytes = self.reached.latest
            self._round = max(self._round, round_number)
        self._round = max(self._round, at_least)

    def _rate(self) -> float:
        elapsed = time.monotonic() - self._started
        return (self._round - self.first_round) / elapsed if elapsed > 0 else 0.0

    def _print(self, text: str) -> None:
        self._last_line = time.monotonic()
        if self._bar is not None:
            self._bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
