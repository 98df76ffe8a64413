"""D-PSGD: every round, train, then average with all neighbours (Metropolis-Hastings).

The same synchronous loop runs every pattern whose peers are known per round
(`dpsgd.algorithms.peers`): the study's fixed graph, a graph resampled every r rounds,
and Epidemic Learning's random receivers with equal weights.
"""

from __future__ import annotations

from typing import Callable

import torch

from dpsgd.algorithms.peers import FixedGraph, RoundPeers
from dpsgd.averaging import Contribution, merge_fill_own, mix_rows_into
from dpsgd.node import Node
from dpsgd.node_group import NodeGroup
from dpsgd.sharing.wire import Encoding, Message


def run_dpsgd(
    group: NodeGroup,
    rounds: int,
    start_round: int = 0,
    state: dict | None = None,
    peers: RoundPeers | None = None,
    keep: dict | None = None,
) -> dict[int, int]:
    """Run synchronous rounds start_round+1 .. rounds for every node the rank hosts; return each
    node's rounds completed (all equal: D-PSGD rounds are synchronous).

    `peers`: who sends to whom each round and how merges weigh (default: the nodes' fixed graph);
    `keep`: what each checkpoint keeps for the algorithm (a hybrid run's switch round).

    Phase times are the group's: every hosted node reports the seconds its rank spent
    training all of them, exchanging and merging all of them, evaluating all of them.
    """
    peers = peers or FixedGraph(group.nodes[0].topology)
    for round_number in range(start_round + 1, rounds + 1):
        clock = group.clock()
        with clock.phase("train"):
            batch_losses = group.train_round()
        with clock.phase("comm"):
            targets = peers.targets(round_number)
            outgoing = {
                node.rank: node.sharing.pack(node.flat, round_number, len(targets[node.rank]))
                for node in group.nodes
            }
            _exchange_and_merge(group, peers, round_number, outgoing, targets)
        with clock.phase("eval"):
            metrics = [
                node.evaluate() if node.schedule.due(round_number) else {} for node in group.nodes
            ]
        for node, batch_loss, measured in zip(group.nodes, batch_losses, metrics):
            node.record(round_number, clock, batch_loss=batch_loss, **measured)
            node.note_divergence(round_number, batch_loss)
        if group.nodes[0].divergence.must_stop(round_number):
            return group.stop_after(
                round_number
            )  # every node of every rank stops after this same round
        for node in group.nodes:
            node.checkpoint(round_number, keep or {})
    return group.stop_after(rounds)


def contributions(
    node: Node,
    peers: RoundPeers,
    round_number: int,
    received: dict[int, Message],
    decoded: dict[int, tuple] | None = None,
) -> tuple[float, list[Contribution]]:
    """Weigh each sender's message as the pattern says (Metropolis-Hastings on a graph, using the
    degree each sender announced; equal weights for Epidemic Learning).

    `decoded`: messages already decoded (a node group decodes each sender's message once).
    The contributions are in the order of `received`, so they can be zipped with its senders.
    """
    self_weight, weights = merge_weights(node, peers, round_number, received)
    if decoded is None:
        decoded = {peer: node.sharing.decode(message) for peer, message in received.items()}
    return self_weight, [
        Contribution(
            weight=weights[peer],
            values=decoded[peer][1],
            index=decoded[peer][0],
            degree=received[peer].degree,
        )
        for peer in received
    ]


def merge_weights(
    node: Node, peers: RoundPeers, round_number: int, received: dict[int, Message]
) -> tuple[float, dict[int, float]]:
    """(own weight, weight per sender) as the pattern says, from the degree each sender announced
    (its header is enough: the weights are known before any values arrive)."""
    own_degree = len(peers.targets(round_number)[node.rank])
    return peers.weigh(own_degree, {peer: message.degree for peer, message in received.items()})


def _exchange_and_merge(
    group: NodeGroup,
    peers: RoundPeers,
    round_number: int,
    outgoing: dict[int, Message],
    targets: list[list[int]],
) -> None:
    """Every hosted node merges what its neighbours sent, each exactly as it would alone.

    Whole models under fill_own are averaged out of place into the group's spare rows, which
    then become the rows: nobody's input changes while others read it, at no copy. Other ranks'
    models are added as they arrive (the average is linear), so a round's messages between ranks
    are never held whole. Otherwise nodes merge in place, after the messages that are live rows
    were copied. A node alone on its rank reads no live row but its own: it merges in place.
    """
    averaged = False

    def arriving(received: dict[int, dict[int, Message]]):
        nonlocal averaged
        averaged = _whole_models(group, received)
        return _average_whole_models(group, peers, round_number, received) if averaged else None

    received = group.transport.exchange(outgoing, targets, arriving)
    if averaged:
        group.swap_rows()
    else:
        _merge_in_place(group, peers, round_number, outgoing, received)
    for node in group.nodes:
        node.sharing.after_merge(node.flat)


def _whole_models(group: NodeGroup, received: dict[int, dict[int, Message]]) -> bool:
    """Whether every hosted node averages whole models (fill_own on full messages) with others."""
    return (
        len(group.nodes) > 1
        and group.nodes[0].merge is merge_fill_own
        and all(m.encoding == Encoding.FULL for ms in received.values() for m in ms.values())
    )


def _merge_in_place(
    group: NodeGroup,
    peers: RoundPeers,
    round_number: int,
    outgoing: dict[int, Message],
    received: dict[int, dict[int, Message]],
) -> None:
    """Each node's merge rule on its own row, after the messages that are live rows were copied."""
    if len(group.nodes) > 1:  # before decoding: decoded values must point at the copy
        _detached(outgoing, group.rows, group.spare)
    decoder = group.nodes[0].sharing  # every node's method decodes alike: once per sender
    decoded = {
        sender: decoder.decode(message)
        for messages in received.values()
        for sender, message in messages.items()
    }
    for node in group.nodes:
        self_weight, weighed = contributions(
            node, peers, round_number, received[node.rank], decoded
        )
        node.merge(node.flat, self_weight, weighed, own_index=node.sharing.last_sent_index)


def _average_whole_models(
    group: NodeGroup,
    peers: RoundPeers,
    round_number: int,
    received: dict[int, dict[int, Message]],
) -> Callable[[int, torch.Tensor], None]:
    """Averaging of every hosted node (weights as the pattern says) into the spare rows in one sparse
    product over the rows; a message that is not its sender's live row (values rounded to a lighter
    type on the wire) is added to its reader's row. Returns what adds another rank's model to the
    rows of its readers as it arrives (its weights come from the headers, in before any model)."""
    position = {node.rank: g for g, node in enumerate(group.nodes)}
    from_rows, readers = [], {}
    for g, node in enumerate(group.nodes):
        self_weight, weights = merge_weights(node, peers, round_number, received[node.rank])
        from_rows.append((g, g, self_weight))
        for sender, message in received[node.rank].items():
            row = position.get(sender)
            if row is not None and _is_row(message.values, group.rows[row]):
                from_rows.append((g, row, weights[sender]))
            else:
                readers.setdefault(sender, []).append((g, weights[sender]))
    mix_rows_into(group.spare, group.rows, from_rows)

    def add(sender: int, values: torch.Tensor) -> None:
        for g, weight in readers[sender]:
            group.spare[g].add_(values, alpha=weight)

    local = {s: m for messages in received.values() for s, m in messages.items() if s in position}
    for sender in [s for s in readers if s in local]:  # this rank's own, rounded on the wire
        add(sender, local[sender].values)
    return add


def _is_row(values: torch.Tensor, row: torch.Tensor) -> bool:
    """A message that is the sender's live row is already in the sparse product's input; any
    other tensor (a copy, a rounded or received buffer) must be added on its own."""
    return (
        values.data_ptr() == row.data_ptr()
        and values.shape == row.shape
        and values.stride() == row.stride()
        and values.dtype == row.dtype
    )


def _detached(outgoing: dict[int, Message], rows, spare) -> dict[int, Message]:
    """Messages that are the live model (full sharing sends the row itself) must not change while
    the group's other nodes merge them: they point into a snapshot of the rows instead, taken into
    the group's spare rows (which merging in place leaves unused)."""
    live = [
        node
        for node, message in outgoing.items()
        if message.values.untyped_storage().data_ptr() == rows.untyped_storage().data_ptr()
    ]
    if live:
        snapshot = spare.copy_(rows)
        base = rows.untyped_storage().data_ptr()
        for node in live:
            values = outgoing[node].values
            start = (values.data_ptr() - base) // values.element_size()
            outgoing[node].values = snapshot.view(-1)[start : start + values.numel()]
    return outgoing
