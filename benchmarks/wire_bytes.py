"""Bytes per message: dpsgd's wire format against the reference system and the information floor.

For each model size and sharing setting, one message is packed with the library's own
sharing classes and its bytes are read off the `Message`. The reference system pickles a
dict of numpy arrays (float32 values, int32 indices) plus a few scalars; its size is
measured by pickling such a dict for real, with the same values and coordinates. The
floor is what any encoding must spend: 4 bytes per float32 value sent, plus
log2 C(n, k) bits to say which k of the n coordinates they are.

    python benchmarks/wire_bytes.py [--out results.json] [--csv results.csv]
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import pickle

import torch

from dpsgd.models.flat import num_parameters
from dpsgd.models.mf import MatrixFactorization
from dpsgd.seeding import torch_generator
from dpsgd.sharing.full import FullSharing
from dpsgd.sharing.partial import PartialSharing, coordinates_to_send
from dpsgd.sharing.subsampling import SubsamplingSharing

SEED = 90
ALPHAS = (0.1, 0.3, 0.5)
ROUND, DEGREE = 12, 4                 # what the message's header says; sizes do not depend on it
TRAINING_CHANGE_STD = 0.01            # scale of the fake training step that partial sharing ranks
FEMNIST_CNN_PARAMETERS = 1_690_046    # SPEC §6: the FEMNIST CNN, not yet in the library


def movielens_mf_parameters() -> int:
    """Parameter count of the MovieLens model (SPEC §6: 610 users, 9,724 items, embedding 20)."""
    model = MatrixFactorization(610, 9724, 20, generator=torch_generator(SEED, "wire_bytes_mf"))
    return num_parameters(model)


def reference_bytes(values: torch.Tensor, indices: torch.Tensor | None) -> int:
    """Size of the pickled dict the reference system sends for these values (and coordinates)."""
    message = {"params": values.numpy().astype("float32")}
    if indices is not None:
        message["indices"] = indices.numpy().astype("int32")
    message.update(degree=DEGREE, iteration=ROUND, channel="DPSGD")
    return len(pickle.dumps(message))


def floor_bytes(numel: int, k: float) -> int:
    """k float32 values, plus the bits needed to name which k of numel coordinates they are."""
    if k >= numel:
        return 4 * numel
    log2_choices = (math.lgamma(numel + 1) - math.lgamma(k + 1) - math.lgamma(numel - k + 1)) / math.log(2)
    return math.ceil(4 * k + math.ceil(log2_choices / 8))


def measure(model_name: str, numel: int, sharing_name: str, alpha: float, flat: torch.Tensor,
            training_change: torch.Tensor) -> dict:
    """Pack one message with the library and size it three ways."""
    flat = flat.clone()
    if sharing_name == "full":
        sharing, expected_k = FullSharing(), numel
    elif sharing_name == "partial":
        sharing = PartialSharing(flat, alpha, accumulation=True, accumulate_averaging_changes=True,
                                 metadata_cap=1.0)  # cap above every alpha measured: always top-k
        flat += training_change          # the change since construction is what top-k ranks
        expected_k = coordinates_to_send(alpha, numel)
    else:
        sharing, expected_k = SubsamplingSharing(flat, alpha, seed=SEED, node=0), alpha * numel
    message = sharing.pack(flat, ROUND, DEGREE)
    ours, reference = message.total_bytes, reference_bytes(message.values, sharing.last_sent_index)
    floor = floor_bytes(numel, expected_k)
    return {
        "model": model_name, "numel": numel, "sharing": sharing_name,
        "alpha": alpha, "k_sent": message.values.numel(),
        "encoding": message.encoding.name, "our_bytes": ours,
        "our_data_bytes": message.data_bytes, "our_meta_bytes": message.meta_bytes,
        "reference_bytes": reference, "floor_bytes": floor,
        "overhead_over_floor_pct": 100 * (ours - floor) / floor,
        "saving_vs_reference_pct": 100 * (reference - ours) / reference,
    }


def run_all() -> list[dict]:
    rows = []
    for model_name, numel in (("movielens-mf", movielens_mf_parameters()), ("femnist-cnn", FEMNIST_CNN_PARAMETERS)):
        generator = torch_generator(SEED, "wire_bytes", numel)
        flat = torch.randn(numel, generator=generator)
        training_change = TRAINING_CHANGE_STD * torch.randn(numel, generator=generator)
        settings = [("full", 1.0)] + [(name, alpha) for name in ("partial", "subsampling") for alpha in ALPHAS]
        for sharing_name, alpha in settings:
            rows.append(measure(model_name, numel, sharing_name, alpha, flat, training_change))
    return rows


COLUMNS = [  # (title, row key, width, number format; "" for text, which is left-aligned)
    ("model", "model", 12, ""), ("row", "label", 15, ""), ("k sent", "k_sent", 9, ","),
    ("encoding", "encoding", 11, ""), ("ours", "our_bytes", 10, ","), ("data", "our_data_bytes", 10, ","),
    ("meta", "our_meta_bytes", 8, ","), ("reference", "reference_bytes", 10, ","), ("floor", "floor_bytes", 10, ","),
    ("over floor", "overhead_over_floor_pct", 10, ".2f"), ("vs ref", "saving_vs_reference_pct", 6, ".2f"),
]


def print_table(rows: list[dict]) -> None:
    print("  ".join(format(title, f"{'>' if number else '<'}{width}") for title, _, width, number in COLUMNS))
    for row in rows:
        cells = {**row, "label": "full" if row["sharing"] == "full" else f"{row['sharing']} {row['alpha']}"}
        print("  ".join(format(cells[key], f"{'>' if number else '<'}{width}{number}")
                        for _, key, width, number in COLUMNS))
    print(f"bytes per message; reference = len(pickle.dumps(dict)), pickle protocol {pickle.DEFAULT_PROTOCOL}; "
          "over floor = (ours - floor) / floor; vs ref = (reference - ours) / reference; both in %")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="write the rows as JSON to this path")
    parser.add_argument("--csv", help="write the rows as CSV to this path")
    args = parser.parse_args()
    rows = run_all()
    print_table(rows)
    if args.out:
        with open(args.out, "w") as file:
            json.dump(rows, file, indent=2)
    if args.csv:
        with open(args.csv, "w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)


if __name__ == "__main__":
    main()
