"""Hybrid: random walks first (few bytes per round), then D-PSGD on the same graph, in one run.

The study's open question: RWM reaches a given accuracy with far fewer bytes, D-PSGD gets
further per round. Here the walk (`dpsgd.algorithms.rwm`) runs until the first node completes
`algorithm.switch_round` rounds or has sent `algorithm.byte_budget` bytes; as in any RWM run,
its END messages then stop every other node wherever it is. The nodes agree on the switch
round S, the most rounds any node walked (an all-reduce of one number: after the walk every
node is idle, so this wait is short), and all continue with synchronous D-PSGD from round
S + 1 to `rounds`. A node that walked fewer than S rounds has no records between its last
walked round and S; the aggregator is told it skipped them. Each node evaluates the round its
walk stopped after (`dpsgd.algorithms.stopping`), so the walk's end is measured on every node
even when no evaluation was due there. Every record says its `phase`.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.distributed as dist

from dpsgd.algorithms.dpsgd import run_dpsgd
from dpsgd.algorithms.peers import RoundPeers
from dpsgd.algorithms.rwm import run_rwm
from dpsgd.divergence import DivergenceWatch
from dpsgd.errors import ConfigError, NodeFailure
from dpsgd.node import Node
from dpsgd.node_group import NodeGroup
from dpsgd.run_outputs import RESUME_AGGREGATED_KEY, SWITCH_KEY, publish_skipped
from dpsgd.transport.rounds import RoundTransport

WALK, AVERAGE = "rwm", "dpsgd"  # the `phase` of a record
SWITCHED = "switched_after"  # what a checkpoint after the switch keeps: the switch round


def run_hybrid(
    group: NodeGroup,
    rounds: int,
    start_round: int = 0,
    state: dict | None = None,
    *,
    switch_round: int | None,
    byte_budget: int | None,
    every: int,
    peers: RoundPeers,
    averaging: RoundTransport,
) -> dict[int, int]:
    """The walk, the agreed switch, then D-PSGD over `averaging` (it takes over the byte counts).

    A run resumed after the switch goes straight on with D-PSGD (its checkpoints keep the switch
    round); one resumed before it walks afresh from the saved models, as RWM does.
    """
    first = group.nodes[0]
    switch = ((state or {}).get(first.rank) or {}).get(SWITCHED)
    for node in group.nodes:
        node.phase = WALK
    if switch is None:
        with _stopping_at_once(first.divergence):
            walked = run_rwm(
                group,
                _walk_rounds(rounds, switch_round),
                start_round,
                state,
                every=every,
                byte_budget=byte_budget,
            )
        switch = _after_walk(group.nodes, walked, rounds)
        if switch is None:
            return walked
    else:
        _resumed_after(switch, group.nodes)
    averaging.ports = group.transport.ports  # each node's byte counters go on from the walk's
    group.transport = averaging
    for node in group.nodes:
        node.phase = AVERAGE
    return run_dpsgd(group, rounds, max(switch, start_round), peers=peers, keep={SWITCHED: switch})


def check_hybrid(options: dict, nodes: int, rounds: int) -> None:
    """The walk needs a switch condition, and a switch round must leave rounds for D-PSGD."""
    switch_round, byte_budget = options["switch_round"], options["byte_budget"]
    if switch_round is None and byte_budget is None:
        raise ConfigError(
            "algorithm=hybrid walks until a switch condition, but neither algorithm.switch_round "
            "nor algorithm.byte_budget is set; set one, e.g. `algorithm.switch_round=100`."
        )
    if switch_round is not None and switch_round >= rounds:
        raise ConfigError(
            f"algorithm.switch_round={switch_round} with rounds={rounds} leaves no round for "
            f"D-PSGD; set it below rounds, e.g. `algorithm.switch_round={rounds // 5 or 1}`, "
            "or use `algorithm=rwm`."
        )


def _after_walk(nodes: list[Node], walked: dict[int, int], rounds: int) -> int | None:
    """The agreed switch round, once this rank's nodes have walked (`walked`: rounds per node), with
    the rounds each skipped said to the aggregator; None when no averaging follows (the walk used
    every round, or training diverged)."""
    first = nodes[0]
    switch = agree_on_switch(max(walked.values()), first.recorder.store)
    for node in nodes:
        _skip(node, range(walked[node.rank] + 1, switch + 1))
    if switch >= rounds or first.divergence is not None and first.divergence.must_stop(switch):
        return None
    return switch


def _walk_rounds(rounds: int, switch_round: int | None) -> int:
    return rounds if switch_round is None else min(switch_round, rounds)


def agree_on_switch(walked: int, store: dist.Store) -> int:
    """The most rounds any node walked: every rank's D-PSGD starts after it (bounded by comm.timeout_s)."""
    most = torch.tensor([walked], dtype=torch.int64)
    try:
        dist.all_reduce(most, op=dist.ReduceOp.MAX)
    except Exception as error:  # noqa: BLE001 - gloo raises RuntimeError subclasses
        raise NodeFailure(
            f"rank {dist.get_rank()} stops: not every rank reached the switch from RWM to D-PSGD "
            f"({error})"
        ) from None
    switch = int(most.item())
    _announce(switch, store)
    return switch


def _announce(switch: int, store: dist.Store) -> None:
    """summary.json's `switch_round` (rank 0 tells its aggregator)."""
    if dist.get_rank() == 0:
        store.set(SWITCH_KEY, str(switch))


def _skip(node: Node, rounds) -> None:
    """Tell the aggregator which evaluated rounds among `rounds` this node never ran (it walked fewer
    rounds than the switch)."""
    for round_number in rounds:
        if node.schedule.due(round_number):
            publish_skipped(node.recorder.store, node.rank, round_number)


def _resumed_after(switch: int, nodes: list[Node]) -> None:
    """A run resumed after the switch: summary.json's switch round again, and the walk's skipped rounds
    that rank 0 had not aggregated yet said again (the JSONL holds only the rounds a node ran)."""
    _announce(switch, nodes[0].recorder.store)
    skip_unaggregated(nodes, switch)


def skip_unaggregated(nodes: list[Node], switch: int) -> None:
    """The skipped rounds up to the switch that rank 0 had not aggregated when the run stopped."""
    aggregated = int(nodes[0].recorder.store.get(RESUME_AGGREGATED_KEY))
    for node in nodes:
        logged = {record["round"] for record in node.recorder.log.kept_records}
        _skip(node, [r for r in range(aggregated + 1, switch + 1) if r not in logged])


@contextmanager
def _stopping_at_once(watch: DivergenceWatch | None):
    """While walking, a divergence stops the walk at once, as in RWM (its END messages stop everyone);
    the averaging phase needs the drift margin of synchronous rounds again."""
    if watch is None:
        yield
        return
    margin, watch.stop_margin = watch.stop_margin, None
    try:
        yield
    finally:
        watch.stop_margin = margin
