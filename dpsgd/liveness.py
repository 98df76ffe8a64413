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

Ranks forked by `dpsgd.launch.spawn` also share a `RankTable` with their launcher. The
launcher writes there how a rank died the moment it sees it, so a death is a verdict at
once instead of after `CONFIRM_S` of silent heartbeats. Each rank writes there which
receives it has posted and not completed (`receiving` / `received`): gloo aborts a
process (SIGABRT, in its own thread, so nothing can catch it) when a sender puts more
bytes on the wire than the posted buffer holds, i.e. more than the sender's header
announced. Honest headers have a fixed size, so a rank aborted while only one payload
receive was open is that payload's sender's victim, and the verdict names the sender
(`death_verdict`); an RWM node always has its other neighbours' header receives open too.
"""

from __future__ import annotations

import mmap
import signal
import struct
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
DEATH_POLL_S = 0.1  # how often a node confirming a stall looks for the launcher's word on a death


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
    # Whether the heartbeats showed a stalled or slow node (False: `node` is only the peer waited for).
    found: bool = True
    source: str = "the heartbeats show"  # or the launcher, that saw a rank die


class Liveness:
    """This node's heartbeat, and the verdict on who stalled when a wait expires."""

    def __init__(
        self,
        store: dist.Store,
        rank: int,
        world_size: int,
        slow_after_s: float,
        label: Callable[[int], str] = "node {}".format,
    ):
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
        self._thread = threading.Thread(
            target=self._beat_forever, name=f"dpsgd-heartbeat-{rank}", daemon=True
        )

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
            death = self._death_within(HEARTBEAT_S)
            if death is not None:
                return death
            second = self._read()
            stalled = [
                node
                for node in range(self.world_size)
                if node != self.rank
                and (node not in second or first.get(node) == second.get(node))
                and (node not in second or second[node].phase not in ENDED_PHASES)
            ]
            if not stalled or time.monotonic() > deadline:
                break
        if stalled:
            node = max(stalled, key=lambda n: second[n].phase_s if n in second else float("inf"))
            return Verdict(
                node,
                f"{self.label(node)} stopped answering: its heartbeat stopped (frozen or dead)",
            )
        busy = {
            node: beat
            for node, beat in second.items()
            if node != self.rank
            and beat.phase not in WAITING_PHASES + ENDED_PHASES
            and beat.phase_s >= self.slow_after_s
        }
        if busy:
            node = max(busy, key=lambda n: busy[n].phase_s)
            beat = busy[node]
            return Verdict(
                node,
                f"{self.label(node)} has been in its {beat.phase} phase for {beat.phase_s:.0f} s while "
                "its neighbours waited for it (too slow for comm.timeout_s)",
            )
        return Verdict(waited_for, f"neighbour {waited_for} did not answer", found=False)

    def _death_within(self, seconds: float) -> Verdict | None:
        """Wait `seconds`, returning early with the launcher's verdict once it saw another rank die."""
        end = time.monotonic() + seconds
        while True:
            died = (
                []
                if _TABLE is None
                else [
                    (order, rank)
                    for rank in range(min(self.world_size, _TABLE.world_size))
                    if rank != self.rank and (order := _TABLE.death_order(rank))
                ]
            )
            if died:
                return death_verdict(_TABLE, min(died)[1], self.label)
            left = end - time.monotonic()
            if left <= 0:
                return None
            time.sleep(min(DEATH_POLL_S, left))

    def _beat_forever(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                self._beat()
            except Exception:  # noqa: BLE001 - the store may be gone at the end of a run
                return

    def _beat(self) -> None:
        self._count += 1
        seconds = time.monotonic() - self._phase_started
        self.store.set(
            f"{HEARTBEAT_PREFIX}/{self.rank}", f"{self._count} {self._phase} {seconds:.3f}"
        )

    def _read(self) -> dict[int, Beat]:
        beats = {}
        for node in range(self.world_size):
            key = f"{HEARTBEAT_PREFIX}/{node}"
            if self.store.check([key]):
                beats[node] = Beat.parse(self.store.get(key))
        return beats


@dataclass(frozen=True)
class OpenReceive:
    """A receive a rank had posted and not completed: from `peer`, of `kind` ("header", "payload"...)."""

    peer: int
    kind: str
    what: str  # in words, e.g. "values of round 3"


@dataclass(frozen=True)
class OpenReceives:
    """What a rank last wrote about its open receives: `shown` in full, and how many more did not fit."""

    shown: tuple[OpenReceive, ...]
    payloads: int  # open payload receives, counted even when not all are shown
    more: int = 0

    def payload_senders(self) -> list[OpenReceive]:
        return [receive for receive in self.shown if receive.kind == "payload"]

    def words(self, label: Callable[[int], str]) -> str:
        listed = ", ".join(f"{label(receive.peer)}'s {receive.what}" for receive in self.shown)
        return listed + (f" and {self.more} more" if self.more else "")


class RankTable:
    """Memory shared by a launcher and the ranks it forks: how each rank died (written by the launcher)
    and the receives each rank has open (written by the rank), readable after that rank is gone.

    One anonymous shared mapping made before forking, one fixed slot per rank: no store call and no
    lock between processes, so a rank can afford to write its open receives on every message. A slot
    holds whole entries only, with counts of those left out: a cut entry could name a wrong peer.
    """

    SLOT_BYTES = 1024
    # death order (0: alive or ended normally), exit code, bytes of entries, entries shown, entries left out,
    # open payload receives
    _HEAD = struct.Struct("<iiiiii")
    TEXT_BYTES = SLOT_BYTES - _HEAD.size

    def __init__(self, world_size: int):
        self.world_size = world_size
        # MAP_SHARED: forked ranks see it.
        self._memory = mmap.mmap(-1, max(1, world_size) * self.SLOT_BYTES)
        self._deaths = 0

    def record_death(self, rank: int, exit_code: int) -> None:
        """The launcher saw `rank` end with `exit_code` (negative: killed by that signal), on its own."""
        self._deaths += 1
        _, _, *receives = self._head(rank)
        self._HEAD.pack_into(
            self._memory, rank * self.SLOT_BYTES, self._deaths, exit_code, *receives
        )

    def death_order(self, rank: int) -> int:
        """1 for the first rank the launcher saw die, 2 for the next...; 0 while it has not."""
        return self._head(rank)[0]

    def exit_code(self, rank: int) -> int:
        return self._head(rank)[1]

    def write_receives(self, rank: int, receives: list[OpenReceive]) -> None:
        """Payloads first (they decide a verdict), as many whole entries as fit. Length zero first, then the
        entries, then the head: a rank dying mid-write leaves no half record."""
        receives = sorted(receives, key=lambda receive: receive.kind != "payload")
        encoded, used = [], 0
        for receive in receives:
            entry = (
                f"{receive.peer} {receive.kind} {receive.what}".replace(";", ",").encode() + b";"
            )
            if used + len(entry) > self.TEXT_BYTES:
                break
            encoded.append(entry)
            used += len(entry)
        data = b"".join(encoded)
        payloads = sum(receive.kind == "payload" for receive in receives)
        start = rank * self.SLOT_BYTES
        order, code, *_ = self._head(rank)
        self._HEAD.pack_into(self._memory, start, order, code, 0, 0, 0, 0)
        self._memory[start + self._HEAD.size : start + self._HEAD.size + len(data)] = data
        self._HEAD.pack_into(
            self._memory,
            start,
            order,
            code,
            len(data),
            len(encoded),
            len(receives) - len(encoded),
            payloads,
        )

    def open_receives(self, rank: int) -> OpenReceives:
        """What `rank` was receiving, as the rank last wrote it."""
        _, _, length, shown, more, payloads = self._head(rank)
        start = rank * self.SLOT_BYTES + self._HEAD.size
        entries = self._memory[start : start + length].decode().split(";")[:shown]
        receives = []
        for entry in entries:
            peer, kind, what = entry.split(" ", 2)
            receives.append(OpenReceive(int(peer), kind, what))
        return OpenReceives(tuple(receives), payloads, more)

    def _head(self, rank: int) -> tuple[int, int, int, int, int, int]:
        return self._HEAD.unpack_from(self._memory, rank * self.SLOT_BYTES)


_TABLE: RankTable | None = None  # this process's table: set in a rank forked by dpsgd.launch.spawn
_RANK = -1
_open: dict[tuple[int, str], str] = {}
_open_lock = threading.Lock()  # RWM receives from several threads


def attach(table: RankTable | None, rank: int) -> None:
    """Called in a forked rank before it runs: its receives go to `table`'s slot `rank`."""
    global _TABLE, _RANK
    _TABLE, _RANK = table, rank
    _open.clear()


def receiving(peer: int, kind: str, what: str) -> None:
    """A receive from `peer` whose length `peer` controls is about to be posted (`kind`: "header" or
    "payload"); `what` says it in words, e.g. "values and index of round 3". A no-op without a launcher."""
    if _TABLE is None:
        return
    with _open_lock:
        _open[peer, kind] = what
        _publish()


def received(peer: int, kind: str) -> None:
    """The receive that `receiving(peer, kind, ...)` announced completed."""
    if _TABLE is None:
        return
    with _open_lock:
        if _open.pop((peer, kind), None) is not None:
            _publish()


def _publish() -> None:
    _TABLE.write_receives(
        _RANK, [OpenReceive(peer, kind, what) for (peer, kind), what in _open.items()]
    )


def death_verdict(
    table: RankTable, rank: int, label: Callable[[int], str] = "node {}".format
) -> Verdict:
    """Who to blame for `rank`'s death as its launcher saw it.

    Killed by SIGABRT while receiving: some sender put more on the wire than the receive posted for
    it (gloo's "Received data size doesn't match expected size" ends the receiving process). Honest
    headers have a fixed size, so with exactly one payload receive open its sender is named (a forged
    header longer than a header would abort the receiver too: the other open receives are listed as
    well); with no payload or several open, the candidates are listed and the victim is named.
    Anything else: the rank itself.
    """
    code = table.exit_code(rank)
    receives = table.open_receives(rank)
    source = "the launcher says"
    payloads = receives.payload_senders()
    if code == -signal.SIGABRT and receives.payloads == 1 and len(payloads) == 1:
        (payload,) = payloads
        others = OpenReceives(
            tuple(r for r in receives.shown if r is not payload), 0, receives.more
        )
        also = f" (also open: {others.words(label)})" if others.shown or others.more else ""
        return Verdict(
            payload.peer,
            f"{label(rank)} was killed by gloo (SIGABRT) while receiving "
            f"{label(payload.peer)}'s {payload.what}{also}: {label(payload.peer)} sent more "
            "than its header announced",
            source=source,
        )
    if code == -signal.SIGABRT and (receives.shown or receives.more):
        return Verdict(
            rank,
            f"{label(rank)} was killed by gloo (SIGABRT) while receiving {receives.words(label)}: "
            "one of them sent more than it announced",
            source=source,
        )
    how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
    return Verdict(rank, f"{label(rank)} died ({how})", source=source)
