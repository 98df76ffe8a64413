"""One flat float32 vector that *is* the model's parameters.

Every parameter (and floating-point buffer) becomes a view into a single contiguous
tensor, in a fixed order. Sending the full model is then sending that tensor with no
copy, and averaging writes into it in place; the optimizer keeps working on the same
parameter objects because only their storage moved.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


def _state_tensors(model: nn.Module) -> list[torch.Tensor]:
    """Parameters, then floating-point buffers, in the module's own deterministic order."""
    tensors = [p for _, p in model.named_parameters()]
    tensors += [b for _, b in model.named_buffers() if b.is_floating_point()]
    return tensors


def flatten_model(model: nn.Module) -> torch.Tensor:
    """Move the model's state into one flat float32 vector and return that vector."""
    flat = torch.empty(num_parameters(model), dtype=torch.float32)
    bind_model_to(model, flat)
    return flat


def bind_model_to(model: nn.Module, flat: torch.Tensor) -> None:
    """Copy the model's state into `flat` (e.g. one row of a node group's tensor) and make
    every parameter and float buffer a view into it."""
    offset = 0
    for tensor in _state_tensors(model):
        size = tensor.numel()
        view = flat[offset : offset + size].view_as(tensor)
        view.copy_(tensor.detach())
        tensor.data = view
        offset += size


def rebind_model(model: nn.Module, flat: torch.Tensor) -> None:
    """Make the model's state views into `flat` without copying (its values are already there)."""
    offset = 0
    for tensor in _state_tensors(model):
        size = tensor.numel()
        tensor.data = flat[offset : offset + size].view_as(tensor)
        offset += size


@dataclass(frozen=True)
class Slot:
    """Where one named parameter (or float buffer) lives in the flat vector."""

    name: str
    offset: int
    shape: torch.Size

    @property
    def numel(self) -> int:
        return self.shape.numel()


def layout(model: nn.Module) -> list[Slot]:
    """The flat vector's layout, in the order `flatten_model` uses."""
    named = [(n, p) for n, p in model.named_parameters()]
    named += [(n, b) for n, b in model.named_buffers() if b.is_floating_point()]
    slots, offset = [], 0
    for name, tensor in named:
        slots.append(Slot(name, offset, tensor.shape))
        offset += tensor.numel()
    return slots


def num_parameters(model: nn.Module) -> int:
    """Number of coordinates in the flat vector (parameters plus float buffers)."""
    return sum(t.numel() for t in _state_tensors(model))
