"""Topology construction, validation, and Metropolis-Hastings weights, without ranks."""

import networkx as nx
import numpy as np
import pytest

from dpsgd.errors import ConfigError
from dpsgd.topology import Topology, build_topology, mh_matrix, mh_weights, spectral_gap

SIZES = (2, 5, 8, 16)


def reference_mh(graph: nx.Graph) -> np.ndarray:
    """Plain float64 numpy recomputation of W from the adjacency matrix."""
    n = graph.number_of_nodes()
    adjacency = nx.to_numpy_array(graph, nodelist=range(n), dtype=np.float64)
    deg = adjacency.sum(axis=1)
    weights = adjacency / (1.0 + np.maximum(deg[:, None], deg[None, :]))
    np.fill_diagonal(weights, 1.0 - weights.sum(axis=1))
    return weights


def topologies_for(n: int):
    yield build_topology("ring", n)
    yield build_topology("full", n)
    yield build_topology("star", n)
    if n >= 5:
        yield build_topology("regular", n, degree=4, seed=3)
        yield build_topology("smallworld", n, degree=2, rewire_p=0.3, seed=3)
        yield build_topology("smallworld", n, degree=4, rewire_p=0.5, seed=7)
    if n == 2:
        yield build_topology("regular", n, degree=1)


def test_mh_weights_on_path_by_hand():
    # path 0-1-2-3: degrees 1, 2, 2, 1; every edge touches a degree-2 node -> 1/3
    topology = Topology(nx.path_graph(4))
    expected = np.array(
        [
            [2 / 3, 1 / 3, 0.0, 0.0],
            [1 / 3, 1 / 3, 1 / 3, 0.0],
            [0.0, 1 / 3, 1 / 3, 1 / 3],
            [0.0, 0.0, 1 / 3, 2 / 3],
        ]
    )
    np.testing.assert_allclose(mh_matrix(topology), expected, rtol=0, atol=1e-15)
    self_weight, weights = mh_weights(2, {0: 1, 2: 2})
    assert weights == {0: 1 / 3, 2: 1 / 3}
    assert self_weight == pytest.approx(1 / 3, abs=1e-15)


def test_mh_weights_on_star_by_hand():
    # star with hub 0 of degree 3: each edge weight 1/(1+3) = 1/4
    topology = build_topology("star", 4)
    hub_self, hub_weights = mh_weights(3, {1: 1, 2: 1, 3: 1})
    assert hub_weights == {1: 0.25, 2: 0.25, 3: 0.25}
    assert hub_self == 0.25
    leaf_self, leaf_weights = mh_weights(1, {0: 3})
    assert leaf_weights == {0: 0.25} and leaf_self == 0.75
    expected = np.array(
        [
            [0.25, 0.25, 0.25, 0.25],
            [0.25, 0.75, 0.0, 0.0],
            [0.25, 0.0, 0.75, 0.0],
            [0.25, 0.0, 0.0, 0.75],
        ]
    )
    np.testing.assert_array_equal(mh_matrix(topology), expected)


def test_mh_weights_isolated_node_keeps_everything():
    assert mh_weights(0, {}) == (1.0, {})


@pytest.mark.parametrize("n", SIZES)
def test_mh_matrix_symmetric_doubly_stochastic_and_matches_numpy(n):
    for topology in topologies_for(n):
        matrix = mh_matrix(topology)
        assert matrix.dtype == np.float64 and matrix.shape == (n, n)
        np.testing.assert_array_equal(matrix, matrix.T)
        np.testing.assert_allclose(matrix.sum(axis=0), 1.0, rtol=0, atol=1e-12)
        np.testing.assert_allclose(matrix.sum(axis=1), 1.0, rtol=0, atol=1e-12)
        assert (matrix >= 0).all()
        np.testing.assert_allclose(matrix, reference_mh(topology.graph), rtol=0, atol=1e-15)


@pytest.mark.parametrize("n", SIZES)
def test_every_kind_is_connected_on_nodes_zero_to_n(n):
    for topology in topologies_for(n):
        assert sorted(topology.graph.nodes) == list(range(n))
        assert topology.num_nodes == n
        assert nx.is_connected(topology.graph)
        assert nx.number_of_selfloops(topology.graph) == 0


def test_neighbours_sorted_and_degree():
    topology = build_topology("ring", 6)
    assert topology.neighbours(0) == [1, 5]
    assert topology.degree(3) == 2
    star = build_topology("star", 6)
    assert star.neighbours(0) == [1, 2, 3, 4, 5]
    assert star.neighbours(4) == [0]
    assert star.degree(0) == 5


def test_topology_graph_cannot_be_edited():
    topology = build_topology("ring", 4)
    with pytest.raises(nx.NetworkXError):
        topology.graph.add_edge(0, 2)


@pytest.mark.parametrize("n,d", [(10, 4), (16, 3), (20, 6), (8, 2)])
def test_regular_degree_and_reproducible(n, d):
    topology = build_topology("regular", n, degree=d, seed=11)
    assert all(topology.degree(i) == d for i in range(n))
    again = build_topology("regular", n, degree=d, seed=11)
    assert sorted(topology.graph.edges) == sorted(again.graph.edges)


def test_regular_differs_for_most_other_seeds():
    base = sorted(build_topology("regular", 20, degree=4, seed=0).graph.edges)
    others = [
        sorted(build_topology("regular", 20, degree=4, seed=s).graph.edges) for s in range(1, 6)
    ]
    assert sum(edges != base for edges in others) >= 4


def test_smallworld_reproducible():
    a = build_topology("smallworld", 20, degree=4, rewire_p=0.4, seed=5)
    b = build_topology("smallworld", 20, degree=4, rewire_p=0.4, seed=5)
    assert sorted(a.graph.edges) == sorted(b.graph.edges)


def write(tmp_path, text: str) -> str:
    path = tmp_path / "graph.txt"
    path.write_text(text)
    return str(path)


def test_file_parses_both_directions_comments_and_blank_lines(tmp_path):
    path = write(
        tmp_path, "# a 4-node ring\n\n4\n0 1\n1 0\n# back edges too\n1 2\n2 1\n\n2 3\n3 0\n0 3\n"
    )
    topology = build_topology("file", 4, path=path)
    assert sorted(topology.graph.edges) == [(0, 1), (0, 3), (1, 2), (2, 3)]
    assert topology.neighbours(0) == [1, 3]
    np.testing.assert_array_equal(mh_matrix(topology), mh_matrix(build_topology("ring", 4)))


def test_file_with_leading_whitespace_and_tabs(tmp_path):
    path = write(tmp_path, "  3\n0\t1\n 1   2 \n")
    assert sorted(build_topology("file", 3, path=path).graph.edges) == [(0, 1), (1, 2)]


def assert_config_error(match: str, *args, **kwargs) -> str:
    with pytest.raises(ConfigError, match=match) as caught:
        build_topology(*args, **kwargs)
    return str(caught.value)


def test_unknown_kind_lists_valid_ones():
    message = assert_config_error("topology.kind", "torus", 4)
    assert "'torus'" in message
    for kind in ("regular", "ring", "smallworld", "full", "star", "file"):
        assert kind in message


@pytest.mark.parametrize("n", [0, 1])
def test_too_few_nodes(n):
    assert_config_error(r"nodes is %d" % n, "ring", n)


@pytest.mark.parametrize("n,d", [(5, 3), (4, 4), (4, 6), (6, 0)])
def test_regular_impossible_degree(n, d):
    message = assert_config_error("topology.degree", "regular", n, degree=d)
    assert f"nodes={n}" in message


def test_regular_never_connected():
    # a 1-regular graph on 4 nodes is always two separate edges
    message = assert_config_error("topology.degree", "regular", 4, degree=1)
    assert "disconnected" in message


@pytest.mark.parametrize("d", [1, 3, 8])
def test_smallworld_bad_degree(d):
    assert_config_error("topology.degree", "smallworld", 8, degree=d)


def test_smallworld_bad_rewire_p():
    assert_config_error("topology.rewire_p", "smallworld", 8, degree=4, rewire_p=1.5)


def test_file_path_not_set():
    assert_config_error("topology.path", "file", 4)


def test_file_missing(tmp_path):
    missing = str(tmp_path / "nope.txt")
    message = assert_config_error("topology.path", "file", 4, path=missing)
    assert missing in message


def test_file_not_text(tmp_path):
    path = tmp_path / "graph.bin"
    path.write_bytes(b"\xff\xfe\x00\x81")
    message = assert_config_error("topology.path", "file", 4, path=str(path))
    assert str(path) in message


@pytest.mark.parametrize(
    "text,line",
    [
        ("4\n0 1\n1 x\n", 3),
        ("4\n0 1 2\n", 2),
        ("# header\nfour\n0 1\n", 2),
        ("4 4\n0 1\n", 1),
        ("4\n\n0\n", 3),
    ],
)
def test_file_malformed_line_names_file_and_line(tmp_path, text, line):
    path = write(tmp_path, text)
    message = assert_config_error(f"line {line}", "file", 4, path=path)
    assert path in message and "topology.path" in message


def test_file_empty(tmp_path):
    path = write(tmp_path, "# nothing here\n\n")
    assert_config_error("node count", "file", 4, path=path)


def test_file_node_count_differs_from_world_size(tmp_path):
    path = write(tmp_path, "3\n0 1\n1 2\n")
    message = assert_config_error("declares 3 nodes", "file", 4, path=path)
    assert "4 ranks" in message and "set nodes" in message and path in message


def test_file_self_loop(tmp_path):
    path = write(tmp_path, "3\n0 1\n1 1\n1 2\n")
    message = assert_config_error("self loop", "file", 3, path=path)
    assert "line 3" in message and path in message


@pytest.mark.parametrize("edge", ["0 3", "-1 2", "5 0"])
def test_file_id_out_of_range(tmp_path, edge):
    path = write(tmp_path, f"3\n0 1\n{edge}\n")
    message = assert_config_error(r"outside 0\.\.2", "file", 3, path=path)
    assert "line 3" in message and path in message


def test_file_disconnected_counts_components(tmp_path):
    # edges 0-1 and 2-3, node 4 isolated -> 3 components
    path = write(tmp_path, "5\n0 1\n2 3\n")
    message = assert_config_error("3 disconnected components", "file", 5, path=path)
    assert "topology.path" in message and path in message


@pytest.mark.parametrize("n", (5, 8, 16, 96))
def test_spectral_gap_of_ring_and_full_graph_by_hand(n):
    """Ring: every MH weight is 1/3, so W's eigenvalues are 1/3 + 2/3 cos(2 pi k / n); full graph: W = J / n."""
    assert spectral_gap(build_topology("ring", n)) == pytest.approx(
        2 / 3 * (1 - np.cos(2 * np.pi / n)), abs=1e-12
    )
    assert spectral_gap(build_topology("full", n)) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("n", (5, 16, 24))
def test_spectral_gap_is_how_much_one_round_shrinks_disagreement_at_worst(n):
    """|lambda_2| is the largest factor by which one round of averaging can shrink a vector's
    distance to its mean: the 2-norm (an SVD, not an eigensolver) of W minus the averaging matrix."""
    for topology in topologies_for(n):
        worst_shrink = np.linalg.norm(
            reference_mh(topology.graph) - np.full((n, n), 1.0 / n), ord=2
        )
        assert spectral_gap(topology) == pytest.approx(1.0 - worst_shrink, abs=1e-10)
