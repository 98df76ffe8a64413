"""Models, by name (`MODELS`) or of the user's own (`model._target_`), and the flat view of their parameters that
sharing puts on the wire (`dpsgd.models.flat`)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from dpsgd.models.cnn import CelebaCNN, FemnistCNN
from dpsgd.models.mf import MatrixFactorization
from dpsgd.seeding import stream_key, torch_generator
from dpsgd.settings import builder_for, call_target

# Each model of dpsgd's own, by `model.name`: builder(dims, seed, **its keys) -> nn.Module, where `dims` is the
# data set's (`Dataset.dims`). A `model._target_` of the user's own is called the same way and returns an nn.Module
# with parameters: called as model(images) -> logits on classification data; on ratings data as model(user, item)
# -> predictions, with model.factor_penalty(user, item) the per-rating term `model.regularization` weighs.
MODELS: dict[str, Callable[..., nn.Module]] = {
    "mf": lambda dims, seed, embedding_dim=20, initial_offset=0.0: MatrixFactorization(
        dims["num_users"],
        dims["num_items"],
        embedding_dim,
        generator=torch_generator(seed, "model_init"),
        initial_offset=initial_offset,
    ),
    "femnist_cnn": lambda dims, seed, input_scale=1.0: FemnistCNN(
        dims["num_classes"], input_scale=input_scale
    ),
    "celeba_cnn": lambda dims, seed, input_scale=1.0: CelebaCNN(
        dims["num_classes"], input_scale=input_scale
    ),
}


def model_builder(name: str | None, target: str | None = None) -> Callable[..., nn.Module]:
    """MODELS[name], or the callable `model._target_` names (`dpsgd.settings.builder_for`)."""
    return builder_for(
        "model",
        MODELS,
        name,
        target,
        " (each data set picks its model by default, e.g. `dataset=femnist`)",
    )


def build_model(name: str, dims: dict, seed: int, **options) -> nn.Module:
    """The model named by `model.name`, or by `model._target_` among `options` (the other model keys: mf's
    `initial_offset` is where mu starts, the node's train mean), initialised identically on every node from the
    run seed: torch's layers draw their initial weights from the global generator, so it is seeded for the
    construction only, inside fork_rng, and left as it was afterwards."""
    target = options.pop("_target_", None)
    builder = model_builder(name, target)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(stream_key(seed, "model_init"))
        if target is None:
            return builder(dims, seed, **options)
        return call_target(
            "model",
            target,
            builder,
            {"dims": dims, "seed": seed},
            options,
            "a torch.nn.Module with parameters",
            lambda made: isinstance(made, nn.Module) and any(True for _ in made.parameters()),
        )
