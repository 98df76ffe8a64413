"""The Rice gap code of top-k indices: round trips, a bit-by-bit reference, its length, corrupt input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dpsgd.sharing.gap_code import (
    GapCodeError,
    best_parameter,
    coded_bytes,
    decode_gaps,
    encode_gaps,
    gaps_of,
)


def _reference_code(indices: list[int], parameter: int) -> bytes:
    """The code written out one bit at a time, from the layout in the module docstring."""
    gaps = [index - previous - 1 for previous, index in zip([-1, *indices], indices)]
    low = [(gap >> j) & 1 for gap in gaps for j in range(parameter)]
    high = [bit for gap in gaps for bit in [0] * (gap >> parameter) + [1]]

    def packed(bits: list[int]) -> list[int]:
        bits = bits + [0] * (-len(bits) % 8)
        return [
            sum(bit << j for j, bit in enumerate(bits[i : i + 8])) for i in range(0, len(bits), 8)
        ]

    return bytes([parameter, *packed(low), *packed(high)])


def _index_sets(numel: int, seed: int) -> dict[str, list[int]]:
    rng = np.random.default_rng(seed)
    half = max(1, numel // 2)
    block = min(numel, 40)
    start = int(rng.integers(0, numel - block + 1))
    return {
        "empty": [],
        "full": list(range(numel)),
        "first_only": [0],
        "last_only": [numel - 1],
        "one": [int(rng.integers(numel))],
        "random_few": sorted(rng.choice(numel, min(numel, 3), replace=False).tolist()),
        "random_half": sorted(rng.choice(numel, half, replace=False).tolist()),
        "clustered": list(range(start, start + block)),
        "two_ends": sorted({*range(min(numel, 5)), *range(max(0, numel - 5), numel)}),
    }


NUMELS = (1, 2, 7, 8, 9, 1000, 4099, 217_015)


@pytest.mark.parametrize("numel", NUMELS)
def test_every_kind_of_index_set_survives_the_code(numel):
    for name, indices in _index_sets(numel, seed=numel).items():
        chosen = torch.tensor(indices, dtype=torch.long)
        code = encode_gaps(chosen, numel)
        assert code.dtype == torch.uint8
        assert torch.equal(decode_gaps(code, len(indices), numel), chosen), name
        assert code.numel() == coded_bytes(gaps_of(chosen), int(code[0])), name


@pytest.mark.parametrize("numel", (9, 1000, 4099))
def test_the_code_equals_a_bit_by_bit_reference_for_every_parameter(numel):
    for name, indices in _index_sets(numel, seed=numel + 1).items():
        for parameter in range(numel.bit_length() + 1):
            code = encode_gaps(torch.tensor(indices, dtype=torch.long), numel, parameter)
            assert bytes(code.tolist()) == _reference_code(indices, parameter), (name, parameter)
            assert decode_gaps(code, len(indices), numel).tolist() == indices


@pytest.mark.parametrize("numel", (1000, 217_015, 1_690_046))
@pytest.mark.parametrize("alpha", (0.001, 0.01, 0.05, 0.1, 0.3))
def test_random_sets_cost_little_more_than_the_information_floor(numel, alpha):
    k = max(1, round(alpha * numel))
    chosen = torch.from_numpy(np.sort(np.random.default_rng(k).choice(numel, k, replace=False)))
    parameter, nbytes = best_parameter(gaps_of(chosen), numel)
    floor_bits = (
        math.lgamma(numel + 1) - math.lgamma(k + 1) - math.lgamma(numel - k + 1)
    ) / math.log(2)
    assert nbytes == encode_gaps(chosen, numel).numel()
    assert (
        nbytes <= 1.04 * floor_bits / 8 + 3
    )  # within 4 % of log2 C(n, k) bits, plus the byte roundings
    assert all(nbytes <= coded_bytes(gaps_of(chosen), b) for b in range(numel.bit_length() + 1))


def _valid_or_rejected(code: torch.Tensor, k: int, numel: int) -> None:
    """A damaged code either fails with GapCodeError or names k distinct coordinates of the model."""
    try:
        decoded = decode_gaps(code, k, numel)
    except GapCodeError:
        return
    assert decoded.numel() == k
    assert k == 0 or (
        int(decoded[0]) >= 0 and int(decoded[-1]) < numel and bool((decoded.diff() > 0).all())
    )


@pytest.mark.parametrize("numel,k", [(1000, 1), (1000, 20), (4099, 300), (217_015, 2_170)])
def test_damaged_codes_are_errors_never_out_of_range_coordinates(numel, k):
    rng = np.random.default_rng(numel + k)
    chosen = torch.from_numpy(np.sort(rng.choice(numel, k, replace=False)))
    code = encode_gaps(chosen, numel)
    rejected = 0
    for trial in range(300):
        damaged = code.clone()
        where = int(rng.integers(code.numel()))
        damaged[where] ^= int(rng.integers(1, 256))
        _valid_or_rejected(damaged, k, numel)
        for cut in (
            damaged[:where],
            torch.cat([code, torch.tensor([int(rng.integers(256))], dtype=torch.uint8)]),
        ):
            with pytest.raises(GapCodeError):
                decode_gaps(cut, k, numel)
        rejected += 1
    for k_claimed in (k - 1, k + 1):
        with pytest.raises(GapCodeError):
            decode_gaps(code, k_claimed, numel)
    assert rejected == 300


@pytest.mark.parametrize(
    "code, k, numel, words",
    [
        ([], 1, 10, "at least one byte"),
        ([40, 0], 1, 1000, "parameter 40"),
        ([0, 0b0000_0000], 1, 10, "ends 0 gaps"),
        ([0, 0b0000_0010, 0], 1, 10, "bytes follow"),
        ([0, 0, 0b1000_0000], 1, 10, "outside"),  # gap 15 in a model of 10
        ([1, 0b0000_0010, 0b0000_0001], 1, 10, "padding"),  # a low bit set beyond k * b
    ],
)
def test_named_damage_is_reported_with_its_reason(code, k, numel, words):
    with pytest.raises(GapCodeError, match=words):
        decode_gaps(torch.tensor(code, dtype=torch.uint8), k, numel)
