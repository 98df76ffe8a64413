"""Divergence: a non-finite loss or model is a result to report, not a crash.

A learning-rate sweep meets runs that blow up. Such a run should say once where it went
wrong ("training diverged at round N on nodes ...") and, if the user asks for it
(`train.stop_on_divergence`), stop early, with every node stopping cleanly.

Nodes record their first non-finite round in the rendezvous store. Synchronous nodes
(D-PSGD, Epidemic Learning, a hybrid run once it averages) must all stop after the same
round or their peers would wait for messages that never come: on a fixed graph no node is
more than the graph's diameter rounds ahead of another, so the first diverging node fixes
the stop at its round + diameter + 1, which every node reads before it gets there (where
the peers change every round the margin is the node count: `dpsgd.algorithms.peers`). RWM
nodes, and a hybrid run's walk, stop as soon as they see the key; the END handshake stops
the rest of the walk.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

DIVERGED_PREFIX = "diverged/node"
STOP_KEY = "diverged/stop_after"


class DivergenceWatch:
    """A rank's view (for its one node, or every node of its group): notes divergence, says when to stop."""

    def __init__(self, store: dist.Store, stop: bool, stop_margin: int | None):
        """`stop_margin`: rounds between the first divergence and the common stop (None: stop at once)."""
        self.store = store
        self.stop = stop
        self.stop_margin = stop_margin
        self._noted: set[int] = set()
        self._stop_after: int | None = None

    def note(
        self, node: int, round_number: int, batch_loss: float, flat: torch.Tensor, check_model: bool
    ) -> None:
        """After a node's round: record its first non-finite loss, or parameter when `check_model`.

        The loss is checked every round. The model costs a pass over it, so it is checked on
        evaluated rounds only (a non-finite parameter that no batch touches changes no loss).
        The sum is non-finite exactly when a parameter is (or when they are so large that
        they sum past float32's range, which is divergence too).
        """
        finite = math.isfinite(batch_loss) and (not check_model or math.isfinite(float(flat.sum())))
        if node in self._noted or finite:
            return
        self._noted.add(node)
        self.store.set(f"{DIVERGED_PREFIX}/{node}", str(round_number))
        if self.stop:
            self.store.compare_set(STOP_KEY, "", str(round_number + (self.stop_margin or 0)))

    def must_stop(self, round_number: int) -> bool:
        """True when the rank's node(s) stop after this round (one store lookup per round, not per node)."""
        if not self.stop:
            return False
        if self._stop_after is None and self.store.check([STOP_KEY]):
            self._stop_after = int(self.store.get(STOP_KEY))
        if self._stop_after is None:
            return False
        return self.stop_margin is None or round_number >= self._stop_after


def divergence_report(store: dist.Store, nodes: int) -> dict | None:
    """What summary.json says about divergence: the first round, the nodes then, how many in all."""
    keys = [f"{DIVERGED_PREFIX}/{node}" for node in range(nodes)]
    rounds = {node: int(store.get(key)) for node, key in enumerate(keys) if store.check([key])}
    if not rounds:
        return None
    first = min(rounds.values())
    stop_after = int(store.get(STOP_KEY)) if store.check([STOP_KEY]) else None
    return {
        "round": first,
        "nodes": sorted(node for node, r in rounds.items() if r == first),
        "nodes_diverged": len(rounds),
        "stop_after": stop_after,
    }


def describe(report: dict) -> str:
    """The one line a user reads about it."""
    nodes = ", ".join(str(node) for node in report["nodes"])
    if report["stop_after"] is None:
        then = "the run went on (train.stop_on_divergence=false)"
    else:
        then = f"every node stopped by round {report['stop_after']} (train.stop_on_divergence=true)"
    return (
        f"training diverged at round {report['round']} on node(s) {nodes} (non-finite loss or parameters; "
        f"{report['nodes_diverged']} node(s) diverged in all); {then}. Lower optimizer.lr, e.g. by 10x."
    )


def finite_or_none(value):
    """JSON has no NaN or Infinity: strict readers reject them, so a non-finite number is written as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
