"""Synchronous rounds: every hosted node's message to each of its receivers, once a round.

Between two nodes of the same rank a message is handed over in memory. Between ranks, the
messages of every hosted node that sends to a node of the other rank travel as one batch per
pair of ranks and round: a header block (one wire header per message), then all values, then
all indices, each one gloo isend/irecv. Both sides know from the round's plan
(`dpsgd.algorithms.peers`: a graph's neighbours, or Epidemic Learning's draws) which senders a
batch holds and in what order, so nothing else needs to travel. A sender's message goes once
to a rank however many of its receivers live there, but each node's byte counters say exactly
what it would have put on the wire and received alone (one message per receiver), so bytes
compare across groupings.

A payload longer than its header announced cannot be caught: gloo aborts the receiving process
from its own thread. So every header block is in before the first batch's payload is posted,
and the open receives are announced (`dpsgd.liveness.receiving`): a rank that gloo aborts over
a payload names the rank that sent it.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist

from dpsgd import liveness as receipts
from dpsgd.sharing.wire import (
    HEADER_BYTES,
    HEADER_DTYPE,
    HEADER_LENGTH,
    INDEX_DTYPES,
    Encoding,
    Message,
    declared_bytes,
    parse_header,
    read_index,
    values_dtype,
)
from dpsgd.transport.base import Transport, span

HEADERS_TAG, VALUES_TAG, INDEX_TAG = 11, 12, 13
# Whole models from another rank merged as they arrive (`exchange`'s `arriving`) are received this
# many bytes at a time, in each of two buffers: what a round's messages hold, whatever the group size.
STREAM_BYTES = 16 * 2**20

# Given a round's received messages (other ranks' still without values), a function that takes each
# of those messages' values as they arrive, add(sender, values), or None to receive them whole.
Arriving = Callable[[dict[int, dict[int, Message]]], "Callable[[int, torch.Tensor], None] | None"]


class RoundTransport(Transport):
    """Exchange one round's messages of all hosted nodes with the nodes each sends to.

    Who sends to whom is given per round (`targets`: for every node of the run, its receivers),
    so the same batches serve a fixed graph, a resampled one, and Epidemic Learning's draws;
    every rank derives the same plan of batches from the same targets.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._buffers: dict[tuple, torch.Tensor] = {}

    # The last targets and their routes (a fixed graph's never change).
    _planned: tuple = (None, None)

    def _routes(
        self, targets: list[list[int]]
    ) -> tuple[dict[int, list[int]], dict[int, list[int]]]:
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

    def exchange(
        self,
        outgoing: dict[int, Message],
        targets: list[list[int]],
        arriving: Arriving | None = None,
    ) -> dict[int, dict[int, Message]]:
        """Every hosted node's message to each of its receivers; returns, per hosted node, what each
        of its senders sent (in sender order).

        `arriving(received)`, called once every header is in (other ranks' messages then carry
        their header's fields but no values yet), may return a function that takes each of those
        messages' values as they arrive, `add(sender, values)`, a bounded chunk at a time: averages
        are linear, so whole models are merged as they come and a round's messages between ranks
        are never held whole. Their messages then keep no values. Returning None receives them all.
        """
        round_number = next(iter(outgoing.values())).round
        where = f"round {round_number}"
        outgoing_to, incoming_from = self._routes(targets)
        header_blocks = {
            other: torch.empty(len(senders), HEADER_LENGTH, dtype=HEADER_DTYPE)
            for other, senders in incoming_from.items()
        }
        for other in header_blocks:
            receipts.receiving(other, "header", f"header block of round {round_number}")
        header_works = {
            other: (self._post(dist.irecv, block, other, HEADERS_TAG, where), block)
            for other, block in header_blocks.items()
        }
        send_works = [
            work
            for other, senders in outgoing_to.items()
            for work in self._send_batch(other, [outgoing[node] for node in senders], where)
        ]
        for node, message in outgoing.items():
            for _ in targets[node]:  # alone, a node sends its message once per receiver
                self.ports[node].bytes.count_sent(message)
        # Every header block in before any payload is posted: one payload open at a time.
        batches = {}
        for other, (work, headers) in header_works.items():
            self._wait(work, other, f"headers, {where}")
            receipts.received(other, "header")
            batches[other] = self._checked(
                other, incoming_from[other], headers, targets, round_number
            )
        # Every message a hosted node may hear, by sender: the hosted nodes', then other ranks'.
        arrived = dict(outgoing)
        for batch in batches.values():
            arrived.update((sender, Message.received(field, None, None)) for sender, field in batch)
        received = self._delivered(arrived, targets)
        announced = {sender: field for batch in batches.values() for sender, field in batch}
        for receiver, messages in received.items():
            for sender, message in messages.items():  # other ranks' by what their header declares
                self.ports[receiver].bytes.count_received(announced.get(sender, message))
        add = arriving(received) if arriving is not None else None
        for other, batch in batches.items():
            if add is None:
                arrived.update(zip((s for s, _ in batch), self._receive_batch(other, batch, where)))
            else:
                self._stream_batch(other, batch, where, add)
        for other, work in send_works:
            self._wait(work, other, f"send, {where}")
        return received if add is not None else self._delivered(arrived, targets)

    def _delivered(
        self, arrived: dict[int, Message], targets: list[list[int]]
    ) -> dict[int, dict[int, Message]]:
        """Per hosted node, the message of each of its senders, in sender order."""
        received: dict[int, dict[int, Message]] = {node: {} for node in self.hosted}
        for sender, message in sorted(arrived.items()):
            for receiver in targets[sender]:
                if self.rank_of[receiver] == self.rank:
                    received[receiver][sender] = message
        return received

    def _send_batch(
        self, other: int, messages: list[Message], where: str
    ) -> list[tuple[int, dist.Work]]:
        """The header block, then each message's values as they are (no copy: a whole model is its
        row), then the batch's indices as one tensor."""
        headers = torch.stack([message.header() for message in messages])
        works = [(other, self._post(dist.isend, headers, other, HEADERS_TAG, where))]
        works += [
            (other, self._post(dist.isend, message.values.cpu(), other, VALUES_TAG, where))
            for message in messages
            if message.values.numel()
        ]
        indices = [m.index.view(torch.uint8) for m in messages if m.index is not None]
        if indices:  # int32 and bitmask indices as bytes
            index = self._joined(("index", other), indices)
            works.append((other, self._post(dist.isend, index, other, INDEX_TAG, where)))
        return works

    def _checked(
        self,
        other: int,
        senders: list[int],
        headers: torch.Tensor,
        targets: list[list[int]],
        round_number: int,
    ) -> list[tuple[int, dict]]:
        """A batch's header block, checked: (sender, header fields) in sender order."""
        fields = [parse_header(row) for row in headers]
        for sender, field in zip(senders, fields):
            problem = self._problem(field, len(targets[sender]), expected_round=round_number)
            if problem is None and field["values_type"] != fields[0]["values_type"]:
                problem = "a batch mixes value types (every node must use one sharing.values)"
            if problem is not None:
                raise self._rejected(other, sender, problem)
        return list(zip(senders, fields))

    def _receive_values(
        self, other: int, batch: list[tuple[int, dict]], into: torch.Tensor, where: str
    ) -> list[dist.Work]:
        """Post the receive of each message's values of `batch` into consecutive parts of `into`."""
        works, at = [], 0
        for _, field in batch:
            if field["num_values"]:
                part = into[at : at + field["num_values"]]
                works.append(self._post(dist.irecv, part, other, VALUES_TAG, where))
            at += field["num_values"]
        return works

    def _receive_batch(
        self, other: int, batch: list[tuple[int, dict]], where: str
    ) -> list[Message]:
        """The messages of a batch whose header block arrived, received whole into exact buffers."""
        senders, fields = [s for s, _ in batch], [f for _, f in batch]
        values = self._scratch(
            ("values", other), sum(f["num_values"] for f in fields), values_dtype(fields[0])
        )
        receipts.receiving(other, "payload", f"values of {where} (for nodes {span(senders)})")
        value_works = self._receive_values(other, batch, values, where)
        index_bytes = [declared_bytes(f)[1] - HEADER_BYTES for f in fields]  # meta less the header
        index = self._scratch(("received index", other), sum(index_bytes), torch.uint8)
        index_work = (
            self._post(dist.irecv, index, other, INDEX_TAG, where) if index.numel() else None
        )
        for work in value_works:
            self._wait(work, other, f"values, {where}")
        if index_work is not None:
            self._wait(index_work, other, f"index, {where}")
        receipts.received(other, "payload")
        return self._split(
            other, senders, fields, values.to(self.device), index.to(self.device), index_bytes
        )

    def _stream_batch(
        self, other: int, batch: list[tuple[int, dict]], where: str, add: Callable
    ) -> None:
        """A batch of whole models handed to `add` as they arrive, at most STREAM_BYTES at a time
        in each of two buffers: the next chunk arrives while the last one is added."""
        dtype = values_dtype(batch[0][1])
        size = dtype.itemsize
        chunks, chunk, held = [], [], 0
        for sender, field in batch:
            if chunk and held + field["num_values"] * size > STREAM_BYTES:
                chunks.append(chunk)
                chunk, held = [], 0
            chunk.append((sender, field))
            held += field["num_values"] * size
        chunks.append(chunk)
        longest = max(sum(f["num_values"] for _, f in chunk) for chunk in chunks)
        buffers = [self._scratch(("stream", i), longest, dtype) for i in (0, 1)]
        receipts.receiving(
            other, "payload", f"values of {where} (for nodes {span([s for s, _ in batch])})"
        )
        posted = self._receive_values(other, chunks[0], buffers[0], where)
        for k, chunk in enumerate(chunks):
            works = posted
            if k + 1 < len(chunks):
                posted = self._receive_values(other, chunks[k + 1], buffers[(k + 1) % 2], where)
            for work in works:
                self._wait(work, other, f"values, {where}")
            at, values = 0, buffers[k % 2].to(self.device)
            for sender, field in chunk:
                add(sender, values[at : at + field["num_values"]])
                at += field["num_values"]
        receipts.received(other, "payload")

    def _split(
        self,
        other: int,
        senders: list[int],
        fields: list[dict],
        values: torch.Tensor,
        index: torch.Tensor,
        index_bytes: list[int],
    ) -> list[Message]:
        messages, value_at, index_at = [], 0, 0
        for sender, field, nbytes in zip(senders, fields, index_bytes):
            encoding = Encoding(field["encoding"])
            part = values[value_at : value_at + field["num_values"]]
            own_index, coordinates = None, None
            if nbytes:
                own_index = index[index_at : index_at + nbytes]
                # An int32 index may start at any byte: a view needs alignment.
                if INDEX_DTYPES[encoding].itemsize > 1:
                    own_index = own_index.clone().view(INDEX_DTYPES[encoding])
                coordinates, problem = read_index(
                    encoding, own_index, field["num_values"], self.numel
                )
                if problem is not None:
                    raise self._rejected(other, sender, problem)
            messages.append(Message.received(field, part, own_index, coordinates))
            value_at += field["num_values"]
            index_at += nbytes
        return messages

    def _joined(self, key: tuple, tensors: list[torch.Tensor]) -> torch.Tensor:
        """One tensor for the wire; a batch of one message is sent as it is, without a copy."""
        if len(tensors) == 1:
            return tensors[0].cpu()
        joined = self._scratch(key, sum(t.numel() for t in tensors), tensors[0].dtype)
        return torch.cat([t.cpu() for t in tensors], out=joined)

    def _scratch(self, key: tuple, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """A buffer reused every round: a fresh one of tens of megabytes costs more in page faults than
        its copy. What a round received lives here until that round's merge is done."""
        buffer = self._buffers.get((key, dtype))
        if buffer is None or buffer.numel() < numel:
            buffer = self._buffers[(key, dtype)] = torch.empty(numel, dtype=dtype)
        return buffer[:numel]
