"""Who a synchronous node sends to and hears from in a round, and how it weighs what it hears.

D-PSGD on a fixed graph, D-PSGD on a graph drawn anew every r rounds
(`topology.resample_every`) and Epidemic Learning (`algorithm=epidemic`) are one loop
(`dpsgd.algorithms.dpsgd`) with three answers to these questions. Each answer is a pure
function of the run seed and the round that every rank computes for every node of the run,
so a node knows who sends to it this round without asking anyone: no barrier, no extra
message, and a sender that is not expected is a protocol violation the transport rejects.
"""

from __future__ import annotations

from typing import Callable, Protocol

from dpsgd.errors import ConfigError
from dpsgd.seeding import numpy_rng
from dpsgd.topology import Topology, mh_weights, spectral_gap


class RoundPeers(Protocol):
    """A synchronous pattern's plan: per round, every node's receivers, and the weights of a merge."""

    stop_margin: (
        int  # rounds one node may run ahead of another (`dpsgd.divergence` stops them all after it)
    )

    def targets(self, round_number: int) -> list[list[int]]:
        """For every node of the run, the nodes it sends to this round (sorted)."""

    def senders(self, round_number: int) -> list[list[int]]:
        """For every node of the run, the nodes that send to it this round (sorted)."""

    def weigh(
        self, own_degree: int, sender_degrees: dict[int, int]
    ) -> tuple[float, dict[int, float]]:
        """The receiver's own weight and each sender's, from the degrees the senders announced."""

    def mixing_gap(self) -> float | None:
        """The spectral gap of the mixing matrix when it never changes (summary.json), else None."""


class FixedGraph:
    """The study's D-PSGD: every round, all neighbours of one graph; Metropolis-Hastings weights."""

    def __init__(self, topology: Topology):
        self.topology = topology
        self._neighbours = [topology.neighbours(node) for node in range(topology.num_nodes)]

    @property
    def stop_margin(self) -> int:
        """Nodes drift at most one round per hop (computed on demand: a resampled graph never asks)."""
        return self.topology.diameter + 1

    def targets(self, round_number: int) -> list[list[int]]:
        return self._neighbours

    def senders(self, round_number: int) -> list[list[int]]:
        return self._neighbours  # undirected: a node hears from whom it sends to

    weigh = staticmethod(mh_weights)

    def mixing_gap(self) -> float | None:
        return spectral_gap(self.topology)


class ResampledGraph:
    """D-PSGD on a new graph every `every` rounds: period p = (round - 1) // every uses `build(p)`.

    Metropolis-Hastings weights need only the degrees the senders announce, so they follow
    each period's graph with no extra step, and every period's matrix is doubly stochastic.
    """

    def __init__(self, build: Callable[[int], Topology], every: int, nodes: int):
        self.build = build
        self.every = every
        self.stop_margin = (
            nodes  # a connected graph's diameter is below n, whichever graph each round uses
        )
        self._period: int | None = None
        self._graph: FixedGraph | None = None

    def graph(self, round_number: int) -> FixedGraph:
        """The graph of the period this round falls in (built once per period)."""
        period = (round_number - 1) // self.every
        if period != self._period:
            self._period, self._graph = period, FixedGraph(self.build(period))
        return self._graph

    def targets(self, round_number: int) -> list[list[int]]:
        return self.graph(round_number).targets(round_number)

    def senders(self, round_number: int) -> list[list[int]]:
        return self.graph(round_number).senders(round_number)

    weigh = staticmethod(mh_weights)

    def mixing_gap(self) -> float | None:
        return None


class EpidemicDraws:
    """Epidemic Learning: every round each node sends to `fanout` peers drawn uniformly from all
    other nodes, and averages what it received with its own model, all with equal weight.

    Node i's draw in round r comes from its own stream (seed, "epidemic", i, r), so every rank
    computes everyone's draw, and so every receiver set, alone. A node may receive nothing in a
    round (it keeps its model) or more than `fanout` models.
    """

    def __init__(self, nodes: int, fanout: int, seed: int):
        self.nodes = nodes
        self.fanout = fanout
        self.seed = seed
        # Who waits on whom changes every round, so drift has no graph bound, only a probabilistic one:
        # a node waits for its receivers (a send completes when they receive) and its senders, and that
        # dependence reaches every node within O(log n) rounds with high probability; n rounds is far
        # beyond any drift seen (a node past the common stop would end the run with a timeout).
        self.stop_margin = nodes
        self._round: int | None = None
        self._plan: tuple[list[list[int]], list[list[int]]] = ([], [])

    def draw(self, node: int, round_number: int) -> list[int]:
        """The `fanout` distinct peers (never the node itself) that `node` sends to in this round."""
        picks = numpy_rng(self.seed, "epidemic", node, round_number).choice(
            self.nodes - 1, self.fanout, replace=False
        )
        return sorted(int(p) + int(p >= node) for p in picks)  # skip over the node itself

    def targets(self, round_number: int) -> list[list[int]]:
        return self._planned(round_number)[0]

    def senders(self, round_number: int) -> list[list[int]]:
        return self._planned(round_number)[1]

    def weigh(
        self, own_degree: int, sender_degrees: dict[int, int]
    ) -> tuple[float, dict[int, float]]:
        share = 1.0 / (len(sender_degrees) + 1)
        return share, {sender: share for sender in sender_degrees}

    def mixing_gap(self) -> float | None:
        return None

    def _planned(self, round_number: int) -> tuple[list[list[int]], list[list[int]]]:
        if round_number != self._round:
            targets = [self.draw(node, round_number) for node in range(self.nodes)]
            senders: list[list[int]] = [[] for _ in range(self.nodes)]
            for sender, receivers in enumerate(
                targets
            ):  # in sender order, so each list comes out sorted
                for receiver in receivers:
                    senders[receiver].append(sender)
            self._round, self._plan = round_number, (targets, senders)
        return self._plan


def check_epidemic(options: dict, nodes: int, rounds: int) -> None:
    """Each node sends to `fanout` other nodes, so there must be that many."""
    if options["fanout"] >= nodes:
        raise ConfigError(
            f"algorithm.fanout={options['fanout']} with nodes={nodes}: each node sends to fanout "
            f"other nodes, so fanout must be below nodes, e.g. `algorithm.fanout={min(4, nodes - 1)}`."
        )
