"""Top-k selection: the library's `top_k_indices` against the torch.topk rule it replaced.

For each model size (204,000 parameters: MovieLens as issue 22 measured it; 332,000: the
item side of MovieLens, as `scale.py` uses), alpha and kind of score, both methods choose
k = round(alpha * numel) coordinates from the same vectors, the results are checked to be
equal, and each is timed: milliseconds per call, one thread (as a rank runs), the median of
`--repeats` calls, the two methods taking turns on the same vectors so load from other
processes falls on both alike. `pack_*_ms` time a whole `PartialSharing.pack` (selection,
index encoding, values) with each selection, which is what a node pays per round.

Scores: `gaussian`, a dense change (accumulated drift, the default score, looks like this);
`sparse`, one round's change of a model whose rows were mostly not touched (95% zeros, so at
alpha 0.1 and 0.3 the k-th largest is 0 and ties decide).

    python benchmarks/top_k.py [--csv benchmarks/results/top_k.csv] [--repeats 101]

Timings vary with the machine's load: rerun, and compare rows from one run only.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from dpsgd.sharing import partial
from dpsgd.sharing.partial import PartialSharing, coordinates_to_send
from dpsgd.sharing.selection import top_k_indices

SIZES = (204_000, 332_000)
ALPHAS = (0.01, 0.1, 0.3)
VECTORS = 5  # distinct score vectors per row, used in turn
SEED = 22


def torch_topk_indices(score: torch.Tensor, k: int) -> torch.Tensor:
    """The selection before issue 22 (kept here only to compare): torch.topk, then the tie rule."""
    magnitude = score.abs()
    if k >= magnitude.numel():
        return torch.arange(magnitude.numel())
    if k <= 0:
        return torch.empty(0, dtype=torch.long)
    threshold = torch.topk(magnitude, k, sorted=False).values.min()
    above = (magnitude > threshold).nonzero().squeeze(1)
    at_threshold = (magnitude == threshold).nonzero().squeeze(1)[: k - above.numel()]
    return torch.cat([above, at_threshold]).sort().values


def scores(kind: str, numel: int, rng: np.random.Generator) -> list[torch.Tensor]:
    vectors = []
    for _ in range(VECTORS):
        values = rng.standard_normal(numel).astype(np.float32) * 1e-2
        if kind == "sparse":
            values[rng.random(numel) >= 0.05] = 0.0
        vectors.append(torch.from_numpy(values))
    return vectors


def median_ms(calls: dict[str, callable], repeats: int) -> dict[str, float]:
    """Median milliseconds per call of each, the calls taking turns."""
    times = {name: [] for name in calls}
    for repeat in range(repeats):
        for name, call in calls.items():
            start = time.perf_counter()
            call(repeat)
            times[name].append(time.perf_counter() - start)
    return {name: 1e3 * statistics.median(values) for name, values in times.items()}


def pack_call(vectors: list[torch.Tensor], alpha: float, select):
    """One PartialSharing.pack per call, on score `vectors[i]`, with `select` as the selection."""
    flat = torch.zeros_like(vectors[0])
    sharing = PartialSharing(
        flat, alpha, accumulation=False, accumulate_averaging_changes=False, metadata_cap=1.0
    )

    def call(repeat: int) -> None:
        original, partial.top_k_indices = partial.top_k_indices, select
        try:
            sharing.pack(vectors[repeat % VECTORS], round_number=1, degree=4)
        finally:
            partial.top_k_indices = original

    return call


def rows(repeats: int):
    rng = np.random.default_rng(SEED)
    for numel in SIZES:
        for kind in ("gaussian", "sparse"):
            vectors = scores(kind, numel, rng)
            for alpha in ALPHAS:
                k = coordinates_to_send(alpha, numel)
                for vector in vectors:
                    assert torch.equal(top_k_indices(vector, k), torch_topk_indices(vector, k))
                times = median_ms(
                    {
                        "torch_topk": lambda i: torch_topk_indices(vectors[i % VECTORS], k),
                        "new": lambda i: top_k_indices(vectors[i % VECTORS], k),
                        "pack_torch_topk": pack_call(vectors, alpha, torch_topk_indices),
                        "pack_new": pack_call(vectors, alpha, top_k_indices),
                    },
                    repeats,
                )
                yield {
                    "numel": numel,
                    "score": kind,
                    "alpha": alpha,
                    "k": k,
                    "torch_topk_ms": round(times["torch_topk"], 3),
                    "new_ms": round(times["new"], 3),
                    "speedup": round(times["torch_topk"] / times["new"], 1),
                    "pack_torch_topk_ms": round(times["pack_torch_topk"], 3),
                    "pack_new_ms": round(times["pack_new"], 3),
                    "repeats": repeats,
                }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--csv", type=Path, default=Path("benchmarks/results/top_k.csv"))
    parser.add_argument("--repeats", type=int, default=101)
    args = parser.parse_args()
    torch.set_num_threads(1)
    table = []
    for row in rows(args.repeats):
        table.append(row)
        print(", ".join(f"{key}={value}" for key, value in row.items()), flush=True)
    args.csv.parent.mkdir(parents=True, exist_ok=True)
    with args.csv.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(table[0]))
        writer.writeheader()
        writer.writerows(table)
    print(f"wrote {args.csv}")


if __name__ == "__main__":
    main()
