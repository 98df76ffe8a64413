"""Moving messages between nodes with gloo point-to-point, never waiting forever.

Rules that keep gloo from hanging (see PITFALLS.md): receives are posted before we
wait on sends; every posted operation is waited on; each pair has at most one header,
one values and one index transfer in flight per direction, told apart by tag; every
wait has a bound, and a bound that expires is a verdict that the peer is gone (gloo
closes the pair), so it ends the run with the peer's name rather than a retry.

A payload longer than its header announced cannot be caught: gloo aborts the receiving
process from its own thread. So every receive whose length a sender controls is announced
first (`dpsgd.liveness.receiving`): a D-PSGD node waits for all its senders' headers, then
receives one sender's payload at a time, so a launcher that sees a rank aborted during a
payload knows whose it was and names that sender, not its victim. An RWM node receives
from each neighbour in its own thread, so its other neighbours' header receives are open
too; headers have a fixed size, so the one open payload still names its sender.

A peer's header is checked (`wire.check_header`, then the sharing method's own check)
before anything is allocated or received on its word: sizes beyond what the model
allows, a degree other than the sender's (its degree in the topology, or under a plan that
changes per round its number of receivers that round), or a round out of order end
the run with a NodeFailure naming the sender, like a peer that died.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Callable

import torch
import torch.distributed as dist

from dpsgd import liveness as receipts
from dpsgd.errors import NodeFailure
from dpsgd.liveness import Liveness
from dpsgd.sharing.wire import (HEADER_DTYPE, HEADER_LENGTH, INDEX_DTYPES, Encoding, Message,
                                check_header, declared_bytes, parse_header, read_index, values_dtype)

HEADER_TAG, VALUES_TAG, INDEX_TAG = 1, 2, 3
FAILURE_KEY = "failure/first"
# Waits that must not expire (a gloo timeout closes the pair): peers' deaths still end them.
NO_BOUND = timedelta(days=365)
# A sharing method's own check of a header that passed wire.check_header: the reason it is wrong, or None.
HeaderCheck = Callable[[dict[str, int]], "str | None"]


@dataclass
class ByteCounters:
    """Cumulative bytes this node handed to isend and received, split as the output contract asks."""

    sent_data: int = 0
    sent_meta: int = 0
    recv_data: int = 0
    recv_meta: int = 0

    @property
    def sent(self) -> int:
        return self.sent_data + self.sent_meta

    @property
    def recv(self) -> int:
        return self.recv_data + self.recv_meta

    def count_sent(self, message: Message) -> None:
        self.sent_data += message.data_bytes
        self.sent_meta += message.meta_bytes

    def count_received(self, fields: dict[str, int]) -> None:
        """A message received in full, counted by the sizes its checked header declared."""
        data_bytes, meta_bytes = declared_bytes(fields)
        self.recv_data += data_bytes
        self.recv_meta += meta_bytes


@dataclass
class _ReceiveBuffers:
    """One receive slot's buffers (values: per value type, at the model's size), reused every round."""

    header: torch.Tensor
    values: dict[torch.dtype, torch.Tensor] = field(default_factory=dict)
    index: dict[Encoding, torch.Tensor] = field(default_factory=dict)


class FailureBoard:
    """First-writer-wins record, in the rendezvous store, of which node failed first.

    When a node dies its neighbours notice, then theirs notice those, and so on; the
    board lets every node name the original failure instead of the neighbour it saw go.
    """

    def __init__(self, store: dist.Store, label: Callable[[int], str] = "node {}".format):
        """`label(rank)` names a failing party: "node 3", or for node groups "rank 1 (nodes 24-47)"."""
        self.store = store
        self.label = label

    def report(self, node: int, message: str) -> str:
        """Record `message` about `node` unless an earlier failure is recorded; return the first."""
        try:
            first = self.store.compare_set(FAILURE_KEY, "", f"{node}|{message}")
            return first.decode()
        except Exception:  # noqa: BLE001 - the store may be gone with the failed node
            return f"{node}|{message}"

    def recorded(self) -> bool:
        """Whether some node already recorded a failure: a later witness need not confirm it again."""
        try:
            return self.store.check([FAILURE_KEY])
        except Exception:  # noqa: BLE001 - the store may be gone with the failed node
            return False

    def failure(self, rank: int, peer: int, seen: str) -> NodeFailure:
        """The error this node stops with: it names the first node that failed in the run."""
        first = self.report(peer, seen if peer == rank else f"{self.label(rank)} saw: {seen}")
        failed_node, text = first.split("|", 1)
        return NodeFailure(f"{self.label(rank)} stops: {self.label(int(failed_node))} failed ({text}). The run "
                           f"cannot continue without it; rounds completed so far are in nodes/*.jsonl.",
                           failed_node=int(failed_node))


def is_timeout(error: Exception) -> bool:
    text = str(error).lower()
    return "timed out" in text or "timeout" in text


def describe_peer_error(peer: int, error: Exception, timeout_s: float) -> str:
    """What a failed gloo operation says about the peer: silent too long, or gone."""
    if is_timeout(error):
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
    """What both transports share: who this node talks to, what it accepts from them, byte counts,
    and failure naming.

    `numel` is the model's size, which bounds every message; `peer_degrees` maps each
    neighbour to its degree in the topology (None: degrees are not checked);
    `header_check` is the sharing method's own check of a header (e.g. sub-sampling's
    value count against the mask its seed draws).
    """

    def __init__(self, rank: int, neighbours: list[int], numel: int, timeout_s: float, failures: FailureBoard,
                 peer_degrees: dict[int, int] | None = None, header_check: HeaderCheck | None = None,
                 liveness: Liveness | None = None):
        self.rank = rank
        self.liveness = liveness  # names the node that stalled when a wait expires (None: the peer)
        self.neighbours = list(neighbours)
        self.numel = numel
        self.timeout_s = timeout_s
        self.failures = failures
        self.bytes = ByteCounters()
        if peer_degrees is not None and not set(self.neighbours) <= set(peer_degrees):
            raise ValueError(f"peer_degrees={peer_degrees} lacks neighbours "
                             f"{sorted(set(self.neighbours) - set(peer_degrees))} of node {rank}")
        self.peer_degrees = peer_degrees
        self.header_check = header_check

    def _failure(self, peer: int, error: Exception, where: str) -> NodeFailure:
        """The NodeFailure for a failed gloo operation on the pair with `peer`.

        Neither an expired wait nor a closed connection says who stalled first: a peer
        closes its pairs when its own wait expires, because someone upstream of it stalled.
        The heartbeats name the node that stopped or is far too slow (`dpsgd.liveness`), unless
        another node recorded the failure already: then this one is only a ripple of it, and
        confirming it again would cost every hop of the graph `CONFIRM_S` more.
        """
        seen = f"{describe_peer_error(peer, error, self.timeout_s)} ({where})"
        if self.liveness is not None and not self.failures.recorded():
            verdict = self.liveness.suspect(waited_for=peer)
            if verdict.found:
                peer, seen = verdict.node, f"{seen}, and {verdict.source} {verdict.why}"
        return self._stop(peer, seen)

    def _stop(self, culprit: int, seen: str) -> NodeFailure:
        """Record the failure (first writer wins), and say this node leaves on purpose."""
        failure = self.failures.failure(self.rank, culprit, seen)
        if self.liveness is not None:
            self.liveness.end("failed")
        return failure

    def _check_header(self, peer: int, fields: dict[str, int], expected_degree: int | None = None,
                      **round_rule) -> None:
        """Raise the NodeFailure naming `peer` unless its header can come from a correct node
        (`expected_degree`: what the sender must announce; by default its degree in the topology)."""
        if expected_degree is None and self.peer_degrees is not None:
            expected_degree = self.peer_degrees[peer]
        problem = check_header(fields, self.numel, expected_degree, **round_rule)
        if problem is None and self.header_check is not None and fields["encoding"] != Encoding.END:
            problem = self.header_check(fields)
        if problem is not None:
            raise self._rejected(peer, problem)

    def _read_index(self, peer: int, fields: dict[str, int], index: torch.Tensor | None) -> torch.Tensor | None:
        """The coordinates a checked index names when checking decoded them; a bad index ends the run."""
        if index is None:
            return None
        coordinates, problem = read_index(Encoding(fields["encoding"]), index, fields["num_values"], self.numel)
        if problem is not None:
            raise self._rejected(peer, problem)
        return coordinates

    def _rejected(self, peer: int, problem: str) -> NodeFailure:
        return self._stop(peer, f"neighbour {peer} sent a message that no correct node sends: {problem}")


class NeighbourLink(_Link):
    """Synchronous point-to-point exchange of Messages: by default with this node's graph neighbours,
    or with the senders and receivers a round's plan names (`dpsgd.algorithms.peers`)."""

    def __init__(self, rank: int, neighbours: list[int], numel: int, timeout_s: float, failures: FailureBoard,
                 *, peer_degrees: dict[int, int] | None = None, header_check: HeaderCheck | None = None,
                 liveness: Liveness | None = None):
        super().__init__(rank, neighbours, numel, timeout_s, failures, peer_degrees, header_check, liveness)
        self._slots: list[_ReceiveBuffers] = []  # slot k holds the k-th sender's message of the round

    def exchange(self, outgoing: Message, send_to: list[int] | None = None,
                 receive_from: dict[int, int] | None = None) -> dict[int, Message]:
        """Send `outgoing` to `send_to` and receive one message from each sender of `receive_from`
        (sender -> the degree it must announce); by default both are the graph neighbours (D-PSGD).

        Buffers belong to positions in the round's sender list, not to peers: a node that hears
        from different peers every round (Epidemic Learning) keeps as many model-sized buffers
        as it has senders in one round, not one per peer it ever heard from. Every header is in
        before the first payload is posted, so only one sender's payload is ever being received.
        """
        round_number = outgoing.round
        send_to = self.neighbours if send_to is None else send_to
        if receive_from is None:
            receive_from = {peer: None if self.peer_degrees is None else self.peer_degrees[peer]
                            for peer in self.neighbours}
        slots = self._slots_for(len(receive_from))
        for peer in receive_from:
            receipts.receiving(peer, "header", f"header of round {round_number}")
        header_receives = {peer: (self._post(dist.irecv, slot.header, peer, HEADER_TAG, round_number), slot)
                           for peer, slot in zip(receive_from, slots)}
        sends = [(peer, work) for peer in send_to for work in self._post_send(outgoing, peer)]
        headers = {}
        for peer, (work, slot) in header_receives.items():
            self._wait(work, peer, round_number, "header")
            receipts.received(peer, "header")
            headers[peer] = parse_header(slot.header)
            self._check_header(peer, headers[peer], expected_round=round_number, expected_degree=receive_from[peer])
        received = {peer: self._receive_body(peer, slot, headers[peer], round_number)
                    for peer, (_, slot) in header_receives.items()}
        for peer, work in sends:
            self._wait(work, peer, round_number, "send")
        return received

    def _slots_for(self, count: int) -> list[_ReceiveBuffers]:
        while len(self._slots) < count:
            self._slots.append(_ReceiveBuffers(header=torch.empty(HEADER_LENGTH, dtype=HEADER_DTYPE)))
        return self._slots[:count]

    def _post_send(self, message: Message, peer: int) -> list[dist.Work]:
        works = [self._post(dist.isend, tensor, peer, tag, message.round)
                 for tensor, tag in wire_parts(message, message.header())]
        self.bytes.count_sent(message)
        return works

    def _receive_body(self, peer: int, buffers: _ReceiveBuffers, header: dict[str, int],
                      expected_round: int) -> Message:
        encoding = Encoding(header["encoding"])
        dtype = values_dtype(header)
        if dtype not in buffers.values:
            buffers.values[dtype] = torch.empty(self.numel, dtype=dtype)
        values = buffers.values[dtype][:header["num_values"]]
        receipts.receiving(peer, "payload", f"{'values and index' if encoding in INDEX_DTYPES else 'values'} "
                                            f"of round {expected_round}")
        value_work = self._post(dist.irecv, values, peer, VALUES_TAG, expected_round)
        index = None
        if encoding in INDEX_DTYPES:
            index = self._index_buffer(buffers, encoding, header["num_index"])
            index_work = self._post(dist.irecv, index, peer, INDEX_TAG, expected_round)
        self._wait(value_work, peer, expected_round, "values")
        if index is not None:
            self._wait(index_work, peer, expected_round, "index")
        receipts.received(peer, "payload")
        coordinates = self._read_index(peer, header, index)
        self.bytes.count_received(header)
        return Message.received(header, values, index, coordinates)

    def _index_buffer(self, buffers: _ReceiveBuffers, encoding: Encoding, length: int) -> torch.Tensor:
        """Grown to the longest index received so far, which check_header bounds by the model's size."""
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

    def __init__(self, rank: int, neighbours: list[int], numel: int, timeout_s: float, failures: FailureBoard,
                 *, peer_degrees: dict[int, int] | None = None, header_check: HeaderCheck | None = None,
                 liveness: Liveness | None = None):
        super().__init__(rank, neighbours, numel, timeout_s, failures, peer_degrees, header_check, liveness)
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
                raise self._stop(peer, f"neighbour {peer} did not say END within "
                                       f"comm.timeout_s={self.timeout_s:g} s of this node stopping")
        self._drain_failures()
        self._complete_sends()

    def _receive_from(self, peer: int) -> None:
        """Receiver thread body: header, then the payload it announces, until END or failure."""
        header = torch.empty(HEADER_LENGTH, dtype=HEADER_DTYPE)
        last_round = 1  # a sender's rounds never go back; END carries the last round it completed
        try:
            while True:
                receipts.receiving(peer, "header", "header")
                dist.irecv(header, peer, tag=HEADER_TAG).wait(timeout=NO_BOUND)
                receipts.received(peer, "header")
                fields = parse_header(header)
                self._check_header(peer, fields, min_round=last_round, allow_end=True)
                last_round = fields["round"]
                encoding = Encoding(fields["encoding"])
                if encoding == Encoding.END:
                    self._count_received(fields)
                    self._stop_seen.set()
                    return
                values = torch.empty(fields["num_values"], dtype=values_dtype(fields))
                parts = "values and index" if encoding in INDEX_DTYPES else "values"
                receipts.receiving(peer, "payload", f"{parts} of round {fields['round']}")
                dist.irecv(values, peer, tag=VALUES_TAG).wait(timeout=NO_BOUND)
                index = None
                if encoding in INDEX_DTYPES:
                    index = torch.empty(fields["num_index"], dtype=INDEX_DTYPES[encoding])
                    dist.irecv(index, peer, tag=INDEX_TAG).wait(timeout=NO_BOUND)
                receipts.received(peer, "payload")
                coordinates = self._read_index(peer, fields, index)
                self._count_received(fields)
                self._arrivals.put(("message", peer, Message.received(fields, values, index, coordinates)))
        except NodeFailure as failure:  # the peer's message was malformed: it is named already
            self._arrivals.put(("failure", peer, failure))
            self._stop_seen.set()
        except Exception as error:  # noqa: BLE001 - gloo raises RuntimeError subclasses
            self._arrivals.put(("failure", peer, self._failure(peer, error, "receive")))
            self._stop_seen.set()

    def _count_received(self, fields: dict[str, int]) -> None:
        with self._lock:
            self.bytes.count_received(fields)

    def _complete_sends(self) -> None:
        for peer, work, _ in self._pending_sends:
            try:
                work.wait(timeout=timedelta(seconds=self.timeout_s))
            except Exception as error:  # noqa: BLE001
                raise self._failure(peer, error, "send") from None
        self._pending_sends.clear()

    def _check_silence(self) -> None:
        """Silence past comm.timeout_s: a walk is stuck somewhere; the heartbeats say where."""
        if time.monotonic() - self._last_heard <= self.timeout_s:
            return
        silence = (f"node {self.rank} heard from no neighbour ({self.neighbours}) within "
                   f"comm.timeout_s={self.timeout_s:g} s")
        verdict = None if self.liveness is None else self.liveness.suspect(waited_for=self.rank)
        if verdict is None or verdict.node == self.rank:
            raise self._stop(self.rank, silence)
        raise self._stop(verdict.node, f"{silence}, and the heartbeats show {verdict.why}")

    def _drain_failures(self) -> None:
        while not self._arrivals.empty():
            kind, _, payload = self._arrivals.get_nowait()
            if kind == "failure":
                raise payload
