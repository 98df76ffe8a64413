"""RWM: random-walk averaging. A node moves only when a model reaches it.

Every node trains one round and sends (model, age) to one uniformly random neighbour;
then, repeatedly: wait for a model from any neighbour, merge it by age-weighted
averaging, train one round, send to one random neighbour. The run ends when the first
node completes its rounds; the stop floods the graph through END messages (see
`RandomWalkLink`).
"""

from __future__ import annotations

from dpsgd.averaging import merge_by_age
from dpsgd.node import Node


def run_rwm(node: Node, rounds: int, start_round: int = 0, state: dict | None = None) -> int:
    """Run until this node completes `rounds` or a neighbour stops; return the rounds completed.

    A resumed run (start_round > 0) starts its walk afresh from the saved model and age.
    """
    node.link.start()
    age = (state or {}).get("age", 0)
    completed = start_round
    for round_number in range(start_round + 1, rounds + 1):
        clock = node.clock()
        if round_number > start_round + 1:
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
        with clock.phase("comm"):
            peer = node.neighbours[node.rng.integers(len(node.neighbours))]
            node.link.send(peer, node.sharing.pack(node.flat, round_number, node.degree, age))
        with clock.phase("eval"):
            metrics = node.evaluate() if node.schedule.due(round_number) else {}
        node.recorder.record(round_number, clock, node.link.bytes, batch_loss=batch_loss, age=age,
                             sent_to=peer, **metrics)
        completed = round_number
        if node.stops_after(round_number, batch_loss):
            break  # training diverged somewhere: END messages stop the rest of the walk
        node.checkpoint(round_number, {"age": age})
    node.link.close(completed)
    return completed
