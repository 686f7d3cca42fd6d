"""The state of a federation as plain tensors: what the server holds and what a client sends back.

Per adapted module the global adapter is ``(B, A)`` with ``dW = scaling * B @ A``; trainable tensors that
are not LoRA factors (a classification head) travel beside them. Conversion to and from the live PEFT
model is a copy into (or out of) parameter maps built once per run, and checkpoints are safetensors
files of the flat form :func:`flatten` defines.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

Tensor = torch.Tensor
Factors = dict[str, tuple[Tensor, Tensor]]  # module name -> (B (m x r), A (r x n))


@dataclass
class GlobalState:
    """What the server holds after a round."""

    factors: Factors
    head: dict[str, Tensor]
    scaling: float
    extras: dict[str, Tensor] = field(default_factory=dict)  # method-specific server tensors

    def products(self) -> dict[str, tuple[Tensor, Tensor]]:
        """Per module ``(scaling * B, A)``: the two factors of the update ``dW``."""
        return {name: (self.scaling * B, A) for name, (B, A) in self.factors.items()}


@dataclass
class ClientUpdate:
    """One client's result of a round: its final adapter, head, example count and training loss."""

    client_id: int
    num_examples: int
    factors: Factors
    head: dict[str, Tensor]
    train_loss: float
    extras: dict[str, Tensor] = field(default_factory=dict)

    def non_finite_tensor(self) -> str | None:
        """Name of the first tensor holding NaN or Inf, or None when all are finite."""
        for name, (B, A) in self.factors.items():
            for suffix, tensor in (("lora_B", B), ("lora_A", A)):
                if not torch.isfinite(tensor).all():
                    return f"{name}.{suffix}"
        for name, tensor in {**self.head, **self.extras}.items():
            if not torch.isfinite(tensor).all():
                return name
        return None


def flatten(
    factors: Factors, head: Mapping[str, Tensor], extras: Mapping[str, Tensor] | None = None
) -> dict[str, Tensor]:
    """One flat name -> tensor dict, the form sent over the wire and written to checkpoints."""
    flat: dict[str, Tensor] = {}
    for name, (B, A) in factors.items():
        flat[f"lora_B/{name}"] = B
        flat[f"lora_A/{name}"] = A
    flat.update({f"head/{name}": t for name, t in head.items()})
    flat.update({f"extra/{name}": t for name, t in (extras or {}).items()})
    return flat


def unflatten(flat: Mapping[str, Tensor]) -> tuple[Factors, dict[str, Tensor], dict[str, Tensor]]:
    """Inverse of :func:`flatten`."""
    halves: dict[str, dict[str, Tensor]] = {"lora_B": {}, "lora_A": {}, "head": {}, "extra": {}}
    for key, tensor in flat.items():
        kind, _, name = key.partition("/")
        halves[kind][name] = tensor
    factors = {name: (B, halves["lora_A"][name]) for name, B in halves["lora_B"].items()}
    return factors, halves["head"], halves["extra"]


def payload_bytes(tensors: Mapping[str, Tensor]) -> int:
    """Bytes of the tensor data a message carries."""
    return sum(t.numel() * t.element_size() for t in tensors.values())


def weighted_average(tensors: list[Mapping[str, Tensor]], weights: list[float]) -> dict[str, Tensor]:
    """``sum_i p_i T_i`` key by key (heads, and the factors of rules that average them)."""
    return {key: sum(w * t[key] for w, t in zip(weights, tensors, strict=True)) for key in tensors[0]}


def save_state(path: Path, state: GlobalState) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    flat = {
        k: v.detach().contiguous().cpu() for k, v in flatten(state.factors, state.head, state.extras).items()
    }
    save_file(flat, str(tmp), metadata={"scaling": json.dumps(state.scaling)})
    tmp.replace(path)  # a crash mid-write never leaves a torn checkpoint


def load_state(path: Path) -> GlobalState:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        scaling = json.loads((f.metadata() or {})["scaling"])
    factors, head, extras = unflatten(load_file(str(path)))
    return GlobalState(factors=factors, head=head, scaling=scaling, extras=extras)
