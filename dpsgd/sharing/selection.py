"""Choosing coordinates and writing down which were chosen: pure functions on tensors.

Top-k is by magnitude (a large negative change counts as large) and deterministic on
ties (the lower coordinate wins), so a run is reproducible. The chosen coordinates
travel in whichever of three forms is smallest for that message: sorted int32 indices
(4 bytes per chosen coordinate: only for a handful), a packed bitmask (1 bit per
coordinate of the model: dense choices, alpha near 0.5 and above), or the Rice code of
their gaps (`dpsgd.sharing.gap_code`, about log2(numel/k) + 1.5 bits per chosen
coordinate: everything between). On a tie the earlier form in that order wins.
"""

from __future__ import annotations

import torch

from dpsgd.sharing.bits import pack_bits, set_bit_positions
from dpsgd.sharing.gap_code import best_parameter, decode_gaps, encode_gaps, gaps_of
from dpsgd.sharing.wire import INDEX_DTYPES, Encoding, bitmask_bytes


def top_k_indices(score: torch.Tensor, k: int) -> torch.Tensor:
    """Sorted int64 indices of the k largest |score|; among equals the lower index wins."""
    magnitude = score.abs()
    if k >= magnitude.numel():
        return torch.arange(magnitude.numel())
    if k <= 0:
        return torch.empty(0, dtype=torch.long)
    threshold = torch.topk(magnitude, k, sorted=False).values.min()
    above = (magnitude > threshold).nonzero().squeeze(1)
    at_threshold = (magnitude == threshold).nonzero().squeeze(1)[: k - above.numel()]
    return torch.cat([above, at_threshold]).sort().values


def fixed_index_bytes(encoding: Encoding, k: int, numel: int) -> int:
    """Bytes of an INDEX_INT32 or BITMASK index choosing k of numel coordinates (the gap code's
    length depends on which coordinates: `smallest_encoding`)."""
    if encoding == Encoding.INDEX_INT32:
        return k * INDEX_DTYPES[encoding].itemsize
    if encoding == Encoding.BITMASK:
        return bitmask_bytes(numel)
    raise ValueError(f"{encoding.name} has no length fixed by k and numel")


def smallest_encoding(indices: torch.Tensor, numel: int) -> tuple[Encoding, int, int | None]:
    """(encoding, index bytes, Rice parameter): the form that names these sorted coordinates in the
    fewest bytes; the parameter is the gap code's best (None when there is nothing to code)."""
    k = indices.numel()
    sizes = {
        Encoding.INDEX_INT32: fixed_index_bytes(Encoding.INDEX_INT32, k, numel),
        Encoding.BITMASK: fixed_index_bytes(Encoding.BITMASK, k, numel),
    }
    parameter = None
    if k:
        parameter, sizes[Encoding.GAP_RICE] = best_parameter(gaps_of(indices), numel)
    encoding = min(sizes, key=sizes.get)  # the first of equals: int32, bitmask, gap code
    return encoding, sizes[encoding], parameter


def encode_indices(
    indices: torch.Tensor, numel: int, encoding: Encoding, parameter: int | None = None
) -> torch.Tensor:
    """Sorted indices as the index tensor of a message (`parameter`: the gap code's, else its best)."""
    if encoding == Encoding.INDEX_INT32:
        return indices.to(INDEX_DTYPES[encoding])
    if encoding == Encoding.GAP_RICE:
        return encode_gaps(indices, numel, parameter)
    mask = torch.zeros(numel, dtype=torch.uint8)
    mask[indices] = 1
    return pack_bits(mask)


def decode_indices(
    index: torch.Tensor, numel: int, encoding: Encoding, k: int | None = None
) -> torch.Tensor:
    """The sorted int64 coordinates an index tensor names (`k`: how many, for the gap code)."""
    if encoding == Encoding.INDEX_INT32:
        return index.long()
    if encoding == Encoding.GAP_RICE:
        return decode_gaps(index, k, numel)
    return set_bit_positions(index, numel)
