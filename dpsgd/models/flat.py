"""One flat float32 vector that *is* the model's parameters.

Every parameter (and floating-point buffer) becomes a view into a single contiguous
tensor, in a fixed order. Sending the full model is then sending that tensor with no
copy, and averaging writes into it in place; the optimizer keeps working on the same
parameter objects because only their storage moved.
"""

from __future__ import annotations

import torch
from torch import nn


def _state_tensors(model: nn.Module) -> list[torch.Tensor]:
    """Parameters, then floating-point buffers, in the module's own deterministic order."""
    tensors = [p for _, p in model.named_parameters()]
    tensors += [b for _, b in model.named_buffers() if b.is_floating_point()]
    return tensors


def flatten_model(model: nn.Module) -> torch.Tensor:
    """Move the model's state into one flat float32 vector and return that vector."""
    tensors = _state_tensors(model)
    flat = torch.empty(sum(t.numel() for t in tensors), dtype=torch.float32)
    offset = 0
    for tensor in tensors:
        size = tensor.numel()
        view = flat[offset:offset + size].view_as(tensor)
        view.copy_(tensor.detach())
        tensor.data = view
        offset += size
    return flat


def num_parameters(model: nn.Module) -> int:
    """Number of coordinates in the flat vector (parameters plus float buffers)."""
    return sum(t.numel() for t in _state_tensors(model))
