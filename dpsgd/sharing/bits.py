"""Bit fields on the wire: 0/1 tensors packed eight to a byte, least significant bit first.

Every bit field a message carries (the bitmask over the model, both blocks of the gap
code) uses this one layout: bit j of byte i is bit 8i + j of the field.
"""

from __future__ import annotations

import numpy as np
import torch

BIT_WEIGHTS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)


def packed_length(count: int) -> int:
    """Bytes that hold `count` bits."""
    return (count + 7) // 8


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """A uint8 tensor of 0/1 values as bytes; the last byte is padded with zero bits."""
    padded = torch.zeros(packed_length(bits.numel()) * 8, dtype=torch.uint8)
    padded[: bits.numel()] = bits
    return (padded.view(-1, 8) * BIT_WEIGHTS).sum(dim=1, dtype=torch.uint8)


def set_bit_positions(packed: torch.Tensor, count: int | None = None) -> torch.Tensor:
    """The int64 positions of the set bits among the first `count` bits (default: all) of packed bytes.

    numpy's unpackbits and flatnonzero on a boolean view do this several times faster than
    torch's nonzero (1.1 M bits: under 1 ms against about 6 ms); it decides how fast a
    receiver reads a bitmask or a gap code.
    """
    bits = np.unpackbits(packed.numpy(), bitorder="little", count=count)
    return torch.from_numpy(np.flatnonzero(bits.view(bool)))
