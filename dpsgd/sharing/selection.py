"""Choosing coordinates and writing down which were chosen: pure functions on tensors.

Top-k is by magnitude (a large negative change counts as large) and deterministic on
ties (the lower coordinate wins), so a run is reproducible. The chosen coordinates
travel either as sorted int32 indices or as a packed bitmask, whichever is smaller for
that message: indices cost 4 bytes per chosen coordinate, a bitmask 1 bit per
coordinate of the model, so the bitmask wins above k = numel / 32.
"""

from __future__ import annotations

import torch

from dpsgd.sharing.wire import INDEX_DTYPES, Encoding

BIT_WEIGHTS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)
BIT_POSITIONS = torch.arange(8, dtype=torch.uint8)


def top_k_indices(score: torch.Tensor, k: int) -> torch.Tensor:
    """Sorted int64 indices of the k largest |score|; among equals the lower index wins."""
    magnitude = score.abs()
    if k >= magnitude.numel():
        return torch.arange(magnitude.numel())
    if k <= 0:
        return torch.empty(0, dtype=torch.long)
    threshold = torch.topk(magnitude, k, sorted=False).values.min()
    above = (magnitude > threshold).nonzero().squeeze(1)
    at_threshold = (magnitude == threshold).nonzero().squeeze(1)[:k - above.numel()]
    return torch.cat([above, at_threshold]).sort().values


def index_bytes(encoding: Encoding, k: int, numel: int) -> int:
    """Bytes of the index part of a message choosing k of numel coordinates."""
    if encoding == Encoding.INDEX_INT32:
        return 4 * k
    if encoding == Encoding.BITMASK:
        return (numel + 7) // 8
    return 0


def smaller_encoding(k: int, numel: int) -> Encoding:
    """INDEX_INT32 or BITMASK, whichever puts fewer bytes on the wire (int32 on a tie)."""
    int32_bytes = index_bytes(Encoding.INDEX_INT32, k, numel)
    return Encoding.INDEX_INT32 if int32_bytes <= index_bytes(Encoding.BITMASK, k, numel) else Encoding.BITMASK


def encode_indices(indices: torch.Tensor, numel: int, encoding: Encoding) -> torch.Tensor:
    """Sorted indices as the index tensor of a message."""
    if encoding == Encoding.INDEX_INT32:
        return indices.to(INDEX_DTYPES[encoding])
    mask = torch.zeros((numel + 7) // 8 * 8, dtype=torch.uint8)
    mask[indices] = 1
    return (mask.view(-1, 8) * BIT_WEIGHTS).sum(dim=1, dtype=torch.uint8)


def decode_indices(index: torch.Tensor, numel: int, encoding: Encoding) -> torch.Tensor:
    """The sorted int64 coordinates an index tensor names."""
    if encoding == Encoding.INDEX_INT32:
        return index.long()
    bits = (index.unsqueeze(1) >> BIT_POSITIONS) & 1
    return bits.view(-1)[:numel].nonzero().squeeze(1)
