"""D-PSGD messages for a group of nodes hosted by one rank.

Between two nodes of the same rank a message is handed over in memory. Between ranks,
the messages of every hosted node that sends to a node of the other rank travel as one
batch per pair of ranks and round: a header block (one wire header per message, the
same fields as alone), then all values, then all indices, each one gloo isend/irecv.
Both sides know from the round's plan (`dpsgd.algorithms.peers`: a graph's neighbours, or
Epidemic Learning's draws) which senders a batch holds and in what order, so nothing else
needs to travel. A sender's message goes once to a rank however many of its receivers live
there, but each node's byte counters say exactly what it would have put on the wire and
received alone (one message per receiver), so bytes compare across groupings. Headers are checked before anything is allocated, as `NeighbourLink`
does, and a bad one ends the run naming the rank that sent it. As there, every header block is in
before the first batch's payload is posted, and the open receives are announced
(`dpsgd.liveness.receiving`), so a rank that gloo aborts over a payload longer than its headers
announced names the rank that sent it.
"""

from __future__ import annotations

from datetime import timedelta

import torch
import torch.distributed as dist

from dpsgd import liveness as receipts
from dpsgd.communication import ByteCounters, FailureBoard, describe_peer_error
from dpsgd.sharing.wire import (HEADER_BYTES, HEADER_DTYPE, HEADER_LENGTH, INDEX_DTYPES, Encoding, Message,
                                check_header, declared_bytes, parse_header, read_index, values_dtype)
from dpsgd.topology import Topology

HEADERS_TAG, VALUES_TAG, INDEX_TAG = 11, 12, 13


class NodePort:
    """What one hosted node keeps of the link: its own byte counters (checkpointed like a link's)."""

    def __init__(self):
        self.bytes = ByteCounters()


class GroupTransport:
    """What both group transports share: which nodes this rank hosts, their byte counters, what
    a received header is checked against, and where the group's models live."""

    def __init__(self, rank: int, rank_of: list[int], topology: Topology, numel: int, timeout_s: float,
                 failures: FailureBoard, header_check=None, liveness=None, device: torch.device | None = None):
        """`rank_of[node]` is the rank hosting each node of the run; `device` is where the group's
        models live: messages to other ranks go through host memory (gloo), local ones stay there."""
        self.device = device or torch.device("cpu")
        self.rank = rank
        self.rank_of = rank_of
        self.topology = topology
        self.numel = numel
        self.timeout_s = timeout_s
        self.failures = failures
        self.header_check = header_check
        self.liveness = liveness
        self.hosted = [node for node, owner in enumerate(rank_of) if owner == rank]
        self.ports = {node: NodePort() for node in self.hosted}


class GroupLink(GroupTransport):
    """Exchange one round's messages of all hosted nodes with the nodes each sends to.

    Who sends to whom is given per round (`targets`: for every node of the run, its receivers),
    so the same batches serve a fixed graph, a resampled one, and Epidemic Learning's draws;
    every rank derives the same plan of batches from the same targets.
    """

    _planned: tuple = (None, None)  # the last targets and their routes (a fixed graph's never change)

    def _routes(self, targets: list[list[int]]) -> tuple[dict[int, list[int]], dict[int, list[int]]]:
        """Per remote rank: our nodes that send there, and its nodes that send to us, in node order."""
        if self._planned[0] is targets:
            return self._planned[1]
        outgoing_to: dict[int, list[int]] = {}
        incoming_from: dict[int, list[int]] = {}
        for sender, receivers in enumerate(targets):
            ranks = {self.rank_of[receiver] for receiver in receivers}
            if self.rank_of[sender] == self.rank:
                for other in sorted(ranks - {self.rank}):
                    outgoing_to.setdefault(other, []).append(sender)
            elif self.rank in ranks:
                incoming_from.setdefault(self.rank_of[sender], []).append(sender)
        self._planned = (targets, (outgoing_to, incoming_from))
        return outgoing_to, incoming_from

    def exchange(self, outgoing: dict[int, Message], targets: list[list[int]]) -> dict[int, dict[int, Message]]:
        """Every hosted node's message to each of its receivers; returns, per hosted node, what each
        of its senders sent."""
        round_number = next(iter(outgoing.values())).round
        outgoing_to, incoming_from = self._routes(targets)
        received: dict[int, dict[int, Message]] = {node: {} for node in self.hosted}
        header_blocks = {other: torch.empty(len(senders), HEADER_LENGTH, dtype=HEADER_DTYPE)
                         for other, senders in incoming_from.items()}
        for other in header_blocks:
            receipts.receiving(other, "header", f"header block of round {round_number}")
        header_works = {other: (self._post(dist.irecv, block, other, HEADERS_TAG, round_number), block)
                        for other, block in header_blocks.items()}
        send_works = [work for other, senders in outgoing_to.items()
                      for work in self._send_batch(other, [outgoing[node] for node in senders], round_number)]
        for node, message in outgoing.items():
            self._count_sent(node, message, len(targets[node]))
            for receiver in targets[node]:
                if self.rank_of[receiver] == self.rank:
                    received[receiver][node] = message
        for other, (work, _) in header_works.items():  # every block in before any payload: one open at a time
            self._wait(work, other, round_number, "headers")
            receipts.received(other, "header")
        for other, (_, headers) in header_works.items():
            senders = incoming_from[other]
            for sender, message in zip(senders, self._receive_batch(other, senders, headers, targets, round_number)):
                for receiver in targets[sender]:
                    if self.rank_of[receiver] == self.rank:
                        received[receiver][sender] = message
        for other, work in send_works:
            self._wait(work, other, round_number, "send")
        self._count_received(received)
        return {node: dict(sorted(messages.items())) for node, messages in received.items()}

    def _send_batch(self, other: int, messages: list[Message], round_number: int) -> list[tuple[int, dist.Work]]:
        headers = torch.stack([message.header() for message in messages])
        values = torch.cat([message.values for message in messages]).cpu()
        works = [(other, self._post(dist.isend, headers, other, HEADERS_TAG, round_number)),
                 (other, self._post(dist.isend, values, other, VALUES_TAG, round_number))]
        indices = [message.index for message in messages if message.index is not None]
        if indices:
            index = torch.cat([i.view(torch.uint8) for i in indices]).cpu()  # int32 and bitmask indices as bytes
            works.append((other, self._post(dist.isend, index, other, INDEX_TAG, round_number)))
        return works

    def _receive_batch(self, other: int, senders: list[int], headers: torch.Tensor, targets: list[list[int]],
                       round_number: int) -> list[Message]:
        """The messages of a batch whose header block arrived: checked, then received into exact buffers."""
        fields = [parse_header(row) for row in headers]
        for sender, field in zip(senders, fields):
            self._check(other, sender, field, len(targets[sender]), round_number)
            if field["values_type"] != fields[0]["values_type"]:  # one values tensor carries the whole batch
                raise self._rejected(other, sender, "a batch mixes value types (every node must use one "
                                                    "sharing.values)")
        values = torch.empty(sum(f["num_values"] for f in fields), dtype=values_dtype(fields[0]))
        receipts.receiving(other, "payload", f"batch of round {round_number} (for nodes {_span(senders)})")
        value_work = self._post(dist.irecv, values, other, VALUES_TAG, round_number)
        index_bytes = [self._index_bytes(f) for f in fields]
        index = torch.empty(sum(index_bytes), dtype=torch.uint8)
        index_work = self._post(dist.irecv, index, other, INDEX_TAG, round_number) if index.numel() else None
        self._wait(value_work, other, round_number, "values")
        if index_work is not None:
            self._wait(index_work, other, round_number, "index")
        receipts.received(other, "payload")
        return self._split(other, senders, fields, values.to(self.device), index.to(self.device), index_bytes)

    def _split(self, other: int, senders: list[int], fields: list[dict], values: torch.Tensor, index: torch.Tensor,
               index_bytes: list[int]) -> list[Message]:
        messages, value_at, index_at = [], 0, 0
        for sender, field, nbytes in zip(senders, fields, index_bytes):
            encoding = Encoding(field["encoding"])
            part = values[value_at:value_at + field["num_values"]]
            own_index, coordinates = None, None
            if nbytes:
                own_index = index[index_at:index_at + nbytes]
                if INDEX_DTYPES[encoding].itemsize > 1:  # an int32 index may start at any byte: a view needs alignment
                    own_index = own_index.clone().view(INDEX_DTYPES[encoding])
                coordinates, problem = read_index(encoding, own_index, field["num_values"], self.numel)
                if problem is not None:
                    raise self._rejected(other, sender, problem)
            messages.append(Message.received(field, part, own_index, coordinates))
            value_at += field["num_values"]
            index_at += nbytes
        return messages

    @staticmethod
    def _index_bytes(fields: dict[str, int]) -> int:
        """Bytes of the index a checked header announces: its meta bytes less the header's."""
        return declared_bytes(fields)[1] - HEADER_BYTES

    def _check(self, other: int, sender: int, fields: dict[str, int], degree: int, round_number: int) -> None:
        """`degree`: what the sender must announce, its number of receivers this round."""
        problem = check_header(fields, self.numel, degree, expected_round=round_number)
        if problem is None and self.header_check is not None:
            problem = self.header_check(fields)
        if problem is not None:
            raise self._rejected(other, sender, problem)

    def _count_sent(self, node: int, message: Message, receivers: int) -> None:
        for _ in range(receivers):  # alone, a node sends its message once per receiver
            self.ports[node].bytes.count_sent(message)

    def _count_received(self, received: dict[int, dict[int, Message]]) -> None:
        for node, messages in received.items():
            for message in messages.values():
                self.ports[node].bytes.recv_data += message.data_bytes
                self.ports[node].bytes.recv_meta += message.meta_bytes

    def _post(self, operation, tensor: torch.Tensor, other: int, tag: int, round_number: int):
        try:
            return operation(tensor, other, tag=tag)
        except Exception as error:  # noqa: BLE001 - gloo raises RuntimeError subclasses
            raise self._failure(other, error, f"post, round {round_number}") from None

    def _wait(self, work, other: int, round_number: int, what: str) -> None:
        try:
            work.wait(timeout=timedelta(seconds=self.timeout_s))
        except Exception as error:  # noqa: BLE001 - gloo raises RuntimeError subclasses
            raise self._failure(other, error, f"{what}, round {round_number}") from None

    def _failure(self, other: int, error: Exception, where: str):
        """A failed transfer with rank `other`: the heartbeats say which rank stalled (dpsgd.liveness)."""
        seen = f"{describe_peer_error(other, error, self.timeout_s)} ({where})".replace("neighbour", "rank")
        if self.liveness is not None and not self.failures.recorded():  # recorded: a ripple, confirmed already
            verdict = self.liveness.suspect(waited_for=other)
            if verdict.found:
                other, seen = verdict.node, f"{seen}, and {verdict.source} {verdict.why}"
        return self._stop(other, seen)

    def _rejected(self, other: int, sender: int, problem: str):
        return self._stop(other, f"rank {other} sent, for node {sender}, a message that no correct node sends: "
                                 f"{problem}")

    def _stop(self, culprit: int, seen: str):
        failure = self.failures.failure(self.rank, culprit, seen)
        if self.liveness is not None:
            self.liveness.end("failed")
        return failure


def _span(nodes: list[int]) -> str:
    """Nodes in words: "4-7" for a run of consecutive ids, else "4, 9, 12"."""
    if nodes == list(range(nodes[0], nodes[0] + len(nodes))) and len(nodes) > 1:
        return f"{nodes[0]}-{nodes[-1]}"
    return ", ".join(map(str, nodes))
