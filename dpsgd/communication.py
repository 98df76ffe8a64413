"""Moving messages between graph neighbours with gloo point-to-point, never waiting forever.

Rules that keep gloo from hanging (see PITFALLS.md): receives are posted before we
wait on sends; every posted operation is waited on; each pair has at most one header,
one values and one index transfer in flight per direction, told apart by tag; every
wait has a bound, and a bound that expires is a verdict that the peer is gone (gloo
closes the pair), so it ends the run with the peer's name rather than a retry.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from dpsgd.errors import NodeFailure
from dpsgd.sharing.wire import (HEADER_BYTES, HEADER_DTYPE, HEADER_FIELDS, INDEX_DTYPES, VALUES_DTYPE,
                                Encoding, Message, parse_header)

HEADER_TAG, VALUES_TAG, INDEX_TAG = 1, 2, 3
FAILURE_KEY = "failure/first"
# Waits that must not expire (a gloo timeout closes the pair): peers' deaths still end them.
NO_BOUND = timedelta(days=365)


@dataclass
class ByteCounters:
    """Cumulative bytes this node handed to isend and received, split as the output contract asks."""

    sent_data: int = 0
    sent_meta: int = 0
    recv: int = 0

    @property
    def sent(self) -> int:
        return self.sent_data + self.sent_meta

    def count_sent(self, message: Message) -> None:
        self.sent_data += message.data_bytes
        self.sent_meta += message.meta_bytes


@dataclass
class _ReceiveBuffers:
    """Allocated once per neighbour and reused every round."""

    header: torch.Tensor
    values: torch.Tensor
    index: dict[Encoding, torch.Tensor] = field(default_factory=dict)


class FailureBoard:
    """First-writer-wins record, in the rendezvous store, of which node failed first.

    When a node dies its neighbours notice, then theirs notice those, and so on; the
    board lets every node name the original failure instead of the neighbour it saw go.
    """

    def __init__(self, store: dist.Store):
        self.store = store

    def report(self, node: int, message: str) -> str:
        """Record `message` about `node` unless an earlier failure is recorded; return the first."""
        try:
            first = self.store.compare_set(FAILURE_KEY, "", f"{node}|{message}")
            return first.decode()
        except Exception:  # noqa: BLE001 - the store may be gone with the failed node
            return f"{node}|{message}"

    def failure(self, rank: int, peer: int, seen: str) -> NodeFailure:
        """The error this node stops with: it names the first node that failed in the run."""
        first = self.report(peer, seen if peer == rank else f"node {rank} saw: {seen}")
        failed_node, text = first.split("|", 1)
        return NodeFailure(f"node {rank} stops: node {failed_node} failed ({text}). The run cannot continue "
                           f"without it; rounds completed so far are in nodes/*.jsonl.",
                           failed_node=int(failed_node))


def describe_peer_error(peer: int, error: Exception, timeout_s: float) -> str:
    """What a failed gloo operation says about the peer: silent too long, or gone."""
    text = str(error).lower()
    if "timed out" in text or "timeout" in text:
        return f"neighbour {peer} did not answer within comm.timeout_s={timeout_s:g} s"
    return f"the connection to neighbour {peer} closed (its process stopped)"


def wire_parts(message: Message, header: torch.Tensor) -> list[tuple[torch.Tensor, int]]:
    """The tensors a message puts on the wire, in order, with their tags (END: header only)."""
    parts = [(header, HEADER_TAG)]
    if message.encoding != Encoding.END:
        parts.append((message.values, VALUES_TAG))
    if message.index is not None:
        parts.append((message.index, INDEX_TAG))
    return parts


class _Link:
    """What both transports share: who this node talks to, its byte counts, and failure naming."""

    def __init__(self, rank: int, neighbours: list[int], timeout_s: float, failures: FailureBoard):
        self.rank = rank
        self.neighbours = list(neighbours)
        self.timeout_s = timeout_s
        self.failures = failures
        self.bytes = ByteCounters()

    def _failure(self, peer: int, error: Exception, where: str) -> NodeFailure:
        """The NodeFailure for a failed gloo operation on the pair with `peer`."""
        seen = describe_peer_error(peer, error, self.timeout_s)
        return self.failures.failure(self.rank, peer, f"{seen} ({where})")


class NeighbourLink(_Link):
    """Point-to-point exchange of Messages with this node's graph neighbours."""

    def __init__(self, rank: int, neighbours: list[int], max_values: int, timeout_s: float,
                 failures: FailureBoard):
        super().__init__(rank, neighbours, timeout_s, failures)
        self._buffers = {
            peer: _ReceiveBuffers(header=torch.empty(len(HEADER_FIELDS), dtype=HEADER_DTYPE),
                                  values=torch.empty(max_values, dtype=VALUES_DTYPE))
            for peer in self.neighbours
        }

    def exchange(self, outgoing: Message) -> dict[int, Message]:
        """Send `outgoing` to every neighbour and receive one message from each (D-PSGD)."""
        round_number = outgoing.round
        header_receives = {peer: self._post(dist.irecv, self._buffers[peer].header, peer, HEADER_TAG, round_number)
                           for peer in self.neighbours}
        sends = [(peer, work) for peer in self.neighbours for work in self._post_send(outgoing, peer)]
        received = {}
        for peer, work in header_receives.items():
            self._wait(work, peer, round_number, "header")
            fields = parse_header(self._buffers[peer].header)
            if fields["round"] != round_number:
                raise RuntimeError(f"node {self.rank}: neighbour {peer} sent round {fields['round']} "
                                   f"while round {round_number} was expected (message order broken)")
            received[peer] = self._receive_body(peer, fields, round_number)
        for peer, work in sends:
            self._wait(work, peer, round_number, "send")
        return received

    def _post_send(self, message: Message, peer: int) -> list[dist.Work]:
        works = [self._post(dist.isend, tensor, peer, tag, message.round)
                 for tensor, tag in wire_parts(message, message.header())]
        self.bytes.count_sent(message)
        return works

    def _receive_body(self, peer: int, header: dict[str, int], expected_round: int) -> Message:
        buffers = self._buffers[peer]
        encoding = Encoding(header["encoding"])
        values = buffers.values[:header["num_values"]]
        value_work = self._post(dist.irecv, values, peer, VALUES_TAG, expected_round)
        index = None
        if encoding in INDEX_DTYPES:
            index = self._index_buffer(buffers, encoding, header["num_index"])
            index_work = self._post(dist.irecv, index, peer, INDEX_TAG, expected_round)
        self._wait(value_work, peer, expected_round, "values")
        if index is not None:
            self._wait(index_work, peer, expected_round, "index")
        message = Message.received(header, values, index)
        self.bytes.recv += message.total_bytes
        return message

    def _index_buffer(self, buffers: _ReceiveBuffers, encoding: Encoding, length: int) -> torch.Tensor:
        buffer = buffers.index.get(encoding)
        if buffer is None or buffer.numel() < length:
            buffer = torch.empty(max(length, 1), dtype=INDEX_DTYPES[encoding])
            buffers.index[encoding] = buffer
        return buffer[:length]

    def _post(self, operation, tensor: torch.Tensor, peer: int, tag: int, round_number: int) -> dist.Work:
        """Post an isend or irecv; posting to a pair whose peer is gone fails at once."""
        try:
            return operation(tensor, peer, tag=tag)
        except Exception as error:  # noqa: BLE001 - gloo raises RuntimeError subclasses
            raise self._failure(peer, error, f"post, round {round_number}") from None

    def _wait(self, work: dist.Work, peer: int, round_number: int, what: str) -> None:
        try:
            work.wait(timeout=timedelta(seconds=self.timeout_s))
        except Exception as error:  # noqa: BLE001 - gloo raises RuntimeError subclasses
            raise self._failure(peer, error, f"{what}, round {round_number}") from None


class RandomWalkLink(_Link):
    """Asynchronous messages for RWM: send to one neighbour, receive from whichever sends.

    One receiver thread per neighbour keeps a header receive posted on that pair, so a
    sender's isend always completes without the receiver's main loop taking part, and
    messages reach one queue in arrival order. No wait here has a short bound: in a
    random walk a neighbour may rightly stay silent for many rounds, and a gloo timeout
    would close the pair. A dead neighbour is noticed at once (its connection closes);
    `comm.timeout_s` bounds only how long the node may go without hearing from anyone.

    Shutdown is a handshake that leaves nothing in flight: a node that stops sends END to
    every neighbour; a node that receives END stops too (so the stop floods the graph)
    and answers with its own END; per pair, END is the last message each way, so once a
    node has seen END from every neighbour and its own sends completed, nothing is
    pending on any of its pairs.
    """

    def __init__(self, rank: int, neighbours: list[int], max_values: int, timeout_s: float,
                 failures: FailureBoard):
        # max_values is unused here (each arriving message gets its own buffer): same signature as NeighbourLink.
        super().__init__(rank, neighbours, timeout_s, failures)
        self._arrivals: "queue.Queue[tuple[str, int, object]]" = queue.Queue()
        self._stop_seen = threading.Event()
        self._lock = threading.Lock()
        self._pending_sends: list[tuple[int, dist.Work, torch.Tensor]] = []
        self._ended_sent = False
        self._last_heard = time.monotonic()
        self._threads = [threading.Thread(target=self._receive_from, args=(peer,), daemon=True,
                                          name=f"dpsgd-recv-{rank}-from-{peer}") for peer in self.neighbours]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def send(self, peer: int, message: Message) -> None:
        """Send asynchronously; the previous sends are completed first, so few are ever in flight."""
        self._complete_sends()
        for tensor, tag in wire_parts(message, message.header()):
            try:
                work = dist.isend(tensor, peer, tag=tag)
            except Exception as error:  # noqa: BLE001 - gloo raises RuntimeError subclasses
                raise self._failure(peer, error, f"send, round {message.round}") from None
            self._pending_sends.append((peer, work, tensor))
        self.bytes.count_sent(message)

    def receive(self) -> Message | None:
        """The next model message in arrival order, or None once a neighbour has stopped.

        The last send completes first: a full message is the live model itself (no copy),
        and the caller is about to merge into it.
        """
        self._complete_sends()
        self._last_heard = time.monotonic()  # silence counts from here, not from our own training
        while not self._stop_seen.is_set():
            try:
                kind, peer, payload = self._arrivals.get(timeout=min(1.0, self.timeout_s))
            except queue.Empty:
                self._check_silence()
                continue
            self._last_heard = time.monotonic()
            if kind == "message":
                return payload
            if kind == "failure":
                raise payload
        self._drain_failures()  # a neighbour's death also stops the walk: say so, not "stopped"
        return None

    def close(self, round_number: int) -> None:
        """Say END to every neighbour, hear END from every neighbour, complete every send."""
        if not self._ended_sent:
            for peer in self.neighbours:
                self.send(peer, Message(round=round_number, degree=len(self.neighbours), age=0,
                                        encoding=Encoding.END, values=torch.empty(0)))
            self._ended_sent = True
        for peer, thread in zip(self.neighbours, self._threads):
            thread.join(timeout=self.timeout_s)
            if thread.is_alive():
                raise self.failures.failure(self.rank, peer, f"neighbour {peer} did not say END within "
                                            f"comm.timeout_s={self.timeout_s:g} s of this node stopping")
        self._drain_failures()
        self._complete_sends()

    def _receive_from(self, peer: int) -> None:
        """Receiver thread body: header, then the payload it announces, until END or failure."""
        header = torch.empty(len(HEADER_FIELDS), dtype=HEADER_DTYPE)
        try:
            while True:
                dist.irecv(header, peer, tag=HEADER_TAG).wait(timeout=NO_BOUND)
                fields = parse_header(header)
                encoding = Encoding(fields["encoding"])
                if encoding == Encoding.END:
                    self._count_received(HEADER_BYTES)
                    self._stop_seen.set()
                    return
                values = torch.empty(fields["num_values"], dtype=VALUES_DTYPE)
                dist.irecv(values, peer, tag=VALUES_TAG).wait(timeout=NO_BOUND)
                index = None
                if encoding in INDEX_DTYPES:
                    index = torch.empty(fields["num_index"], dtype=INDEX_DTYPES[encoding])
                    dist.irecv(index, peer, tag=INDEX_TAG).wait(timeout=NO_BOUND)
                message = Message.received(fields, values, index)
                self._count_received(message.total_bytes)
                self._arrivals.put(("message", peer, message))
        except Exception as error:  # noqa: BLE001 - gloo raises RuntimeError subclasses
            self._arrivals.put(("failure", peer, self._failure(peer, error, "receive")))
            self._stop_seen.set()

    def _count_received(self, nbytes: int) -> None:
        with self._lock:
            self.bytes.recv += nbytes

    def _complete_sends(self) -> None:
        for peer, work, _ in self._pending_sends:
            try:
                work.wait(timeout=timedelta(seconds=self.timeout_s))
            except Exception as error:  # noqa: BLE001
                raise self._failure(peer, error, "send") from None
        self._pending_sends.clear()

    def _check_silence(self) -> None:
        if time.monotonic() - self._last_heard > self.timeout_s:
            raise self.failures.failure(self.rank, self.rank, f"node {self.rank} heard from no neighbour "
                                        f"({self.neighbours}) within comm.timeout_s={self.timeout_s:g} s")

    def _drain_failures(self) -> None:
        while not self._arrivals.empty():
            kind, _, payload = self._arrivals.get_nowait()
            if kind == "failure":
                raise payload
