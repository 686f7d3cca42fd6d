"""Server-side building blocks shared by several methods (all on top of :mod:`fedsubspace.lowrank`)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fedsubspace import lowrank
from fedsubspace.state import ClientUpdate, Factors, GlobalState, weighted_average

Tensor = torch.Tensor


def average_heads(updates: list[ClientUpdate], weights: list[float]) -> dict[str, Tensor]:
    if not updates[0].head:
        return {}
    return weighted_average([u.head for u in updates], weights)


def weighted_sum(tensors: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    """``sum_i p_i T_i`` (factor averaging)."""
    total = weights[0] * tensors[0]
    for p, t in zip(weights[1:], tensors[1:], strict=True):
        total = total + p * t
    return total


def average_factors(updates: list[ClientUpdate], weights: list[float], module: str) -> tuple[Tensor, Tensor]:
    """``(sum p_i B_i, sum p_i A_i)`` of one module: the factor averaging of fedavg and its relatives."""
    return (
        weighted_sum([u.factors[module][0] for u in updates], weights),
        weighted_sum([u.factors[module][1] for u in updates], weights),
    )


def exact_sum(
    updates: list[ClientUpdate], weights: list[float], module: str, scaling: float
) -> tuple[Tensor, Tensor]:
    """``sum_i p_i s_i B_i A_i`` of one module as the product ``left @ right`` of stacked factors.

    Each client's own scaling s_i applies (clients of different ranks have different alpha / r);
    ``scaling`` is used for updates that do not carry one. Inner size: the sum of the client ranks.
    """
    products = [u.product(module, scaling) for u in updates]
    return lowrank.stack_weighted([left for left, _ in products], [right for _, right in products], weights)


def merged_residual(state: GlobalState, merges: Factors) -> dict[str, Tensor]:
    """The state's residual plus each module's increment ``left @ right``, in W0's out x in layout.

    This is the one place the server forms m x n matrices: the merged weight delta is the method's
    definition (fedex, flora, fedgalore), formed once per module and round from the stacked factors.
    """
    residual = dict(state.residual)
    for module, (left, right) in merges.items():
        increment = left @ right
        residual[module] = residual[module] + increment if module in residual else increment
    return residual


def svd_refactorise(
    state: GlobalState,
    updates: list[ClientUpdate],
    weights: list[float],
    split: lowrank.Split,
    max_norm: float | None,
    preserve_norm: bool,
    *,
    rescale_factors: bool = False,
) -> GlobalState:
    """The exact average of client products ``T = sum p_i s_i B_i A_i``, truncated to the global rank and
    split by ``split``; each module's SVD is taken in factored form.

    ``max_norm`` clips ``||T||_F`` first; ``preserve_norm`` rescales the truncated update to the
    (clipped) norm of T, as the Subspace-Reg reference implementation does: here by scaling the kept
    singular values. ``rescale_factors`` applies that gain the way the reference code does instead:
    the split of the unrescaled truncation, then both factors times ``sqrt(||T|| / ||T_r||)``. The
    product is the same; the factors differ (an ``orthonormal_B`` split's B is then no longer
    orthonormal).
    """
    factors = {}
    rank = state.rank
    for module in state.factors:
        full = lowrank.factored_svd(*exact_sum(updates, weights, module, state.scaling))
        S = lowrank.clip_and_preserve(full.S, rank, max_norm, preserve_norm)
        svd = lowrank.TruncatedSVD(U=full.U[..., :rank], S=S, Vh=full.Vh[..., :rank, :])
        B, A = lowrank.split_factors(svd, state.scaling, split, rank)
        if rescale_factors:
            unrescaled = lowrank.clip_and_preserve(full.S, rank, max_norm, preserve_norm=False)
            kept, raw = torch.linalg.vector_norm(S), torch.linalg.vector_norm(unrescaled)
            root_gain = torch.sqrt(kept / raw) if raw > 0 else torch.ones_like(raw)
            B, A = B * root_gain, A / root_gain
        factors[module] = (B, A)
    return state.next(factors=factors, head=average_heads(updates, weights))
