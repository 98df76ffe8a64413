"""D-PSGD: every round, train, then average with all neighbours (Metropolis-Hastings)."""

from __future__ import annotations

from dpsgd.averaging import Contribution
from dpsgd.node import Node
from dpsgd.sharing.wire import Message
from dpsgd.topology import mh_weights


def run_dpsgd(node: Node, rounds: int, start_round: int = 0, state: dict | None = None) -> int:
    """Run synchronous rounds start_round+1 .. rounds; return the number completed."""
    for round_number in range(start_round + 1, rounds + 1):
        clock = node.clock()
        with clock.phase("train"):
            batch_loss = node.trainer.train_round()
        with clock.phase("comm"):
            message = node.sharing.pack(node.flat, round_number, node.degree)
            received = node.link.exchange(message)
            self_weight, weighed = contributions(node, received)
            node.merge(node.flat, self_weight, weighed, own_index=node.sharing.last_sent_index)
            node.sharing.after_merge(node.flat)
        with clock.phase("eval"):
            metrics = node.evaluate() if node.schedule.due(round_number) else {}
        node.recorder.record(round_number, clock, node.link.bytes, batch_loss=batch_loss, **metrics)
        if node.stops_after(round_number, batch_loss):
            return round_number  # every node stops after this same round (dpsgd.divergence)
        node.checkpoint(round_number, {})
    return rounds


def contributions(node: Node, received: dict[int, Message]) -> tuple[float, list[Contribution]]:
    """Weigh each neighbour's message by Metropolis-Hastings, using the degree it announced."""
    self_weight, weights = mh_weights(node.degree, {peer: message.degree for peer, message in received.items()})
    decoded = {peer: node.sharing.decode(message) for peer, message in received.items()}
    return self_weight, [Contribution(weight=weights[peer], values=values, index=index,
                                      degree=received[peer].degree)
                         for peer, (index, values) in decoded.items()]
