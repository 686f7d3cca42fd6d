"""glora (GLoRA, 2026, "gauge-aware server representation"): aggregate in a consensus subspace.

RECONSTRUCTED. The paper's equations are not public; this follows methods.md, itself a reconstruction
from the abstract. Per module:

1. each client's projector from its column space, ``Q_i = orth(B_i)`` (zero directions dropped);
2. the consensus subspace ``U_ref``: top-R eigenvectors of ``sum_i p_i Q_i Q_i^T`` (left singular vectors
   of ``[sqrt(p_1) Q_1, ..., sqrt(p_k) Q_k]``), R = ``glora_server_rank``: default the largest client
   rank, ``union`` the sum of client ranks, which makes the aggregation exact;
3. shared coordinates ``Z = sum_i p_i s_i (U_ref^T B_i) A_i`` (R x n), formed from the stacked factors.
   ``(U_ref, Z)`` is the server state (``extras["glora/U_ref/<module>"]``, ``extras["glora/Z/<module>"]``);
   ``U_ref Z = P_ref sum_i p_i s_i B_i A_i`` is invariant to every client's gauge ``(B G, G^-1 A)``;
4. a client of rank r_k reads out ``B = U_ref X_k sqrt(S_k / s_k)``, ``A = sqrt(S_k / s_k) Y_k^T`` from the
   thin SVD ``Z = X S Y^T``: the best rank-r_k approximation of ``U_ref Z``.

Choices beyond methods.md: Z carries each client's own scaling s_i = alpha / r_i (methods.md has one s;
with mixed ranks the products, not the factors, are what clients share), so Z is in units of dW and
the readout divides by the reader's scaling. The global adapter in ``state.factors`` (evaluated, and
compared by the diagnostics) is the readout at the largest client rank. Before the first aggregation
there is no ``(U_ref, Z)`` and clients read the initial adapter's first r_k components. No m x n matrix
is formed anywhere.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedsubspace import lowrank
from fedsubspace.methods.base import Method, register, truncated_readout
from fedsubspace.methods.common import average_heads, exact_sum
from fedsubspace.methods.options import Check, Option
from fedsubspace.methods.privacy import individual_uploads
from fedsubspace.state import ClientUpdate, Factors, GlobalState

Tensor = torch.Tensor


def _keys(module: str) -> tuple[str, str]:
    return f"glora/U_ref/{module}", f"glora/Z/{module}"


@dataclass(frozen=True)
class GLoRAOptions:
    glora_server_rank: int | str | None = Option(
        None,
        "rank of the server's consensus subspace; union: the sum of the client ranks (exact), null: the "
        "largest client rank",
        Check(
            lambda value: value is None or value == "union" or (isinstance(value, int) and value >= 1),
            "must be a positive integer, union, or null (the largest client rank)",
        ),
    ).field()


@register
class GLoRA(Method):
    name = "glora"
    privacy = individual_uploads("needs each client's column space orth(B_i)")
    heterogeneous_ranks = True
    Options = GLoRAOptions
    options: GLoRAOptions

    def server_rank(self, client_ranks: list[int]) -> int:
        chosen = self.options.glora_server_rank
        if chosen is None:
            return max(client_ranks)
        return sum(client_ranks) if chosen == "union" else int(chosen)

    def readout(self, state: GlobalState, rank: int, scaling: float) -> Factors:
        if _keys(next(iter(state.factors)))[0] not in state.extras:
            return truncated_readout(state, rank, scaling)
        factors = {}
        for module in state.factors:
            U_ref, Z = (state.extras[key] for key in _keys(module))
            svd = lowrank.factored_svd(U_ref, Z, rank)
            factors[module] = lowrank.split_factors(svd, scaling, "symmetric", rank)
        return factors

    def aggregate(self, state: GlobalState, updates: list[ClientUpdate], weights: list[float]) -> GlobalState:
        extras: dict[str, Tensor] = {}
        for module in state.factors:
            bases = [lowrank.orthonormal_basis(u.factors[module][0]) for u in updates]
            R = self.server_rank([u.factors[module][0].shape[-1] for u in updates])
            U_ref, _ = lowrank.consensus_basis(bases, weights, R)
            left, right = exact_sum(updates, weights, module, state.scaling)
            U_key, Z_key = _keys(module)
            extras[U_key], extras[Z_key] = U_ref, (U_ref.mT @ left) @ right
        new = state.next(extras=extras, head=average_heads(updates, weights))
        new.factors = self.readout(new, state.rank, state.scaling)
        return new
