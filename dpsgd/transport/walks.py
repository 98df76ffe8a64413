"""Random walks (RWM): one model to one neighbour, whenever it is ready.

A message to a node of the same rank goes into that node's inbox (a copy: the sender trains
on). A message to another rank is a routing pair (sender, receiver) followed by the wire
message (header, values, index). One receiver thread per neighbouring rank keeps a routing
receive posted, so a sender never waits on the receiver's main loop; no wait there has a
short bound (in a random walk a neighbour may rightly stay silent for many rounds, and a gloo
timeout would close the pair). A dead neighbour is noticed at once (its connection closes);
`comm.timeout_s` bounds only how long a rank may go without hearing from anyone. The thread
checks each header (`wire.check_header`, rounds never going back) before allocating, and
announces its receives to the launcher's table (`dpsgd.liveness.receiving`), so a rank that
gloo aborts over a payload longer than its header names the rank that sent it.

Shutdown is a handshake that leaves nothing in flight: a rank that stops sends the routing
pair END to every neighbouring rank; a rank that receives END stops too (so the stop floods
the graph) and answers with its own, and END is the last thing on each pair, so once a rank
has seen END from every neighbouring rank and its sends completed, nothing is in flight.
Each node's byte counters say what it would have sent and received alone, END included.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from dataclasses import replace

import torch
import torch.distributed as dist

from dpsgd import liveness as receipts
from dpsgd.communication import NO_BOUND
from dpsgd.sharing.wire import (
    HEADER_BYTES,
    HEADER_DTYPE,
    HEADER_LENGTH,
    INDEX_DTYPES,
    Encoding,
    Message,
    parse_header,
    read_index,
    values_dtype,
)
from dpsgd.transport.base import Transport

ROUTE_TAG, HEADER_TAG, VALUES_TAG, INDEX_TAG = 21, 22, 23, 24
END = -1  # routing pair (END, END): the sending rank will send nothing more


class WalkTransport(Transport):
    """Moves RWM messages between hosted nodes and to nodes of other ranks."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        rank, rank_of, topology = self.rank, self.rank_of, self.topology
        self.inbox: dict[int, deque] = {node: deque() for node in self.hosted}
        self.peer_ranks = sorted(
            {rank_of[peer] for node in self.hosted for peer in topology.neighbours(node)} - {rank}
        )
        self._arrivals: "queue.Queue[tuple]" = queue.Queue()
        self._stop_seen = threading.Event()
        self._pending: list[tuple[int, dist.Work, torch.Tensor]] = []
        self._ended = False
        self._threads = [
            threading.Thread(
                target=self._receive_from,
                args=(other,),
                daemon=True,
                name=f"dpsgd-walk-{rank}-from-{other}",
            )
            for other in self.peer_ranks
        ]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def send(self, sender: int, receiver: int, message: Message) -> None:
        """Hand `message` to `receiver`: into its inbox on this rank, else over gloo (the previous sends
        completed first, so few are ever in flight)."""
        self.ports[sender].bytes.count_sent(message)
        if self.rank_of[receiver] == self.rank:
            values = message.values.clone()  # the sender's live row trains on
            self.inbox[receiver].append(replace(message, values=values, coordinates=None))
            self.ports[receiver].bytes.count_received(message)
            return
        self._complete_sends()
        other = self.rank_of[receiver]
        self._send(torch.tensor([sender, receiver], dtype=torch.int64), other, ROUTE_TAG, "send")
        for tensor, tag in wire_parts(message):
            self._send(tensor.cpu(), other, tag, f"send, round {message.round}")

    def ready(self) -> dict[int, Message] | None:
        """The next message of every hosted node that has one (oldest first), waiting until one has;
        None once a neighbouring rank has stopped (the walk is over)."""
        self._complete_sends()  # a full message is the live model itself: the caller merges into it next
        waited_since = time.monotonic()
        while True:
            self._drain_arrivals()
            waiting = {node: box.popleft() for node, box in self.inbox.items() if box}
            if waiting:
                return waiting
            if self._stop_seen.is_set():
                self._drain_arrivals()
                return None
            try:
                item = self._arrivals.get(timeout=min(1.0, self.timeout_s))
            except queue.Empty:
                if time.monotonic() - waited_since > self.timeout_s:
                    raise self._silence()
                continue
            self._accept(item)

    def close(self) -> None:
        """END to every neighbouring rank, END from every neighbouring rank, every send completed."""
        if not self._ended:
            for other in self.peer_ranks:
                self._send(
                    torch.tensor([END, END], dtype=torch.int64), other, ROUTE_TAG, "send END"
                )
            self._ended = True
            # Alone, every node says END to each neighbour and hears it from each.
            for node in self.hosted:
                for _ in self.topology.neighbours(node):
                    self.ports[node].bytes.sent_meta += HEADER_BYTES
                    self.ports[node].bytes.recv_meta += HEADER_BYTES
        for other, thread in zip(self.peer_ranks, self._threads):
            thread.join(timeout=self.timeout_s)
            if thread.is_alive():
                raise self._stop(
                    other,
                    f"{self.peer(other)} did not say END within "
                    f"comm.timeout_s={self.timeout_s:g} s of this {self._self()} stopping",
                )
        self._drain_arrivals()
        self._complete_sends()

    def _receive_from(self, other: int) -> None:
        """Receiver thread body: routing pair, header, then the payload it announces, until END or failure."""
        route = torch.empty(2, dtype=torch.int64)
        header = torch.empty(HEADER_LENGTH, dtype=HEADER_DTYPE)
        last_round: dict[int, int] = {}  # a sender's rounds never go back
        try:
            while True:
                receipts.receiving(other, "header", "routing pair")
                dist.irecv(route, other, tag=ROUTE_TAG).wait(timeout=NO_BOUND)
                receipts.received(other, "header")
                sender, receiver = route.tolist()
                if sender == END:
                    self._stop_seen.set()
                    self._arrivals.put(("end", other, None))
                    return
                receipts.receiving(other, "header", f"header (node {sender} -> {receiver})")
                dist.irecv(header, other, tag=HEADER_TAG).wait(timeout=NO_BOUND)
                receipts.received(other, "header")
                fields = parse_header(header)
                problem = self._route_problem(other, sender, receiver) or self._problem(
                    fields, self.topology.degree(sender), min_round=last_round.get(sender, 1)
                )
                if problem is not None:
                    self._arrivals.put(("failure", other, self._rejected(other, sender, problem)))
                    return
                last_round[sender] = fields["round"]
                payload = self._payload(other, sender, fields)
                if payload is None:
                    return
                self._arrivals.put(("message", receiver, payload))
        except Exception as error:  # noqa: BLE001 - gloo raises RuntimeError subclasses
            self._arrivals.put(("failure", other, self._closed(other, error)))
            self._stop_seen.set()

    def _route_problem(self, other: int, sender: int, receiver: int) -> str | None:
        if not (
            0 <= sender < len(self.rank_of)
            and self.rank_of[sender] == other
            and receiver in self.inbox
            and receiver in self.topology.neighbours(sender)
        ):
            return f"routing ({sender} -> {receiver}) is not an edge from rank {other} to this rank"
        return None

    def _payload(self, other: int, sender: int, fields: dict[str, int]) -> Message | None:
        """The values (and index) a checked header announced; None after reporting a bad index."""
        values = torch.empty(fields["num_values"], dtype=values_dtype(fields))
        encoding = Encoding(fields["encoding"])
        parts = "values and index" if encoding in INDEX_DTYPES else "values"
        receipts.receiving(other, "payload", f"{parts} of round {fields['round']} (node {sender})")
        dist.irecv(values, other, tag=VALUES_TAG).wait(timeout=NO_BOUND)
        index, coordinates = None, None
        if encoding in INDEX_DTYPES:
            index = torch.empty(fields["num_index"], dtype=INDEX_DTYPES[encoding])
            dist.irecv(index, other, tag=INDEX_TAG).wait(timeout=NO_BOUND)
        receipts.received(other, "payload")
        if index is not None:
            coordinates, problem = read_index(encoding, index, fields["num_values"], self.numel)
            if problem is not None:
                self._arrivals.put(("failure", other, self._rejected(other, sender, problem)))
                return None
        return Message.received(
            fields,
            values.to(self.device),
            None if index is None else index.to(self.device),
            None if coordinates is None else coordinates.to(self.device),
        )

    def _closed(self, other: int, error: Exception):
        """The connection to rank `other` closed: the launcher's word or the heartbeats may name who caused
        it (a rank aborted by gloo over a third rank's malformed message is that rank's victim)."""
        return self._failure(
            other,
            error,
            "",
            seen=f"the connection to {self.peer(other)} closed ({type(error).__name__})",
        )

    def _accept(self, item: tuple) -> None:
        kind, where, payload = item
        if kind == "failure":
            raise payload
        if kind == "message":
            self.inbox[where].append(payload)
            self.ports[where].bytes.count_received(payload)

    def _drain_arrivals(self) -> None:
        while True:
            try:
                self._accept(self._arrivals.get_nowait())
            except queue.Empty:
                return

    def _send(self, tensor: torch.Tensor, other: int, tag: int, where: str) -> None:
        self._pending.append((other, self._post(dist.isend, tensor, other, tag, where), tensor))

    def _complete_sends(self) -> None:
        for other, work, _ in self._pending:
            self._wait(work, other, "send")
        self._pending.clear()

    def _self(self) -> str:
        return "node" if self.one_node_per_rank else "rank"

    def _silence(self):
        """Silence past comm.timeout_s: a walk is stuck somewhere; the heartbeats say where."""
        who = f"node {self.rank}" if self.one_node_per_rank else f"no node of rank {self.rank}"
        heard = "no neighbour" if self.one_node_per_rank else "any neighbour"
        silence = f"{who} heard from {heard} within comm.timeout_s={self.timeout_s:g} s"
        verdict = None if self.liveness is None else self.liveness.suspect(waited_for=self.rank)
        if verdict is None or not verdict.found:
            return self._stop(self.rank, silence)
        return self._stop(verdict.node, f"{silence}, and the heartbeats show {verdict.why}")


def wire_parts(message: Message) -> list[tuple[torch.Tensor, int]]:
    """The tensors a message puts on the wire after its routing pair, in order, with their tags."""
    parts = [(message.header(), HEADER_TAG), (message.values, VALUES_TAG)]
    if message.index is not None:
        parts.append((message.index, INDEX_TAG))
    return parts
