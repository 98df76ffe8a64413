"""Sharing methods by name: `sharing.name` chooses one of `SHARING_METHODS`.

A new method is one module: a class with the `Sharing` protocol's methods (`dpsgd.sharing`), a
builder decorated with `@sharing_method(name)`, and `conf/sharing/<name>.yaml` declaring its
options. Every pattern and every grouping then runs it: the loops and transports only ever call
the protocol. A module of one's own registers when imported, before the run starts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    import torch

    from dpsgd.sharing import Sharing

# builder(flat model, alpha, the sharing.* options, run seed, node) -> the node's sharing method
Builder = Callable[["torch.Tensor", float, dict, int, int], "Sharing"]


@dataclass(frozen=True)
class SharingMethod:
    """A registered method: how to build it, and what the start-up checks must know of it.

    `alpha_unused`: why the top-level `alpha` means nothing to this method (None: it is the
    fraction of the model a message carries, checked to lie in (0, 1]). `check`: the reason
    its own options are invalid, or None.
    """

    build: Builder
    alpha_unused: str | None = None
    check: Callable[[dict], str | None] | None = None


SHARING_METHODS: dict[str, SharingMethod] = {}


def sharing_method(
    name: str,
    alpha_unused: str | None = None,
    check: Callable[[dict], str | None] | None = None,
) -> Callable[[Builder], Builder]:
    """Register a sharing method's builder under `name` (then `sharing=<name>` chooses it)."""

    def register(build: Builder) -> Builder:
        SHARING_METHODS[name] = SharingMethod(build, alpha_unused, check)
        return build

    return register
