"""A Rice code of the gaps between sorted coordinates: top-k indices near their information floor.

Naming which k of n coordinates a message carries takes at least log2 C(n, k) bits,
about k (log2(n/k) + 1.44). Sorted int32 indices spend 32 bits on each and a bitmask n
bits in all, so between alpha = 1/32 and alpha = 0.3 or so both are far above that
floor. The gaps between sorted coordinates are close to geometric, and a Rice code with
parameter b spends b + 1 + (gap >> b) bits on a gap: within a few percent of the floor
when b is near log2(n/k).

Layout, in bytes, every bit field packed as `dpsgd.sharing.bits` says:

    [b] [the low b bits of every gap: k*b bits] [every gap's high part in unary: (gap >> b) zeros, then a one]

Keeping the two parts apart is what lets both directions run as tensor operations, with
no loop over indices: the ones of the unary block mark where each gap ends, so one
`nonzero` recovers all high parts, and the low parts are a fixed-width array.

A received index is checked while it is decoded: a code that does not describe exactly
k coordinates inside the model raises `GapCodeError`, so nothing is ever written out of range.
The tensors are CPU tensors: top-k messages travel only between CPU models (a node group on
a GPU shares whole models).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from dpsgd.sharing.bits import pack_bits, packed_length, set_bit_positions


class GapCodeError(ValueError):
    """A gap-coded index that no correct encoder writes."""


def gaps_of(indices: torch.Tensor) -> torch.Tensor:
    """Sorted distinct coordinates as gaps: how many coordinates were skipped before each."""
    return torch.diff(indices.long(), prepend=torch.tensor([-1])) - 1


def coded_bytes(gaps: torch.Tensor, parameter: int) -> int:
    """Bytes of the code of these gaps with Rice parameter `parameter`."""
    k = gaps.numel()
    high_bits = k + int((gaps >> parameter).sum())
    return 1 + packed_length(k * parameter) + packed_length(high_bits)


def best_parameter(gaps: torch.Tensor, numel: int) -> tuple[int, int]:
    """(b, bytes): the Rice parameter that codes these gaps shortest, and that length.

    The best b for geometric gaps of mean m is near log2(m) - 0.5; the few values around
    it are tried exactly, since real gaps (top-k of a model) are not quite geometric.
    """
    k = gaps.numel()
    if k == 0:
        return 0, 1
    centre = max(0, math.floor(math.log2(max(numel - k, 1) / k)))  # log2 of the mean gap
    candidates = range(max(0, centre - 2), min(centre + 2, numel.bit_length()) + 1)
    sizes = {b: coded_bytes(gaps, b) for b in candidates}
    parameter = min(sizes, key=sizes.get)
    return parameter, sizes[parameter]


def encode_gaps(indices: torch.Tensor, numel: int, parameter: int | None = None) -> torch.Tensor:
    """Sorted distinct coordinates of a model of `numel` as the uint8 code (best parameter unless given)."""
    gaps = gaps_of(indices)
    if parameter is None:
        parameter, _ = best_parameter(gaps, numel)
    low_bits = ((gaps.unsqueeze(1) >> torch.arange(parameter)) & 1).to(torch.uint8).view(-1)
    ends = torch.cumsum((gaps >> parameter) + 1, 0) - 1
    high_bits = torch.zeros(int(ends[-1]) + 1 if ends.numel() else 0, dtype=torch.uint8)
    high_bits[ends] = 1
    return torch.cat(
        [torch.tensor([parameter], dtype=torch.uint8), pack_bits(low_bits), pack_bits(high_bits)]
    )


def decode_gaps(code: torch.Tensor, k: int, numel: int) -> torch.Tensor:
    """The k sorted int64 coordinates a code names; `GapCodeError` if it names anything else."""
    if code.dtype != torch.uint8 or code.numel() < 1:
        raise GapCodeError(
            f"a gap code is at least one byte of uint8 (got {code.numel()} of {code.dtype})"
        )
    parameter = int(code[0])
    if parameter > numel.bit_length():
        raise GapCodeError(
            f"Rice parameter {parameter} is larger than any gap in a model of {numel} needs"
        )
    low_length = packed_length(k * parameter)
    if code.numel() < 1 + low_length:
        raise GapCodeError(
            f"{code.numel()} bytes cannot hold the low bits of {k} gaps with parameter {parameter}"
        )
    low_bytes, high_length = code.numpy()[1 : 1 + low_length], code.numel() - 1 - low_length
    if (k * parameter) % 8 and int(low_bytes[-1]) >> ((k * parameter) % 8):
        raise GapCodeError("the padding after the low bits is not zero")
    ends = set_bit_positions(code[1 + low_length :]).numpy()
    if ends.size != k:
        raise GapCodeError(
            f"the unary block ends {ends.size} gaps, but the message carries {k} values"
        )
    if k and int(ends[-1]) // 8 != high_length - 1 or not k and high_length:
        raise GapCodeError("bytes follow the last gap")
    if (
        int(ends[-1]) + 1 if k else 0
    ) << parameter >= 2**62:  # coordinates this far out would wrap int64
        raise GapCodeError(f"the code spans more than 2**62 coordinates; the model has {numel}")
    # Coordinate i is the sum of gaps 0..i plus i. The unary block's ones already sum the high
    # parts: ends[i] - i zeros come before the i-th one. So only the low parts need a cumsum.
    # (numpy, not torch: on tens of thousands of indices its per-call cost is several times lower.)
    position = np.arange(k)
    indices = ((ends - position) << parameter) + position
    if parameter:
        indices += np.cumsum(_low_parts(low_bytes, k, parameter))
    indices = torch.from_numpy(indices)
    if k and int(indices[-1]) >= numel:
        raise GapCodeError(
            f"the code names coordinate {int(indices[-1])}, outside the model's [0, {numel - 1}]"
        )
    return indices


def _low_parts(low_bytes: np.ndarray, k: int, parameter: int) -> np.ndarray:
    """The k fixed-width low parts, as one matrix product of their bits with the powers of two
    (exact in float64, whose 53 bits hold any parameter allowed here)."""
    low_bits = np.unpackbits(low_bytes, count=k * parameter, bitorder="little").reshape(
        k, parameter
    )
    return (low_bits @ (2.0 ** np.arange(parameter))).astype(np.int64)
