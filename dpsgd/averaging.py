"""Merging received parameters into one's own: pure functions on flat tensors.

Kept free of ranks and messages so the maths can be checked against a float64
reference in a single process. Two rules for partial messages (SPEC §4):

- `fill_own`: a coordinate a neighbour did not send counts as the receiver's own value,
  then ordinary Metropolis-Hastings averaging runs; the weight of the missing
  coordinate stays with the receiver.
- `renormalize`: per coordinate only the nodes that sent it contribute, their weights
  rescaled to sum to one. The receiver contributes its own value only for coordinates
  it sent itself this round; where it did not, neighbour i weighs 1/d_i, normalised
  over the contributing neighbours (i.e. w_i = 1 / (1 + d_i * sum_{j != i} 1/d_j)).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class Contribution:
    """A neighbour's values with its weight (MH, equal, or by age) and degree; `index` None means every coordinate."""

    weight: float
    values: torch.Tensor
    index: torch.Tensor | None = None
    degree: int = 1
    age: int = 0  # RWM: the training steps the sender's model has seen


def merge_fill_own(
    flat: torch.Tensor,
    self_weight: float,
    contributions: list[Contribution],
    own_index: torch.Tensor | None = None,
) -> None:
    """x_new[c] = x[c] + sum_j w_j (v_j[c] - x[c]) over the neighbours j that sent c.

    That is w_ii x + sum_j w_ij x_j when every neighbour sent everything. `self_weight`
    and `own_index` are implied by the rule and accepted for a common signature.
    """
    partial_updates = []  # every v_j[c] - x[c] read before any is added
    for c in contributions:
        if c.index is not None:
            difference = torch.index_select(flat, 0, c.index)
            partial_updates.append((c, torch.sub(c.values, difference, out=difference)))
    full = [c for c in contributions if c.index is None]
    if full:
        flat.mul_(1.0 - sum(c.weight for c in full))
        for contribution in full:
            flat.add_(contribution.values, alpha=contribution.weight)
    for contribution, difference in partial_updates:
        flat.index_add_(0, contribution.index, difference, alpha=contribution.weight)


MIX_BLOCK_COLUMNS = (
    16_384  # a block of every row of a group (96 x 64 KB) stays in cache while its readers use it
)


def mix_rows_into(
    out: torch.Tensor, rows: torch.Tensor, weights: list[tuple[int, int, float]]
) -> None:
    """out = W rows for the sparse mixing matrix W given as (out row, input row, weight) entries:
    Metropolis-Hastings averaging of the whole models of a node group, out of place so that the
    rows stay as they were while every node reads its neighbours' rows.

    On a CPU one sparse product per block of columns reads each row once per block for all the
    nodes that weigh it; averaging node after node streams each neighbour's whole row from memory
    again for every reader, about 3x slower for 96 MovieLens models. Other devices (their kernels
    are not memory-bound the same way) average row after row.
    """
    if rows.device.type != "cpu":
        _mix_row_by_row(out, rows, weights)
        return
    targets, sources, values = zip(*weights)
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message="Sparse CSR tensor support is in beta"
        )  # addmm's CSR path is stable
        mixing = torch.sparse_coo_tensor(
            torch.tensor([targets, sources]),
            torch.tensor(values, dtype=rows.dtype),
            (out.shape[0], rows.shape[0]),
            check_invariants=True,
        )
        mixing = mixing.coalesce().to_sparse_csr()
    for start in range(0, rows.shape[1], MIX_BLOCK_COLUMNS):
        block = slice(
            start, start + MIX_BLOCK_COLUMNS
        )  # beta=0: out's old values are never read (tested with NaN)
        torch.addmm(out[:, block], mixing, rows[:, block], beta=0, out=out[:, block])


def _mix_row_by_row(
    out: torch.Tensor, rows: torch.Tensor, weights: list[tuple[int, int, float]]
) -> None:
    """The same product one weighted row at a time: a GPU runs each as one kernel over a whole row."""
    started: set[int] = set()
    for target, source, weight in weights:
        if target in started:
            out[target].add_(rows[source], alpha=weight)
        else:
            torch.mul(rows[source], weight, out=out[target])
            started.add(target)


def merge_renormalize(
    flat: torch.Tensor,
    self_weight: float,
    contributions: list[Contribution],
    own_index: torch.Tensor | None = None,
) -> None:
    """Per coordinate, a weighted mean over the nodes that have a value for it (see module doc)."""
    mh_sum = torch.zeros_like(flat)
    mh_weight = torch.zeros_like(flat)
    inverse_degree_sum = torch.zeros_like(flat)
    inverse_degree_weight = torch.zeros_like(flat)
    for c in contributions:
        index = c.index if c.index is not None else torch.arange(flat.numel())
        mh_sum.index_add_(0, index, c.values * c.weight)
        mh_weight.index_add_(0, index, torch.full_like(c.values, c.weight))
        inverse_degree_sum.index_add_(0, index, c.values / c.degree)
        inverse_degree_weight.index_add_(0, index, torch.full_like(c.values, 1.0 / c.degree))
    own = (
        torch.ones_like(flat, dtype=torch.bool)
        if own_index is None
        else torch.zeros_like(flat, dtype=torch.bool)
    )
    if own_index is not None:
        own[own_index] = True
    with_self = (self_weight * flat + mh_sum) / (self_weight + mh_weight)
    neighbours_only = inverse_degree_sum / inverse_degree_weight.clamp_min(1e-30)
    merged = torch.where(
        own, with_self, torch.where(inverse_degree_weight > 0, neighbours_only, flat)
    )
    flat.copy_(merged)


def age_weights(own_age: int, received_age: int) -> tuple[float, float]:
    """RWM's weights: each model weighs by the training steps it has seen (equal when neither has)."""
    total = own_age + received_age
    received = received_age / total if total > 0 else 0.5
    return 1.0 - received, received


def merge_by_age(
    flat: torch.Tensor,
    own_age: int,
    received_age: int,
    values: torch.Tensor,
    index: torch.Tensor | None = None,
) -> None:
    """RWM's age-weighted merge, x <- (a_own x + a_recv x_recv) / (a_own + a_recv) on the received
    coordinates: `fill_own` with the weights the ages give."""
    own, received = age_weights(own_age, received_age)
    merge_fill_own(flat, own, [Contribution(received, values, index, age=received_age)])


MergeRule = Callable[[torch.Tensor, float, list[Contribution], torch.Tensor | None], None]
# `sharing.merge`: how a node combines its own vector with what it received, in every pattern and grouping.
# A rule gets the node's vector, its own weight, each sender's Contribution (weight, values, index,
# degree, and for RWM the sender's age) and the coordinates it sent itself; it changes the vector in place.
MERGE_RULES: dict[str, MergeRule] = {}
# Rules that need what only synchronous averaging has (every neighbour's degree, one's own message).
AVERAGING_ONLY: set[str] = set()


def merge_rule(name: str, averaging_only: bool = False) -> Callable[[MergeRule], MergeRule]:
    """Register a merge rule under `name` (then `sharing.merge=<name>` chooses it)."""

    def register(rule: MergeRule) -> MergeRule:
        MERGE_RULES[name] = rule
        if averaging_only:
            AVERAGING_ONLY.add(name)
        return rule

    return register


merge_rule("fill_own")(merge_fill_own)
merge_rule("renormalize", averaging_only=True)(merge_renormalize)
