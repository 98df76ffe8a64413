"""Independent random streams derived from the one run seed.

Every consumer of randomness (data split, partition, model init, batch order, masks,
neighbour choice) gets its own stream keyed by (run seed, stream name, node, ...), so
adding a random draw in one place never shifts the numbers drawn in another, and the
same seed and config always give the same run.
"""

import hashlib

import numpy as np
import torch


def stream_key(seed: int, stream: str, *keys: int) -> int:
    """A 63-bit integer that is a pure function of the seed, the stream name and the keys."""
    text = ":".join([str(int(seed)), stream, *(str(int(k)) for k in keys)])
    digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def numpy_rng(seed: int, stream: str, *keys: int) -> np.random.Generator:
    """A numpy generator for one named stream."""
    return np.random.default_rng(stream_key(seed, stream, *keys))


def torch_generator(seed: int, stream: str, *keys: int) -> torch.Generator:
    """A CPU torch generator for one named stream (never the global one)."""
    generator = torch.Generator()
    generator.manual_seed(stream_key(seed, stream, *keys))
    return generator
