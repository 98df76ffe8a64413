"""The graph of nodes, and the Metropolis-Hastings weights each node mixes with.

A topology is built once from the config, checked before any rank trains (node count
equals the world size, no self loops, ids in range, connected), and then only read.
Metropolis-Hastings weights need only a node's own degree and its neighbours' degrees,
so each rank can compute its row alone and the rows still form a symmetric, doubly
stochastic matrix.
"""

import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import networkx as nx
import numpy as np

from dpsgd.errors import ConfigError
from dpsgd.seeding import stream_key

KINDS = ("regular", "ring", "smallworld", "full", "star", "file")
DEFAULT_DEGREE = (
    4  # the study's degree; `topology.degree` left unset takes the largest valid one up to this
)
REGULAR_ATTEMPTS = 20  # d >= 3 is almost surely connected; d = 2 often is not at large n


@dataclass(frozen=True)
class Topology:
    """An undirected, connected graph on nodes 0..n-1 with no self loops."""

    graph: nx.Graph

    @property
    def num_nodes(self) -> int:
        return self.graph.number_of_nodes()

    def neighbours(self, node: int) -> list[int]:
        """Sorted, so every rank walks its neighbours in the same order."""
        return sorted(self.graph.neighbors(node))

    def degree(self, node: int) -> int:
        return self.graph.degree(node)

    @cached_property
    def diameter(self) -> int:
        """The most hops between two nodes: how far apart in rounds synchronous D-PSGD nodes can drift."""
        return nx.diameter(self.graph)


def default_degree(kind: str, nodes: int) -> int:
    """The degree of a graph whose degree the user did not set: the largest valid one up to 4.

    So that `torchrun --nproc_per_node 4 train.py` runs on a 3-regular graph instead of
    stopping because no 4-regular graph on 4 nodes exists; a degree the user sets is
    checked as given (`_regular`, `_smallworld`).
    """
    if kind == "smallworld":  # even, 2 <= d < nodes
        return max(
            [d for d in range(2, DEFAULT_DEGREE + 1, 2) if d < nodes], default=DEFAULT_DEGREE
        )
    valid = [d for d in range(1, DEFAULT_DEGREE + 1) if d < nodes and (nodes * d) % 2 == 0]
    return max(valid, default=DEFAULT_DEGREE)  # none valid (nodes < 2): build_topology says why


def build_topology(
    kind: str,
    nodes: int,
    *,
    seed: int = 0,
    degree: int | None = None,
    path: str | None = None,
    rewire_p: float = 0.1,
) -> Topology:
    """Build and validate the graph named by `topology.kind` for `nodes` ranks.

    `degree` None: `default_degree` (the largest valid degree up to 4).
    """
    if degree is None:
        degree = default_degree(kind, nodes)
    if kind not in KINDS:
        raise ConfigError(
            f"topology.kind is {kind!r}, which is not a known topology; "
            f"set it to one of: {', '.join(KINDS)}."
        )
    if nodes < 2:
        raise ConfigError(
            f"nodes is {nodes}, but a decentralized run needs at least 2 "
            "nodes to exchange anything; set nodes to 2 or more."
        )
    if kind == "regular":
        graph = _regular(nodes, degree, seed)
    elif kind == "ring":
        graph = nx.cycle_graph(nodes)
    elif kind == "smallworld":
        graph = _smallworld(nodes, degree, rewire_p, seed)
    elif kind == "full":
        graph = nx.complete_graph(nodes)
    elif kind == "star":
        graph = nx.star_graph(nodes - 1)  # node 0 is the hub
    else:
        graph = _read_edge_list(path, nodes)
    where = f"topology.path {path!r}" if kind == "file" else f"topology.kind={kind!r}"
    return _validated(graph, where)


def _regular(nodes: int, degree: int, seed: int) -> nx.Graph:
    if degree < 1 or degree >= nodes or (nodes * degree) % 2:
        raise ConfigError(
            f"topology.degree is {degree} with nodes={nodes}, but a d-regular "
            "graph needs 1 <= d < nodes and nodes * d even; choose another "
            f"topology.degree (e.g. `topology.degree={default_degree('regular', nodes)}`), leave it "
            "unset for the largest valid degree up to 4, or change the number of nodes."
        )
    for attempt in range(REGULAR_ATTEMPTS):
        keys = (attempt,) if attempt else ()  # first try uses the plain topology stream
        graph = nx.random_regular_graph(degree, nodes, seed=stream_key(seed, "topology", *keys))
        if nx.is_connected(graph):
            return graph
    raise ConfigError(
        f"topology.degree={degree} with nodes={nodes} gave a disconnected random "
        f"regular graph in all {REGULAR_ATTEMPTS} attempts; raise "
        "topology.degree (3 or more is almost always connected), or for "
        "degree 2 use topology.kind='ring'."
    )


def _smallworld(nodes: int, degree: int, rewire_p: float, seed: int) -> nx.Graph:
    # networkx joins each node to degree // 2 ring neighbours per side, so odd is silently lost
    if degree < 2 or degree >= nodes or degree % 2:
        raise ConfigError(
            f"topology.degree is {degree} with nodes={nodes}, but a small-world "
            "graph needs an even degree with 2 <= degree < nodes (each node "
            "starts joined to degree/2 ring neighbours on each side); change "
            "topology.degree."
        )
    if not 0.0 <= rewire_p <= 1.0:
        raise ConfigError(
            f"topology.rewire_p is {rewire_p}, but it is a probability; set it between 0 and 1."
        )
    try:
        return nx.connected_watts_strogatz_graph(
            nodes, degree, rewire_p, tries=100, seed=stream_key(seed, "topology")
        )
    except nx.NetworkXError as error:
        raise ConfigError(
            f"topology.kind='smallworld' with degree={degree}, rewire_p="
            f"{rewire_p} gave no connected graph ({error}); lower "
            "topology.rewire_p or raise topology.degree."
        ) from error


def _read_edge_list(path: str | None, nodes: int) -> nx.Graph:
    """First data line is the node count, then one 'u v' pair per line; '#' lines ignored."""
    if not path:
        raise ConfigError(
            "topology.kind is 'file' but topology.path is not set; set "
            "topology.path to an edge-list file."
        )
    try:
        lines = Path(path).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as error:
        reason = getattr(error, "strerror", None) or "not a text file"
        raise ConfigError(
            f"topology.path {path!r} cannot be read ({reason}); point "
            "topology.path at a readable edge-list file."
        ) from error
    graph, declared = nx.Graph(), None
    for number, line in enumerate(lines, start=1):
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        values = [int(f) for f in fields] if all(re.fullmatch(r"-?\d+", f) for f in fields) else []
        if len(values) != (1 if declared is None else 2):
            what = "the node count" if declared is None else "a 'u v' pair of integer ids"
            raise ConfigError(
                f"topology.path {path!r} line {number} reads {line.strip()!r}, "
                f"but it should be {what}; fix that line."
            )
        if declared is None:
            declared = values[0]
            if declared != nodes:
                raise ConfigError(
                    f"topology.path {path!r} declares {declared} nodes but the "
                    f"run has {nodes} ranks (nodes={nodes}); set nodes to "
                    f"{declared} and start that many ranks, or use a file for "
                    f"{nodes} nodes."
                )
            graph.add_nodes_from(range(declared))
            continue
        u, v = values
        if u == v or not (0 <= u < declared and 0 <= v < declared):
            problem = f"a self loop on node {u}" if u == v else f"an id outside 0..{declared - 1}"
            raise ConfigError(
                f"topology.path {path!r} line {number} has {problem}; each "
                f"line must join two different 0-based node ids; fix it."
            )
        graph.add_edge(u, v)  # both directions listed collapse to one undirected edge
    if declared is None:
        raise ConfigError(
            f"topology.path {path!r} has no node count line; put the node "
            "count on the first non-comment line."
        )
    return graph


def _validated(graph: nx.Graph, where: str) -> Topology:
    """The last check every builder passes, so later code may assume a connected graph."""
    components = nx.number_connected_components(graph)
    if components > 1:
        raise ConfigError(
            f"{where} gives a graph in {components} disconnected components, so "
            "their models can never agree; add edges joining them."
        )
    return Topology(graph=nx.freeze(graph))  # frozen: ranks read it, nobody edits it


def mh_weights(
    own_degree: int, neighbour_degrees: dict[int, int]
) -> tuple[float, dict[int, float]]:
    """One node's Metropolis-Hastings row: needs only local degrees, yet sums to 1."""
    weights = {j: 1.0 / (1 + max(own_degree, d)) for j, d in neighbour_degrees.items()}
    return 1.0 - sum(weights.values()), weights


def mh_matrix(topology: Topology) -> np.ndarray:
    """The full float64 NxN matrix W[i, j], for single-process references and checks."""
    n = topology.num_nodes
    matrix = np.zeros((n, n), dtype=np.float64)
    for i in range(n):
        neighbour_degrees = {j: topology.degree(j) for j in topology.neighbours(i)}
        self_weight, weights = mh_weights(topology.degree(i), neighbour_degrees)
        matrix[i, i] = self_weight
        for j, w in weights.items():
            matrix[i, j] = w
    return matrix


def spectral_gap(topology: Topology) -> float:
    """1 - |lambda_2| of the Metropolis-Hastings matrix: how fast averaging on this graph mixes
    (a node's model approaches the network average by about that fraction per round).

    W is symmetric, so its eigenvalues are real; on a connected graph only the first is 1.
    """
    eigenvalues = np.linalg.eigvalsh(mh_matrix(topology))
    magnitudes = np.sort(np.abs(eigenvalues))
    return float(1.0 - magnitudes[-2]) if len(magnitudes) > 1 else 1.0
