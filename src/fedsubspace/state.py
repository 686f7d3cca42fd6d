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
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

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


# The flat form's key prefixes: ``lora_B/<module>``, ``lora_A/<module>``, ``head/<name>``, ``extra/<name>``.
LORA_B, LORA_A, HEAD, EXTRA = "lora_B/", "lora_A/", "head/", "extra/"
_FACTOR_PREFIX = {"B": LORA_B, "A": LORA_A}


def flatten(
    factors: Factors,
    head: Mapping[str, Tensor],
    extras: Mapping[str, Tensor] | None = None,
    *,
    sides: Collection[str] = ("B", "A"),
) -> dict[str, Tensor]:
    """One flat name -> tensor dict, the form sent over the wire and written to checkpoints; ``sides``
    names the factors that travel ("B", "A": a method's trained set), the others are left out."""
    flat: dict[str, Tensor] = {}
    for name, pair in factors.items():
        for side, tensor in zip(("B", "A"), pair, strict=True):
            if side in sides:
                flat[f"{_FACTOR_PREFIX[side]}{name}"] = tensor
    flat.update({f"{HEAD}{name}": t for name, t in head.items()})
    flat.update({f"{EXTRA}{name}": t for name, t in (extras or {}).items()})
    return flat


def unflatten(
    flat: Mapping[str, Tensor], base: Factors | None = None
) -> tuple[Factors, dict[str, Tensor], dict[str, Tensor]]:
    """Inverse of :func:`flatten`: ``(factors, head, extras)``. Without ``base`` every module's two
    factors must be there (a checkpoint); with it, the modules are ``base``'s and a factor that did not
    travel is ``base``'s (what the receiver already holds)."""
    parts: dict[str, dict[str, Tensor]] = {LORA_B: {}, LORA_A: {}, HEAD: {}, EXTRA: {}}
    for key, tensor in flat.items():
        kind, _, name = key.partition("/")
        parts[f"{kind}/"][name] = tensor
    B_sent, A_sent = parts[LORA_B], parts[LORA_A]
    if base is None:
        factors = {name: (B, A_sent[name]) for name, B in B_sent.items()}
    else:
        factors = {name: (B_sent.get(name, B), A_sent.get(name, A)) for name, (B, A) in base.items()}
    return factors, parts[HEAD], parts[EXTRA]


def carries_factors(flat: Mapping[str, Tensor]) -> bool:
    """Whether a flat dict holds any LoRA factor."""
    return any(key.startswith((LORA_B, LORA_A)) for key in flat)


def payload_bytes(tensors: Mapping[str, Tensor]) -> int:
    """Bytes of the tensor data a message carries."""
    return sum(t.numel() * t.element_size() for t in tensors.values())


def weighted_average(tensors: list[Mapping[str, Tensor]], weights: list[float]) -> dict[str, Tensor]:
    """``sum_i p_i T_i`` key by key (heads, and the factors of rules that average them)."""
    return {
        key: cast(Tensor, sum(w * t[key] for w, t in zip(weights, tensors, strict=True)))
        for key in tensors[0]
    }


class MergeHistory:
    """Every round's merge into the base weights, and what brings a client up to date with them.

    A client whose base weights are current with round ``since`` needs the residual increments of rounds
    ``since+1 .. now``. Each increment is a product ``left @ right`` of stacked client factors, so it
    travels as those factors (replayed in order, they give exactly the server's residual), unless their
    total exceeds the dense m x n residual, which then travels instead: per module, the cheaper of the two.
    Clients start synchronised with the initial model (round 0, nothing merged).

    The in-process runner counts the bytes (:meth:`catch_up_bytes`, which also keeps track of each client's
    round); the Flower server ships the tensors (:meth:`catch_up`). Only the byte counts and the clients'
    rounds are checkpointed (:meth:`state_dict`): the factors of rounds before a restore are not kept.
    """

    def __init__(self) -> None:
        self.factors: list[Factors] = []  # round t's merge factors at index t - 1 (empty: no merge)
        self.factored: list[dict[str, int]] = []  # per round: module -> bytes of that round's merge factors
        self.dense: dict[str, int] = {}  # module -> bytes of one m x n increment
        self.synced: dict[int, int] = {}  # client -> the round its base weights are current with

    def record(self, state: GlobalState) -> None:
        """Note the merge of the round that produced ``state`` (none for methods that never merge)."""
        while len(self.factored) < state.round:
            self.factored.append({})
            self.factors.append({})
        if state.round == 0:
            return
        self.factors[state.round - 1] = dict(state.merged)
        self.factored[state.round - 1] = {
            module: payload_bytes({"l": left, "r": right}) for module, (left, right) in state.merged.items()
        }
        for module, residual in state.residual.items():
            self.dense[module] = residual.numel() * residual.element_size()

    def state_dict(self) -> dict[str, Any]:
        """The byte counts and the clients' rounds, as JSON-ready data (a resumed run restores them)."""
        return {"factored": self.factored, "dense": self.dense, "synced": self.synced}

    def load_state_dict(self, data: dict[str, Any]) -> None:
        self.factored = [dict(merges) for merges in data["factored"]]
        self.factors = [{} for _ in self.factored]
        self.dense = dict(data["dense"])
        self.synced = {int(client): since for client, since in data["synced"].items()}  # JSON keys are str

    def _plan(self, since: int, now: int) -> Iterator[tuple[str, list[int] | None]]:
        """Per merged module, the rounds whose factors travel to a client current with ``since``, or None
        where the dense residual is the smaller download."""
        for module, dense in self.dense.items():
            rounds = [t for t in range(since + 1, now + 1) if module in self.factored[t - 1]]
            factored = sum(self.factored[t - 1][module] for t in rounds)
            yield module, rounds if factored <= dense else None

    def catch_up_bytes(self, client_id: int, state: GlobalState) -> int:
        """Bytes that bring ``client_id`` to ``state``'s base weights; the client is then synchronised."""
        since = self.synced.get(client_id, 0)
        self.synced[client_id] = state.round
        return sum(
            self.dense[module] if rounds is None else sum(self.factored[t - 1][module] for t in rounds)
            for module, rounds in self._plan(since, state.round)
        )

    def catch_up(self, since: int, state: GlobalState) -> dict[str, Tensor]:
        """What a client current with round ``since`` must receive to reach ``state``'s base weights:
        ``merge/<t>/left/<module>`` and ``merge/<t>/right/<module>`` per round, or ``dense/<module>``."""
        payload: dict[str, Tensor] = {}
        for module, rounds in self._plan(since, state.round):
            if rounds is None:
                payload[f"dense/{module}"] = state.residual[module]
            for t in rounds or []:
                left, right = self.factors[t - 1][module]
                payload[f"merge/{t}/left/{module}"] = left
                payload[f"merge/{t}/right/{module}"] = right
        return payload

    @staticmethod
    def read_catch_up(payload: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[int, Factors]]:
        """A :meth:`catch_up` payload as ``(dense residuals, round -> merge factors)``."""
        dense: dict[str, Tensor] = {}
        sides: dict[str, dict[tuple[int, str], Tensor]] = {"left": {}, "right": {}}
        for key, tensor in payload.items():
            kind, _, rest = key.partition("/")
            if kind == "dense":
                dense[rest] = tensor
            else:
                round_text, side, module = rest.split("/", 2)
                sides[side][int(round_text), module] = tensor
        merges: dict[int, Factors] = {}
        for (t, module), left in sides["left"].items():
            merges.setdefault(t, {})[module] = (left, sides["right"][t, module])
        return dense, merges


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
