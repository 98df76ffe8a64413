"""A whole group's matrix factorizations trained at once: one gradient computation for every node.

A MovieLens step of one node is 8 ratings against a 217,015-parameter model: alone,
autograd builds a dense gradient (two full-size zero tensors per factor matrix) for 8
users and 8 items. The group instead gathers the touched rows of every node's model,
takes the gradient of exactly the per-node loss (`RatingsTask.example_losses` of
`mf.predict`) on those rows, and puts it back, accumulating repeated users or items as
the dense gradient does:

- plain SGD (no momentum, no weight decay): the coordinates outside the batch do not
  move, so `-lr * gradient` is scattered into the touched rows and nothing else runs;
- any other optimizer (Adam, AdamW, SGD with momentum: all act coordinate by
  coordinate) needs the whole gradient, zeros included (Adam's moments decay
  everywhere): the gradient is scattered into a dense per-node buffer, and the node's own
  optimizer, built from the same config over its flat row, steps on it. Coordinate by
  coordinate that is the update the node makes alone, in about half the time.

Each node's batches come from its own stream (the group gathers them all at once from the
positions the streams draw); a node whose batch is short (the end of a pass) steps with
the other short ones.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Callable

import torch

from dpsgd.models.flat import Slot
from dpsgd.models.mf import factor_penalty, predict
from dpsgd.training import RatingsTask, Trainer

MF_SLOTS = ("user_factors", "item_factors", "user_bias", "item_bias", "offset")


# Optimizers that update each coordinate from its own gradient and state only: a flat row
# stepped by one of them moves exactly as the node's separate parameters would.
COORDINATEWISE_OPTIMIZERS = ("sgd", "adam", "adamw")


def stacked_applies(model_name: str, optimizer_name: str) -> bool:
    """Matrix factorization with a coordinate-wise optimizer trains stacked; anything else node by node."""
    return model_name == "mf" and optimizer_name in COORDINATEWISE_OPTIMIZERS


def sparse_sgd_applies(optimizer_name: str, options: dict) -> bool:
    """Only plain SGD leaves the untouched coordinates alone."""
    plain = all(
        not options.get(key) for key in ("momentum", "weight_decay", "nesterov", "maximize")
    )
    return optimizer_name == "sgd" and plain


class StackedMFTrainer:
    """Trains every hosted node's MF for one round; each node's batches and step count are its own."""

    def __init__(
        self,
        rows: torch.Tensor,
        layout: list[Slot],
        trainers: list[Trainer],
        task: RatingsTask,
        lr: float,
        make_optimizer: Callable[[list[torch.Tensor]], torch.optim.Optimizer] | None = None,
    ):
        """`make_optimizer(params)`: the config's optimizer over one node's flat row, for every node
        (None: plain SGD with `lr` on the touched rows). Each node's Trainer then holds its row's
        optimizer, so checkpoints save and restore its state as they do alone."""
        self.trainers = trainers
        self.task = task
        self.lr = lr
        self.slots = {slot.name: slot for slot in layout}
        streams = [
            trainer.batches for trainer in trainers
        ]  # every node's (user, item, rating), end to end
        self.examples = tuple(
            torch.cat([stream.tensors[k] for stream in streams]) for k in range(3)
        )
        sizes = torch.tensor([0] + [stream.num_examples for stream in streams[:-1]])
        self.first_example = torch.cumsum(sizes, 0)  # where node g's examples start in `examples`
        for stream, start in zip(
            streams, self.first_example.tolist()
        ):  # streams and group read the same tensors
            stream.tensors = tuple(
                examples[start : start + stream.num_examples] for examples in self.examples
            )
        self.row_params: list[torch.nn.Parameter] = []
        if make_optimizer is not None:
            self.gradients = torch.zeros_like(rows)
            self._zero = torch.zeros(
                (), device=rows.device
            )  # written back where a step's gradient was
            self.row_params = [torch.nn.Parameter(row, requires_grad=False) for row in rows]
            for trainer, param, gradient in zip(trainers, self.row_params, self.gradients):
                param.grad = gradient
                trainer.optimizer = make_optimizer([param])
            self.gradient_views = self._slot_views(
                self.gradients
            )  # the buffers never move: viewed once
        self.rebind(rows)

    def rebind(self, rows: torch.Tensor) -> None:
        """Work on `rows` from now on (a node group swaps its rows after averaging)."""
        self.views = self._slot_views(rows)
        for param, row in zip(self.row_params, rows):
            param.data = row  # the same Parameter object: its optimizer state stays keyed to it

    def _slot_views(self, stacked: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each MF parameter of every node as a [group, *shape] view into a [group, P] tensor."""
        return {
            name: stacked[
                :, self.slots[name].offset : self.slots[name].offset + self.slots[name].numel
            ].view(stacked.shape[0], *self.slots[name].shape)
            for name in MF_SLOTS
        }

    def train_round(self, only: list[int] | None = None) -> list[float]:
        """Every node's steps for this round (or only the group positions `only`, e.g. RWM's nodes
        that received a model); return each one's mean mini-batch loss."""
        positions = list(range(len(self.trainers))) if only is None else list(only)
        steps = {g: self.trainers[g].steps_per_round for g in positions}
        totals = torch.zeros(len(self.trainers), dtype=torch.float64)
        for step in range(max(steps.values(), default=0)):
            by_length = defaultdict(list)
            for node in positions:
                if step < steps[node]:
                    chosen = self.trainers[node].batches.next_positions()
                    by_length[len(chosen)].append((node, chosen))
            for members in by_length.values():
                nodes = torch.tensor([node for node, _ in members])
                where = (
                    torch.stack([chosen for _, chosen in members]) + self.first_example[nodes, None]
                )
                where = where.to(self.examples[0].device)
                batch = [examples[where] for examples in self.examples]  # [nodes, batch] each
                totals[nodes] += self._step(nodes.to(where.device), *batch).double().cpu()
        return [totals[g].item() / max(1, steps[g]) for g in positions]

    def _step(
        self, nodes: torch.Tensor, user: torch.Tensor, item: torch.Tensor, rating: torch.Tensor
    ) -> torch.Tensor:
        """One SGD step of the given nodes on their [nodes, batch] ratings; return each node's loss."""
        views = self.views
        owner = nodes[:, None].expand_as(user)
        touched = {
            "user_factors": (owner, user),
            "item_factors": (owner, item),
            "user_bias": (owner, user),
            "item_bias": (owner, item),
            "offset": (nodes,),
        }
        leaves = {name: views[name][where].requires_grad_() for name, where in touched.items()}
        x, y = leaves["user_factors"], leaves["item_factors"]
        error = (
            predict(x, y, leaves["user_bias"], leaves["item_bias"], leaves["offset"][:, None])
            - rating
        )
        losses = self.task.example_losses(error, factor_penalty(x, y)).mean(dim=1)
        losses.sum().backward()  # nodes do not share leaves: each gets its own loss's gradient
        with torch.no_grad():
            if not self.row_params:
                for name, where in touched.items():
                    views[name].index_put_(where, leaves[name].grad.mul_(-self.lr), accumulate=True)
            else:
                self._optimizer_steps(nodes, touched, leaves)
        return losses.detach()

    def _optimizer_steps(self, nodes: torch.Tensor, touched: dict, leaves: dict) -> None:
        """The touched rows' gradients into the nodes' dense gradient buffers, one optimizer step
        per node, then the buffers zeroed where they were written (zero elsewhere all along)."""
        for name, where in touched.items():
            self.gradient_views[name].index_put_(where, leaves[name].grad, accumulate=True)
        for g in nodes.tolist():
            self.trainers[g].optimizer.step()
        for name, where in touched.items():
            self.gradient_views[name].index_put_(where, self._zero)
