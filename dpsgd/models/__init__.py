"""Models, and the flat view of their parameters that sharing puts on the wire."""

from __future__ import annotations

import torch
from torch import nn

from dpsgd.errors import ConfigError
from dpsgd.models.cnn import CelebaCNN, FemnistCNN
from dpsgd.models.mf import MatrixFactorization
from dpsgd.seeding import stream_key, torch_generator

MODELS = ("mf", "femnist_cnn", "celeba_cnn")


def build_model(name: str, dims: dict, seed: int, embedding_dim: int = 20, initial_offset: float = 0.0,
                input_scale: float = 1.0) -> nn.Module:
    """The model named by `model.name`, initialised identically on every node from the run seed.

    `dims` says what the data set needs (users and items, or classes). torch's layers
    draw their initial weights from the global generator, so it is seeded for the
    construction only, inside fork_rng, and left as it was afterwards. `initial_offset`
    (matrix factorization only) is where the global offset mu starts: the node's train mean;
    `input_scale` (CNNs only) is the value a white pixel becomes (`dpsgd.models.cnn`).
    """
    if name == "mf":
        return MatrixFactorization(dims["num_users"], dims["num_items"], embedding_dim,
                                   generator=torch_generator(seed, "model_init"), initial_offset=initial_offset)
    if name not in MODELS:
        raise ConfigError(f"model.name={name!r} is not known; choose one of {list(MODELS)} "
                          "(each data set picks its model by default, e.g. `dataset=femnist`).")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(stream_key(seed, "model_init"))
        cls = FemnistCNN if name == "femnist_cnn" else CelebaCNN
        return cls(num_classes=dims["num_classes"], input_scale=input_scale)
