"""Bytes per message: dpsgd's wire format against the reference system and the information floor.

For each model size, sharing setting and value type, one message is packed with the
library's own sharing classes and its bytes are read off the `Message`. The reference
system pickles a dict of numpy arrays (float32 values, int32 indices) plus a few
scalars; its size is measured by pickling such a dict for real, with the same values
and coordinates. The floor is what any encoding of float32 values must spend: 4 bytes
per value sent, plus log2 C(n, k) bits to say which k of the n coordinates they are. It
stays the float32 floor for float16/bfloat16 rows, which is why those go below 1.

Times (milliseconds, one thread, the fastest of 15 runs, i.e. the cost without interference
from other load): `pack_ms` (choose and encode), `decode_ms` (what a receiver does before
merging: check and decode the coordinates, widen the values), `receive_ms`, the time a
receiver waits from asking a peer for the message until all of it arrived, over gloo on
this machine's loopback (the fastest link a message ever takes, so the hardest bar for
decoding to stay under), and `at_1gbit_ms`, the message's bytes at 1 Gbit/s.

    python benchmarks/wire_bytes.py [--csv benchmarks/results/wire_bytes.csv] [--no-timing]
"""

from __future__ import annotations

import argparse
import csv
import math
import pickle
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from dpsgd.launch import spawn
from dpsgd.models import build_model
from dpsgd.models.flat import num_parameters
from dpsgd.seeding import torch_generator
from dpsgd.sharing import build_sharing
from dpsgd.sharing.partial import coordinates_to_send
from dpsgd.sharing.wire import HEADER_DTYPE, HEADER_LENGTH, VALUE_TYPES, Message, read_index
from dpsgd.transport.walks import wire_parts

SEED = 90
ALPHAS = (0.001, 0.01, 0.05, 0.1, 0.3, 0.5)
ROUND, DEGREE = 12, 4  # what the message's header says; sizes do not depend on it
TRAINING_CHANGE_STD = 0.01  # scale of the fake training step that partial sharing ranks
REPEATS = 15
MODELS = {  # the study's two model sizes, built by the library (SPEC §6)
    "movielens-mf": ("mf", {"num_users": 610, "num_items": 9724}),
    "femnist-cnn": ("femnist_cnn", {"num_classes": 62}),
}
SHARING_OPTIONS = {
    "merge": "fill_own",
    "accumulation": True,
    "accumulate_averaging_changes": True,
    "metadata_cap": 1.0,
}  # cap above every alpha measured: partial rows are always top-k


def model_parameters(name: str) -> int:
    model, dims = MODELS[name]
    return num_parameters(build_model(model, dims, SEED))


def reference_bytes(values: torch.Tensor, indices: torch.Tensor | None) -> int:
    """Size of the pickled dict the reference system sends for these values (and coordinates)."""
    message = {"params": values.float().numpy()}
    if indices is not None:
        message["indices"] = indices.numpy().astype("int32")
    message.update(degree=DEGREE, iteration=ROUND, channel="DPSGD")
    return len(pickle.dumps(message))


def floor_bytes(numel: int, k: float) -> int:
    """k float32 values, plus the bits needed to name which k of numel coordinates they are."""
    if k >= numel:
        return 4 * numel
    log2_choices = (
        math.lgamma(numel + 1) - math.lgamma(k + 1) - math.lgamma(numel - k + 1)
    ) / math.log(2)
    return math.ceil(4 * k + math.ceil(log2_choices / 8))


def best_ms(action, setup=lambda: None, repeats: int = REPEATS) -> float:
    """The fastest of `repeats` timed calls of action(setup()), after one untimed warm-up; setup is not timed."""
    times = []
    for _ in range(repeats + 1):
        prepared = setup()
        started = time.perf_counter()
        action(prepared)
        times.append(time.perf_counter() - started)
    return 1000 * min(times[1:])


def measure(
    model: str,
    flat: torch.Tensor,
    change: torch.Tensor,
    sharing_name: str,
    alpha: float,
    values: str,
    timing: bool,
) -> tuple[dict, Message]:
    """Pack one message with the library, size it three ways, time packing and decoding."""
    numel = flat.numel()
    options = {**SHARING_OPTIONS, "values": values}

    def ready_to_pack() -> tuple[object, torch.Tensor]:
        model_now = flat.clone()
        sharing = build_sharing(sharing_name, model_now, alpha, options, SEED, node=0)
        model_now += change  # the change since construction is what top-k ranks
        return sharing, model_now

    sharing, model_now = ready_to_pack()
    message = sharing.pack(model_now, ROUND, DEGREE)
    expected_k = {"full": numel, "partial": coordinates_to_send(alpha, numel)}.get(
        sharing_name, alpha * numel
    )
    ours, floor = message.total_bytes, floor_bytes(numel, expected_k)
    reference = reference_bytes(message.values, sharing.last_sent_index)
    row = {
        "model": model,
        "numel": numel,
        "sharing": sharing_name,
        "alpha": alpha,
        "values": values,
        "k_sent": message.values.numel(),
        "encoding": message.encoding.name,
        "our_bytes": ours,
        "our_data_bytes": message.data_bytes,
        "our_meta_bytes": message.meta_bytes,
        "reference_bytes": reference,
        "floor_bytes": floor,
        "ours_over_floor": round(ours / floor, 4),
        "saving_vs_reference_pct": round(100 * (reference - ours) / reference, 2),
    }
    if timing:
        row["pack_ms"] = round(
            best_ms(lambda ready: ready[0].pack(ready[1], ROUND, DEGREE), ready_to_pack), 3
        )
        row["decode_ms"] = round(best_ms(lambda _: receive_side(sharing, message, numel)), 3)
        row["at_1gbit_ms"] = round(ours * 8 / 1e6, 3)
    return row, message


def receive_side(sharing, message: Message, numel: int) -> None:
    """A receiver's work on an arrived message before merging: check (and decode) its index, decode."""
    coordinates = None
    if message.index is not None:
        coordinates, problem = read_index(
            message.encoding, message.index, message.values.numel(), numel
        )
        assert problem is None, problem
    sharing.decode(
        Message(
            message.round,
            message.degree,
            message.age,
            message.encoding,
            message.values,
            message.index,
            message.seed,
            coordinates,
        )
    )


def receive_times_ms(messages: list[Message]) -> list[float]:
    """Per message, the median time a receiver waits from asking for it until all of it arrived (loopback gloo)."""
    with tempfile.TemporaryDirectory() as scratch:
        result = Path(scratch) / "times.pt"

        def rank(ctx) -> None:
            dist.init_process_group(
                "gloo", store=ctx.store, rank=ctx.rank, world_size=2, timeout=timedelta(seconds=120)
            )
            ask = torch.zeros(1, dtype=torch.int32)
            times = []
            for message in messages:
                parts = wire_parts(message)
                if ctx.rank == 1:
                    for _ in range(REPEATS + 1):
                        dist.recv(ask, 0)
                        for work in [dist.isend(tensor, 0, tag=tag) for tensor, tag in parts]:
                            work.wait()
                    continue
                buffers = [(torch.empty_like(tensor), tag) for tensor, tag in parts]
                buffers[0] = (torch.empty(HEADER_LENGTH, dtype=HEADER_DTYPE), buffers[0][1])

                def receive() -> None:
                    dist.send(ask, 1)
                    for work in [dist.irecv(tensor, 1, tag=tag) for tensor, tag in buffers]:
                        work.wait()

                times.append(best_ms(lambda _: receive()))
            if ctx.rank == 0:
                torch.save(times, result)
            dist.destroy_process_group()

        spawn(rank, 2, timeout_s=600)
        return torch.load(
            result, weights_only=True
        )  # a list of floats: nothing to unpickle beyond data


def run_all(timing: bool) -> list[dict]:
    torch.set_num_threads(1)
    rows, messages = [], []
    for model in MODELS:
        numel = model_parameters(model)
        generator = torch_generator(SEED, "wire_bytes", numel)
        flat = torch.randn(numel, generator=generator)
        change = TRAINING_CHANGE_STD * torch.randn(numel, generator=generator)
        settings = [("full", 1.0)] + [
            (name, alpha) for name in ("partial", "subsampling") for alpha in ALPHAS
        ]
        for sharing_name, alpha in settings:
            for values in VALUE_TYPES:
                row, message = measure(model, flat, change, sharing_name, alpha, values, timing)
                rows.append(row)
                messages.append(message)
    if timing:
        for row, receive_ms in zip(rows, receive_times_ms(messages)):
            row["receive_ms"] = round(receive_ms, 3)
    return rows


COLUMNS = [  # (title, row key, width, number format; "" for text, which is left-aligned)
    ("model", "model", 12, ""),
    ("row", "label", 17, ""),
    ("values", "values", 8, ""),
    ("k sent", "k_sent", 9, ","),
    ("encoding", "encoding", 11, ""),
    ("ours", "our_bytes", 10, ","),
    ("meta", "our_meta_bytes", 8, ","),
    ("reference", "reference_bytes", 10, ","),
    ("floor", "floor_bytes", 10, ","),
    ("/floor", "ours_over_floor", 7, ".3f"),
    ("pack ms", "pack_ms", 8, ".3f"),
    ("decode ms", "decode_ms", 9, ".3f"),
    ("recv ms", "receive_ms", 8, ".3f"),
    ("1Gbit ms", "at_1gbit_ms", 8, ".3f"),
]


def print_table(rows: list[dict]) -> None:
    columns = [column for column in COLUMNS if column[1] in rows[0] or column[1] == "label"]
    print(
        "  ".join(
            format(title, f"{'>' if number else '<'}{width}") for title, _, width, number in columns
        )
    )
    for row in rows:
        cells = {
            **row,
            "label": "full" if row["sharing"] == "full" else f"{row['sharing']} {row['alpha']}",
        }
        print(
            "  ".join(
                format(cells[key], f"{'>' if number else '<'}{width}{number}")
                for _, key, width, number in columns
            )
        )
    print(
        f"bytes per message; reference = len(pickle.dumps(dict)), pickle protocol {pickle.DEFAULT_PROTOCOL}; "
        "/floor = ours / the float32 information floor"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--csv", help="write the rows as CSV to this path")
    parser.add_argument(
        "--no-timing", action="store_true", help="sizes only: skip the pack/decode/receive timings"
    )
    args = parser.parse_args()
    rows = run_all(timing=not args.no_timing)
    print_table(rows)
    if args.csv:
        with open(args.csv, "w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)


if __name__ == "__main__":
    main()
