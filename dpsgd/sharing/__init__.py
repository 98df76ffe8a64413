"""Sharing methods: what part of its model a node puts on the wire, and how a receiver reads it.

A sharing method packs the flat model into a `Message` and decodes a received one into
(coordinates, values); merging the decoded values is `dpsgd.averaging`'s job and moving
them is `dpsgd.communication`'s.
"""

from __future__ import annotations

import warnings
from typing import Protocol

import torch

from dpsgd.averaging import MERGE_RULES
from dpsgd.errors import ConfigError
from dpsgd.sharing.full import FullSharing
from dpsgd.sharing.partial import PartialSharing, RandomAlphaSharing
from dpsgd.sharing.subsampling import SubsamplingSharing
from dpsgd.sharing.values import WireValues
from dpsgd.sharing.wire import VALUE_TYPES, Message


class Sharing(Protocol):
    name: str
    last_sent_index: torch.Tensor | None  # coordinates of the last message sent (None: all)

    def pack(self, flat: torch.Tensor, round_number: int, degree: int, age: int = 0) -> Message:
        """The message this node sends this round."""

    def check_header(self, fields: dict[str, int]) -> str | None:
        """Why a received header (already through `wire.check_header`) cannot be this method's message."""

    def decode(self, message: Message) -> tuple[torch.Tensor | None, torch.Tensor]:
        """The coordinates a received message covers (None: all) and their values."""

    def after_merge(self, flat: torch.Tensor) -> None:
        """Bookkeeping once the round's merge is done (e.g. change accumulators)."""

    def state_dict(self) -> dict:
        """What a checkpoint must keep to continue exactly."""

    def load_state_dict(self, state: dict) -> None: ...


SHARING_METHODS = ("full", "partial", "random_alpha", "subsampling")


def check_sharing(name: str, alpha: float, options: dict) -> None:
    """Reject invalid sharing settings before any rank trains (see SPEC §4)."""
    if name not in SHARING_METHODS:
        raise ConfigError(
            f"sharing.name={name!r} is not a known sharing method. Choose one of "
            f"{list(SHARING_METHODS)}, e.g. `sharing=partial alpha=0.1`."
        )
    merge = options.get("merge", "fill_own")
    if merge not in MERGE_RULES:
        raise ConfigError(
            f"sharing.merge={merge!r} is not a known merge rule. Choose one of "
            f"{sorted(MERGE_RULES)}, e.g. `sharing.merge=fill_own`."
        )
    if name in ("partial", "subsampling") and not 0 < alpha <= 1:
        raise ConfigError(
            f"alpha={alpha} is outside (0, 1]: it is the fraction of the model each "
            f"message carries with sharing={name}. Set e.g. `alpha=0.1`."
        )
    if name == "random_alpha":
        alpha_list = options.get("alpha_list") or []
        if not alpha_list or not all(0 < a <= 1 for a in alpha_list):
            raise ConfigError(
                f"sharing.alpha_list={list(alpha_list)} must be a non-empty list of fractions "
                "in (0, 1], e.g. `sharing.alpha_list=[0.1,0.2,0.3,0.4,1.0]`."
            )
    values = options.get("values", "float32")
    if values not in VALUE_TYPES:
        raise ConfigError(
            f"sharing.values={values!r} is not a type values can travel in. Choose one of "
            f"{list(VALUE_TYPES)}, e.g. `sharing.values=float16` (half the data bytes)."
        )
    if options.get("accumulate_averaging_changes") and not options.get("accumulation"):
        warnings.warn(
            "sharing.accumulate_averaging_changes=true has no effect with "
            "sharing.accumulation=false; set sharing.accumulation=true to rank coordinates "
            "by their total drift since last sent.",
            stacklevel=2,
        )


def build_sharing(
    name: str, flat: torch.Tensor, alpha: float, options: dict, seed: int, node: int
) -> Sharing:
    """The sharing method named by `sharing.name`, with its `sharing.*` options, its values on the
    wire in `sharing.values`."""
    check_sharing(name, alpha, options)
    return WireValues(
        _method(name, flat, alpha, options, seed, node), options.get("values", "float32")
    )


def _method(
    name: str, flat: torch.Tensor, alpha: float, options: dict, seed: int, node: int
) -> Sharing:
    if name == "full":
        return FullSharing()
    if name == "subsampling":
        return SubsamplingSharing(flat, alpha, seed, node)
    partial_options = {
        key: options[key]
        for key in ("accumulation", "accumulate_averaging_changes", "metadata_cap")
    }
    if name == "partial":
        return PartialSharing(flat, alpha, **partial_options)
    return RandomAlphaSharing(flat, list(options["alpha_list"]), seed, node, **partial_options)
