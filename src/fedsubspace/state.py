"""The state of a federation as plain tensors: what the server holds and what a client sends back.

Per adapted module the global adapter is ``(B, A)`` with ``dW = scaling * B @ A``; trainable tensors that
are not LoRA factors (a classification head) travel beside them. Methods that merge updates into the
frozen weights (fedex, flora, fedgalore) also carry the accumulated ``residual`` per module (m x n, in
the weight's own out x in layout): the global model is ``W0 + residual + scaling * B @ A``. Conversion
to and from the live PEFT model is a copy into (or out of) parameter maps built once per run, and
checkpoints are safetensors files of the flat form :func:`flatten` defines.
"""

from __future__ import annotations

import dataclasses
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
    """What the server holds after a round.

    ``factors`` is the global adapter at the global (largest client) rank with ``scaling`` its alpha / r.
    ``residual`` is what has been merged into the frozen weights so far (module -> m x n; empty for
    methods that never merge), ``merged`` the factored form ``left @ right`` of this round's increment
    of it (for diagnostics and communication; not checkpointed), ``round`` the number of rounds folded
    in (0 = the initial state), and ``extras`` holds method-specific server tensors.
    """

    factors: Factors
    head: dict[str, Tensor]
    scaling: float
    extras: dict[str, Tensor] = field(default_factory=dict)
    residual: dict[str, Tensor] = field(default_factory=dict)
    merged: Factors = field(default_factory=dict)
    round: int = 0

    @property
    def rank(self) -> int:
        return next(iter(self.factors.values()))[0].shape[-1]

    def products(self) -> dict[str, tuple[Tensor, Tensor]]:
        """Per module ``(scaling * B, A)``: the two factors of the update ``dW``."""
        return {name: (self.scaling * B, A) for name, (B, A) in self.factors.items()}

    def round_update(self, module: str, dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
        """The global model minus the base its round started from, as one product ``left @ right``.

        That base is ``W0`` plus the residual merged before this round, the same base every client of the
        round trained on, so this is what client updates compare with: this round's merge (if any) plus
        the adapter ``scaling * B @ A``. ``dtype`` converts the factors before they are scaled.
        """
        B, A = (t.to(dtype) for t in self.factors[module])
        if module not in self.merged:
            return self.scaling * B, A
        left, right = (t.to(dtype) for t in self.merged[module])
        return torch.cat([left, self.scaling * B], dim=-1), torch.cat([right, A], dim=-2)

    def next(self, **changes: object) -> GlobalState:
        """The state one round later: ``changes`` replace fields, the rest carries over.

        Every rule builds its result through this, so the round counter (which fedrot and rolora read)
        advances exactly once per round and a round's merge record never leaks into the next.
        """
        changes.setdefault("merged", {})
        return dataclasses.replace(self, round=self.round + 1, **changes)  # type: ignore[arg-type]


@dataclass
class ClientUpdate:
    """One client's result of a round: its final adapter, head, example count and training loss.

    ``scaling`` is the client's own alpha / r (clients of different ranks differ; None means the global
    state's), so the client's update is ``scaling * B @ A``. ``trained`` names the factors it trained
    (None: the method's static set); the uplink sends only those.
    """

    client_id: int
    num_examples: int
    factors: Factors
    head: dict[str, Tensor]
    train_loss: float
    extras: dict[str, Tensor] = field(default_factory=dict)
    scaling: float | None = None
    trained: frozenset[str] | None = None

    def product(
        self, module: str, default_scaling: float, dtype: torch.dtype | None = None
    ) -> tuple[Tensor, Tensor]:
        """``(s B, A)`` of one module, s the client's scaling (or ``default_scaling`` when unknown);
        ``dtype`` converts the factors before they are scaled."""
        B, A = (t.to(dtype) for t in self.factors[module])
        return (self.scaling if self.scaling is not None else default_scaling) * B, A

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


def first_non_finite(tensors: Mapping[str, Tensor]) -> str | None:
    """Name of the first tensor holding NaN or Inf, or None when all are finite."""
    return next((name for name, tensor in tensors.items() if not torch.isfinite(tensor).all()), None)


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


class MergeLedger:
    """What a client must download to reach the current merged base weights, counted honestly.

    A client that last synchronised after round tau needs the residual increments of rounds tau+1..now.
    Each increment is a product of stacked client factors, so it travels as those factors, unless
    their total exceeds the dense m x n increment, which then travels instead (per module, the cheaper
    of the two). Clients start synchronised with the initial model (round 0, nothing merged).
    """

    def __init__(self) -> None:
        self.factored: list[dict[str, int]] = []  # per round: module -> bytes of that round's merge factors
        self.dense: dict[str, int] = {}  # module -> bytes of one m x n increment
        self.synced: dict[int, int] = {}  # client -> the round its base weights are current with

    def record(self, state: GlobalState) -> None:
        """Note the merge of the round that produced ``state`` (none for methods that never merge)."""
        while len(self.factored) < state.round:
            self.factored.append({})
        if state.round == 0:
            return
        self.factored[state.round - 1] = {
            module: payload_bytes({"l": left, "r": right}) for module, (left, right) in state.merged.items()
        }
        for module, residual in state.residual.items():
            self.dense[module] = residual.numel() * residual.element_size()

    def state_dict(self) -> dict:
        """Everything the ledger remembers, as JSON-ready data (a resumed run restores it)."""
        return {"factored": self.factored, "dense": self.dense, "synced": self.synced}

    def load_state_dict(self, data: dict) -> None:
        self.factored = [dict(merges) for merges in data["factored"]]
        self.dense = dict(data["dense"])
        self.synced = {int(client): since for client, since in data["synced"].items()}  # JSON keys are str

    def catch_up_bytes(self, client_id: int, state: GlobalState) -> int:
        """Bytes that bring ``client_id`` to ``state``'s base weights; the client is then synchronised."""
        since = self.synced.get(client_id, 0)
        self.synced[client_id] = state.round
        total = 0
        for module, dense in self.dense.items():
            factored = sum(merges.get(module, 0) for merges in self.factored[since : state.round])
            total += min(dense, factored)
        return total


SIDECAR = "sidecar/"  # checkpoint keys that are not part of the global state (a runner's resume data)


def global_tensors(state: GlobalState) -> dict[str, Tensor]:
    """Every tensor of ``state`` that a checkpoint holds, by its checkpoint name."""
    flat = flatten(state.factors, state.head, state.extras)
    flat.update({f"residual/{name}": t for name, t in state.residual.items()})
    return flat


def save_state(
    path: Path,
    state: GlobalState,
    *,
    sidecar: Mapping[str, Tensor] | None = None,
    metadata: Mapping[str, str] | None = None,
) -> None:
    """``state`` as safetensors; ``sidecar`` tensors and ``metadata`` strings travel in the same file, so a
    runner's whole resume point is written by one atomic rename (:func:`load_state` ignores them,
    :func:`load_sidecar` reads them)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    flat = global_tensors(state)
    flat.update({f"{SIDECAR}{name}": t for name, t in (sidecar or {}).items()})
    flat = {k: v.detach().contiguous().cpu() for k, v in flat.items()}
    metadata = {**(metadata or {}), "scaling": json.dumps(state.scaling), "round": json.dumps(state.round)}
    save_file(flat, str(tmp), metadata=metadata)
    tmp.replace(path)  # a crash mid-write never leaves a torn checkpoint


def load_state(path: Path) -> GlobalState:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    flat = {k: t for k, t in load_file(str(path)).items() if not k.startswith(SIDECAR)}
    residual = {k.removeprefix("residual/"): t for k, t in flat.items() if k.startswith("residual/")}
    factors, head, extras = unflatten({k: t for k, t in flat.items() if not k.startswith("residual/")})
    return GlobalState(
        factors=factors,
        head=head,
        scaling=json.loads(metadata["scaling"]),
        extras=extras,
        residual=residual,
        round=json.loads(metadata.get("round", "0")),
    )


def load_sidecar(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The ``sidecar`` tensors and all metadata :func:`save_state` wrote beside the state."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
        tensors = {k.removeprefix(SIDECAR): f.get_tensor(k) for k in f.keys() if k.startswith(SIDECAR)}  # noqa: SIM118
    return tensors, metadata
