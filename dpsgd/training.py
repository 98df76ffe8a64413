"""Local training: mini-batches from a node's own data, optimizer steps, evaluation.

No DataLoader: with 96 ranks sharing two cores, worker processes and collation cost
more than the model. A node's examples are a few tensors; a batch is an index slice.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from dpsgd.errors import ConfigError

# Evaluation batch sizes: big for cheap MF lookups; small for CNNs, whose activations
# (e.g. 32 x 84 x 84 floats per CelebA image) are multiplied by every rank on the machine.
RATINGS_EVAL_BATCH = 4096
IMAGES_EVAL_BATCH = 64


class BatchStream:
    """Endless mini-batches: shuffled passes over the examples, a fresh shuffle per pass."""

    def __init__(
        self, tensors: tuple[torch.Tensor, ...], batch_size: int, generator: torch.Generator
    ):
        self.tensors = tensors
        self.batch_size = batch_size
        self.generator = generator
        self.num_examples = len(tensors[0])
        self.batches_per_pass = math.ceil(self.num_examples / batch_size)
        self._order = torch.empty(0, dtype=torch.long)
        self._position = 0

    def next_batch(self) -> tuple[torch.Tensor, ...]:
        chosen = self.next_positions()
        if (
            self.tensors[0].device != chosen.device
        ):  # the order is drawn on the CPU generator, the data may be on a GPU
            chosen = chosen.to(self.tensors[0].device, non_blocking=True)
        return tuple(t[chosen] for t in self.tensors)

    def next_positions(self) -> torch.Tensor:
        """Where the next mini-batch's examples are (a CPU tensor): a node group gathers the batches
        of all its nodes at once from these."""
        if self._position >= len(self._order):
            self._order = torch.randperm(self.num_examples, generator=self.generator)
            self._position = 0
        chosen = self._order[self._position : self._position + self.batch_size]
        self._position += self.batch_size
        return chosen

    def state_dict(self) -> dict:
        """Where the stream is: a resumed run draws exactly the batches it would have."""
        return {
            "order": self._order,
            "position": self._position,
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        self._order, self._position = state["order"], state["position"]
        self.generator.set_state(state["generator"])


class Task(Protocol):
    """How a model is trained and judged on one kind of data."""

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor: ...

    def evaluate(self, model: nn.Module, tensors: tuple[torch.Tensor, ...]) -> dict[str, float]: ...

    def no_learning(
        self, train: tuple[torch.Tensor, ...], test: tuple[torch.Tensor, ...]
    ) -> dict[str, float]: ...


@dataclass
class RatingsTask:
    """Rating prediction: half squared error plus (lambda/2)(|x_u|^2 + |y_i|^2); judged by RMSE.

    `evaluate` returns `loss` (RMSE, the study's "test loss" for ratings) and `acc`, the
    share of predictions that, clipped to the scale and rounded to the nearest half
    star, equal the true rating.
    """

    regularization: float
    min_rating: float = 0.5
    max_rating: float = 5.0

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        user, item, rating = batch
        return self.example_losses(
            model(user, item) - rating, model.factor_penalty(user, item)
        ).mean()

    def example_losses(self, error: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
        """Per rating: half the squared error plus half lambda times the factor penalty."""
        return 0.5 * error.pow(2) + 0.5 * self.regularization * penalty

    @torch.no_grad()
    def evaluate(self, model: nn.Module, tensors: tuple[torch.Tensor, ...]) -> dict[str, float]:
        user, item, rating = tensors
        if len(rating) == 0:
            return {"loss": math.nan, "acc": math.nan}
        squared_error, exact = 0.0, 0
        for start in range(0, len(rating), RATINGS_EVAL_BATCH):
            part = slice(start, start + RATINGS_EVAL_BATCH)
            prediction = model(user[part], item[part])
            squared_error += (prediction - rating[part]).pow(2).sum().item()
            snapped = (prediction.clamp(self.min_rating, self.max_rating) * 2).round() / 2
            exact += (snapped == rating[part]).sum().item()
        return {"loss": math.sqrt(squared_error / len(rating)), "acc": exact / len(rating)}

    def no_learning(
        self, train: tuple[torch.Tensor, ...], test: tuple[torch.Tensor, ...]
    ) -> dict[str, float]:
        """What predicting the train mean rating for everything scores on `test`: the line a
        model that learned nothing about users or items sits on (about 1.04 RMSE on MovieLens)."""
        mean, rating = train[2].double().mean(), test[2].double()
        snapped = (mean.clamp(self.min_rating, self.max_rating) * 2).round() / 2
        return {
            "loss": (rating - mean).pow(2).mean().sqrt().item(),
            "acc": (rating == snapped).double().mean().item(),
        }


@dataclass
class ClassificationTask:
    """Image classification: cross-entropy; judged by mean cross-entropy (`loss`) and accuracy (`acc`)."""

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        images, labels = batch
        return nn.functional.cross_entropy(model(images), labels)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, tensors: tuple[torch.Tensor, ...]) -> dict[str, float]:
        images, labels = tensors
        if len(labels) == 0:
            return {"loss": math.nan, "acc": math.nan}
        total_loss, correct = 0.0, 0
        for start in range(0, len(labels), IMAGES_EVAL_BATCH):
            part = slice(start, start + IMAGES_EVAL_BATCH)
            logits = model(images[part])
            total_loss += nn.functional.cross_entropy(logits, labels[part], reduction="sum").item()
            correct += (logits.argmax(dim=1) == labels[part]).sum().item()
        return {"loss": total_loss / len(labels), "acc": correct / len(labels)}

    def no_learning(
        self, train: tuple[torch.Tensor, ...], test: tuple[torch.Tensor, ...]
    ) -> dict[str, float]:
        """What always answering the train set's most common class scores on `test` (and the
        cross-entropy of predicting the train class frequencies): a stricter line than chance."""
        num_classes = int(max(train[1].max(), test[1].max())) + 1
        frequency = torch.bincount(train[1], minlength=num_classes).double() / len(train[1])
        labels = test[1]
        cross_entropy = -frequency.clamp_min(1e-12).log()[labels].mean().item()
        return {"loss": cross_entropy, "acc": (labels == frequency.argmax()).double().mean().item()}


OPTIMIZERS = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}


def optimizers_without_compiler() -> None:
    """Let torch.optim run eagerly without importing torch._dynamo, which doubles start-up.

    Called by the composition root (train.py) before ranks fork, never at import: a notebook or
    benchmark that imports dpsgd and uses torch.compile keeps optimizers as torch made them.

    Optimizer methods (__init__ through add_param_group, zero_grad, state_dict) are wrapped
    so that torch.compile skips them; the wrapper imports torch._dynamo (sympy, FSDP: about
    2 s of CPU, as long as `import torch` itself) on its first call to build the skipping
    version, then caches it on the wrapped function. dpsgd never compiles, and outside
    compilation that version does exactly what the function does, so the function is
    cached as its own. A torch whose wrapper looks different is left alone (it stays correct,
    only slower to start).
    """
    compile_module = getattr(torch, "_compile", None)
    for value in vars(torch.optim.Optimizer).values():
        code = getattr(value, "__code__", None)
        wrapped = getattr(value, "__wrapped__", None)
        if (
            code is not None
            and wrapped is not None
            and code.co_name == "inner"
            and code.co_filename == getattr(compile_module, "__file__", None)
        ):
            setattr(wrapped, "__dynamo_disable", wrapped)


def check_optimizer(name: str, lr: float) -> None:
    """Reject an unknown optimizer or a bad learning rate (without building anything)."""
    if name not in OPTIMIZERS:
        raise ConfigError(
            f"optimizer.name={name!r} is not known. Choose one of "
            f"{sorted(OPTIMIZERS)} (for example `optimizer=sgd`)."
        )
    if not lr >= 0:
        raise ConfigError(
            f"optimizer.lr={lr} must be a non-negative number, e.g. `optimizer.lr=0.1`."
        )


# Adam's update touches every coordinate on every step (the dense moments decay even where the
# gradient is zero), so on the 217,015-parameter MF it dominates a step; the fused CPU kernel
# does the same arithmetic in one pass, about 2x faster per step (MovieLens (2) runs ~460 a round).
FUSED_BY_DEFAULT = ("adam", "adamw")


def build_optimizer(name: str, parameters, lr: float, **options) -> torch.optim.Optimizer:
    """The optimizer named in `optimizer.name`; extra keys (momentum, weight_decay) pass through."""
    check_optimizer(name, lr)
    if name in FUSED_BY_DEFAULT:
        options.setdefault("fused", True)
    return OPTIMIZERS[name](parameters, lr=lr, **options)


class Trainer:
    """One node's local training; the optimizer (and its state) lives across rounds."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        task: Task,
        batches: BatchStream,
        local_steps: int,
        full_epochs: bool = False,
    ):
        self.model = model
        self.optimizer = optimizer
        self.task = task
        self.batches = batches
        self.steps_per_round = (
            local_steps * batches.batches_per_pass if full_epochs else local_steps
        )

    def train_round(self) -> float:
        """Run this round's optimizer steps; return the mean mini-batch loss."""
        self.model.train()
        total = 0.0
        for _ in range(self.steps_per_round):
            batch = self.batches.next_batch()
            self.optimizer.zero_grad(set_to_none=True)
            loss = self.task.loss(self.model, batch)
            loss.backward()
            self.optimizer.step()
            total += loss.item()
        return total / max(1, self.steps_per_round)

    def evaluate(self, tensors: tuple[torch.Tensor, ...]) -> dict[str, float]:
        self.model.eval()
        return self.task.evaluate(self.model, tensors)
