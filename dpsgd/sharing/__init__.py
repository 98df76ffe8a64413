"""Sharing methods: what part of its model a node puts on the wire, and how a receiver reads it.

A sharing method packs the flat model into a `Message` and decodes a received one into
(coordinates, values); merging the decoded values is `dpsgd.averaging`'s job and moving
them is `dpsgd.communication`'s.
"""

from __future__ import annotations

from typing import Protocol

import torch

from dpsgd.errors import ConfigError
from dpsgd.sharing.full import FullSharing
from dpsgd.sharing.wire import Message


class Sharing(Protocol):
    name: str

    def pack(self, flat: torch.Tensor, round_number: int, degree: int, age: int = 0) -> Message:
        """The message this node sends this round."""

    def decode(self, message: Message) -> tuple[torch.Tensor | None, torch.Tensor]:
        """The coordinates a received message covers (None: all) and their values."""

    def after_merge(self, flat: torch.Tensor) -> None:
        """Bookkeeping once the round's merge is done (e.g. change accumulators)."""


SHARING_METHODS = {"full": FullSharing}


def build_sharing(name: str) -> Sharing:
    """The sharing method named by `sharing.name`."""
    if name not in SHARING_METHODS:
        raise ConfigError(f"sharing.name={name!r} is not a known sharing method. Choose one of "
                          f"{sorted(SHARING_METHODS)}, e.g. `sharing=full` on the command line.")
    return SHARING_METHODS[name]()
