"""What a checkpoint round costs a rank hosting a group of nodes, without training.

Builds `--nodes` stand-in nodes holding what a MovieLens (1) node's checkpoint holds (its
217,015-parameter row of the group's models, plain SGD, a batch order of 735 examples, the
generators and counters) and saves a checkpoint of every one of them `--checkpoints` times,
as `Checkpoints.after_round` does after a round, into a temporary folder on the disk the runs
use. Per checkpoint round (the median over the rounds):

- `in_round_s`: how long the rank is held up: serializing the states and handing the bytes
  to the writer, and with `--in-round` also waiting for each file to be on disk, node after
  node (how every checkpoint was written before issue 22);
- `on_disk_s`: from the start of the checkpoint round until every file is on disk (fsync'd,
  renamed, older ones pruned), which the writer threads must finish before the next one;
- `mb`: megabytes written per checkpoint round.

    python benchmarks/checkpoints.py                 # 96 nodes, 5 checkpoint rounds, in the background
    python benchmarks/checkpoints.py --in-round      # the same, each file written before the next node goes on

Prints one JSON line. The disk's speed (and whatever else writes to it) sets `on_disk_s`.

    python benchmarks/checkpoints.py --overhead      # what checkpoints cost rounds that go on meanwhile

`--overhead` measures what the writing costs the rounds that go on while it happens (a
writer thread holds the interpreter while it serializes, and shares the machine): the nodes'
rows go through `--rounds` stand-in rounds (many small tensor operations with gradients, as
training is, then the group's Metropolis-Hastings average), once with a checkpoint every
`--every` rounds and once without, alternated `--repeats` times in one process so that the
machine's drift falls on both alike. `overhead` is the median ratio of the two times, less one.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dpsgd.averaging import mix_rows_into  # noqa: E402
from dpsgd.checkpoint import WRITER, Checkpoints, CheckpointWriter, checkpoint_dir  # noqa: E402 - the repository is on the path from here
from dpsgd.communication import ByteCounters  # noqa: E402
from dpsgd.training import BatchStream  # noqa: E402

MOVIELENS_PARAMETERS = 217_015  # (610 users + 9,724 items) x (20 + 1) + 1: `experiment=movielens_1`
EXAMPLES_PER_NODE = 735  # 70% of 100,836 ratings over 96 nodes


def stand_in_nodes(count: int, rounds: int) -> list[SimpleNamespace]:
    rows = torch.randn(count, MOVIELENS_PARAMETERS)
    nodes = []
    for g in range(count):
        parameter = torch.nn.Parameter(rows[g])
        generator = torch.Generator().manual_seed(g)
        batches = BatchStream((torch.arange(EXAMPLES_PER_NODE),), 8, generator)
        batches.next_positions()  # an order drawn, as after a round
        nodes.append(
            SimpleNamespace(
                flat=rows[g],
                rng=np.random.default_rng(g),
                link=SimpleNamespace(bytes=ByteCounters()),
                trainer=SimpleNamespace(
                    optimizer=torch.optim.SGD([parameter], lr=0.25), batches=batches
                ),
                sharing=SimpleNamespace(state_dict=dict),
                recorder=SimpleNamespace(elapsed_s=lambda: 1.0),
                schedule=SimpleNamespace(rounds=rounds),
            )
        )
    return nodes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=96)
    parser.add_argument("--checkpoints", type=int, default=5)
    parser.add_argument(
        "--in-round", action="store_true", help="write each file before the next node goes on"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=WRITER.threads,
        help="writer threads (default: the library's)",
    )
    parser.add_argument(
        "--dir", default=str(REPO), help="a folder on the disk to measure (default: the repository)"
    )
    parser.add_argument("--overhead", action="store_true", help="the cost to rounds going on")
    parser.add_argument("--rounds", type=int, default=200, help="with --overhead")
    parser.add_argument("--every", type=int, default=50, help="with --overhead: checkpoint.every")
    parser.add_argument("--repeats", type=int, default=3, help="with --overhead")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.overhead:
        print(json.dumps(measure_overhead(args)))
        return
    rounds = args.checkpoints
    nodes = stand_in_nodes(
        args.nodes, rounds + 1
    )  # the last checkpoint round is not the run's last round
    store = dist.HashStore()
    in_round, on_disk = [], []
    with tempfile.TemporaryDirectory(dir=args.dir, prefix=".checkpoint-bench-") as run_dir:
        writer = CheckpointWriter(args.threads)
        checkpoints = [
            Checkpoints(Path(run_dir), g, args.nodes, 1, store, writer) for g in range(args.nodes)
        ]
        for round_number in range(1, rounds + 1):
            started = time.perf_counter()
            for node, node_checkpoints in zip(nodes, checkpoints):
                node_checkpoints.after_round(node, round_number, {})
                if args.in_round:
                    node_checkpoints.wait()
            in_round.append(time.perf_counter() - started)
            for node_checkpoints in checkpoints:
                node_checkpoints.wait()
            on_disk.append(time.perf_counter() - started)
        written = sum(path.stat().st_size for path in checkpoint_dir(Path(run_dir), 0).glob("*.pt"))
        written /= len(list(checkpoint_dir(Path(run_dir), 0).glob("*.pt")))
    print(
        json.dumps(
            {
                "nodes": args.nodes,
                "checkpoints": rounds,
                "in_round": args.in_round,
                "threads": args.threads,
                "in_round_s": round(statistics.median(in_round), 3),
                "on_disk_s": round(statistics.median(on_disk), 3),
                "mb": round(written * args.nodes / 1e6, 1),
            }
        )
    )


def stand_in_round(rows: torch.Tensor, spare: torch.Tensor, weights: list) -> None:
    """About what a round of grouped MovieLens training and averaging asks of the interpreter and
    the memory: small gathers with gradients per step, then one sparse average of the rows."""
    for _ in range(9):  # local steps
        where = torch.randint(0, rows.shape[1] - 21, (rows.shape[0], 8))
        for _ in range(4):  # the model's parts, each gathered, used and updated
            leaf = rows.gather(1, where).requires_grad_()
            (leaf * leaf).sum().backward()
            rows.scatter_add_(1, where, -0.01 * leaf.grad)
    mix_rows_into(spare, rows, weights)
    rows.copy_(spare)


def measure_overhead(args: argparse.Namespace) -> dict:
    nodes = stand_in_nodes(args.nodes, args.rounds + 1)
    rows = torch.stack([node.flat for node in nodes])
    for g, node in enumerate(nodes):
        node.flat = rows[g]
    spare = torch.empty_like(rows)
    ring = [(g, (g + step) % args.nodes, 1 / 3) for g in range(args.nodes) for step in (-1, 0, 1)]
    times: dict[str, list[float]] = {"with": [], "without": []}
    with tempfile.TemporaryDirectory(dir=args.dir, prefix=".checkpoint-bench-") as run_dir:
        for repeat in range(args.repeats):
            for case in ("without", "with"):
                writer = CheckpointWriter(args.threads)
                folder = Path(run_dir) / f"{case}-{repeat}"
                every = args.every if case == "with" else 0
                store = dist.HashStore()
                checkpoints = [
                    Checkpoints(folder, g, args.nodes, every, store, writer)
                    for g in range(args.nodes)
                ]
                started = time.perf_counter()
                for round_number in range(1, args.rounds + 1):
                    stand_in_round(rows, spare, ring)
                    for node, node_checkpoints in zip(nodes, checkpoints):
                        node_checkpoints.after_round(node, round_number, {})
                for node_checkpoints in checkpoints:
                    node_checkpoints.wait()
                times[case].append(time.perf_counter() - started)
    ratios = [w / wo for w, wo in zip(times["with"], times["without"])]
    return {
        "nodes": args.nodes,
        "rounds": args.rounds,
        "every": args.every,
        "threads": args.threads,
        "without_s": [round(t, 2) for t in times["without"]],
        "with_s": [round(t, 2) for t in times["with"]],
        "overhead": round(statistics.median(ratios) - 1, 4),
    }


if __name__ == "__main__":
    main()
