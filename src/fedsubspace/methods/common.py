"""Server-side building blocks shared by several methods (all on top of :mod:`fedsubspace.lowrank`)."""

from __future__ import annotations

from fedsubspace import lowrank
from fedsubspace.state import ClientUpdate, GlobalState, weighted_average


def average_heads(updates: list[ClientUpdate], weights: list[float]) -> dict:
    if not updates[0].head:
        return {}
    return weighted_average([u.head for u in updates], weights)


def truncated_average(
    updates: list[ClientUpdate],
    weights: list[float],
    module: str,
    scaling: float,
    rank: int,
    max_norm: float | None,
    preserve_norm: bool,
) -> lowrank.TruncatedSVD:
    """Rank-``rank`` SVD of the exact average ``T = sum p_i s B_i A_i`` of one module, in factored form.

    ``max_norm`` clips ``||T||_F`` first; ``preserve_norm`` rescales the truncated update to the
    (clipped) norm of T, as the Subspace-Reg reference implementation does.
    """
    left, right = lowrank.stack_weighted(
        [scaling * u.factors[module][0] for u in updates], [u.factors[module][1] for u in updates], weights
    )
    full = lowrank.factored_svd(left, right)
    S = lowrank.clip_and_preserve(full.S, rank, max_norm, preserve_norm)
    return lowrank.TruncatedSVD(U=full.U[..., :rank], S=S, Vh=full.Vh[..., :rank, :])


def svd_refactorise(
    state: GlobalState,
    updates: list[ClientUpdate],
    weights: list[float],
    split: lowrank.Split,
    max_norm: float | None,
    preserve_norm: bool,
) -> GlobalState:
    """The exact average of client products, truncated to each module's rank and split by ``split``."""
    factors = {}
    for module, (B_g, _) in state.factors.items():
        rank = B_g.shape[-1]
        svd = truncated_average(updates, weights, module, state.scaling, rank, max_norm, preserve_norm)
        factors[module] = lowrank.split_factors(svd, state.scaling, split, rank)
    return GlobalState(factors=factors, head=average_heads(updates, weights), scaling=state.scaling)
