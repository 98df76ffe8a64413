"""Communication patterns by name (`algorithm.name`): each is a loop over a rank's node group and
what it needs from the run.

A synchronous pattern whose peers are known per round is a `RoundPeers` plan run by the one
D-PSGD loop, so adding one is its module (the plan and a `register_pattern` call), its
conf/algorithm/<name>.yaml, and its import below. Every pattern works in every grouping and
with every merge rule and sharing method, because those live in the node group, not the loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from dpsgd.algorithms.dpsgd import run_dpsgd
from dpsgd.algorithms.hybrid import check_hybrid, run_hybrid
from dpsgd.algorithms.peers import EpidemicDraws, FixedGraph, RoundPeers, check_epidemic
from dpsgd.algorithms.rwm import run_rwm
from dpsgd.topology import Topology

# A synchronous plan from the run's nodes, seed, `algorithm.*` options and graph.
PlanBuilder = Callable[[int, int, dict, Topology], RoundPeers]
# A pattern's cross-key rule: (algorithm.* options, nodes, rounds) -> raises ConfigError naming the key and fix.
OptionsCheck = Callable[[dict, int, int], None]


@dataclass(frozen=True)
class Pattern:
    loop: Callable[
        ..., dict[int, int]
    ]  # loop(group, rounds, start_round, states, **options) -> rounds per node
    keys: tuple[str, ...] = ()  # `algorithm.*` keys its config group declares for the loop
    plan: PlanBuilder | None = None  # synchronous rounds: who sends to whom (None: it only walks)
    plan_keys: tuple[str, ...] = ()  # `algorithm.*` keys its config group declares for the plan
    walks: bool = False  # starts with random walks (`dpsgd.transport.walks`)
    complete_graph: bool = False  # draws its peers among all nodes, whatever `topology.*` says
    check: OptionsCheck | None = None  # gets the loop's and the plan's keys

    @property
    def declared(self) -> tuple[str, ...]:
        return self.keys + self.plan_keys


PATTERNS: dict[str, Pattern] = {}


def register_pattern(name: str, pattern: Pattern) -> Pattern:
    """Make `algorithm.name=<name>` run `pattern` (its YAML under conf/algorithm/ declares its keys)."""
    PATTERNS[name] = pattern
    return pattern


def fixed_graph(nodes: int, seed: int, options: dict, topology: Topology) -> RoundPeers:
    return FixedGraph(topology)


register_pattern("dpsgd", Pattern(run_dpsgd, plan=fixed_graph))
register_pattern(
    "epidemic",
    Pattern(
        run_dpsgd,
        plan_keys=("fanout",),
        complete_graph=True,
        check=check_epidemic,
        plan=lambda nodes, seed, options, _: EpidemicDraws(nodes, options["fanout"], seed),
    ),
)
register_pattern("rwm", Pattern(run_rwm, keys=("every",), walks=True))
register_pattern(
    "hybrid",
    Pattern(
        run_hybrid,
        keys=("every", "switch_round", "byte_budget"),
        plan=fixed_graph,
        walks=True,
        check=check_hybrid,
    ),
)
