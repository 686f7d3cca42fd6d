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

Two norms of "the aggregate" (methods.md): ``aggregated_update_norm`` is the norm of the new global
update (what the server produced: the adapter product plus this round's merge), ``client_average_norm``
the norm of the exact client average ``sum_i p_i dW_i`` (what the Subspace-Reg paper's code reports
under the name aggregated_update_norm). They differ wherever a rule is not exact (fedavg: the product of
averages; a truncation; a clip).

Cosines (client_global_cosine, pairwise_client_cosine, delta_cosine): a client whose update is zero has
no direction, so it is left out of the mean (the paper's code counts it as cosine 0); with one client
there is no pair, so pairwise_client_cosine is NaN (the paper's code returns 1.0), while
client_global_cosine is then 1.0 (the client is the average).

Round deltas (:func:`round_delta_diagnostics`): what a round changed, not where the adapters are. Each
client's delta is its product minus the product it started the round from, ``s_i B_i A_i - s_i B_i0
A_i0`` (zero start for flora's fresh adapter and fedgalore, whose upload already is the weight change);
the aggregate's delta is the new global model minus the one the round started from, merged-weight
increments included (fedex, flora, fedgalore). All four depend only on products (gauge-invariant):
``delta_overlap`` (each client's top-r_i left singular subspace against the aggregate delta's top-r),
``pairwise_delta_overlap`` (clients' top-r subspaces pairwise), ``delta_cancellation_ratio``
(``||sum p_i D_i|| / sum p_i ||D_i||``) and ``delta_cosine`` (each client's delta against the
aggregate's, flattened over modules).
"""

from __future__ import annotations

import math

import torch

from fedsubspace import lowrank
from fedsubspace.state import ClientUpdate, Factors, GlobalState

ROUNDING = 1e-12  # relative size below which a float64 difference of two products is rounding, not a change
DELTA_KEYS = ("delta_overlap", "pairwise_delta_overlap", "delta_cancellation_ratio", "delta_cosine")


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
    average_norm = math.sqrt(max(float(p @ gram @ p), 0.0))
    weighted_client_norm = float(p @ client_norms)
    return {
        "basis_overlap": _nanmean(overlaps),
        "update_overlap": _nanmean(update_overlaps),
        "principal_angles": _nanmean(angles),
        "cancellation_ratio": average_norm / weighted_client_norm if weighted_client_norm > 0 else math.nan,
        "client_global_cosine": _nanmean(_cosines_to(gram, gram @ p, average_norm)),
        "pairwise_client_cosine": _nanmean(_pairwise_cosines(gram)),
        "update_norm": float(client_norms.mean()),
        "aggregated_update_norm": math.sqrt(max(float(new_sq), 0.0)),
        "client_average_norm": average_norm,
        "aggregation_error": math.sqrt(max(error_sq, 0.0)) / average_norm if average_norm > 0 else math.nan,
    }


def _cosines_to(gram: torch.Tensor, inner: torch.Tensor, norm: float) -> list[float]:
    """Each client's cosine with a reference of norm ``norm``, from ``inner[i]`` = <X_i, reference>;
    NaN (left out of means) where the client or the reference is zero."""
    norms = gram.diagonal().clamp_min(0).sqrt()
    return [
        float(inner[i] / (norms[i] * norm)) if norms[i] * norm > 0 else math.nan for i in range(len(norms))
    ]


def _pairwise_cosines(gram: torch.Tensor) -> list[float]:
    """Cosines of every pair of clients both non-zero (none with one client)."""
    norms = gram.diagonal().clamp_min(0).sqrt()
    k = len(norms)
    return [
        float(gram[i, j] / (norms[i] * norms[j]))
        for i in range(k)
        for j in range(i + 1, k)
        if norms[i] * norms[j] > 0
    ]


def round_delta_diagnostics(
    updates: list[ClientUpdate],
    starts: list[Factors],
    weights: list[float],
    previous: GlobalState,
    new_state: GlobalState,
) -> dict[str, float]:
    """The round-delta geometry (module docstring): ``starts[i]`` is the adapter client i started the
    round from, at its own rank and for its own scaling (``updates[i].scaling``), ``previous`` the global
    state the round started from, ``new_state`` the one it produced. No m x n matrix is formed."""
    k = len(updates)
    p = torch.tensor(weights, dtype=torch.float64)
    gram = torch.zeros(k + 1, k + 1, dtype=torch.float64)  # clients' deltas, then the aggregate's
    overlaps, pairwise = [], []
    for module in new_state.factors:
        pairs = []  # (end, start) products: the clients', then the aggregate's
        for update, start in zip(updates, starts, strict=True):
            s_i = update.scaling if update.scaling is not None else previous.scaling
            B0, A0 = (t.to(torch.float64) for t in start[module])
            pairs.append((update.product(module, previous.scaling, torch.float64), (s_i * B0, A0)))
        B_prev, A_prev = (t.to(torch.float64) for t in previous.factors[module])
        pairs.append((new_state.round_update(module, torch.float64), (previous.scaling * B_prev, A_prev)))
        deltas = [lowrank.difference(*end, *start) for end, start in pairs]
        # A delta at rounding level of its two terms (an unchanged adapter) is zero, not a direction.
        moved = torch.tensor(
            [
                float(lowrank.product_norm(*delta))
                > ROUNDING * (float(lowrank.product_norm(*end)) + float(lowrank.product_norm(*start)))
                for delta, (end, start) in zip(deltas, pairs, strict=True)
            ],
            dtype=torch.float64,
        )
        gram += lowrank.gram_matrix(*zip(*deltas, strict=True)) * torch.outer(moved, moved)
        ranks = [u.factors[module][0].shape[-1] for u in updates] + [new_state.rank]
        bases = [
            lowrank.product_basis(*delta, rank=rank) if moved[i] else delta[0][..., :0]
            for i, (delta, rank) in enumerate(zip(deltas, ranks, strict=True))
        ]
        aggregate_basis = bases.pop()
        overlaps += [lowrank.basis_overlap(basis, aggregate_basis) for basis in bases]
        pairwise += [lowrank.basis_overlap(bases[i], bases[j]) for i in range(k) for j in range(i + 1, k)]
    clients = gram[:k, :k]
    delta_norms = clients.diagonal().clamp_min(0).sqrt()
    average_norm = math.sqrt(max(float(p @ clients @ p), 0.0))
    weighted_norm = float(p @ delta_norms)
    aggregate_norm = math.sqrt(max(float(gram[k, k]), 0.0))
    return {
        "delta_overlap": _nanmean(overlaps),
        "pairwise_delta_overlap": _nanmean(pairwise),
        "delta_cancellation_ratio": average_norm / weighted_norm if weighted_norm > 0 else math.nan,
        "delta_cosine": _nanmean(_cosines_to(clients, gram[:k, k], aggregate_norm)),
    }
