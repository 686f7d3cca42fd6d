"""The contract every aggregation method fulfils, and the registry that finds methods by name.

A method is one file holding both halves of a federated rule: what a client starts from, trains (which
factors or weights, which optimiser, which extra loss terms) and uploads, and how the server turns
client updates into the next global state. Methods see tensors, parameters and
:class:`~fedsubspace.state.GlobalState` only: no model, no PEFT, no Flower, so the in-process runner and
the Flower apps drive the very same objects.

The life of one client round, as the runner drives it:
``client_start`` (what the client's adapter and head start from) -> ``local_plan`` (what trains, with
which optimisers and regulariser; ``finish`` post-processes the result) -> the shared training loop ->
``uplink`` (what travels) -> ``aggregate`` on the server. ``downlink`` is what the client had to receive.
"""

from __future__ import annotations

import typing
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from fedsubspace import lowrank
from fedsubspace.methods.options import Declared, NoOptions, declarations
from fedsubspace.methods.privacy import PrivacySupport
from fedsubspace.state import ClientUpdate, Factors, GlobalState, carries_factors, flatten, unflatten

Tensor = torch.Tensor
# Extra client loss term, called once per optimiser step on the live (B, A) parameters of every module.
Regularizer = Callable[[Mapping[str, tuple[Tensor, Tensor]]], Tensor]


@dataclass(frozen=True)
class LocalSchedule:
    max_local_steps: int
    batch_size: int
    gradient_accumulation_steps: int
    learning_rate: float
    weight_decay: float
    max_grad_norm: float | None


@dataclass(frozen=True)
class ClientContext:
    """Who trains, when, at which LoRA rank, and the tensors the client keeps privately between rounds.

    ``memory`` belongs to the client alone (fedsa's local B and head, fedgalore's projector and second
    moment); the server never reads it. ``scaling`` is alpha / rank of the client's adapter.
    """

    client_id: int
    round_index: int  # 1-based
    rank: int
    scaling: float
    memory: dict[str, Tensor] = field(default_factory=dict)


@dataclass
class ClientStart:
    """The adapter (at the client's rank) and head a client starts its round from."""

    factors: Factors
    head: dict[str, Tensor]


@dataclass
class LiveParameters:
    """The model's parameters a method may train, as the runner maps them for the client's adapter.

    ``base`` holds the frozen weights of the adapted modules (W0 plus any merged residual), for methods
    that train the weights themselves (fedgalore).
    """

    factors: Mapping[str, tuple[nn.Parameter, nn.Parameter]]  # module -> (B, A)
    head: Mapping[str, nn.Parameter]
    base: Mapping[str, nn.Parameter]


@dataclass
class LocalPlan:
    """One client round as a method shapes it: what trains, how, and how the result is reported."""

    trains: frozenset[str]  # LoRA factors that train ("A", "B")
    parameters: list[nn.Parameter]  # everything that trains; gradients are clipped together
    optimizers: list[torch.optim.Optimizer]
    regularizer: Regularizer | None = None
    finish: Callable[[ClientUpdate], ClientUpdate] | None = None


class Method(ABC):
    name: ClassVar[str]
    # Which LoRA factors a client trains; the others stay at the value it started from.
    trains: ClassVar[frozenset[str]] = frozenset({"A", "B"})
    # Whether clients may have different LoRA ranks (config ``client_ranks``).
    heterogeneous_ranks: ClassVar[bool] = False
    # Whether the server merges updates into the frozen weights (needs a pristine copy of W0).
    merges_into_base: ClassVar[bool] = False
    # Whether each client keeps its own model (evaluated on its own held-out data) instead of a global one.
    personalised: ClassVar[bool] = False
    # Which privacy mechanisms the method's client and server rule can honour, and why (methods/privacy.py).
    privacy: ClassVar[PrivacySupport]
    # The method's hyperparameters: a frozen dataclass of the config keys it reads (methods/options.py).
    Options: ClassVar[type[Any]] = NoOptions

    def __init__(self, options: Any = None, seed: int = 0) -> None:
        self.options = self.Options() if options is None else options
        self.seed = seed  # the run's seed, for draws on the server (flora's fresh A)

    # --- client side ---------------------------------------------------------------------------

    def readout(self, state: GlobalState, rank: int, scaling: float) -> Factors:
        """The global adapter as a client of ``rank`` (with scaling ``scaling``) receives it.

        Methods that serve mixed ranks override this; the others only ever see the global rank.
        """
        if rank != state.rank:
            raise ValueError(f"{self.name} serves only the global rank {state.rank}, not {rank}")
        return state.factors

    def client_start(self, state: GlobalState, ctx: ClientContext) -> ClientStart:
        return ClientStart(self.readout(state, ctx.rank, ctx.scaling), state.head)

    def trains_in(self, round_index: int) -> frozenset[str]:
        """The LoRA factors clients train in ``round_index`` (rolora alternates them)."""
        return self.trains

    def client_regularizer(self, state: GlobalState) -> Regularizer | None:
        """Extra term added to a client's task loss in this round, or None."""
        return None

    def local_plan(
        self, state: GlobalState, ctx: ClientContext, params: LiveParameters, schedule: LocalSchedule
    ) -> LocalPlan:
        """The usual LoRA round: the method's factors and the head train with a fresh AdamW."""
        trains = self.trains_in(ctx.round_index)
        parameters = list(params.head.values())
        for B, A in params.factors.values():
            B.requires_grad_("B" in trains)
            A.requires_grad_("A" in trains)
            parameters += [p for p in (B, A) if p.requires_grad]
        for p in params.head.values():
            p.requires_grad_(True)
        optimizer = torch.optim.AdamW(
            parameters, lr=schedule.learning_rate, weight_decay=schedule.weight_decay
        )
        return LocalPlan(trains, parameters, [optimizer], self.client_regularizer(state))

    # --- communication -------------------------------------------------------------------------

    def downlink(self, state: GlobalState, ctx: ClientContext) -> dict[str, Tensor]:
        """The tensors a client must receive to start the round from ``state`` (merged residuals aside:
        the runner counts those with a :class:`~fedsubspace.state.MergeHistory`)."""
        return flatten(self.readout(state, ctx.rank, ctx.scaling), state.head)

    def client_view(
        self, received: Mapping[str, Tensor], initial: GlobalState, ctx: ClientContext
    ) -> GlobalState:
        """The global state as a client knows it at the start of round ``ctx.round_index``, from what it
        received (this method's :meth:`downlink`) and the initial state, which every client rebuilds from
        the config and seed. A runner that ships only the downlink (Flower) trains the client from this
        view: ``client_start`` and ``client_regularizer`` give on it what they give on the server's state.

        Received factors are the readout at the client's rank, with its scaling; factors that never travel
        keep their initial value (ffa's A, fedsa's B), and so does the head when it does not travel
        (fedsa). Merged base weights are the runner's to add (``residual``).
        """
        factors, head, extras = unflatten(received, initial.factors)
        return GlobalState(
            factors=factors,
            head={name: head.get(name, t) for name, t in initial.head.items()},
            scaling=ctx.scaling if carries_factors(received) else initial.scaling,
            extras=extras,
            round=ctx.round_index - 1,
        )

    def uplink(self, update: ClientUpdate) -> dict[str, Tensor]:
        """The tensors a client sends back: the factors it trained, its head and any extras."""
        trained = update.trained if update.trained is not None else self.trains
        return flatten(update.factors, update.head, update.extras, sides=trained)

    # --- server side ---------------------------------------------------------------------------

    @abstractmethod
    def aggregate(self, state: GlobalState, updates: list[ClientUpdate], weights: list[float]) -> GlobalState:
        """The next global state from this round's client updates; ``weights`` sum to 1."""


def truncated_readout(state: GlobalState, rank: int, scaling: float) -> Factors:
    """The first ``rank`` components of the global adapter, rescaled for a client with ``scaling``
    (zero-padded when the client's rank exceeds the global one)."""
    return {
        name: lowrank.resize_rank(B, A, rank, state.scaling / scaling)
        for name, (B, A) in state.factors.items()
    }


class TruncatingReadout:
    """Mixin for states whose adapter is ordered so that its first r_k components are the ones a client
    of rank r_k should get (hetlora's, flexlora's SVD order, flora's and fedgalore's B = 0)."""

    def readout(self, state: GlobalState, rank: int, scaling: float) -> Factors:
        return truncated_readout(state, rank, scaling)


METHODS: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    declared = declared_options()
    for key, option in declarations(cls.Options).items():
        # an option several methods read is one declaration (methods/options.py), never a copy
        if key in declared and declared[key].option is not option:
            raise TypeError(f"{cls.name} declares option {key!r} again; reference the existing Option")
    METHODS[cls.name] = cls
    return cls


def declared_options() -> dict[str, Declared]:
    """Every method's options by config key, in the order the methods were registered."""
    declared: dict[str, Declared] = {}
    for name, cls in METHODS.items():
        kinds = typing.get_type_hints(cls.Options)
        for key, option in declarations(cls.Options).items():
            readers = declared[key].methods if key in declared else ()
            declared[key] = Declared(option, kinds[key], (*readers, name))
    return declared


def heterogeneous_methods() -> list[str]:
    return sorted(name for name, cls in METHODS.items() if cls.heterogeneous_ranks)
