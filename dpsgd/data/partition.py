"""Assigning a data set's train samples to nodes: partitioners, chosen by name.

Partitioning is kept apart from the data sets so every data set shares the same rules. A
partitioner is one function registered under a name (`@partitioner("name")`); it gets the
`Samples` to deal (how many, and the users or labels they carry when the data set has them),
the number of nodes and the run seed, and returns each node's sample indices. `dataset.partition`
chooses one by name (null: the data set's own default, that of the study); a data set whose
samples lack what a partitioner needs (users, labels) says so before any rank starts. Parts are
disjoint, cover every sample, and can be counted (`partition_counts`) so runs can say what each
node received.
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

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


# ---------------------------------------------------------------- partitioners by name


@dataclass(frozen=True, eq=False)
class Samples:
    """What a partitioner deals to nodes: a data set's train samples 0..count-1, and what is known of them."""

    count: int
    # int64 (users+1,): user i owns samples [i]:[i+1] (samples grouped by user); None: the data set has no users.
    user_offsets: np.ndarray | None = None
    labels: np.ndarray | None = None  # each sample's class (count,); None: the task has no classes
    what: str = "users"  # what the data set calls its users in messages ("writers", "celebrities")

    @property
    def num_users(self) -> int:
        return 0 if self.user_offsets is None else len(self.user_offsets) - 1

    def rows_of_users(self, users: Sequence[int]) -> np.ndarray:
        """The samples of `users`, user after user (int64; ascending when `users` is)."""
        offsets = self.user_offsets
        ranges = [np.arange(offsets[u], offsets[u + 1], dtype=np.int64) for u in users]
        return np.concatenate(ranges) if ranges else np.zeros(0, dtype=np.int64)


# partitioner(samples, nodes, seed) -> one array of sample indices per node; the same seed must give the same
# parts on every rank (ranks share nothing else), so draw only from `numpy_rng(seed, "<a stream of its own>")`.
Partitioner = Callable[[Samples, int, int], list[np.ndarray]]
PARTITIONERS: dict[str, Partitioner] = {}
# What a partitioner needs the samples to carry ("users", "labels"), by name: checked before any rank starts.
PARTITIONER_NEEDS: dict[str, tuple[str, ...]] = {}
_CARRIED = ("users", "labels")


def partitioner(name: str, needs: Sequence[str] = ()) -> Callable[[Partitioner], Partitioner]:
    """Register a partitioner under `name` (then `dataset.partition=<name>` chooses it); `needs`: what of
    "users" and "labels" the samples must carry for it to apply."""
    unknown = [need for need in needs if need not in _CARRIED]
    if unknown:
        raise ValueError(f"partitioner {name!r}: needs {unknown} are not among {list(_CARRIED)}")

    def register(rule: Partitioner) -> Partitioner:
        PARTITIONERS[name] = rule
        PARTITIONER_NEEDS[name] = tuple(needs)
        return rule

    return register


def choose_partitioner(name: str | None, default: str, samples: Samples, dataset: str) -> str:
    """`dataset.partition`, or the data set's `default` when it is null; a ConfigError, one paragraph, when
    the name is not registered or `dataset`'s samples lack what it needs. Called when the data set is
    prepared, before any rank starts."""
    if name is None:
        return default
    known = sorted(PARTITIONERS)
    if name not in PARTITIONERS:
        raise ConfigError(
            f"dataset.partition={name!r} is not a known partitioner; the known ones are {known}. Choose one "
            f"of them (dataset={dataset} uses `{default}` when `dataset.partition` is null, its default), "
            'or register yours with `@partitioner("<name>")` from dpsgd.data.partition in a module that is '
            "imported before the data set is prepared."
        )
    carried = {"users": samples.user_offsets is not None, "labels": samples.labels is not None}
    missing = [need for need in PARTITIONER_NEEDS[name] if not carried[need]]
    if missing:
        fitting = [
            other for other in known if all(carried[need] for need in PARTITIONER_NEEDS[other])
        ]
        raise ConfigError(
            f"dataset.partition={name} needs the samples' {' and '.join(missing)}, but dataset={dataset} has "
            f"no {' and no '.join(missing)}, so it cannot assign its samples. Choose a partitioner that "
            f"applies to {dataset} ({fitting}), or leave `dataset.partition` null for its own (`{default}`)."
        )
    return name


def partition_samples(name: str, samples: Samples, nodes: int, seed: int) -> list[np.ndarray]:
    """Each node's sample indices (int64, ascending) as the partitioner `name` deals them; the parts are
    checked to be `nodes` disjoint sets that cover every sample, whoever wrote the partitioner."""
    parts = [
        np.sort(np.asarray(part, dtype=np.int64))
        for part in PARTITIONERS[name](samples, nodes, seed)
    ]
    flat = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    in_range = len(flat) == 0 or (flat.min() >= 0 and flat.max() < samples.count)
    if (
        len(parts) != nodes
        or not in_range
        or not np.array_equal(np.bincount(flat, minlength=samples.count), np.ones(samples.count))
    ):
        raise ValueError(
            f"partitioner {name!r} returned {len(parts)} parts for {nodes} nodes that are not disjoint "
            f"sets covering the samples 0..{samples.count - 1} exactly once each"
        )
    return parts


@partitioner("user_blocks", needs=("users",))
def user_blocks(samples: Samples, nodes: int, seed: int) -> list[np.ndarray]:
    """The study's rule for MovieLens: users in their order, in contiguous blocks of near-equal numbers of
    users (the first users % nodes blocks one more), each user's samples on one node. `seed` plays no part."""
    blocks = contiguous_blocks(samples.num_users, nodes, what=samples.what)
    offsets = samples.user_offsets
    return [np.arange(offsets[b.start], offsets[b.stop], dtype=np.int64) for b in blocks]


@partitioner("shuffled_users", needs=("users",))
def shuffled_users(samples: Samples, nodes: int, seed: int) -> list[np.ndarray]:
    """Whole users dealt at random (seeded), near-equal numbers of users per node: LEAF's non-IID setting,
    where one user's data stays on one device."""
    if 1 <= nodes and samples.num_users < nodes:
        raise ConfigError(
            f"`nodes` is {nodes}, but the data set has only {samples.num_users} {samples.what}, and the "
            f"partitioner `shuffled_users` (LEAF's default) keeps each one's samples on one node: use at most "
            f"{samples.num_users} `nodes`, or set `dataset.partition=split_users` (on LEAF data sets "
            f"`dataset.split_users=true` does the same) to cut the {samples.count} samples into {nodes} "
            "near-equal blocks."
        )
    # The stream keeps the name it had when only LEAF data sets dealt users this way: the same parts as then.
    groups = shuffled_partition(
        range(samples.num_users), nodes, seed, "leaf_users", what=samples.what
    )
    # Users keep ascending order within a group, so their rows are already ascending.
    return [samples.rows_of_users(group) for group in groups]


@partitioner("split_users", needs=("users",))
def split_users(samples: Samples, nodes: int, seed: int) -> list[np.ndarray]:
    """For more nodes than users: users shuffled (seeded), their samples laid end to end and cut into
    `nodes` near-equal contiguous blocks, so a user may span neighbouring nodes."""
    order = numpy_rng(seed, "leaf_user_order").permutation(samples.num_users)
    rows = samples.rows_of_users(order.tolist())
    blocks = contiguous_blocks(len(rows), nodes, what="samples")
    return [np.sort(rows[block.start : block.stop]) for block in blocks]
