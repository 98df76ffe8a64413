"""What a run counts and concludes about its messages: bytes per node, and who failed first.

The transports that move the messages (`dpsgd.transport`) count each node's bytes here, and
every failure they see is recorded on one board, so that every node names the original
failure rather than the neighbour it saw go.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Callable

import torch.distributed as dist

from dpsgd.errors import NodeFailure
from dpsgd.sharing.wire import Message, declared_bytes

FAILURE_KEY = "failure/first"
# Waits that must not expire (a gloo timeout closes the pair): peers' deaths still end them.
NO_BOUND = timedelta(days=365)


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

    def count_received(self, message: Message | dict[str, int]) -> None:
        """A message received in full, or the checked header of one (counted by what it declares)."""
        if isinstance(message, dict):
            data_bytes, meta_bytes = declared_bytes(message)
        else:
            data_bytes, meta_bytes = message.data_bytes, message.meta_bytes
        self.recv_data += data_bytes
        self.recv_meta += meta_bytes


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
        return NodeFailure(
            f"{self.label(rank)} stops: {self.label(int(failed_node))} failed ({text}). The run "
            f"cannot continue without it; rounds completed so far are in nodes/*.jsonl.",
            failed_node=int(failed_node),
        )


def is_timeout(error: Exception) -> bool:
    text = str(error).lower()
    return "timed out" in text or "timeout" in text


def describe_peer_error(peer: str, error: Exception, timeout_s: float) -> str:
    """What a failed gloo operation says about the peer (in words: "neighbour 3", "rank 1"): silent
    too long, or gone."""
    if is_timeout(error):
        return f"{peer} did not answer within comm.timeout_s={timeout_s:g} s"
    return f"the connection to {peer} closed (its process stopped)"
