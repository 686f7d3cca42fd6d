"""The geometric diagnostics of a round, from client updates and the new global state.

Names follow the Subspace-Reg paper (basis_overlap, cancellation_ratio, client_global_cosine,
pairwise_client_cosine, update_norm, aggregated_update_norm) plus aggregation_error, principal_angles
and update_overlap (methods.md). All of them come from per-module Gram matrices and thin bases of the
factors, in float64, without forming any m x n update.

Client i's update is ``s_i B_i A_i`` with its own scaling (clients of different ranks differ). The
global update it is compared with is the new global model minus the base the round started from
(:meth:`GlobalState.round_update`): the adapter product, plus this round's merge into the frozen
weights for fedex, flora and fedgalore. ``basis_overlap`` and ``principal_angles`` compare with the
global adapter's B as the paper defines them (overlap over the smaller rank); they are NaN where the
global adapter is zero by design (flora, fedgalore and fedsa keep B = 0), where ``update_overlap``,
which uses the global update's column space, still applies.
"""

from __future__ import annotations

import math

import torch

from fedsubspace import lowrank
from fedsubspace.state import ClientUpdate, GlobalState


def _nanmean(values: list[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return sum(finite) / len(finite) if finite else math.nan


def round_diagnostics(
    updates: list[ClientUpdate], weights: list[float], new_state: GlobalState
) -> dict[str, float]:
    s = new_state.scaling
    k = len(updates)
    p = torch.tensor(weights, dtype=torch.float64)
    gram = torch.zeros(k, k, dtype=torch.float64)  # <dW_i, dW_j> summed over modules
    error_sq = 0.0  # ||dW_new - sum_i p_i dW_i||^2, from the stacked difference (no cancellation)
    new_sq = torch.zeros((), dtype=torch.float64)
    overlaps, update_overlaps, angles = [], [], []
    for module, (B_new, _) in new_state.factors.items():
        products = [u.product(module, s, torch.float64) for u in updates]
        lefts = [left for left, _ in products]
        rights = [right for _, right in products]
        new_left, new_right = new_state.round_update(module, torch.float64)
        gram += lowrank.gram_matrix(lefts, rights)
        new_sq += lowrank.frobenius_inner(new_left, new_right, new_left, new_right)
        diff_left, diff_right = lowrank.stack_weighted([new_left, *lefts], [new_right, *rights], [1.0, *(-p)])
        error_sq += float(lowrank.product_norm(diff_left, diff_right)) ** 2
        global_basis = lowrank.orthonormal_basis(B_new.double())
        global_product_basis = lowrank.product_basis(new_left, new_right)
        for left, right in zip(lefts, rights, strict=True):
            client_basis = lowrank.orthonormal_basis(left)
            overlaps.append(lowrank.basis_overlap(client_basis, global_basis))
            theta = lowrank.principal_angles(client_basis, global_basis)
            angles.append(math.degrees(float(theta.max())) if theta.numel() else math.nan)
            update_overlaps.append(
                lowrank.basis_overlap(lowrank.product_basis(left, right), global_product_basis)
            )

    client_norms = gram.diagonal().clamp_min(0).sqrt()
    average_sq = float(p @ gram @ p)
    average_norm = math.sqrt(max(average_sq, 0.0))
    with_average = gram @ p  # <dW_i, sum_j p_j dW_j>
    cosines_to_average = [
        float(with_average[i] / (client_norms[i] * average_norm))
        if client_norms[i] * average_norm > 0
        else math.nan
        for i in range(k)
    ]
    pairwise = [
        float(gram[i, j] / (client_norms[i] * client_norms[j]))
        for i in range(k)
        for j in range(i + 1, k)
        if client_norms[i] * client_norms[j] > 0
    ]
    weighted_client_norm = float(p @ client_norms)
    return {
        "basis_overlap": _nanmean(overlaps),
        "update_overlap": _nanmean(update_overlaps),
        "principal_angles": _nanmean(angles),
        "cancellation_ratio": average_norm / weighted_client_norm if weighted_client_norm > 0 else math.nan,
        "client_global_cosine": _nanmean(cosines_to_average),
        "pairwise_client_cosine": _nanmean(pairwise),
        "update_norm": float(client_norms.mean()),
        "aggregated_update_norm": math.sqrt(max(float(new_sq), 0.0)),
        "aggregation_error": math.sqrt(max(error_sq, 0.0)) / average_norm if average_norm > 0 else math.nan,
    }
