"""Top-alpha partial sharing, and its random-alpha variant.

The score of a coordinate is how much it changed, in one of three senses (SPEC §4):
this round's training change; training changes accumulated since the coordinate was
last sent; or total drift (training and averaging) since it was last sent. The values
sent are the current parameter values of the chosen coordinates.
"""

from __future__ import annotations

import torch

from dpsgd.seeding import torch_generator
from dpsgd.sharing.methods import sharing_method
from dpsgd.sharing.selection import decode_indices, encode_indices, smallest_encoding, top_k_indices
from dpsgd.sharing.wire import INDEX_DTYPES, Encoding, Message, encoding_problem


def coordinates_to_send(alpha: float, numel: int) -> int:
    """k = round(alpha * numel), the one formula for how many coordinates a message carries."""
    return round(alpha * numel)


class PartialSharing:
    """Send the k = round(alpha * numel) coordinates that changed most."""

    name = "partial"

    def __init__(
        self,
        flat: torch.Tensor,
        alpha: float,
        *,
        accumulation: bool,
        accumulate_averaging_changes: bool,
        metadata_cap: float,
    ):
        """The switches have no defaults here: conf/sharing/*.yaml is where they are declared."""
        self.alpha = alpha
        self.accumulation = accumulation
        self.accumulate_averaging_changes = accumulation and accumulate_averaging_changes
        self.metadata_cap = metadata_cap
        self.numel = flat.numel()
        # Total drift since last sent is x - (x as last sent), so the drift mode keeps the model
        # as each coordinate was last sent and takes one difference a round; the other modes keep
        # the model as this round's training started.
        self._snapshot = flat.clone()
        self._accumulated = torch.zeros_like(flat)
        self._change = (  # this round's training change (the drift mode needs none)
            None if self.accumulate_averaging_changes else torch.empty_like(flat)
        )
        self._values = torch.empty_like(flat)  # send buffer: a message is sent before the next pack
        self.last_sent_index: torch.Tensor | None = None

    def pack(self, flat: torch.Tensor, round_number: int, degree: int, age: int = 0) -> Message:
        alpha = self.round_alpha()
        score = self._score(flat)
        if alpha >= self.metadata_cap:
            self._accumulated.zero_()
            if self.accumulate_averaging_changes:
                self._snapshot.copy_(flat)
            self.last_sent_index = None
            return Message(
                round=round_number, degree=degree, age=age, encoding=Encoding.FULL, values=flat
            )
        chosen = top_k_indices(score, coordinates_to_send(alpha, self.numel))
        self._accumulated.index_fill_(0, chosen, 0.0)
        values = torch.index_select(flat, 0, chosen, out=self._values[: chosen.numel()])
        if self.accumulate_averaging_changes:
            self._snapshot.index_copy_(0, chosen, values)  # these coordinates are sent as they are
        self.last_sent_index = chosen
        encoding, index_bytes, parameter = smallest_encoding(chosen, self.numel)
        return Message(
            round=round_number,
            degree=degree,
            age=age,
            encoding=encoding,
            values=values,
            coordinates=chosen,  # a receiver of the same rank needs no decoding, nor the index
            unwritten_index=(
                index_bytes // INDEX_DTYPES[encoding].itemsize,
                lambda: encode_indices(chosen, self.numel, encoding, parameter),
            ),
        )

    def _score(self, flat: torch.Tensor) -> torch.Tensor:
        """How much each coordinate changed, in the configured sense (module doc)."""
        if self.accumulate_averaging_changes:  # total drift since last sent
            return torch.sub(flat, self._snapshot, out=self._accumulated)
        training_change = torch.sub(flat, self._snapshot, out=self._change)
        if not self.accumulation:
            return training_change
        self._accumulated += training_change
        return self._accumulated

    def round_alpha(self) -> float:
        return self.alpha

    def check_header(self, fields: dict[str, int]) -> str | None:
        """Above metadata_cap the whole model goes out; below it, coordinates in the smallest index form."""
        return encoding_problem(
            fields,
            (Encoding.FULL, Encoding.INDEX_INT32, Encoding.BITMASK, Encoding.GAP_RICE),
            self.name,
        )

    def decode(self, message: Message) -> tuple[torch.Tensor | None, torch.Tensor]:
        if message.encoding == Encoding.FULL:
            return None, message.values
        if message.coordinates is not None:  # decoded already by the receiver's check of the index
            return message.coordinates, message.values
        return decode_indices(
            message.index, self.numel, message.encoding, message.values.numel()
        ), message.values

    def after_merge(self, flat: torch.Tensor) -> None:
        if not self.accumulate_averaging_changes:  # the next round's training starts here
            self._snapshot.copy_(flat)

    def state_dict(self) -> dict:
        return {"snapshot": self._snapshot.clone(), "accumulated": self._accumulated.clone()}

    def load_state_dict(self, state: dict) -> None:
        self._snapshot.copy_(state["snapshot"])
        self._accumulated.copy_(state["accumulated"])


class RandomAlphaSharing(PartialSharing):
    """Partial sharing whose alpha is drawn each round, uniformly from `alpha_list`."""

    name = "random_alpha"

    def __init__(
        self, flat: torch.Tensor, alpha_list: list[float], seed: int, node: int, **options
    ):
        super().__init__(flat, alpha=max(alpha_list), **options)
        self.alpha_list = list(alpha_list)
        self._generator = torch_generator(seed, "random_alpha", node)
        self.last_alpha: float | None = None

    def state_dict(self) -> dict:
        return {**super().state_dict(), "generator": self._generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self._generator.set_state(state["generator"])

    def round_alpha(self) -> float:
        choice = torch.randint(len(self.alpha_list), (1,), generator=self._generator).item()
        self.last_alpha = self.alpha_list[choice]
        return self.last_alpha


def _switches(options: dict) -> dict:
    """The keyword switches both methods take, from the sharing.* options."""
    return {
        key: options[key]
        for key in ("accumulation", "accumulate_averaging_changes", "metadata_cap")
    }


@sharing_method("partial")
def partial_sharing(
    flat: torch.Tensor, alpha: float, options: dict, seed: int, node: int
) -> PartialSharing:
    return PartialSharing(flat, alpha, **_switches(options))


def _alpha_list_problem(options: dict) -> str | None:
    alpha_list = options.get("alpha_list") or []
    if alpha_list and all(0 < a <= 1 for a in alpha_list):
        return None
    return (
        f"sharing.alpha_list={list(alpha_list)} must be a non-empty list of fractions "
        "in (0, 1], e.g. `sharing.alpha_list=[0.1,0.2,0.3,0.4,1.0]`."
    )


@sharing_method(
    "random_alpha",
    alpha_unused="each round's fraction is drawn from sharing.alpha_list",
    check=_alpha_list_problem,
)
def random_alpha_sharing(
    flat: torch.Tensor, alpha: float, options: dict, seed: int, node: int
) -> RandomAlphaSharing:
    return RandomAlphaSharing(flat, list(options["alpha_list"]), seed, node, **_switches(options))
