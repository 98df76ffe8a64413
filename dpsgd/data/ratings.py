"""Rating data sets (synthetic and MovieLens) and the per-user train/test split.

A data set is one `RatingsTable` for all users, rows sorted by user so a user's ratings
are one contiguous slice. Each node then calls `split_rows` for the ratings its
partitioner gave it; the split of a user depends only on (seed, user), never on which
node owns it.
"""

import sys
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from dpsgd.data.cache import build_once, cache_path, load_arrays
from dpsgd.data.partition import Samples
from dpsgd.errors import ConfigError
from dpsgd.seeding import numpy_rng

MIN_RATING = 0.5
MAX_RATING = 5.0

MOVIELENS_HEADER = "userId,movieId,rating,timestamp"
MOVIELENS_URL = "https://grouplens.org/datasets/movielens/"
_MOVIELENS_ARRAYS = ["user", "item", "rating", "sizes", "user_ids", "movie_ids"]

# Scales of the synthetic generator, chosen so the signal (std about 0.9 before
# clipping) clearly dominates the default noise (0.3) and the global-mean RMSE is
# close to MovieLens' (about 1.0): a model that learns shows it quickly.
SYNTHETIC_MEAN = 3.5
SYNTHETIC_BIAS_STD = 0.4  # per user and per item
SYNTHETIC_INTERACTION_STD = 0.7  # std of <user factor, item factor>
SYNTHETIC_POPULARITY_STD = 0.8  # std of log item popularity: some items are rated more


@dataclass(frozen=True, eq=False)
class RatingsTable:
    """A whole ratings data set, rows sorted by user so each user's rows are contiguous."""

    user: np.ndarray  # int32, 0..num_users-1, ascending
    item: np.ndarray  # int32, 0..num_items-1
    rating: np.ndarray  # float32
    num_users: int
    num_items: int
    # offsets[u]..offsets[u+1] are the rows of user u; computed once, not per lookup.
    _offsets: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not (len(self.user) == len(self.item) == len(self.rating)):
            raise ValueError("user, item and rating must have the same length")
        if len(self.user) > 1 and np.any(self.user[1:] < self.user[:-1]):
            raise ValueError("RatingsTable rows must be sorted by user")
        offsets = np.searchsorted(self.user, np.arange(self.num_users + 1), side="left")
        object.__setattr__(self, "_offsets", offsets)

    @property
    def num_ratings(self) -> int:
        return len(self.rating)

    def user_rows(self, first_user: int, end_user: int) -> slice:
        """The rows of users first_user..end_user-1, as a slice (no copy)."""
        if not 0 <= first_user <= end_user <= self.num_users:
            raise IndexError(f"users [{first_user}, {end_user}) outside 0..{self.num_users}")
        return slice(int(self._offsets[first_user]), int(self._offsets[end_user]))

    def ratings_per_user(self) -> np.ndarray:
        return np.diff(self._offsets)

    @property
    def user_offsets(self) -> np.ndarray:
        """(num_users+1,): the rows of user u are offsets[u]..offsets[u+1] (read-only use)."""
        return self._offsets


@dataclass(frozen=True, eq=False)
class NodeRatings:
    """What one node trains and tests on: its own users' ratings, split per user."""

    # Users with ratings on this node (a range when it holds a block of whole users).
    users: Sequence[int]
    train_user: np.ndarray  # int64 global user ids
    train_item: np.ndarray  # int64 global item ids
    train_rating: np.ndarray  # float32
    test_user: np.ndarray
    test_item: np.ndarray
    test_rating: np.ndarray
    num_users: int  # global sizes: every node's model covers all users and items
    num_items: int

    @property
    def num_train(self) -> int:
        return len(self.train_rating)

    @property
    def num_test(self) -> int:
        return len(self.test_rating)


def _check_synthetic_args(
    num_users: int,
    num_items: int,
    rank: int,
    min_ratings: int,
    max_ratings: int,
    noise_std: float,
) -> None:
    problems = []
    if num_users < 1:
        problems.append(f"`num_users` is {num_users}; it must be at least 1")
    if rank < 1:
        problems.append(f"`rank` is {rank}; it must be at least 1")
    if not 1 <= min_ratings <= max_ratings <= num_items:
        problems.append(
            f"`min_ratings` ({min_ratings}) <= `max_ratings` ({max_ratings}) <= "
            f"`num_items` ({num_items}) does not hold, and min_ratings must be at least 1"
        )
    if noise_std < 0:
        problems.append(f"`noise_std` is {noise_std}; it must be zero or positive")
    if problems:
        raise ConfigError(
            "The synthetic data set settings are inconsistent: "
            + "; ".join(problems)
            + ". Fix these values in the dataset config."
        )


def _choose_items(
    rng: np.random.Generator, counts: np.ndarray, log_popularity: np.ndarray
) -> np.ndarray:
    """Distinct items for each user, popular items more likely (weighted, no replacement).

    Gumbel top-k: adding Gumbel noise to log weights and keeping the k largest samples k
    items without replacement with probability following the weights, for all users at
    once. Done in chunks of users so memory stays bounded for large settings.
    """
    num_users, num_items = len(counts), len(log_popularity)
    max_count = int(counts.max())
    chunk = max(1, 4_000_000 // num_items)
    chosen = []
    for start in range(0, num_users, chunk):
        end = min(start + chunk, num_users)
        keys = log_popularity + rng.gumbel(size=(end - start, num_items))
        if max_count < num_items:
            top = np.argpartition(-keys, max_count - 1, axis=1)[:, :max_count]
        else:
            top = np.broadcast_to(np.arange(num_items), keys.shape)
        top_keys = np.take_along_axis(keys, top, axis=1)
        ranked = np.take_along_axis(top, np.argsort(-top_keys, axis=1), axis=1)
        keep = np.arange(max_count) < counts[start:end, None]
        chosen.append(ranked[keep])  # row-major: users stay in ascending order
    return np.concatenate(chosen)


def make_synthetic_with_truth(
    seed: int,
    num_users: int = 400,
    num_items: int = 600,
    rank: int = 5,
    min_ratings: int = 20,
    max_ratings: int = 80,
    noise_std: float = 0.3,
) -> tuple[RatingsTable, np.ndarray]:
    """`make_synthetic`, plus the noiseless expected rating of every row.

    The expected rating (mean + biases + factor product, clipped to the rating scale) is
    what a perfect model could predict; comparing its RMSE with the global mean's shows
    how much there is to learn.
    """
    _check_synthetic_args(num_users, num_items, rank, min_ratings, max_ratings, noise_std)
    rng = numpy_rng(seed, "synthetic")
    counts = rng.integers(min_ratings, max_ratings + 1, size=num_users)
    log_popularity = rng.normal(0.0, SYNTHETIC_POPULARITY_STD, size=num_items)
    items = _choose_items(rng, counts, log_popularity)
    users = np.repeat(np.arange(num_users), counts)
    order = np.lexsort((items, users))  # canonical row order: by user, then item
    users, items = users[order], items[order]

    # With factors ~ N(0, s^2), <p, q> has variance rank * s^4.
    factor_std = (SYNTHETIC_INTERACTION_STD**2 / rank) ** 0.25
    user_factors = rng.normal(0.0, factor_std, size=(num_users, rank))
    item_factors = rng.normal(0.0, factor_std, size=(num_items, rank))
    user_bias = rng.normal(0.0, SYNTHETIC_BIAS_STD, size=num_users)
    item_bias = rng.normal(0.0, SYNTHETIC_BIAS_STD, size=num_items)
    signal = (
        SYNTHETIC_MEAN
        + user_bias[users]
        + item_bias[items]
        + np.einsum("nk,nk->n", user_factors[users], item_factors[items])
    )
    noisy = signal + rng.normal(0.0, noise_std, size=len(signal))
    # Snap to the half-star scale the way a user would: within range, nearest half star.
    rating = np.round(np.clip(noisy, MIN_RATING, MAX_RATING) * 2.0) / 2.0
    table = RatingsTable(
        user=users.astype(np.int32),
        item=items.astype(np.int32),
        rating=rating.astype(np.float32),
        num_users=num_users,
        num_items=num_items,
    )
    expected = np.clip(signal, MIN_RATING, MAX_RATING).astype(np.float32)
    return table, expected


def make_synthetic(seed: int, **shape) -> RatingsTable:
    """A deterministic MovieLens-like ratings set that needs no files.

    Low-rank user/item factors plus user and item biases plus Gaussian noise, snapped
    to the 0.5..5.0 half-star scale; each user rates between min_ratings and
    max_ratings distinct items, popular items more often. Same seed, same table.
    `shape` takes the keyword arguments of `make_synthetic_with_truth`.
    """
    table, _ = make_synthetic_with_truth(seed, **shape)
    return table


def _malformed(path: Path, line_number: int, text: str, why: str) -> ConfigError:
    return ConfigError(
        f"{path}, line {line_number}: {why} (the line reads {text[:80]!r}). Expected a "
        f"GroupLens ratings.csv with header {MOVIELENS_HEADER!r} and rows like "
        "'1,31,2.5,1260759144'; restore the original file from "
        f"{MOVIELENS_URL} (ml-latest-small.zip)."
    )


def _read_lines(path: Path) -> tuple[list[str], bool]:
    """The file's lines, and whether it ends with a line break (a complete file does)."""
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise ConfigError(
            f"Cannot read the MovieLens ratings {path} ({error.strerror}). Make the file "
            "readable by the user that runs dpsgd, or point `dataset.path` at a readable copy."
        ) from None
    try:
        # utf-8-sig drops a byte-order mark; splitlines handles both LF and CRLF files.
        lines = raw.decode("utf-8-sig").splitlines()
    except UnicodeDecodeError as error:
        line_number = raw[: error.start].count(b"\n") + 1
        raise _malformed(path, line_number, "", "the file is not UTF-8 text") from None
    return lines, raw.endswith((b"\n", b"\r"))


def _warn_maybe_truncated(path: Path, line_number: int, text: str) -> None:
    """Say so when the last row has no line break: a cut-off copy ends that way, and a row
    cut inside its last field (a shorter timestamp) still parses, so nothing else notices."""
    print(
        f"[dpsgd] warning: {path}, line {line_number}: the file does not end with a newline, "
        f"so it may be truncated (the last line reads {text[:80]!r} and was kept). If the "
        f"download or copy was interrupted, restore ratings.csv from {MOVIELENS_URL} "
        "(ml-latest-small.zip).",
        file=sys.stderr,
        flush=True,
    )


def _parse_ratings_csv(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Read (userId, movieId, rating) columns of a GroupLens ratings.csv, checking rows."""
    lines, ends_with_newline = _read_lines(path)
    if not lines or lines[0].strip() != MOVIELENS_HEADER:
        raise _malformed(path, 1, lines[0] if lines else "", "unexpected header")
    user_ids, movie_ids, ratings = [], [], []
    for line_number, text in enumerate(lines[1:], start=2):
        if not text.strip():
            continue
        fields = text.split(",")
        if len(fields) != 4:
            raise _malformed(path, line_number, text, f"expected 4 fields, got {len(fields)}")
        try:
            # The timestamp is not used, but a row cut short can leave it empty.
            user_id, movie_id, rating, _ = (
                int(fields[0]),
                int(fields[1]),
                float(fields[2]),
                int(fields[3]),
            )
        except ValueError:
            raise _malformed(path, line_number, text, "a field is not a number") from None
        if not MIN_RATING <= rating <= MAX_RATING:
            raise _malformed(
                path, line_number, text, f"rating {rating} outside {MIN_RATING}..{MAX_RATING}"
            )
        user_ids.append(user_id)
        movie_ids.append(movie_id)
        ratings.append(rating)
    if not ratings:
        raise _malformed(path, 1, lines[0], "the file has a header but no ratings")
    if not ends_with_newline:
        _warn_maybe_truncated(path, len(lines), lines[-1])
    return (
        np.array(user_ids, dtype=np.int64),
        np.array(movie_ids, dtype=np.int64),
        np.array(ratings, dtype=np.float32),
    )


def _build_movielens_cache(ratings_csv: Path, directory: Path) -> None:
    """Parse the CSV and write contiguous-id arrays, sorted by (user, item), as .npy."""
    user_ids, movie_ids, rating = _parse_ratings_csv(ratings_csv)
    # np.unique sorts, so dense ids follow ascending order of the original ids.
    unique_users, user = np.unique(user_ids, return_inverse=True)
    unique_movies, item = np.unique(movie_ids, return_inverse=True)
    order = np.lexsort((item, user))
    arrays = {
        "user": user[order].astype(np.int32),
        "item": item[order].astype(np.int32),
        "rating": rating[order],
        "sizes": np.array([len(unique_users), len(unique_movies)], dtype=np.int64),
        "user_ids": unique_users,  # original userId of each dense user id
        "movie_ids": unique_movies,  # original movieId of each dense item id
    }
    for name, array in arrays.items():
        np.save(directory / f"{name}.npy", array)


def _check_movielens_cache(directory: Path) -> str | None:
    """What makes a cached MovieLens table unusable, or None: ids beyond `sizes.npy` would
    only show as an IndexError in every rank mid-run, so they are caught at open instead."""
    arrays = load_arrays(directory, _MOVIELENS_ARRAYS)
    user, item, rating, sizes = (arrays[name] for name in ("user", "item", "rating", "sizes"))
    if sizes.shape != (2,):
        return f"sizes.npy has shape {sizes.shape}, not (2,) for [users, items]"
    num_users, num_items = int(sizes[0]), int(sizes[1])
    if not len(user) == len(item) == len(rating) > 0:
        return (
            f"user.npy, item.npy and rating.npy hold {len(user)}, {len(item)} and "
            f"{len(rating)} rows; they must be equal and not zero"
        )
    if np.any(user[1:] < user[:-1]):
        return "user.npy is not sorted"
    if user[0] < 0 or user[-1] >= num_users:
        return f"sizes.npy says {num_users} users, but user.npy has ids {user[0]}..{user[-1]}"
    if item.min() < 0 or item.max() >= num_items:
        return f"sizes.npy says {num_items} items, but item.npy has ids {item.min()}..{item.max()}"
    if (len(arrays["user_ids"]), len(arrays["movie_ids"])) != (num_users, num_items):
        return (
            f"sizes.npy says {num_users} users and {num_items} items, but user_ids.npy "
            f"and movie_ids.npy hold {len(arrays['user_ids'])} and {len(arrays['movie_ids'])}"
        )
    return None


def load_movielens(ratings_csv: str | Path, cache_dir: str | Path) -> RatingsTable:
    """The GroupLens ml-latest-small ratings, parsed once into a cache and memory-mapped.

    The first caller on a machine parses the CSV into `cache_dir`; every later caller
    (other ranks, later runs) memory-maps the cached arrays without reading the CSV, once
    the cache passes its checks (a damaged cache is parsed again).
    """
    ratings_csv = Path(ratings_csv)
    if not ratings_csv.is_file():
        raise ConfigError(
            f"MovieLens ratings not found at {ratings_csv}. Download ml-latest-small.zip "
            f"from {MOVIELENS_URL}, unzip it, and set `data_dir` (or the environment "
            "variable DPSGD_DATA) to the folder that contains `ml-latest-small/`, so "
            "that ml-latest-small/ratings.csv is inside it."
        )
    target = cache_path(cache_dir, "movielens", [ratings_csv])
    try:
        build_once(
            target,
            lambda directory: _build_movielens_cache(ratings_csv, directory),
            check=_check_movielens_cache,
        )
    except PermissionError as error:
        # The data folder is often read-only and shared; the cache must live elsewhere.
        raise ConfigError(
            f"Cannot write the parsed MovieLens cache under {cache_dir} ({error.strerror}). "
            "Point the cache directory setting at a writable folder on this machine "
            "(it may differ from `data_dir`, which can stay read-only)."
        ) from None
    arrays = load_arrays(target, _MOVIELENS_ARRAYS)
    num_users, num_items = (int(n) for n in arrays["sizes"])
    return RatingsTable(
        user=arrays["user"],
        item=arrays["item"],
        rating=arrays["rating"],
        num_users=num_users,
        num_items=num_items,
    )


def split_node_ratings(
    table: RatingsTable, users: range, seed: int, train_fraction: float = 0.7
) -> NodeRatings:
    """Split each of `users`' ratings into train and test, seeded per user (`split_rows`)."""
    if users.step != 1 or not 0 <= users.start <= users.stop <= table.num_users:
        raise ValueError(f"users {users} is not a contiguous range within 0..{table.num_users}")
    rows = table.user_rows(users.start, users.stop)
    node = split_rows(table, np.arange(rows.start, rows.stop, dtype=np.int64), seed, train_fraction)
    return replace(node, users=users)


def split_rows(
    table: RatingsTable, rows: np.ndarray, seed: int, train_fraction: float = 0.7
) -> NodeRatings:
    """A node's ratings `rows` (ascending) into train and test, by each user's split of all its ratings.

    User u's ratings are shuffled by the stream ("split", u) and the first
    round(train_fraction * n) go to train, so a user's split is the same whichever node
    owns it and however many nodes there are; a node holding only some of a user's
    ratings (a partitioner that splits users) keeps those ratings on the side of the
    split they fall on. The arrays are fresh copies, not views of a memory-mapped cache.
    """
    if not 0.0 < train_fraction < 1.0:
        raise ConfigError(
            f"`train_fraction` is {train_fraction}; it must lie strictly between 0 and 1 "
            "so every node has both train and test ratings (the study uses 0.7)."
        )
    rows = np.asarray(rows, dtype=np.int64)
    owners = np.asarray(table.user[rows])
    users, firsts = np.unique(owners, return_index=True)
    in_train = np.zeros(len(rows), dtype=bool)
    for user, first, end in zip(users.tolist(), firsts, [*firsts[1:], len(rows)]):
        start, stop = table.user_offsets[user], table.user_offsets[user + 1]
        count = int(stop - start)
        train = np.zeros(count, dtype=bool)
        train[
            numpy_rng(seed, "split", user).permutation(count)[: int(round(train_fraction * count))]
        ] = True
        in_train[first:end] = train[rows[first:end] - start]
    # Rows ascend, so each side does too: reads of the memory map stay sequential.
    train_index, test_index = rows[in_train], rows[~in_train]

    def take(index: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        # np.array copies into plain arrays that own their data: nothing returned keeps
        # the memory map (or a memmap-typed wrapper of it) alive.
        return (
            np.array(table.user[index], dtype=np.int64),
            np.array(table.item[index], dtype=np.int64),
            np.array(table.rating[index], dtype=np.float32),
        )

    train_user, train_item, train_rating = take(train_index)
    test_user, test_item, test_rating = take(test_index)
    return NodeRatings(
        users=users.tolist(),
        train_user=train_user,
        train_item=train_item,
        train_rating=train_rating,
        test_user=test_user,
        test_item=test_item,
        test_rating=test_rating,
        num_users=table.num_users,
        num_items=table.num_items,
    )


def ratings_samples(table: RatingsTable) -> Samples:
    """The ratings as partitioners see them: grouped by user, no class labels."""
    return Samples(table.num_ratings, table.user_offsets, None, "users")


def describe(table: RatingsTable) -> str:
    """One line of counts to log after loading, so a bad load is visible at once."""
    per_user = table.ratings_per_user()
    rating = np.asarray(table.rating)
    items_rated = len(np.unique(np.asarray(table.item)))
    return (
        f"{table.num_ratings} ratings, {table.num_users} users, {table.num_items} items "
        f"({items_rated} rated); ratings per user {per_user.min()}..{per_user.max()} "
        f"(median {int(np.median(per_user))}); rating {rating.min():.1f}..{rating.max():.1f}, "
        f"mean {rating.mean():.3f}"
    )
