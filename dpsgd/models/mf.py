"""Biased matrix factorization for rating prediction (the MovieLens model of the study)."""

from __future__ import annotations

import torch
from torch import nn

INIT_STD = 0.1


def predict(
    x_u: torch.Tensor, y_i: torch.Tensor, b_u: torch.Tensor, c_i: torch.Tensor, mu: torch.Tensor
) -> torch.Tensor:
    """mu + <x_u, y_i> + b_u + c_i from the rows a batch touches (also used by node groups,
    which gather those rows from many nodes' models at once)."""
    return mu + (x_u * y_i).sum(dim=-1) + b_u + c_i


def factor_penalty(x_u: torch.Tensor, y_i: torch.Tensor) -> torch.Tensor:
    """|x_u|^2 + |y_i|^2 per example: the mini-batch share of (|X|^2 + |Y|^2)."""
    return x_u.pow(2).sum(dim=-1) + y_i.pow(2).sum(dim=-1)


class MatrixFactorization(nn.Module):
    """prediction(u, i) = mu + <x_u, y_i> + b_u + c_i over every user and item of the data set.

    Each node holds the whole model although it only rates its own users: that is the
    decentralized setting of the study, where item factors are what nodes learn together.
    The global offset mu is a learned parameter like any other (shared and averaged), and
    starts from `initial_offset`, the node's own train mean: without it predictions start
    near 0 on a 0.5..5 scale and averaging, which dilutes every user's own parameters each
    round, makes D-PSGD spend hundreds of rounds learning the mean rating.
    """

    def __init__(
        self,
        num_users: int,
        num_items: int,
        embedding_dim: int,
        generator: torch.Generator,
        initial_offset: float = 0.0,
    ):
        super().__init__()
        self.user_factors = nn.Parameter(
            torch.randn(num_users, embedding_dim, generator=generator) * INIT_STD
        )
        self.item_factors = nn.Parameter(
            torch.randn(num_items, embedding_dim, generator=generator) * INIT_STD
        )
        self.user_bias = nn.Parameter(torch.zeros(num_users))
        self.item_bias = nn.Parameter(torch.zeros(num_items))
        self.offset = nn.Parameter(
            torch.tensor(float(initial_offset))
        )  # last: one coordinate at the end

    def forward(self, user: torch.Tensor, item: torch.Tensor) -> torch.Tensor:
        return predict(
            self.user_factors[user],
            self.item_factors[item],
            self.user_bias[user],
            self.item_bias[item],
            self.offset,
        )

    def factor_penalty(self, user: torch.Tensor, item: torch.Tensor) -> torch.Tensor:
        return factor_penalty(self.user_factors[user], self.item_factors[item])
