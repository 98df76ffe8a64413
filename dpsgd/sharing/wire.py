"""The message format: a fixed header tensor, a float32 values tensor, an optional index tensor.

The header travels first and says how long the rest is, so the receiver can post
exactly-sized receives into buffers it allocated once. It also carries what the
algorithms need to match and weigh a message (round, sender degree, sender age) and
what the receiver needs to decode it (encoding, seed). No pickling anywhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

import torch

HEADER_FIELDS = ("round", "degree", "age", "encoding", "num_values", "num_index", "seed")
HEADER_DTYPE = torch.int64
HEADER_BYTES = len(HEADER_FIELDS) * 8
VALUES_DTYPE = torch.float32


class Encoding(IntEnum):
    """How the values map to coordinates of the flat model."""

    FULL = 0          # values are the whole vector, no index
    INDEX_INT32 = 1   # index holds sorted int32 coordinates
    BITMASK = 2       # index holds a packed uint8 bitmask over all coordinates
    SEEDED_MASK = 3   # coordinates follow from the header's seed; no index
    END = 4           # header only: the sender will send nothing more to this receiver


INDEX_DTYPES = {Encoding.INDEX_INT32: torch.int32, Encoding.BITMASK: torch.uint8}


@dataclass
class Message:
    """One message between two nodes, sent or received."""

    round: int
    degree: int
    age: int
    encoding: Encoding
    values: torch.Tensor
    index: torch.Tensor | None = None
    seed: int = 0

    @classmethod
    def received(cls, fields: dict[str, int], values: torch.Tensor, index: torch.Tensor | None) -> "Message":
        """A message as it arrived: the header's fields with the payload received after it."""
        return cls(round=fields["round"], degree=fields["degree"], age=fields["age"],
                   encoding=Encoding(fields["encoding"]), values=values, index=index, seed=fields["seed"])

    def header(self) -> torch.Tensor:
        num_index = 0 if self.index is None else self.index.numel()
        fields = [self.round, self.degree, self.age, int(self.encoding), self.values.numel(), num_index, self.seed]
        return torch.tensor(fields, dtype=HEADER_DTYPE)

    @property
    def data_bytes(self) -> int:
        """Bytes of parameter values."""
        return self.values.numel() * self.values.element_size()

    @property
    def meta_bytes(self) -> int:
        """Bytes of everything else: header, indices."""
        index_bytes = 0 if self.index is None else self.index.numel() * self.index.element_size()
        return HEADER_BYTES + index_bytes

    @property
    def total_bytes(self) -> int:
        return self.data_bytes + self.meta_bytes


def parse_header(header: torch.Tensor) -> dict[str, int]:
    return dict(zip(HEADER_FIELDS, header.tolist()))
