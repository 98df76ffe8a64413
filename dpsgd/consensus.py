"""How far apart the nodes' models are: the consensus distance, without gathering the models.

The consensus distance of a round is the mean squared distance of the node models to their
average, (1/n) sum_i ||x_i - x_mean||^2: zero when every node holds the same model, and what
decentralized averaging drives down between rounds of local training.

Gathering 96 models on rank 0 every evaluated round would cost more than the run's own
traffic, and an all-reduce would need every node at the same round, which RWM nodes never
are. Instead each node publishes, with its evaluated round's record, a count sketch of its
model: `size` numbers, where coordinate c of the model is added, with a random sign s(c), to
bucket h(c). The sketch is linear and E ||S y||^2 = ||y||^2 for every y, so the mean squared
distance of the sketches to their mean estimates the consensus distance without bias; its
relative standard error is at most sqrt(2 / size) (3% at the default 2,048) and smaller when
the nodes' differences point in many directions (on the 96-node MovieLens sweep of
`benchmarks/patterns.py` it was within 2% of the exact value at every checked round). A model
of at most `size` parameters is sketched as itself, so the number is exact. Every rank draws
the same h and s from the run seed.
"""

from __future__ import annotations

import numpy as np
import torch

from dpsgd.seeding import torch_generator

CHUNK = 1 << 20  # coordinates hashed at a time: bounds the temporary memory of big models
CACHE_LIMIT = (
    1 << 22
)  # models up to this size keep their hash (5 bytes a coordinate); larger redraw it


class ModelSketch:
    """The count sketch every node of a run applies to its flat model."""

    def __init__(self, numel: int, size: int, seed: int):
        self.numel = numel
        self.size = min(size, numel)
        self.seed = seed
        self.exact = numel <= size
        self._cached = None if self.exact or numel > CACHE_LIMIT else list(self._chunks())

    def __call__(self, flat: torch.Tensor) -> np.ndarray:
        """The sketch of one model, in float64 (differences of nearly equal models must survive)."""
        values = flat.detach().to("cpu", torch.float64)
        if self.exact:
            return values.numpy().copy()
        sketch = torch.zeros(self.size, dtype=torch.float64)
        for start, bucket, sign in self._cached or self._chunks():
            sketch.index_add_(0, bucket, values[start : start + bucket.numel()] * sign)
        return sketch.numpy()

    def _chunks(self):
        """(first coordinate, bucket h(c), sign s(c)) per chunk, each drawn from its own seeded stream."""
        for number, start in enumerate(range(0, self.numel, CHUNK)):
            length = min(CHUNK, self.numel - start)
            codes = torch.randint(
                0, 2 * self.size, (length,), generator=torch_generator(self.seed, "sketch", number)
            )
            yield start, (codes >> 1).to(torch.int32), (1 - 2 * (codes & 1)).to(torch.int8)


def consensus_distance(sketches: list[np.ndarray]) -> float:
    """Mean squared distance of the sketches to their mean: the consensus distance's estimate
    (exact when the sketches are the models themselves). NaN when a model is not finite (training
    diverged): there is no distance then, and inf - inf would make numpy warn mid-run."""
    stacked = np.stack(sketches)
    if not np.isfinite(stacked).all():
        return float("nan")
    return float(np.mean(np.sum((stacked - stacked.mean(axis=0)) ** 2, axis=1)))
