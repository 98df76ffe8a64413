"""RWM: random-walk averaging. A node moves only when a model reaches it.

Every node trains one round and sends (model, age) to one uniformly random neighbour;
then, repeatedly: wait for a model from any neighbour, merge it by age-weighted
averaging, train one round, send to one random neighbour. The run ends when the first
node completes its rounds; the stop floods the graph through END messages (see
`dpsgd.transport.walks`), and every node then evaluates the round it stopped after
(`dpsgd.algorithms.stopping`), so the run's final numbers are its end.

Periodic RWM (`algorithm.every=k`): a node that holds a model trains k rounds alone and
sends only after rounds k, 2k, ...; it waits for a model only before rounds k+1, 2k+1, ....
Every node still sends exactly once for each model it takes, so n models keep walking.
"""

from __future__ import annotations

from typing import Callable

from dpsgd.averaging import Contribution, age_weights
from dpsgd.node import Node
from dpsgd.node_group import NodeGroup
from dpsgd.sharing.wire import Message


def sends_after(round_number: int, every: int) -> bool:
    """Whether a node sends its model after this round (and so waits for one before the next)."""
    return round_number % every == 0


def run_rwm(
    group: NodeGroup,
    rounds: int,
    start_round: int = 0,
    state: dict | None = None,
    every: int = 1,
    byte_budget: int | None = None,
) -> dict[int, int]:
    """RWM for every node a rank hosts, until the first node anywhere completes `rounds` (or has sent
    `byte_budget` bytes) or training diverged; return each node's rounds completed.

    A node still moves only when a model reaches it: each pass takes, for every hosted
    node that has a model waiting, the oldest one, merges it by age, and trains those
    nodes together until each reaches its next sending round (one round unless periodic),
    then each sends to one random neighbour. The walk ends when the first node anywhere
    completes its rounds. `state`: per node, what its checkpoint kept (age); a resumed run
    (start_round > 0) starts its walk afresh from the saved models and ages.
    """
    transport = group.transport
    transport.start()
    ages = {node.rank: ((state or {}).get(node.rank) or {}).get("age", 0) for node in group.nodes}
    completed = {node.rank: start_round for node in group.nodes}
    by_id = {node.rank: node for node in group.nodes}
    moving, first_pass = (
        list(group.nodes),
        True,
    )  # first: every node trains and sends without waiting
    while True:
        clock = group.clock()
        if not first_pass:
            with clock.phase("comm"):
                arrived = transport.ready()
                if arrived is None:
                    break  # another rank finished: stop before training again
                moving = [by_id[node_id] for node_id in sorted(arrived)]
                for node in moving:
                    ages[node.rank] = merge_arrival(node, ages[node.rank], arrived[node.rank])
        first_pass = False
        if _train_until_sent(group, moving, clock, rounds, every, completed, ages, byte_budget):
            break
    transport.close()
    group.evaluate_at_stop()  # wherever the walk stopped it, each node's last round is measured
    return completed


def merge_arrival(node: Node, age: int, message: Message) -> int:
    """Merge a model that reached the node with the run's merge rule, the two weighed by their ages
    (`fill_own`, the default, is RWM's age-weighted average); return the node's age after it."""
    index, values = node.sharing.decode(message)
    own_weight, weight = age_weights(age, message.age)
    node.merge(
        node.flat,
        own_weight,
        [Contribution(weight, values, index, message.degree, message.age)],
        None,
    )
    node.sharing.after_merge(node.flat)
    return max(age, message.age)


def _train_until_sent(
    group: NodeGroup,
    moving: list[Node],
    clock,
    rounds: int,
    every: int,
    completed: dict[int, int],
    ages: dict[int, int],
    byte_budget: int | None,
) -> bool:
    """Rounds of the moving nodes, trained together, each until it has sent; True when the walk must end."""
    while moving:
        with clock.phase("train"):
            batch_losses = group.train_round(_positions(group, moving))
        finished = False
        for node, batch_loss in zip(moving, batch_losses):
            round_number = completed[node.rank] + 1
            ages[node.rank] += node.trainer.steps_per_round
            sent = {}
            if sends_after(round_number, every):
                with clock.phase("comm"):
                    sent = _send_to_random_neighbour(
                        node,
                        round_number,
                        ages[node.rank],
                        lambda peer, message: group.transport.send(node.rank, peer, message),
                    )
            with clock.phase("eval"):
                metrics = node.evaluate() if node.schedule.due(round_number) else {}
            node.record(
                round_number, clock, batch_loss=batch_loss, age=ages[node.rank], **sent, **metrics
            )
            completed[node.rank] = round_number
            node.note_divergence(round_number, batch_loss)
            node.checkpoint(round_number, {"age": ages[node.rank]})
            finished |= round_number >= rounds or over_budget(node, byte_budget)
        if finished or group.nodes[0].divergence.must_stop(max(completed.values())):
            return True
        moving = [node for node in moving if not sends_after(completed[node.rank], every)]
        clock = group.clock()
    return False


def over_budget(node: Node, byte_budget: int | None) -> bool:
    """Whether the node has sent its byte budget (a hybrid run's walk ends when the first node has)."""
    return byte_budget is not None and node.link.bytes.sent >= byte_budget


def _send_to_random_neighbour(
    node: Node, round_number: int, age: int, send: Callable[[int, Message], None]
) -> dict:
    """The model and its age to one uniformly random neighbour (the node's seeded stream draws it);
    returns what the round's record says of it."""
    peer = node.neighbours[node.rng.integers(len(node.neighbours))]
    send(peer, node.sharing.pack(node.flat, round_number, node.degree, age))
    return {"sent_to": peer}


def _positions(group: NodeGroup, nodes: list[Node]) -> list[int]:
    first = group.nodes[0].rank
    return [node.rank - first for node in nodes]
