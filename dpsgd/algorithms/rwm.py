"""RWM: random-walk averaging. A node moves only when a model reaches it.

Every node trains one round and sends (model, age) to one uniformly random neighbour;
then, repeatedly: wait for a model from any neighbour, merge it by age-weighted
averaging, train one round, send to one random neighbour. The run ends when the first
node completes its rounds; the stop floods the graph through END messages (see
`RandomWalkLink`), and every node then evaluates the round it stopped after
(`dpsgd.algorithms.stopping`), so the run's final numbers are its end.

Periodic RWM (`algorithm.every=k`): a node that holds a model trains k rounds alone and
sends only after rounds k, 2k, ...; it waits for a model only before rounds k+1, 2k+1, ....
Every node still sends exactly once for each model it takes, so n models keep walking.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from dpsgd.algorithms.stopping import evaluate_at_stop
from dpsgd.averaging import merge_by_age
from dpsgd.node import Node
from dpsgd.sharing.wire import Message

if TYPE_CHECKING:
    from dpsgd.group.compose import NodeGroup


def sends_after(round_number: int, every: int) -> bool:
    """Whether a node sends its model after this round (and so waits for one before the next)."""
    return round_number % every == 0


def run_rwm(node: Node, rounds: int, start_round: int = 0, state: dict | None = None, every: int = 1,
            byte_budget: int | None = None) -> int:
    """Run until this node completes `rounds` (or has sent `byte_budget` bytes) or a neighbour stops;
    return the rounds completed.

    A resumed run (start_round > 0) starts its walk afresh from the saved model and age.
    """
    node.link.start()
    age = (state or {}).get("age", 0)
    completed = start_round
    for round_number in range(start_round + 1, rounds + 1):
        clock = node.clock()
        if round_number > start_round + 1 and sends_after(round_number - 1, every):
            with clock.phase("comm"):
                message = node.link.receive()
                if message is None:
                    break  # another node finished: stop before training again
                index, values = node.sharing.decode(message)
                merge_by_age(node.flat, age, message.age, values, index)
                age = max(age, message.age)
                node.sharing.after_merge(node.flat)
        with clock.phase("train"):
            batch_loss = node.trainer.train_round()
            age += node.trainer.steps_per_round
        sent = {}
        if sends_after(round_number, every):
            with clock.phase("comm"):
                sent = _send_to_random_neighbour(node, round_number, age, node.link.send)
        with clock.phase("eval"):
            metrics = node.evaluate() if node.schedule.due(round_number) else {}
        node.record(round_number, clock, batch_loss=batch_loss, age=age, **sent, **metrics)
        completed = round_number
        if node.stops_after(round_number, batch_loss):
            break  # training diverged somewhere: END messages stop the rest of the walk
        node.checkpoint(round_number, {"age": age})
        if over_budget(node, byte_budget):
            break  # as if its rounds were done: END messages stop the rest of the walk
    node.link.close(completed)
    evaluate_at_stop(node)  # wherever the walk stopped it, the node's last round is measured
    return completed


def run_rwm_group(group: "NodeGroup", rounds: int, start_round: int = 0,
                  state: dict | None = None, every: int = 1, byte_budget: int | None = None) -> dict[int, int]:
    """RWM for every node a rank hosts; return each node's rounds completed.

    A node still moves only when a model reaches it: each pass takes, for every hosted
    node that has a model waiting, the oldest one, merges it by age, and trains those
    nodes together until each reaches its next sending round (one round unless periodic),
    then each sends to one random neighbour. The walk ends when the first node anywhere
    completes its rounds. `state`: per node, what its checkpoint kept (age).
    """
    link = group.link
    link.start()
    ages = {node.rank: ((state or {}).get(node.rank) or {}).get("age", 0) for node in group.nodes}
    completed = {node.rank: start_round for node in group.nodes}
    by_id = {node.rank: node for node in group.nodes}
    moving, first_pass = list(group.nodes), True  # first: every node trains and sends without waiting
    while True:
        clock = group.clock()
        if not first_pass:
            with clock.phase("comm"):
                arrived = link.ready()
                if arrived is None:
                    break  # another rank finished: stop before training again
                moving = [by_id[node_id] for node_id in sorted(arrived)]
                for node in moving:
                    message = arrived[node.rank]
                    index, values = node.sharing.decode(message)
                    merge_by_age(node.flat, ages[node.rank], message.age, values, index)
                    ages[node.rank] = max(ages[node.rank], message.age)
                    node.sharing.after_merge(node.flat)
        first_pass = False
        if _train_until_sent(group, moving, clock, rounds, every, completed, ages, byte_budget):
            break
    link.close()
    for node in group.nodes:
        evaluate_at_stop(node)  # wherever the walk stopped it, each node's last round is measured
    return completed


def _train_until_sent(group: "NodeGroup", moving: list[Node], clock, rounds: int, every: int,
                      completed: dict[int, int], ages: dict[int, int], byte_budget: int | None) -> bool:
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
                    sent = _send_to_random_neighbour(node, round_number, ages[node.rank],
                                                     lambda peer, message: group.link.send(node.rank, peer, message))
            with clock.phase("eval"):
                metrics = node.evaluate() if node.schedule.due(round_number) else {}
            node.record(round_number, clock, batch_loss=batch_loss, age=ages[node.rank], **sent, **metrics)
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


def _send_to_random_neighbour(node: Node, round_number: int, age: int, send: Callable[[int, Message], None]) -> dict:
    """The model and its age to one uniformly random neighbour (the node's seeded stream draws it);
    returns what the round's record says of it."""
    peer = node.neighbours[node.rng.integers(len(node.neighbours))]
    send(peer, node.sharing.pack(node.flat, round_number, node.degree, age))
    return {"sent_to": peer}


def _positions(group: "NodeGroup", nodes: list[Node]) -> list[int]:
    first = group.nodes[0].rank
    return [node.rank - first for node in nodes]
