"""fedgalore (FedGaLore, 2026): clients train the adapted weight matrices themselves, GaLore-style.

RECONSTRUCTED. The paper's equations are not public; this follows methods.md and names every choice.

Client (no LoRA adapter: the adapters stay frozen with B = 0, the adapted modules' base weights train).
Per module and round:
- a projector fixed for the round from the first local gradient (the first optimiser step's
  accumulated, clipped gradient): its top-r left singular vectors ``P`` (m x r); right-sided, as GaLore
  does, when m > n. Internally every module is oriented (``W' = W`` or ``W^T``, m' <= n' unless square)
  so the projector acts on rows; r is capped at min(m, n);
- Adam on the projected gradient ``R = P^T G'`` (r x n'): betas (0.9, 0.999), eps 1e-8, the config's
  learning rate, GaLore's scale factor 1; weight decay decoupled and projected (``-lr wd P^T W'``), so the
  round's update is exactly ``P @ N`` with N the sum of the projected steps; a fresh first moment every
  round (as every method here); the second moment warm-started when the client has one (below), and a
  warm-started moment is not bias-corrected (it is already an estimate; a cold one is, as in Adam);
- the update travels as LoRA-style factors ``(B, A)`` with ``W_end - W_start = B @ A`` and scaling 1:
  ``(P, N)`` left-sided, ``(N^T, P^T)`` right-sided; with them the projected second moment ``V`` (r x n',
  indexed by the n' features all clients share);
- the head (encoders) trains with AdamW and is averaged, as everywhere.

Server: ``W <- W + sum_i p_i B_i A_i`` exactly, merged into the residual from the stacked factors. Second
moment synchronisation ("spectral shared-signal extraction", AJIVE-style): orthonormal bases of the row
spaces of the uploaded V_i, joint directions ``Phi`` (n' x q) = eigenvectors of ``sum p_i Q_i Q_i^T`` with
eigenvalue >= cos^2(theta / 2), theta = ``fedgalore_angle_threshold`` (60 degrees): AJIVE's principal-angle
rule for two subspaces, see :func:`fedsubspace.lowrank.joint_subspace`. The server broadcasts Phi; each
client forms ``max(eps, V_i Phi Phi^T)`` (eps 1e-12) from the V_i it uploaded itself, which is exactly what
"send each client max(eps, V_i Phi Phi^T)" delivers, without a per-client message, and maps it into its
next projector's coordinates by ``(P_new^T P_old)**2 @ V``. A client that has not trained before starts
Adam cold.

Communication. Up: (B, A) = r(m + n), V = r n', the head. Down: the merged increments since the
client's last round (the runner's merge ledger), Phi (n' x q), the head.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from fedsubspace import lowrank
from fedsubspace.methods.base import (
    ClientContext,
    LiveParameters,
    LocalPlan,
    LocalSchedule,
    Method,
    TruncatingReadout,
    register,
)
from fedsubspace.methods.common import average_heads, exact_sum, merged_residual
from fedsubspace.methods.options import Check, Option
from fedsubspace.methods.privacy import Support, individual_uploads
from fedsubspace.state import ClientUpdate, Factors, GlobalState, flatten

Tensor = torch.Tensor
MOMENT_FLOOR = 1e-12  # the eps of max(eps, V Phi Phi^T): second moments stay positive


def right_sided(weight: Tensor) -> bool:
    """GaLore projects from the right when the weight has more rows than columns."""
    return weight.shape[-2] > weight.shape[-1]


def oriented(matrix: Tensor, right: bool) -> Tensor:
    return matrix.mT if right else matrix


class ProjectedAdam(torch.optim.Optimizer):
    """Adam on rank-r projections of full weight gradients; each weight's round update is ``P @ N``.

    ``warm`` maps a module to ``(P_old, V_start)``: the client's previous projector and its synchronised
    second moment in that projector's coordinates, mapped into the new projector's at the first step.
    """

    def __init__(
        self,
        weights: Mapping[str, nn.Parameter],
        rank: int,
        lr: float,
        weight_decay: float = 0.0,
        warm: Mapping[str, tuple[Tensor, Tensor]] | None = None,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ) -> None:
        self.names = list(weights)
        self.rank = rank
        self.warm = dict(warm or {})
        super().__init__(
            list(weights.values()), {"lr": lr, "weight_decay": weight_decay, "betas": betas, "eps": eps}
        )

    @torch.no_grad()
    def step(self, closure: None = None) -> None:  # type: ignore[override]
        group = self.param_groups[0]
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        beta1, beta2 = group["betas"]
        for name, weight in zip(self.names, group["params"], strict=True):
            if weight.grad is None:
                continue
            right = right_sided(weight)
            # moments and projector in at least float32, whatever the model's dtype
            gradient = oriented(weight.grad, right).to(torch.promote_types(weight.dtype, torch.float32))
            st = self.state[weight]
            if not st:
                st.update(self._start(name, gradient))
            P = st["P"]
            st["step"] += 1
            projected = P.mT @ gradient
            st["M"].mul_(beta1).add_(projected, alpha=1 - beta1)
            st["V"].mul_(beta2).addcmul_(projected, projected, value=1 - beta2)
            m_hat = st["M"] / (1 - beta1 ** st["step"])
            v_hat = st["V"] if st["warm"] else st["V"] / (1 - beta2 ** st["step"])
            update = -lr * m_hat / (v_hat.sqrt() + eps)
            if wd:
                update -= lr * wd * (P.mT @ oriented(weight, right).to(update.dtype))
            st["N"] += update
            oriented(weight, right).add_((P @ update).to(weight.dtype))

    def _start(self, name: str, gradient: Tensor) -> dict[str, Any]:
        rank = min(self.rank, *gradient.shape)
        P = torch.linalg.svd(gradient, full_matrices=False)[0][:, :rank]
        moments = torch.zeros(rank, gradient.shape[1], dtype=gradient.dtype, device=gradient.device)
        state = {"P": P, "M": moments, "V": moments.clone(), "N": moments.clone(), "step": 0, "warm": False}
        if name in self.warm:
            P_old, V_start = (t.to(dtype=gradient.dtype) for t in self.warm[name])
            state.update(V=((P.mT @ P_old) ** 2) @ V_start, warm=True)
        return state

    def result(self) -> tuple[Factors, dict[str, Tensor], dict[str, Tensor]]:
        """``(B, A)`` with ``W_end - W_start = B @ A`` per module, the projectors, the second moments."""
        factors, projectors, moments = {}, {}, {}
        for name, weight in zip(self.names, self.param_groups[0]["params"], strict=True):
            st = self.state[weight]
            P, N = st["P"], st["N"]
            factors[name] = (N.mT, P.mT) if right_sided(weight) else (P, N)
            projectors[name], moments[name] = P, st["V"]
        return factors, projectors, moments


def _phi_key(module: str) -> str:
    return f"fedgalore/phi/{module}"


@dataclasses.dataclass(frozen=True)
class FedGaLoreOptions:
    fedgalore_angle_threshold: float = Option(
        60.0,
        "principal-angle threshold of the joint-subspace extraction of second moments, in degrees",
        Check(lambda value: 0.0 < value <= 90.0, "must be in (0, 90] degrees"),
    ).field()


@register
class FedGaLore(TruncatingReadout, Method):
    name = "fedgalore"
    privacy = individual_uploads(
        "merges each client's product P_i N_i and reads each client's second moment V_i",
        dp_sgd=Support(
            True,
            "clients train the weights by projected Adam steps: the full weight gradient is clipped and "
            "noised (m x n noise, not r(m + n)); projector and moments are computed from it afterwards",
        ),
    )
    trains = frozenset()
    heterogeneous_ranks = True
    merges_into_base = True
    Options = FedGaLoreOptions
    options: FedGaLoreOptions

    def warm_start(self, state: GlobalState, ctx: ClientContext) -> dict[str, tuple[Tensor, Tensor]]:
        """``(P_old, max(eps, V_old Phi Phi^T))`` per module, for a client that trained before."""
        warm = {}
        for module in state.factors:
            phi = state.extras.get(_phi_key(module))
            P_old, V_old = ctx.memory.get(f"P/{module}"), ctx.memory.get(f"V/{module}")
            if phi is None or P_old is None or V_old is None:
                continue
            warm[module] = (P_old, ((V_old @ phi) @ phi.mT).clamp_min(MOMENT_FLOOR))
        return warm

    def local_plan(
        self, state: GlobalState, ctx: ClientContext, params: LiveParameters, schedule: LocalSchedule
    ) -> LocalPlan:
        for B, A in params.factors.values():  # the adapters stay frozen at B = 0: the weights train
            B.requires_grad_(False)
            A.requires_grad_(False)
        for p in [*params.base.values(), *params.head.values()]:
            p.requires_grad_(True)
        galore = ProjectedAdam(
            params.base,
            rank=ctx.rank,
            lr=schedule.learning_rate,
            weight_decay=schedule.weight_decay,
            warm=self.warm_start(state, ctx),
        )
        optimizers: list[torch.optim.Optimizer] = [galore]
        if params.head:
            optimizers.append(
                torch.optim.AdamW(
                    params.head.values(), lr=schedule.learning_rate, weight_decay=schedule.weight_decay
                )
            )

        def report(update: ClientUpdate) -> ClientUpdate:
            factors, projectors, moments = galore.result()
            ctx.memory.update({f"P/{m}": P for m, P in projectors.items()})
            ctx.memory.update({f"V/{m}": V for m, V in moments.items()})
            return dataclasses.replace(
                update,
                factors=factors,
                extras={f"V/{m}": V for m, V in moments.items()},
                scaling=1.0,
                trained=frozenset({"A", "B"}),
            )

        return LocalPlan(
            trains=frozenset(),
            parameters=[*params.base.values(), *params.head.values()],
            optimizers=optimizers,
            finish=report,
        )

    def downlink(self, state: GlobalState, ctx: ClientContext) -> dict[str, Tensor]:
        phi = {k: v for k, v in state.extras.items() if k.startswith("fedgalore/phi/")}
        return flatten({}, state.head, phi)

    def aggregate(self, state: GlobalState, updates: list[ClientUpdate], weights: list[float]) -> GlobalState:
        merges, extras = {}, {}
        for module in state.factors:
            merges[module] = exact_sum(updates, weights, module, 1.0)
            bases = [lowrank.orthonormal_basis(u.extras[f"V/{module}"].mT) for u in updates]
            extras[_phi_key(module)], _ = lowrank.joint_subspace(
                bases, weights, self.options.fedgalore_angle_threshold
            )
        return state.next(
            head=average_heads(updates, weights),
            residual=merged_residual(state, merges),
            merged=merges,
            extras=extras,
        )
