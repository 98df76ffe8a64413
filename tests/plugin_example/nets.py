"""A model of a user's own: dpsgd calls TinyMLP(dims, seed, **model keys) and trains what it returns."""

from torch import nn


class TinyMLP(nn.Sequential):
    """Features -> `hidden` units -> one logit per class; `dims` is what the data set says it holds."""

    def __init__(self, dims: dict, seed: int, hidden: int = 16):
        super().__init__(
            nn.Linear(dims["num_features"], hidden),
            nn.ReLU(),
            nn.Linear(hidden, dims["num_classes"]),
        )
