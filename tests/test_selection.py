"""Top-k selection against a plain numpy reference: every size, tie pattern and k, both paths."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dpsgd.sharing import selection
from dpsgd.sharing.selection import SAMPLE_SIZE, top_k_indices, top_k_positions

SIZES = (1, 2, 3, 17, 1000, 4 * SAMPLE_SIZE - 1, 4 * SAMPLE_SIZE, 65_537, 204_000, 300_000)


def reference(score: np.ndarray, k: int) -> np.ndarray:
    """The rule, spelled out: stable sort by -|x| (so the lower index first among equals), first k, sorted."""
    return np.sort(np.argsort(-np.abs(score), kind="stable")[: max(k, 0)])


def _scores(size: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Score vectors with the tie patterns a run can produce (and some it should not)."""
    normal = rng.standard_normal(size).astype(np.float32)
    sparse = np.zeros(size, dtype=np.float32)  # one round's change: most coordinates untouched
    touched = rng.choice(size, max(1, size // 20), replace=False)
    sparse[touched] = rng.standard_normal(touched.size)
    return {
        "normal": normal,
        "small_integers": rng.integers(-3, 4, size).astype(np.float32),
        "zeros": np.zeros(size, dtype=np.float32),
        "float16_rounded": (normal * 1e-3).astype(np.float16).astype(np.float32),
        "negative": -np.abs(normal),
        "sparse": sparse,
        "signed_constant": np.where(rng.random(size) < 0.5, -1.5, 1.5).astype(np.float32),
        "float64": rng.standard_normal(size) * 10.0 ** rng.integers(-8, 8, size),
    }


def _ks(size: int) -> list[int]:
    shares = (0.001, 0.01, 0.1, 0.25, 0.3, 0.5, 0.9)
    ks = {0, 1, 2, size - 1, size, size + 5, -1, *(round(share * size) for share in shares)}
    return sorted(ks)


@pytest.mark.parametrize("size", SIZES)
def test_top_k_matches_the_numpy_reference(size):
    rng = np.random.default_rng(size)
    for name, score in _scores(size, rng).items():
        order = np.argsort(-np.abs(score), kind="stable")  # the reference, once per vector
        for k in _ks(size):
            chosen = top_k_indices(torch.from_numpy(score), k)
            expected = np.sort(order[: max(k, 0)])
            assert chosen.dtype == torch.long, (name, k)
            assert np.array_equal(chosen.numpy(), expected), (name, size, k)


@pytest.mark.parametrize("seed", range(20))
def test_top_k_matches_the_reference_on_random_sizes_and_ties(seed):
    rng = np.random.default_rng(1000 + seed)
    size = int(rng.integers(1, 300_001))
    levels = int(rng.integers(1, 50))
    score = (rng.integers(-levels, levels + 1, size) * rng.choice([1e-3, 1.0, 7.5])).astype(
        np.float32
    )
    for k in rng.integers(0, size + 1, 5):
        chosen = top_k_indices(torch.from_numpy(score), int(k))
        assert np.array_equal(chosen.numpy(), reference(score, int(k))), (size, levels, k)


def test_ties_at_the_kth_largest_go_to_the_lower_indices_on_a_large_model():
    size = 204_000
    score = np.zeros(size, dtype=np.float32)
    score[::7] = 2.0  # 29,143 equal magnitudes, alternating signs
    score[::14] = -2.0
    score[5::97] = 3.0
    k = round(0.1 * size)  # falls inside the block of 2.0s
    chosen = top_k_indices(torch.from_numpy(score), k).numpy()
    assert np.array_equal(chosen, reference(score, k))
    assert chosen.size == k and np.all(np.abs(score[chosen]) >= 2.0)


def test_half_precision_and_strided_scores_match_their_float32_values():
    rng = np.random.default_rng(3)
    wide = torch.from_numpy(rng.standard_normal((2, 100_000)).astype(np.float32))
    for score in (wide.half(), wide.bfloat16(), wide[:, ::2].T.contiguous().T.reshape(-1)):
        values = score.float().numpy().reshape(-1)
        for k in (1, 5_000, 20_000):
            assert np.array_equal(top_k_indices(score, k).numpy(), reference(values, k))


def test_the_score_is_left_as_it_was():
    score = torch.randn(50_000)
    before = score.clone()
    top_k_indices(score, 5_000)
    assert torch.equal(score, before)


def test_nan_counts_as_larger_than_any_number_lower_index_first():
    score = torch.tensor([1.0, float("nan"), -3.0, float("nan"), float("inf"), 2.0])
    assert top_k_indices(score, 1).tolist() == [1]
    assert top_k_indices(score, 2).tolist() == [1, 3]
    assert top_k_indices(score, 3).tolist() == [1, 3, 4]
    assert top_k_indices(score, 4).tolist() == [1, 2, 3, 4]
    large = torch.randn(100_000)
    large[[10, 70_000]] = float("nan")
    chosen = top_k_indices(large, 1_000).tolist()
    assert 10 in chosen and 70_000 in chosen and len(chosen) == 1_000
    assert chosen == sorted(chosen)


def test_the_sampled_threshold_narrows_a_large_model_to_few_candidates():
    magnitude = np.abs(np.random.default_rng(0).standard_normal(204_000).astype(np.float32))
    k = 20_400
    candidates = selection._candidates(magnitude, k)
    assert candidates is not None and k <= candidates.size < 1.3 * k
    assert np.array_equal(
        candidates[top_k_positions(magnitude[candidates], k)], reference(magnitude, k)
    )


def test_a_threshold_set_too_high_falls_back_to_the_exact_rule(monkeypatch):
    monkeypatch.setattr(selection, "SAMPLE_MARGIN_SD", -10.0)  # aims well above the k-th largest
    score = np.random.default_rng(1).standard_normal(204_000).astype(np.float32)
    k = 20_400
    assert selection._candidates(np.abs(score), k) is None
    assert np.array_equal(top_k_indices(torch.from_numpy(score), k).numpy(), reference(score, k))


def test_the_sampled_positions_do_not_depend_on_the_global_random_state():
    selection._sample_positions.cache_clear()
    np.random.seed(1)
    torch.manual_seed(1)
    first = selection._sample_positions(204_000).copy()
    selection._sample_positions.cache_clear()
    np.random.seed(2)
    torch.manual_seed(2)
    assert np.array_equal(selection._sample_positions(204_000), first)
    assert first.size == SAMPLE_SIZE == np.unique(first).size


def test_when_zeros_decide_the_nonzeros_and_the_lowest_zeros_come_back_directly():
    rng = np.random.default_rng(4)
    magnitude = np.zeros(204_000, dtype=np.float32)  # one round's change: most rows untouched
    touched = rng.choice(magnitude.size, 10_000, replace=False)
    magnitude[touched] = np.abs(rng.standard_normal(touched.size))
    magnitude[touched[:3]] = np.nan
    for k in (10_001, 20_400, 61_200):
        candidates = selection._candidates(magnitude, k)
        assert candidates is not None and candidates.size == k
        assert np.array_equal(candidates, reference(np.nan_to_num(magnitude, nan=np.inf), k))
    candidates = selection._candidates(magnitude, 5_000)  # fewer than the nonzeros: exact on them
    assert candidates is not None and 5_000 < candidates.size <= 10_000


def test_a_message_left_unwritten_declares_the_index_it_writes():
    """Partial sharing leaves a message's index unwritten (a receiver of the same rank never reads it):
    the header and the byte counts it declares are those of the index written when it is sent."""
    import dataclasses

    from dpsgd.sharing.partial import PartialSharing

    generator = torch.Generator().manual_seed(5)
    for numel, alpha in [(1000, 0.01), (50_000, 0.1), (50_000, 0.6), (204_000, 0.3)]:
        flat = torch.randn(numel, generator=generator)
        sharing = PartialSharing(
            flat, alpha, accumulation=True, accumulate_averaging_changes=True, metadata_cap=1.0
        )
        flat += torch.randn(numel, generator=generator)  # a round's training
        message = sharing.pack(flat, round_number=1, degree=4)
        assert message.unwritten_index is not None
        declared = (message.header().clone(), message.meta_bytes)
        written = dataclasses.replace(message)
        index = written.index
        assert written.unwritten_index is None and index is written.index
        assert (written.header().tolist(), written.meta_bytes) == (
            declared[0].tolist(),
            declared[1],
        )
        as_received = dataclasses.replace(written, coordinates=None)
        coordinates, values = sharing.decode(as_received)
        assert torch.equal(coordinates, message.coordinates) and values is message.values
