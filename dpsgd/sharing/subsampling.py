"""Random sub-sampling: a Bernoulli(alpha) mask that the receiver regenerates from a seed.

The wire carries the seed and the selected values, never indices: the mask is drawn
by an explicitly seeded torch.Generator (never global state), so sender and receiver
compute the identical mask from (run seed, node, round).
"""

from __future__ import annotations

import torch

from dpsgd.seeding import stream_key
from dpsgd.sharing.wire import Encoding, Message


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
        self._values = torch.empty_like(flat)  # send buffer, reused: a message is sent before the next pack
        self.last_sent_index: torch.Tensor | None = None

    def pack(self, flat: torch.Tensor, round_number: int, degree: int, age: int = 0) -> Message:
        mask_seed = stream_key(self.seed, "subsampling", self.node, round_number)
        chosen = subsampling_mask(mask_seed, self.numel, self.alpha).nonzero().squeeze(1)
        self.last_sent_index = chosen
        return Message(round=round_number, degree=degree, age=age, encoding=Encoding.SEEDED_MASK,
                       values=torch.index_select(flat, 0, chosen, out=self._values[:chosen.numel()]),
                       seed=mask_seed)

    def decode(self, message: Message) -> tuple[torch.Tensor | None, torch.Tensor]:
        chosen = subsampling_mask(message.seed, self.numel, self.alpha).nonzero().squeeze(1)
        if chosen.numel() != message.values.numel():
            raise RuntimeError(f"sub-sampling mask from seed {message.seed} selects {chosen.numel()} "
                               f"coordinates but the message carries {message.values.numel()} values: "
                               "sender and receiver disagree on alpha or on the model size")
        return chosen, message.values

    def after_merge(self, flat: torch.Tensor) -> None:
        pass

    def state_dict(self) -> dict:
        return {}  # masks are a function of (seed, node, round): nothing to keep

    def load_state_dict(self, state: dict) -> None:
        pass
