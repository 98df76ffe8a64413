"""Which node stopped answering: heartbeats and phases in the store, read when a wait expires.

When one node freezes, its neighbours wait for it, their neighbours wait for them, and
every wait expires at about the same time; the first node to time out is rarely the
frozen one's neighbour, so "the peer I waited for" blames a healthy node. Instead each
node runs a heartbeat thread that, every `HEARTBEAT_S`, writes to the store a counter and
what the node is doing ("train", "comm", "eval"...) and for how long. A frozen process
(SIGSTOP) or a dead one stops counting; a slow one keeps counting but stays in a
non-waiting phase far longer than the others. A node whose wait failed reads every
heartbeat twice, `HEARTBEAT_S` apart, and blames, in order: the node whose counter did not
move (the one that stalled longest, if several), else the node busy longest outside
communication (at least `slow_after_s`), else the peer it was waiting for. Durations are measured by each node on
its own clock, so machines need not agree on the time.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Callable

import torch.distributed as dist

HEARTBEAT_PREFIX = "alive"
HEARTBEAT_S = 1.0
CONFIRM_S = 10.0  # a live node starved of CPU (96 ranks on 2 cores) may skip beats: wait this long before blaming
WAITING_PHASES = ("comm",)
ENDED_PHASES = ("done", "failed")  # said by a node that leaves on purpose: its silence is no stall


@dataclass(frozen=True)
class Beat:
    count: int
    phase: str
    phase_s: float  # seconds in the phase when written

    @classmethod
    def parse(cls, raw: bytes) -> "Beat":
        count, phase, seconds = raw.decode().split()
        return cls(int(count), phase, float(seconds))


@dataclass(frozen=True)
class Verdict:
    node: int
    why: str
    found: bool = True  # the heartbeats showed a stalled or slow node (False: only the peer waited for)


class Liveness:
    """This node's heartbeat, and the verdict on who stalled when a wait expires."""

    def __init__(self, store: dist.Store, rank: int, world_size: int, slow_after_s: float,
                 label: Callable[[int], str] = "node {}".format):
        """`slow_after_s`: a node busy outside communication this long counts as too slow;
        `label(rank)` names a rank in verdicts ("node 3", or "rank 1 (nodes 24-47)" for node groups)."""
        self.store = store
        self.label = label
        self.slow_after_s = slow_after_s
        self.rank = rank
        self.world_size = world_size
        self._phase = "start"
        self._phase_started = time.monotonic()
        self._count = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat_forever, name=f"dpsgd-heartbeat-{rank}", daemon=True)

    def start(self) -> "Liveness":
        self._beat()
        self._thread.start()
        return self

    def end(self, phase: str = "done") -> None:
        """Stop beating, saying why, so that this node's silence is not read as a stall."""
        self._stop.set()
        self.enter(phase)
        try:
            self._beat()
        except Exception:  # noqa: BLE001 - the store may already be gone
            pass

    def enter(self, phase: str) -> None:
        """The main loop says what it does now (a plain attribute write: no store call on the hot path)."""
        self._phase, self._phase_started = phase, time.monotonic()

    def suspect(self, waited_for: int) -> Verdict:
        """The node to blame for a failed wait on `waited_for` (see the module docstring)."""
        first = self._read()
        deadline = time.monotonic() + CONFIRM_S
        while True:
            time.sleep(HEARTBEAT_S)
            second = self._read()
            stalled = [node for node in range(self.world_size)
                       if node != self.rank and (node not in second or first.get(node) == second.get(node))
                       and (node not in second or second[node].phase not in ENDED_PHASES)]
            if not stalled or time.monotonic() > deadline:
                break
        if stalled:
            node = max(stalled, key=lambda n: second[n].phase_s if n in second else float("inf"))
            return Verdict(node, f"{self.label(node)} stopped answering: its heartbeat stopped (frozen or dead)")
        busy = {node: beat for node, beat in second.items() if node != self.rank
                and beat.phase not in WAITING_PHASES + ENDED_PHASES and beat.phase_s >= self.slow_after_s}
        if busy:
            node = max(busy, key=lambda n: busy[n].phase_s)
            beat = busy[node]
            return Verdict(node, f"{self.label(node)} has been in its {beat.phase} phase for {beat.phase_s:.0f} s while "
                                 "its neighbours waited for it (too slow for comm.timeout_s)")
        return Verdict(waited_for, f"neighbour {waited_for} did not answer", found=False)

    def _beat_forever(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                self._beat()
            except Exception:  # noqa: BLE001 - the store may be gone at the end of a run
                return

    def _beat(self) -> None:
        self._count += 1
        seconds = time.monotonic() - self._phase_started
        self.store.set(f"{HEARTBEAT_PREFIX}/{self.rank}", f"{self._count} {self._phase} {seconds:.3f}")

    def _read(self) -> dict[int, Beat]:
        beats = {}
        for node in range(self.world_size):
            key = f"{HEARTBEAT_PREFIX}/{node}"
            if self.store.check([key]):
                beats[node] = Beat.parse(self.store.get(key))
        return beats
