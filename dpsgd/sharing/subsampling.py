"""Random sub-sampling: a Bernoulli(alpha) mask that the receiver regenerates from a seed.

The wire carries the seed and the selected values, never indices: the mask is drawn
by an explicitly seeded torch.Generator (never global state), so sender and receiver
compute the identical mask from (run seed, node, round).

A receiver checks a message's value count against the mask its seed draws before it
receives the values (`check_header`, called by the transport, which names the sender);
`decode` then reuses that mask instead of drawing it again.
"""

from __future__ import annotations

import threading

import torch

from dpsgd.seeding import stream_key
from dpsgd.sharing.methods import sharing_method
from dpsgd.sharing.wire import Encoding, Message, MessageRejected, encoding_problem

# Masks checked but not yet decoded: a round's messages (D-PSGD) or the RWM arrival queue; more are redrawn.
CHECKED_MASKS_KEPT = 64


def subsampling_mask(mask_seed: int, numel: int, alpha: float) -> torch.Tensor:
    """The bool mask of coordinates that a message with this seed carries."""
    generator = torch.Generator()
    generator.manual_seed(mask_seed)
    return torch.rand(numel, generator=generator) < alpha


class SubsamplingSharing:
    name = "subsampling"

    def __init__(self, flat: torch.Tensor, alpha: float, seed: int, node: int):
        self.alpha = alpha
        self.seed = seed
        self.node = node
        self.numel = flat.numel()
        self._values = torch.empty_like(
            flat
        )  # send buffer, reused: a message is sent before the next pack
        self.last_sent_index: torch.Tensor | None = None
        self._checked: dict[
            int, torch.Tensor
        ] = {}  # mask seed -> coordinates, from check_header to decode
        self._checked_lock = (
            threading.Lock()
        )  # RWM checks in its receiver threads, decodes in the main one

    def pack(self, flat: torch.Tensor, round_number: int, degree: int, age: int = 0) -> Message:
        mask_seed = stream_key(self.seed, "subsampling", self.node, round_number)
        chosen = self._coordinates(mask_seed)
        self.last_sent_index = chosen
        return Message(
            round=round_number,
            degree=degree,
            age=age,
            encoding=Encoding.SEEDED_MASK,
            values=torch.index_select(flat, 0, chosen, out=self._values[: chosen.numel()]),
            seed=mask_seed,
        )

    def check_header(self, fields: dict[str, int]) -> str | None:
        """Why a received header (already through `wire.check_header`) cannot be a sub-sampling message."""
        problem = encoding_problem(fields, (Encoding.SEEDED_MASK,), self.name)
        if problem is not None:
            return problem
        chosen = self._coordinates(fields["seed"])
        problem = _count_problem(fields["seed"], chosen.numel(), fields["num_values"])
        if problem is None:
            with self._checked_lock:
                if len(self._checked) >= CHECKED_MASKS_KEPT:
                    self._checked.pop(next(iter(self._checked)))
                self._checked[fields["seed"]] = chosen
        return problem

    def decode(self, message: Message) -> tuple[torch.Tensor | None, torch.Tensor]:
        with self._checked_lock:
            chosen = self._checked.pop(message.seed, None)
        if chosen is None:
            chosen = self._coordinates(message.seed)
        problem = _count_problem(message.seed, chosen.numel(), message.values.numel())
        if problem:
            raise MessageRejected(problem)
        return chosen, message.values

    def _coordinates(self, mask_seed: int) -> torch.Tensor:
        return subsampling_mask(mask_seed, self.numel, self.alpha).nonzero().squeeze(1)

    def after_merge(self, flat: torch.Tensor) -> None:
        pass

    def state_dict(self) -> dict:
        return {}  # masks are a function of (seed, node, round): nothing to keep

    def load_state_dict(self, state: dict) -> None:
        pass


def _count_problem(mask_seed: int, chosen: int, num_values: int) -> str | None:
    if chosen == num_values:
        return None
    return (
        f"the sub-sampling mask from seed {mask_seed} selects {chosen} coordinates but the message carries "
        f"num_values={num_values}: sender and receiver disagree on alpha or on the model size"
    )


@sharing_method("subsampling")
def subsampling_sharing(
    flat: torch.Tensor, alpha: float, options: dict, seed: int, node: int
) -> SubsamplingSharing:
    return SubsamplingSharing(flat, alpha, seed, node)
