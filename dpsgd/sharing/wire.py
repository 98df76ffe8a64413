"""The message format: a fixed header tensor, a values tensor, an optional index tensor.

The header travels first and says how long the rest is, so the receiver can post
exactly-sized receives into buffers it allocated once. It also carries what the
algorithms need to match and weigh a message (round, sender degree, sender age) and
what the receiver needs to decode it (encoding, value type, seed). No pickling anywhere.
The header is nine int32 (36 bytes; the 63-bit seed takes two): at alpha = 0.001 a
MovieLens message is about 1.2 kB, and a 64-bit header alone would be 5 % of it.

A header comes from another process, so the receiver believes none of it until
`check_header` agreed: its sizes decide what the receiver allocates and receives, and
only the model's size (which the receiver knows) may bound them. `check_index` does the
same for the coordinates an index tensor names, before they address the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import Callable

import torch

from dpsgd.sharing.bits import packed_length
from dpsgd.sharing.gap_code import GapCodeError, decode_gaps

HEADER_FIELDS = (
    "round",
    "degree",
    "age",
    "encoding",
    "values_type",
    "num_values",
    "num_index",
    "seed",
)
HEADER_DTYPE = torch.int32
HEADER_LENGTH = len(HEADER_FIELDS) + 1  # the seed is 63 bits: two int32 slots, low half first
HEADER_BYTES = HEADER_LENGTH * HEADER_DTYPE.itemsize
# sharing.values: the type parameter values travel in (the model itself stays float32). The
# code of each type is what the header's values_type field carries.
VALUE_TYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
VALUE_TYPE_CODES = {dtype: code for code, dtype in enumerate(VALUE_TYPES.values())}


def value_type_name(code: int) -> str:
    """The `sharing.values` name of a header's values_type code (a known one: check_header ran)."""
    return list(VALUE_TYPES)[code]


class Encoding(IntEnum):
    """How the values map to coordinates of the flat model."""

    FULL = 0  # values are the whole vector, no index
    INDEX_INT32 = 1  # index holds sorted int32 coordinates
    BITMASK = 2  # index holds a packed uint8 bitmask over all coordinates
    SEEDED_MASK = 3  # coordinates follow from the header's seed; no index
    END = 4  # header only: the sender will send nothing more to this receiver
    GAP_RICE = (
        5  # index holds the gaps between sorted coordinates, Rice-coded (dpsgd.sharing.gap_code)
    )


INDEX_DTYPES = {
    Encoding.INDEX_INT32: torch.int32,
    Encoding.BITMASK: torch.uint8,
    Encoding.GAP_RICE: torch.uint8,
}
ENCODING_VALUES = frozenset(encoding.value for encoding in Encoding)
# Set bits per byte value, to count a bitmask's coordinates without unpacking it.
POPCOUNT = torch.tensor([bin(byte).count("1") for byte in range(256)], dtype=torch.int64)


class MessageRejected(ValueError):
    """A received message that no correct peer sends, found where its sender is unknown (a decode).

    The transports run the same checks before receiving, where they name the sender.
    """


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
    # The coordinates the index names: the sender's own choice (handed over within a rank), or
    # decoded once by the receiver's check (`read_index`), so the method's decode need not decode them.
    coordinates: torch.Tensor | None = None
    # An index not written yet: (its length in elements of its type, a function that writes it),
    # written when `index` is first read; a message read only on its sender's rank never is.
    unwritten_index: tuple[int, Callable[[], torch.Tensor]] | None = None

    @classmethod
    def received(
        cls,
        fields: dict[str, int],
        values: torch.Tensor,
        index: torch.Tensor | None,
        coordinates: torch.Tensor | None = None,
    ) -> "Message":
        """A message as it arrived: the header's fields with the payload received after it."""
        return cls(
            round=fields["round"],
            degree=fields["degree"],
            age=fields["age"],
            encoding=Encoding(fields["encoding"]),
            values=values,
            index=index,
            seed=fields["seed"],
            coordinates=coordinates,
        )

    def header(self) -> torch.Tensor:
        """The header tensor. The 63-bit seed travels as two int32, low half first, each the two's
        complement reading of its 32 bits (`parse_header` joins them back)."""
        num_index = self._index_numel()
        seed_low = (self.seed & 0xFFFF_FFFF) - ((self.seed & 0x8000_0000) << 1)
        fields = [
            self.round,
            self.degree,
            self.age,
            int(self.encoding),
            VALUE_TYPE_CODES[self.values.dtype],
            self.values.numel(),
            num_index,
            seed_low,
            self.seed >> 32,
        ]
        return torch.tensor(fields, dtype=HEADER_DTYPE)

    @property
    def data_bytes(self) -> int:
        """Bytes of parameter values."""
        return self.values.numel() * self.values.element_size()

    @property
    def meta_bytes(self) -> int:
        """Bytes of everything else: header, indices."""
        if self.unwritten_index is not None:
            return HEADER_BYTES + self.unwritten_index[0] * INDEX_DTYPES[self.encoding].itemsize
        index_bytes = 0 if self.index is None else self.index.numel() * self.index.element_size()
        return HEADER_BYTES + index_bytes

    def _index_numel(self) -> int:
        if self.unwritten_index is not None:
            return self.unwritten_index[0]
        return 0 if self.index is None else self.index.numel()

    @property
    def total_bytes(self) -> int:
        return self.data_bytes + self.meta_bytes


def _read_index(message: Message) -> torch.Tensor | None:
    unwritten = message.__dict__.get("unwritten_index")
    if unwritten is not None:
        message.__dict__["_index"], message.__dict__["unwritten_index"] = unwritten[1](), None
    return message.__dict__.get("_index")


def _keep_index(message: Message, index: torch.Tensor | None) -> None:
    message.__dict__["_index"] = index


# `index` is written when first read (`unwritten_index`); set, it is kept as given.
Message.index = property(_read_index, _keep_index)


def encoding_problem(
    fields: dict[str, int], accepted: tuple[Encoding, ...], sharing: str
) -> str | None:
    """Why a header's encoding is not one that `sharing` sends (None when it is)."""
    if fields["encoding"] in accepted:
        return None
    return (
        f"encoding={Encoding(fields['encoding']).name}, but sharing={sharing} sends only "
        f"{'/'.join(e.name for e in accepted)}"
    )


def parse_header(header: torch.Tensor) -> dict[str, int]:
    """A received header as named fields; the seed's two int32 halves joined (see `Message.header`)."""
    *fields, seed_low, seed_high = header.tolist()
    return {
        **dict(zip(HEADER_FIELDS, fields)),
        "seed": (seed_high << 32) | (seed_low & 0xFFFF_FFFF),
    }


def values_dtype(fields: dict[str, int]) -> torch.dtype:
    """The type of the values a checked header announces."""
    return VALUE_TYPES[value_type_name(fields["values_type"])]


def declared_bytes(fields: dict[str, int]) -> tuple[int, int]:
    """(data, meta) bytes of the message a checked header announces: the values; the header and index."""
    encoding = Encoding(fields["encoding"])
    index_item_bytes = INDEX_DTYPES[encoding].itemsize if encoding in INDEX_DTYPES else 0
    return (
        fields["num_values"] * values_dtype(fields).itemsize,
        HEADER_BYTES + fields["num_index"] * index_item_bytes,
    )


def bitmask_bytes(numel: int) -> int:
    """Length of the packed bitmask over a model of `numel` coordinates."""
    return packed_length(numel)


def check_header(
    fields: dict[str, int],
    numel: int,
    expected_degree: int | None,
    *,
    expected_round: int | None = None,
    min_round: int = 1,
    allow_end: bool = False,
) -> str | None:
    """Why a received header cannot come from a correct peer, or None if it can.

    `numel` is the receiver's model size; `expected_degree` the sender's degree in the
    topology the receiver knows (None: not checked). D-PSGD passes `expected_round` (the
    round both are in); RWM passes `min_round` (the last round heard from this sender)
    and `allow_end`, since END is meaningful only in its shutdown handshake.
    """
    missing = [name for name in HEADER_FIELDS if name not in fields]
    if missing:
        return f"the header lacks the fields {missing}"
    encoding_value, num_values, num_index = (
        fields["encoding"],
        fields["num_values"],
        fields["num_index"],
    )
    if encoding_value not in ENCODING_VALUES:
        known = ", ".join(f"{encoding.name}={encoding.value}" for encoding in Encoding)
        return f"encoding={encoding_value} is not a known encoding ({known})"
    encoding = Encoding(encoding_value)
    if encoding == Encoding.END and not allow_end:
        return "encoding=END, which only the RWM shutdown handshake sends"
    if not 0 <= fields["values_type"] < len(VALUE_TYPES):
        known = ", ".join(f"{name}={code}" for code, name in enumerate(VALUE_TYPES))
        return f"values_type={fields['values_type']} is not a known value type ({known})"
    if num_values < 0 or num_index < 0:
        return f"negative sizes: num_values={num_values}, num_index={num_index}"
    size_problem = _size_problem(encoding, num_values, num_index, numel)
    if size_problem:
        return size_problem
    if expected_degree is not None and fields["degree"] != expected_degree:
        return (
            f"degree={fields['degree']} but the sender has degree {expected_degree} in the topology "
            "(both ends must run the same topology)"
        )
    if fields["age"] < 0:
        return f"age={fields['age']} is negative"
    if expected_round is not None and fields["round"] != expected_round:
        return f"round={fields['round']} while round {expected_round} was expected (message order broken)"
    if fields["round"] < min_round:
        return f"round={fields['round']} is before round {min_round}, the earliest this sender may send now"
    return None


def _size_problem(encoding: Encoding, num_values: int, num_index: int, numel: int) -> str | None:
    """The sizes each encoding allows on a model of `numel` coordinates."""
    sizes = f"num_values={num_values}, num_index={num_index}"
    if encoding == Encoding.FULL and (num_values != numel or num_index != 0):
        return f"{sizes}, but a FULL message carries exactly numel={numel} values and no index"
    if encoding == Encoding.INDEX_INT32 and not num_values == num_index <= numel:
        return f"{sizes}, but an INDEX_INT32 message carries one index per value and at most numel={numel}"
    if encoding == Encoding.BITMASK and (num_index != bitmask_bytes(numel) or num_values > numel):
        return (
            f"{sizes}, but a BITMASK message carries a {bitmask_bytes(numel)}-byte mask and at most "
            f"numel={numel} values"
        )
    if encoding == Encoding.GAP_RICE and not (
        0 < num_values <= numel and 0 < num_index <= bitmask_bytes(numel)
    ):
        return (
            f"{sizes}, but a GAP_RICE message carries 1 to numel={numel} values and an index no longer "
            f"than a bitmask ({bitmask_bytes(numel)} bytes), which it replaces only when shorter"
        )
    if encoding == Encoding.SEEDED_MASK and (num_index != 0 or num_values > numel):
        return (
            f"{sizes}, but a SEEDED_MASK message carries no index and at most numel={numel} values"
        )
    if encoding == Encoding.END and (num_values != 0 or num_index != 0):
        return f"{sizes}, but an END message is a header only"
    return None


def check_index(encoding: Encoding, index: torch.Tensor, num_values: int, numel: int) -> str | None:
    """Why a received index tensor cannot come from a correct peer, or None if it can."""
    return read_index(encoding, index, num_values, numel)[1]


def read_index(
    encoding: Encoding, index: torch.Tensor, num_values: int, numel: int
) -> tuple[torch.Tensor | None, str | None]:
    """(coordinates, problem): a received index checked, and the coordinates it names when checking
    meant decoding them (the gap code; None otherwise); problem is why no correct peer sends it.

    Senders write sorted, distinct coordinates of the model; anything else would address
    coordinates that do not exist (a negative one silently wraps around) or merge twice.
    """
    if encoding == Encoding.GAP_RICE:
        try:
            return decode_gaps(index, num_values, numel), None
        except GapCodeError as error:
            return None, f"the GAP_RICE index is corrupt: {error}"
    return None, _index_problem(encoding, index, num_values, numel)


def _index_problem(
    encoding: Encoding, index: torch.Tensor, num_values: int, numel: int
) -> str | None:
    if encoding == Encoding.INDEX_INT32 and index.numel():
        low, high = int(index[0]), int(index[-1])
        if not (index[1:] > index[:-1]).all():
            return "the INDEX_INT32 coordinates are not sorted and distinct"
        if low < 0 or high >= numel:
            return f"the INDEX_INT32 coordinates span [{low}, {high}], outside the model's [0, {numel - 1}]"
    if encoding == Encoding.BITMASK:
        chosen = int(POPCOUNT[index.long()].sum())
        padding_bits = int(index[-1]) >> (numel % 8) if numel % 8 and index.numel() else 0
        if chosen != num_values or padding_bits:
            return (
                f"the BITMASK sets {chosen} bits ({'some beyond the model, ' if padding_bits else ''}"
                f"numel={numel}) for num_values={num_values}"
            )
    return None
