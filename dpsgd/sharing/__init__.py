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
from dpsgd.sharing import full, partial, subsampling  # noqa: F401 - they register their methods
from dpsgd.sharing.methods import SHARING_METHODS
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


def check_sharing(name: str, alpha: float, options: dict) -> None:
    """Reject invalid sharing settings before any rank trains (see SPEC §4)."""
    if name not in SHARING_METHODS:
        raise ConfigError(
            f"sharing.name={name!r} is not a known sharing method. Choose one of "
            f"{sorted(SHARING_METHODS)}, e.g. `sharing=partial alpha=0.1`."
        )
    method = SHARING_METHODS[name]
    merge = options.get("merge", "fill_own")
    if merge not in MERGE_RULES:
        raise ConfigError(
            f"sharing.merge={merge!r} is not a known merge rule. Choose one of "
            f"{sorted(MERGE_RULES)}, e.g. `sharing.merge=fill_own`."
        )
    if method.alpha_unused is None and not 0 < alpha <= 1:
        raise ConfigError(
            f"alpha={alpha} is outside (0, 1]: it is the fraction of the model each "
            f"message carries with sharing={name}. Set e.g. `alpha=0.1`."
        )
    problem = method.check(options) if method.check else None
    if problem:
        raise ConfigError(problem)
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


def alpha_note(name: str, alpha: float) -> str | None:
    """Why `alpha` does not apply to sharing method `name`, or None when it does (or is left at 1).

    `alpha` means something to partial and sub-sampling sharing only. A sweep that crosses
    sharing methods with alphas (`sharing=full,partial alpha=0.1,0.5`) is the usual way to
    compare them, so with the other methods alpha is accepted, said not to apply, and
    recorded so in the run's config.yaml; the report leaves it out of their labels.
    """
    why = SHARING_METHODS[name].alpha_unused
    if why is None or alpha == 1.0:
        return None
    return f"alpha={alpha} does not apply to sharing={name} ({why})"


def build_sharing(
    name: str, flat: torch.Tensor, alpha: float, options: dict, seed: int, node: int
) -> Sharing:
    """The sharing method named by `sharing.name`, with its `sharing.*` options, its values on the
    wire in `sharing.values`."""
    check_sharing(name, alpha, options)
    method = SHARING_METHODS[name].build(flat, alpha, options, seed, node)
    return WireValues(method, options.get("values", "float32"))
