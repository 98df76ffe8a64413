"""Full sharing: the whole flat model, sent from its own storage without a copy."""

from __future__ import annotations

import torch

from dpsgd.sharing.methods import sharing_method
from dpsgd.sharing.wire import Encoding, Message, encoding_problem


class FullSharing:
    name = "full"
    last_sent_index = None

    def pack(self, flat: torch.Tensor, round_number: int, degree: int, age: int = 0) -> Message:
        return Message(
            round=round_number, degree=degree, age=age, encoding=Encoding.FULL, values=flat
        )

    def check_header(self, fields: dict[str, int]) -> str | None:
        return encoding_problem(fields, (Encoding.FULL,), self.name)

    def decode(self, message: Message) -> tuple[torch.Tensor | None, torch.Tensor]:
        return None, message.values

    def after_merge(self, flat: torch.Tensor) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


@sharing_method("full", alpha_unused="every message carries the whole model")
def full_sharing(
    flat: torch.Tensor, alpha: float, options: dict, seed: int, node: int
) -> FullSharing:
    return FullSharing()
