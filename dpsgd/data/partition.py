"""Assigning users (or LEAF writers) to nodes.

Partitioning is kept apart from the data sets so every data set shares the same rules:
parts are disjoint, cover everything, differ in size by at most one, and can be counted
(`partition_counts`) so runs can say what each node received.
"""

from collections.abc import Sequence

from dpsgd.errors import ConfigError
from dpsgd.seeding import numpy_rng


def _check_enough(num_items: int, num_parts: int, what: str) -> None:
    if num_parts < 1:
        raise ConfigError(
            f"`nodes` is {num_parts}, but a run needs at least one node: set `nodes` "
            "(the world size) to a positive number."
        )
    if num_items < num_parts:
        raise ConfigError(
            f"`nodes` is {num_parts}, but the data set has only {num_items} {what}, and "
            f"every node needs at least one of them: use at most {num_items} nodes "
            "or a larger data set."
        )


def contiguous_blocks(num_items: int, num_parts: int, *, what: str = "users") -> list[range]:
    """Split 0..num_items-1 into num_parts blocks in order, as equal as possible.

    The first `num_items % num_parts` blocks get one extra item, which is the rule the
    study uses to assign MovieLens users to nodes. `what` only words the error message.
    """
    _check_enough(num_items, num_parts, what)
    base, extra = divmod(num_items, num_parts)
    blocks = []
    start = 0
    for part in range(num_parts):
        size = base + (1 if part < extra else 0)
        blocks.append(range(start, start + size))
        start += size
    return blocks


def shuffled_partition(
    ids: Sequence, num_parts: int, seed: int, stream: str, *, what: str = "users"
) -> list[list]:
    """Split `ids` into num_parts disjoint random groups of near-equal size.

    The shuffle comes from its own seeded stream so the assignment does not depend on
    any other random draw; within a group the ids keep their input order, so a group's
    content, not its order, is what the seed decides.
    """
    ids = list(ids)
    blocks = contiguous_blocks(len(ids), num_parts, what=what)
    order = numpy_rng(seed, stream).permutation(len(ids))
    return [[ids[i] for i in sorted(order[block.start : block.stop])] for block in blocks]


def partition_counts(parts) -> list[int]:
    """How many items each part holds, for logs and for comparing runs."""
    return [len(part) for part in parts]
