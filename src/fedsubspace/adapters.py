"""LoRA adapters on a model, through PEFT: one adapter per client rank, all sharing the frozen weights, and
the parameter maps through which training, evaluation and the server's state read and write them.

Three parts, kept apart as PEFT keeps its config, layers and model:

- config: :class:`LoraSpec`, what the adapters are (client ranks, alpha, dropout, targets, the modules
  trained in full, seed), each rank's turned into PEFT's ``LoraConfig``;
- layers: :func:`lora_parameters`, :func:`head_parameters` and :func:`base_weights`, an adapter's
  parameters under the base model's module names, mapped once per rank into an :class:`Adapter`;
- model: :class:`TrainableModel`, the PEFT model with those maps: activate a rank, load a state into it,
  freeze it, snapshot it, merge it for inference. :func:`adapt` builds it.

The largest rank is the global model's adapter (PEFT's ``default``). PEFT draws each new A from the global
RNG: seeded (``seed`` for the global adapter, a stream of its own for each smaller rank) in a fork, so no
other random stream of the run moves.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from torch import nn

from fedsubspace.errors import UserError
from fedsubspace.methods import LiveParameters
from fedsubspace.models import ENCODER_HEAD, KINDS, check_target_modules
from fedsubspace.placement import Placement, tensors_to_server, to_server
from fedsubspace.seeding import ADAPTERS, stream_seed
from fedsubspace.state import GlobalState

Tensor = torch.Tensor
# The adapter PEFT creates first; here it holds the global (largest) rank.
GLOBAL_ADAPTER = "default"
_PEFT_PREFIX = "base_model.model."

# ---------------------------------------------------------------------------------------------
# Config


@dataclass(frozen=True)
class LoraSpec:
    """The adapters a model gets: one per distinct rank in ``ranks``, the largest the global model's."""

    ranks: list[int]
    alpha: float
    dropout: float
    target_modules: list[str]
    # Modules trained in full next to LoRA (PEFT's ``modules_to_save``), e.g. the encoder's head.
    modules_to_save: list[str]
    seed: int

    @property
    def global_rank(self) -> int:
        return max(self.ranks)


def lora_config(
    rank: int, alpha: float, dropout: float, target_modules: list[str], modules_to_save: list[str]
) -> LoraConfig:
    return LoraConfig(
        r=rank,
        lora_alpha=alpha,  # type: ignore[arg-type]  # PEFT says int; it scales by any alpha / r
        lora_dropout=dropout,
        target_modules=list(target_modules),
        modules_to_save=list(modules_to_save) or None,
        bias="none",
    )


def adapter_name(rank: int, global_rank: int) -> str:
    return GLOBAL_ADAPTER if rank == global_rank else f"rank{rank}"


@contextmanager
def _seeded(model: nn.Module, seed: int) -> Iterator[None]:
    """The global RNG seeded with ``seed`` inside a fork (restored afterwards, on the CPU and the model's
    GPUs), for PEFT's initialisation of a new adapter."""
    cuda = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=cuda), warnings.catch_warnings():
        # PEFT 0.21 still reads a transformers attribute that warns about its v6 rename.
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing`", FutureWarning)
        torch.manual_seed(seed)
        yield


def add_lora(
    model: nn.Module,
    kind: str,
    *,
    rank: int,
    alpha: float,
    dropout: float,
    target_modules: list[str],
    seed: int,
    modules_to_save: list[str] | None = None,
) -> PeftModel:
    """Wrap ``model`` in place with LoRA adapters (A kaiming-uniform, B zero, seeded).

    Everything else is frozen except ``modules_to_save`` (default: the multiple-choice
    ``classifier`` for encoders, nothing for causal models), which PEFT trains as a copy.
    The base weights are shared, not copied: wrap one model and swap adapter values per
    client rather than wrapping a model per client.
    """
    if kind not in KINDS:
        raise UserError(f"unknown model kind {kind!r} (use encoder or causal)")
    if rank < 1:
        raise UserError(f"LoRA rank must be at least 1, got {rank}")
    check_target_modules(model, target_modules)
    if modules_to_save is None:
        modules_to_save = [ENCODER_HEAD] if kind == "encoder" else []
    config = lora_config(rank, alpha, dropout, target_modules, modules_to_save)
    with _seeded(model, seed):
        peft_model = get_peft_model(model, config)
    return peft_model


# ---------------------------------------------------------------------------------------------
# Layers: an adapter's parameters under the base model's names


def _stable_name(name: str, adapter: str) -> str:
    """The name in the original model: PEFT's wrapper prefix and adapter copy removed."""
    name = name.removeprefix(_PEFT_PREFIX)
    return name.replace(f".modules_to_save.{adapter}.", ".")


def lora_parameters(peft_model: PeftModel) -> dict[str, tuple[nn.Parameter, nn.Parameter]]:
    """Module name (as in the base model) -> (A: r x in_features, B: out_features x r)."""
    adapter = peft_model.active_adapter
    pairs: dict[str, tuple[nn.Parameter, nn.Parameter]] = {}
    for name, module in peft_model.named_modules():
        if isinstance(module, LoraLayer) and adapter in module.lora_A:
            pairs[_stable_name(name, adapter)] = (
                module.lora_A[adapter].get_parameter("weight"),
                module.lora_B[adapter].get_parameter("weight"),
            )
    return pairs


def head_parameters(peft_model: PeftModel) -> dict[str, nn.Parameter]:
    """The active adapter's fully trained modules (e.g. the classifier), keyed by base-model name.

    PEFT keeps one copy of each such module per adapter; only the active adapter's copy is used.
    """
    adapter = peft_model.active_adapter
    own_copy = f".modules_to_save.{adapter}."
    return {
        _stable_name(name, adapter): param
        for name, param in peft_model.named_parameters()
        if own_copy in name
    }


def lora_scaling(peft_model: PeftModel) -> float:
    """The factor PEFT applies to B @ A: alpha / r."""
    config = peft_model.peft_config[peft_model.active_adapter]
    assert isinstance(config, LoraConfig)  # every adapter add_lora and adapt make is LoRA
    return float(config.lora_alpha) / float(config.r)


def base_weights(peft_model: PeftModel, modules: list[str]) -> dict[str, nn.Parameter]:
    """The frozen weights (out x in) under the adapters of ``modules``, keyed like the adapters."""
    wrapped = peft_model.get_base_model()
    return {module: wrapped.get_parameter(f"{module}.base_layer.weight") for module in modules}


@dataclass
class Adapter:
    """One PEFT adapter (one LoRA rank), its parameters mapped once: module -> (B, A), head name -> tensor."""

    name: str
    rank: int
    scaling: float
    factors: dict[str, tuple[nn.Parameter, nn.Parameter]]
    head: dict[str, nn.Parameter]


def map_adapters(peft_model: PeftModel, ranks: list[int]) -> dict[int, Adapter]:
    """Parameter maps of every adapter, built once (PEFT maps the active adapter, so each is activated)."""
    global_rank = max(ranks)
    adapters = {}
    for rank in sorted(set(ranks)):
        name = adapter_name(rank, global_rank)
        peft_model.set_adapter(name)
        factors = {module: (B, A) for module, (A, B) in lora_parameters(peft_model).items()}
        adapters[rank] = Adapter(name, rank, lora_scaling(peft_model), factors, head_parameters(peft_model))
    peft_model.set_adapter(adapter_name(global_rank, global_rank))
    return adapters


# ---------------------------------------------------------------------------------------------
# Model


class TrainableModel:
    """A PEFT model with one adapter per client rank, and the frozen weights of the adapted modules.

    With ``keep_pristine`` a copy of the adapted modules' original weights W0 is kept, so that the base
    weights can always be set to exactly ``W0 + residual`` (methods that merge into the base) and reset
    after a client trained them (fedgalore).
    """

    def __init__(
        self,
        model: PeftModel,
        kind: str,
        adapters: Mapping[int, Adapter],
        base: Mapping[str, nn.Parameter],
        device: torch.device,
        *,
        global_rank: int,
        keep_pristine: bool = False,
        autocast: str | None = None,
    ) -> None:
        self.model, self.kind, self.device = model, kind, device
        self.autocast = autocast  # forward passes under torch.autocast in this dtype (None: off)
        self.adapters, self.base = dict(adapters), dict(base)
        self.global_rank = global_rank
        self.active = global_rank
        self.pristine = {n: w.detach().clone() for n, w in self.base.items()} if keep_pristine else None

    @property
    def placement(self) -> Placement:
        """Where client rounds compute: the device and dtype of the adapter parameters."""
        B, _ = next(iter(self.adapters[self.global_rank].factors.values()))
        return Placement(B.device, B.dtype)

    @property
    def adapter(self) -> Adapter:
        return self.adapters[self.active]

    @property
    def factors(self) -> dict[str, tuple[nn.Parameter, nn.Parameter]]:
        return self.adapter.factors

    @property
    def head(self) -> dict[str, nn.Parameter]:
        return self.adapter.head

    def activate(self, rank: int) -> Adapter:
        if rank != self.active:
            self.model.set_adapter(self.adapters[rank].name)
            self.active = rank
        return self.adapter

    def load_weights(
        self,
        factors: Mapping[str, tuple[Tensor, Tensor]],
        head: Mapping[str, Tensor],
        residual: Mapping[str, Tensor],
    ) -> None:
        """Copy an adapter and head into the active adapter, and ``W0 + residual`` into the base."""
        if residual and self.pristine is None:
            raise RuntimeError("a state with a merged residual needs TrainableModel(keep_pristine=True)")
        with torch.no_grad():
            for name, (B, A) in self.factors.items():
                B_g, A_g = factors[name]
                B.copy_(B_g)
                A.copy_(A_g)
            for name, param in self.head.items():
                param.copy_(head[name])
            if self.pristine is not None:
                for name, weight in self.base.items():
                    delta = residual.get(name)
                    weight.copy_(
                        self.pristine[name] if delta is None else self.pristine[name] + delta.to(weight)
                    )

    def load(self, state: GlobalState) -> None:
        """The global model: the adapter of the state's rank, its head and the merged base weights."""
        self.activate(state.rank)
        self.load_weights(state.factors, state.head, state.residual)

    def freeze(self) -> None:
        """Nothing trains until the method's plan says so (PEFT marks an activated adapter trainable)."""
        for B, A in self.factors.values():
            B.requires_grad_(False)
            A.requires_grad_(False)
        for param in [*self.head.values(), *self.base.values()]:
            param.requires_grad_(False)

    @contextmanager
    def merged(self) -> Iterator[None]:
        """The active adapter folded into the base weights (``W + s B A``, PEFT's ``merge_adapter``) for
        inference: a forward then costs what the base model's does. The weights are restored bit for bit
        afterwards from a copy (unmerging by subtraction would leave rounding in W round after round)."""
        saved = {name: w.detach().clone() for name, w in self.base.items()}
        self.model.merge_adapter()
        try:
            yield
        finally:
            self.model.unmerge_adapter()  # PEFT's bookkeeping: the layers use their adapters again
            with torch.no_grad():
                for name, weight in self.base.items():
                    weight.copy_(saved[name])

    def live(self) -> LiveParameters:
        return LiveParameters(factors=self.factors, head=self.head, base=self.base)

    def snapshot(self) -> tuple[dict[str, tuple[Tensor, Tensor]], dict[str, Tensor]]:
        """The active adapter and head as the server keeps them (CPU copies)."""
        factors = {name: (to_server(B), to_server(A)) for name, (B, A) in self.factors.items()}
        return factors, tensors_to_server(self.head)


def adapt(
    model: nn.Module,
    kind: str,
    spec: LoraSpec,
    *,
    device: torch.device,
    keep_pristine: bool = False,
    autocast: str | None = None,
) -> TrainableModel:
    """``model`` wrapped in place with ``spec``'s adapters, the global one active, and their maps.

    The global adapter is drawn from ``spec.seed``, each smaller rank's from a stream of its own, so a
    rank's initial adapter does not depend on which other ranks the run has.
    """
    global_rank = spec.global_rank
    peft_model = add_lora(
        model,
        kind,
        rank=global_rank,
        alpha=spec.alpha,
        dropout=spec.dropout,
        target_modules=spec.target_modules,
        seed=spec.seed,
        modules_to_save=spec.modules_to_save,
    )
    for rank in sorted(set(spec.ranks) - {global_rank}):
        config = lora_config(rank, spec.alpha, spec.dropout, spec.target_modules, spec.modules_to_save)
        with _seeded(peft_model, stream_seed(spec.seed, ADAPTERS, rank)):
            peft_model.add_adapter(adapter_name(rank, global_rank), config)
    adapters = map_adapters(peft_model, spec.ranks)
    return TrainableModel(
        peft_model,
        kind,
        adapters,
        base_weights(peft_model, list(adapters[global_rank].factors)),
        device,
        global_rank=global_rank,
        keep_pristine=keep_pristine,
        autocast=autocast,
    )
