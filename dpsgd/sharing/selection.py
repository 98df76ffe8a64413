"""Choosing coordinates and writing down which were chosen: pure functions on tensors.

Top-k is by magnitude (a large negative change counts as large) and deterministic on
ties (the lower coordinate wins), so a run is reproducible. The chosen coordinates
travel in whichever of three forms is smallest for that message: sorted int32 indices
(4 bytes per chosen coordinate: only for a handful), a packed bitmask (1 bit per
coordinate of the model: dense choices, alpha near 0.5 and above), or the Rice code of
their gaps (`dpsgd.sharing.gap_code`, about log2(numel/k) + 1.5 bits per chosen
coordinate: everything between). On a tie the earlier form in that order wins.

Top-k runs in numpy on one key per coordinate, its magnitude's float32 bits above the
complement of its index: keys are distinct and order exactly as the rule does, so the k-th
largest key (`np.partition`, several times faster than `torch.topk` on one thread, and not
slowed down by ties as a partition of the magnitudes is) is the one threshold that keeps
exactly the chosen coordinates. On a large model a cheaper step comes first: the
magnitudes at a fixed set of sampled positions give a threshold a few standard deviations
below the k-th largest, and only the coordinates at or above it get keys. When fewer than
k reach it (rare, and only ever slower) all coordinates do. Either way the result is the
exact top-k, so it never depends on the sample. When the sample is mostly zeros
(coordinates a round left alone), the nonzero coordinates are the candidates, or, if
fewer than k, all of them plus the lowest-index zeros are the answer.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch

from dpsgd.sharing.bits import pack_bits, set_bit_positions
from dpsgd.sharing.gap_code import best_parameter, decode_gaps, encode_gaps, gaps_of
from dpsgd.sharing.wire import INDEX_DTYPES, Encoding, bitmask_bytes

SAMPLE_SIZE = 4096  # sampled magnitudes that set the threshold (a few microseconds to read)
SAMPLE_MARGIN_SD = 5.0  # how far below the k-th largest the threshold aims, in standard deviations
_SAMPLE_SEED = 22  # the sampled positions are the same in every run: results never depend on chance
_NAN_BITS = np.uint32(0x7F800001)  # one bit pattern for every NaN: above inf's, so above any number


def top_k_indices(score: torch.Tensor, k: int) -> torch.Tensor:
    """Sorted int64 indices of the k largest |score|; among equals the lower index wins.

    NaN counts as larger than any number.
    """
    numel = score.numel()
    if k >= numel:
        return torch.arange(numel)
    if k <= 0:
        return torch.empty(0, dtype=torch.long)
    magnitude = score.detach().reshape(-1).abs()
    if magnitude.dtype == torch.float64:
        return torch.from_numpy(_top_k_by_sorting(magnitude.cpu().numpy(), k))
    magnitude = magnitude.float().cpu().numpy()  # float16, bfloat16 widen exactly: same order, ties
    candidates = _candidates(magnitude, k)
    if candidates is None:
        return torch.from_numpy(top_k_positions(magnitude, k))
    if candidates.size == k:
        return torch.from_numpy(candidates)
    return torch.from_numpy(candidates[top_k_positions(magnitude[candidates], k)])


def top_k_positions(magnitude: np.ndarray, k: int) -> np.ndarray:
    """Sorted int64 positions of the k largest of a 1-D float32 array of magnitudes (>= 0 or NaN,
    0 < k < its size, under 2**32 long); among equals the lower position wins. The exact rule."""
    size = magnitude.size
    bits = np.minimum(magnitude.view(np.uint32), _NAN_BITS)  # ordered as the magnitudes are
    keys = bits.astype(np.uint64) << np.uint64(32)
    keys |= np.uint64(2**32 - 1) - np.arange(size, dtype=np.uint64)  # lower position: larger key
    kth = np.partition(keys, size - k)[size - k]
    return np.flatnonzero(keys >= kth)


def _top_k_by_sorting(magnitude: np.ndarray, k: int) -> np.ndarray:
    """The exact rule for float64 magnitudes (no key fits 64 bits): a stable sort, NaN first."""
    nan = np.isnan(magnitude)
    order = np.lexsort((-np.where(nan, 0.0, magnitude), ~nan))  # stable: lower index first
    return np.sort(order[:k])


def _candidates(magnitude: np.ndarray, k: int) -> np.ndarray | None:
    """Sorted positions that hold the k largest magnitudes and few others (exactly those k when
    zeros decide), or None where the full array is as quick or the threshold came out too high.

    If at least k magnitudes reach a threshold, the k-th largest reaches it too, so all of the
    top k are among them; and in position order, so the lower-index rule on ties is unchanged.
    """
    numel = magnitude.size
    share = k / numel
    if numel < 4 * SAMPLE_SIZE:  # the full array costs little more
        return None
    expected = share * SAMPLE_SIZE  # sampled magnitudes at or above the k-th largest, on average
    rank = math.ceil(expected + SAMPLE_MARGIN_SD * math.sqrt(expected * (1 - share))) + 1
    if not 1 <= rank < SAMPLE_SIZE:
        return None
    sample = np.sort(magnitude[_sample_positions(numel)])  # a sort: robust to ties; NaN last
    threshold = sample[SAMPLE_SIZE - rank]
    if threshold == 0:  # mostly zeros (coordinates a round left alone): ties among them decide
        nonzero = np.flatnonzero(magnitude)  # NaN included
        return nonzero if nonzero.size >= k else _with_lowest_zeros(nonzero, k)
    candidates = np.flatnonzero(~(magnitude < threshold))  # NaN is a candidate
    if candidates.size < k or candidates.size > numel // 2:
        return None
    return candidates


def _with_lowest_zeros(nonzero: np.ndarray, k: int) -> np.ndarray:
    """The k sorted positions made of every nonzero one (sorted, fewer than k) and the lowest-index
    zeros: all positions up to the (k - nonzero.size)-th zero, and the nonzero ones after it."""
    zeros_wanted = k - nonzero.size
    zeros_before = nonzero - np.arange(nonzero.size)  # zeros ahead of each nonzero position
    last_zero = zeros_wanted - 1 + np.searchsorted(zeros_before, zeros_wanted - 1, side="right")
    after = nonzero[np.searchsorted(nonzero, last_zero, side="right") :]
    return np.concatenate([np.arange(last_zero + 1), after])


@functools.lru_cache(maxsize=16)
def _sample_positions(numel: int) -> np.ndarray:
    """SAMPLE_SIZE distinct positions in [0, numel), sorted, the same for every call and run."""
    positions = np.sort(
        np.random.default_rng(_SAMPLE_SEED).choice(numel, SAMPLE_SIZE, replace=False)
    )
    positions.flags.writeable = False
    return positions


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
