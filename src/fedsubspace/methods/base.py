"""The contract every aggregation method fulfils, and the registry that finds methods by name.

A method is one file holding both halves of a federated rule: what a client trains (which factors,
which extra loss terms) and uploads, and how the server turns client updates into the next global
state. Methods see tensors and :class:`~fedsubspace.state.GlobalState` only: no model, no PEFT, no
Flower, so the in-process runner and the Flower apps drive the very same objects.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch

from fedsubspace.state import ClientUpdate, GlobalState, flatten

Tensor = torch.Tensor
# Extra client loss term, called once per optimiser step on the live (B, A) parameters of every module.
Regularizer = Callable[[Mapping[str, tuple[Tensor, Tensor]]], Tensor]


@dataclass(frozen=True)
class MethodOptions:
    """The hyperparameters of all methods, as the experiment config names them."""

    mu: float = 0.05
    alpha: float = 0.01
    lambda_reg: float = 1e-5
    max_update_norm: float | None = None
    preserve_norm: bool = True


class Method(ABC):
    name: ClassVar[str]
    # Which LoRA factors a client trains; the others stay at the global value it received.
    trains: ClassVar[frozenset[str]] = frozenset({"A", "B"})

    def __init__(self, options: MethodOptions) -> None:
        self.options = options

    def client_regularizer(self, state: GlobalState) -> Regularizer | None:
        """Extra term added to a client's task loss in this round, or None."""
        return None

    def downlink(self, state: GlobalState) -> dict[str, Tensor]:
        """The tensors a client must receive to start the round from ``state``."""
        return flatten(state.factors, state.head)

    def uplink(self, update: ClientUpdate) -> dict[str, Tensor]:
        """The tensors a client sends back: the factors it trained and its head."""
        flat: dict[str, Tensor] = {}
        for name, (B, A) in update.factors.items():
            if "B" in self.trains:
                flat[f"lora_B/{name}"] = B
            if "A" in self.trains:
                flat[f"lora_A/{name}"] = A
        flat.update({f"head/{k}": v for k, v in update.head.items()})
        return flat

    @abstractmethod
    def aggregate(self, state: GlobalState, updates: list[ClientUpdate], weights: list[float]) -> GlobalState:
        """The next global state from this round's client updates; ``weights`` sum to 1."""


METHODS: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    METHODS[cls.name] = cls
    return cls
