"""Moving messages between graph neighbours with gloo point-to-point, never waiting forever.

Rules that keep gloo from hanging (see PITFALLS.md): receives are posted before we
wait on sends; every posted operation is waited on; each pair has at most one header,
one values and one index transfer in flight per direction, told apart by tag; every
wait has a bound, and a bound that expires is a verdict that the peer is gone (gloo
closes the pair), so it ends the run with the peer's name rather than a retry.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from dpsgd.errors import NodeFailure
from dpsgd.sharing.wire import (HEADER_DTYPE, HEADER_FIELDS, INDEX_DTYPES, VALUES_DTYPE, Encoding,
                                Message, parse_header)

HEADER_TAG, VALUES_TAG, INDEX_TAG = 1, 2, 3
FAILURE_KEY = "failure/first"


@dataclass
class ByteCounters:
    """Cumulative bytes this node handed to isend and received, split as the output contract asks."""

    sent_data: int = 0
    sent_meta: int = 0
    recv: int = 0

    @property
    def sent(self) -> int:
        return self.sent_data + self.sent_meta


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

    @staticmethod
    def node_of(record: str) -> int:
        return int(record.split("|", 1)[0])

    @staticmethod
    def text_of(record: str) -> str:
        return record.split("|", 1)[1]


class NeighbourLink:
    """Point-to-point exchange of Messages with this node's graph neighbours."""

    def __init__(self, rank: int, neighbours: list[int], max_values: int, timeout_s: float,
                 failures: FailureBoard):
        self.rank = rank
        self.neighbours = list(neighbours)
        self.timeout = timedelta(seconds=timeout_s)
        self.timeout_s = timeout_s
        self.failures = failures
        self.bytes = ByteCounters()
        self._buffers = {
            peer: _ReceiveBuffers(header=torch.empty(len(HEADER_FIELDS), dtype=HEADER_DTYPE),
                                  values=torch.empty(max_values, dtype=VALUES_DTYPE))
            for peer in self.neighbours
        }
        self._max_values = max_values

    def exchange(self, outgoing: Message) -> dict[int, Message]:
        """Send `outgoing` to every neighbour and receive one message from each (D-PSGD)."""
        round_number = outgoing.round
        header_receives = {peer: self._post(dist.irecv, self._buffers[peer].header, peer, HEADER_TAG, round_number)
                           for peer in self.neighbours}
        header = outgoing.header()
        sends = [(peer, work) for peer in self.neighbours for work in self._post_send(outgoing, header, peer)]
        received = {}
        for peer, work in header_receives.items():
            self._wait(work, peer, outgoing.round, "header")
            fields = parse_header(self._buffers[peer].header)
            if fields["round"] != outgoing.round:
                raise RuntimeError(f"node {self.rank}: neighbour {peer} sent round {fields['round']} "
                                   f"while round {outgoing.round} was expected (message order broken)")
            received[peer] = self._receive_body(peer, fields, outgoing.round)
        for peer, work in sends:
            self._wait(work, peer, outgoing.round, "send")
        return received

    def _post_send(self, message: Message, header: torch.Tensor, peer: int) -> list[dist.Work]:
        works = [self._post(dist.isend, header, peer, HEADER_TAG, message.round),
                 self._post(dist.isend, message.values, peer, VALUES_TAG, message.round)]
        if message.index is not None:
            works.append(self._post(dist.isend, message.index, peer, INDEX_TAG, message.round))
        self.bytes.sent_data += message.data_bytes
        self.bytes.sent_meta += message.meta_bytes
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
        message = Message(round=header["round"], degree=header["degree"], age=header["age"],
                          encoding=encoding, values=values, index=index, seed=header["seed"])
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
            raise self._failure(peer, round_number, "post", error) from None

    def _wait(self, work: dist.Work, peer: int, round_number: int, what: str) -> None:
        try:
            work.wait(timeout=self.timeout)
        except Exception as error:  # noqa: BLE001 - gloo raises RuntimeError subclasses
            raise self._failure(peer, round_number, what, error) from None

    def _failure(self, peer: int, round_number: int, what: str, error: Exception) -> NodeFailure:
        timed_out = "timed out" in str(error).lower() or "timeout" in str(error).lower()
        seen = (f"neighbour {peer} did not answer within comm.timeout_s={self.timeout_s:g} s"
                if timed_out else f"the connection to neighbour {peer} closed (its process stopped)")
        first = self.failures.report(peer, f"node {self.rank} saw: {seen} ({what}, round {round_number})")
        failed = FailureBoard.node_of(first)
        return NodeFailure(
            f"node {self.rank} stops: node {failed} failed ({FailureBoard.text_of(first)}). The run "
            f"cannot continue without it; rounds completed so far are in nodes/*.jsonl.",
            failed_node=failed)
