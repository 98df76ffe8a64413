"""What both transports share: the hosted nodes, their byte counters, checks and failure verdicts.

Every wait has a bound, and a bound that expires is a verdict that the peer is gone (gloo
closes the pair), so it ends the run naming who failed rather than retrying. Neither an
expired wait nor a closed connection says who stalled first, so the heartbeats are asked
(`dpsgd.liveness`). A peer's header is checked (`wire.check_header`, then the sharing
method's own check) before anything is allocated or received on its word.

A rank is named as it hosts: "neighbour 3" when every rank hosts one node (the rank is the
node), "rank 1" when ranks host groups, whose messages then say which node they were for.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Callable

import torch
import torch.distributed as dist

from dpsgd.communication import ByteCounters, FailureBoard, describe_peer_error
from dpsgd.errors import NodeFailure
from dpsgd.liveness import Liveness
from dpsgd.sharing.wire import Encoding, check_header
from dpsgd.topology import Topology

# A sharing method's own check of a header that passed wire.check_header: the reason it is wrong, or None.
HeaderCheck = Callable[[dict[str, int]], "str | None"]


class NodePort:
    """What one hosted node keeps of the transport: its own byte counters (checkpointed with the node)."""

    def __init__(self):
        self.bytes = ByteCounters()


class Transport:
    """The nodes one rank hosts and what a message from another rank is checked against."""

    def __init__(
        self,
        rank: int,
        rank_of: list[int],
        topology: Topology,
        numel: int,
        timeout_s: float,
        failures: FailureBoard,
        header_check: HeaderCheck | None = None,
        liveness: Liveness | None = None,
        device: torch.device | None = None,
    ):
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
        self.one_node_per_rank = len(rank_of) == max(rank_of) + 1

    def peer(self, other: int) -> str:
        """Another rank in words: the node it is when ranks host one node each, else the rank."""
        return f"neighbour {other}" if self.one_node_per_rank else f"rank {other}"

    def _problem(self, fields: dict[str, int], degree: int | None, **round_rule) -> str | None:
        """Why a header cannot come from a correct node (`degree`: what the sender must announce), or None."""
        problem = check_header(fields, self.numel, degree, **round_rule)
        if problem is None and self.header_check is not None and fields["encoding"] != Encoding.END:
            problem = self.header_check(fields)
        return problem

    def _post(self, operation, tensor: torch.Tensor, other: int, tag: int, where: str) -> dist.Work:
        """Post an isend or irecv; posting to a pair whose peer is gone fails at once."""
        try:
            return operation(tensor, other, tag=tag)
        except Exception as error:  # noqa: BLE001 - gloo raises RuntimeError subclasses
            raise self._failure(other, error, f"post, {where}") from None

    def _wait(
        self, work: dist.Work, other: int, where: str, timeout_s: float | None = None
    ) -> None:
        try:
            work.wait(timeout=timedelta(seconds=timeout_s or self.timeout_s))
        except Exception as error:  # noqa: BLE001 - gloo raises RuntimeError subclasses
            raise self._failure(other, error, where) from None

    def _failure(
        self, other: int, error: Exception, where: str, seen: str | None = None
    ) -> NodeFailure:
        """A failed transfer with rank `other`. The heartbeats say which rank stalled, unless another
        rank recorded the failure already: then this one is a ripple of it, confirmed once is enough."""
        seen = seen or f"{describe_peer_error(self.peer(other), error, self.timeout_s)} ({where})"
        if self.liveness is not None and not self.failures.recorded():
            verdict = self.liveness.suspect(waited_for=other)
            if verdict.found:
                other, seen = verdict.node, f"{seen}, and {verdict.source} {verdict.why}"
        return self._stop(other, seen)

    def _rejected(self, other: int, sender: int, problem: str) -> NodeFailure:
        """A message no correct node sends ends the run naming the rank that sent it."""
        for_node = "" if self.one_node_per_rank else f", for node {sender},"
        return self._stop(
            other,
            f"{self.peer(other)} sent{for_node} a message that no correct node sends: {problem}",
        )

    def _stop(self, culprit: int, seen: str) -> NodeFailure:
        """Record the failure (first writer wins), and say this rank leaves on purpose."""
        failure = self.failures.failure(self.rank, culprit, seen)
        if self.liveness is not None:
            self.liveness.end("failed")
        return failure


def span(nodes: list[int]) -> str:
    """Nodes in words: "4-7" for a run of consecutive ids, else "4, 9, 12"."""
    if nodes == list(range(nodes[0], nodes[0] + len(nodes))) and len(nodes) > 1:
        return f"{nodes[0]}-{nodes[-1]}"
    return ", ".join(map(str, nodes))
