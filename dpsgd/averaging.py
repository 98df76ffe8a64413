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

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class Contribution:
    """A neighbour's values with its MH weight and degree; `index` None means every coordinate."""

    weight: float
    values: torch.Tensor
    index: torch.Tensor | None = None
    degree: int = 1


def merge_fill_own(flat: torch.Tensor, self_weight: float, contributions: list[Contribution],
                   own_index: torch.Tensor | None = None) -> None:
    """x_new[c] = x[c] + sum_j w_j (v_j[c] - x[c]) over the neighbours j that sent c.

    That is w_ii x + sum_j w_ij x_j when every neighbour sent everything. `self_weight`
    and `own_index` are implied by the rule and accepted for a common signature.
    """
    partial_updates = [(c.index, c.weight * (c.values - flat[c.index]))
                       for c in contributions if c.index is not None]
    full = [c for c in contributions if c.index is None]
    if full:
        flat.mul_(1.0 - sum(c.weight for c in full))
        for contribution in full:
            flat.add_(contribution.values, alpha=contribution.weight)
    for index, update in partial_updates:
        flat.index_add_(0, index, update)


def average_full_into(out: torch.Tensor, flat: torch.Tensor, self_weight: float,
                      contributions: list[Contribution]) -> None:
    """out = self_weight * flat + sum_j w_j v_j: Metropolis-Hastings averaging of whole models,
    written to another buffer so that the inputs (a node group's rows) stay as they were
    while the group's other nodes read them."""
    torch.mul(flat, self_weight, out=out)
    for contribution in contributions:
        out.add_(contribution.values, alpha=contribution.weight)


def merge_renormalize(flat: torch.Tensor, self_weight: float, contributions: list[Contribution],
                      own_index: torch.Tensor | None = None) -> None:
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
    own = torch.ones_like(flat, dtype=torch.bool) if own_index is None else torch.zeros_like(flat, dtype=torch.bool)
    if own_index is not None:
        own[own_index] = True
    with_self = (self_weight * flat + mh_sum) / (self_weight + mh_weight)
    neighbours_only = inverse_degree_sum / inverse_degree_weight.clamp_min(1e-30)
    merged = torch.where(own, with_self, torch.where(inverse_degree_weight > 0, neighbours_only, flat))
    flat.copy_(merged)


def merge_by_age(flat: torch.Tensor, own_age: int, received_age: int, values: torch.Tensor,
                 index: torch.Tensor | None = None) -> None:
    """RWM: x <- (a_own x + a_recv x_recv) / (a_own + a_recv), on the received coordinates only."""
    total = own_age + received_age
    received_weight = received_age / total if total > 0 else 0.5
    if index is None:
        flat.mul_(1.0 - received_weight).add_(values, alpha=received_weight)
    else:
        flat[index] = flat[index] * (1.0 - received_weight) + values * received_weight


MergeRule = Callable[[torch.Tensor, float, list[Contribution], torch.Tensor | None], None]
MERGE_RULES: dict[str, MergeRule] = {"fill_own": merge_fill_own, "renormalize": merge_renormalize}
