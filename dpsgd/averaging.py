"""Merging received parameters into one's own: pure functions on flat tensors.

Kept free of ranks and messages so the maths can be checked against a float64
reference in a single process.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Contribution:
    """A neighbour's values with its averaging weight; `index` None means every coordinate."""

    weight: float
    values: torch.Tensor
    index: torch.Tensor | None = None


def merge_fill_own(flat: torch.Tensor, contributions: list[Contribution]) -> None:
    """Metropolis-Hastings averaging in place, a missing coordinate taking the receiver's value.

    x_new[c] = x[c] + sum_j w_j (v_j[c] - x[c]) over the neighbours j that sent c, which
    is w_ii x + sum_j w_ij x_j when every neighbour sent everything: the weight of a
    coordinate a neighbour did not send stays with the receiver.
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
