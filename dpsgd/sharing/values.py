"""The type parameter values travel in: `sharing.values` = float32 (default) | float16 | bfloat16.

Every sharing method packs float32 values; this layer narrows them just before they
leave and widens what arrives just after it is decoded, so the node's own model, its
training and every merge stay float32, and only the wire is lighter. float16 keeps 11
significant bits within +-65504 (a parameter beyond that arrives as inf, which the
divergence watch then reports); bfloat16 keeps float32's range with 8 bits. Bytes are
counted as sent: 2 per value instead of 4.

Both ends must agree: the header says which type a message's values are in, and a
message in another type than this node's `sharing.values` ends the run naming the
sender (a mixed configuration, never a silent reinterpretation of the bytes).
"""

from __future__ import annotations

import torch

from dpsgd.sharing.wire import VALUE_TYPE_CODES, VALUE_TYPES, Message, value_type_name


class WireValues:
    """A sharing method (`inner`) whose messages carry their values as `values_type`."""

    def __init__(self, inner, values_type: str):
        self.inner = inner
        self.name = inner.name
        self.wire_dtype = VALUE_TYPES[values_type]
        self.values_type = values_type
        # Send buffer, reused: each loop completes a message's sends before it packs the next (D-PSGD's
        # exchange waits for them; RWM's receive and a group walk's ready complete them first; a group's
        # batches are copies made by torch.cat).
        self._narrow: torch.Tensor | None = None

    @property
    def last_sent_index(self) -> torch.Tensor | None:
        return self.inner.last_sent_index

    def pack(self, flat: torch.Tensor, round_number: int, degree: int, age: int = 0) -> Message:
        message = self.inner.pack(flat, round_number, degree, age)
        if self.wire_dtype != message.values.dtype:
            if self._narrow is None or self._narrow.device != flat.device:
                self._narrow = torch.empty(flat.numel(), dtype=self.wire_dtype, device=flat.device)
            message.values = self._narrow[: message.values.numel()].copy_(message.values)
        return message

    def check_header(self, fields: dict[str, int]) -> str | None:
        """A header already through `wire.check_header`: this node's value type, then the method's own check."""
        if fields["values_type"] != VALUE_TYPE_CODES[self.wire_dtype]:
            sent = value_type_name(fields["values_type"])
            return (
                f"values_type={sent}, but this node has sharing.values={self.values_type} "
                "(every node of a run must use the same sharing.values)"
            )
        return self.inner.check_header(fields)

    def decode(self, message: Message) -> tuple[torch.Tensor | None, torch.Tensor]:
        """The method's decode, with the values widened to float32 for merging."""
        index, values = self.inner.decode(message)
        return index, values.float()

    def after_merge(self, flat: torch.Tensor) -> None:
        self.inner.after_merge(flat)

    def state_dict(self) -> dict:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.inner.load_state_dict(state)
