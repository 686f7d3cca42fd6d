"""Round diagnostics against dense float64 computations of the same definitions (methods.md)."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import MODULES, dense, dense_average, make_round, mixed_round

from fedsubspace import lowrank
from fedsubspace.diagnostics import round_diagnostics
from fedsubspace.methods import get_method


def dense_overlap(X: torch.Tensor, Y: torch.Tensor) -> float:
    """Overlap of column spaces from dense SVDs (numerical rank by the numpy rule)."""

    def basis(M: torch.Tensor) -> torch.Tensor:
        U, S, _ = torch.linalg.svd(M, full_matrices=False)
        tol = max(M.shape) * torch.finfo(M.dtype).eps * S[0]
        return U[:, : int((S > tol).sum())]

    Q1, Q2 = basis(X), basis(Y)
    return float(torch.linalg.matrix_norm(Q1.T @ Q2) / math.sqrt(min(Q1.shape[1], Q2.shape[1])))


@pytest.mark.parametrize("method", ["fedavg", "svd", "subspace_reg"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_diagnostics_match_dense_definitions(method, seed):
    state, updates, p = make_round(10, 8, 3, 3, seed=seed)
    new = get_method(method).aggregate(state, updates, p)
    d = round_diagnostics(updates, p, new)
    s = new.scaling
    modules = list(new.factors)
    flat = [torch.cat([(s * u.factors[m][0] @ u.factors[m][1]).flatten() for m in modules]) for u in updates]
    average = sum(w * f for w, f in zip(p, flat))
    new_flat = torch.cat([(s * new.factors[m][0] @ new.factors[m][1]).flatten() for m in modules])

    def cos(a, b):
        return float(a @ b / (a.norm() * b.norm()))

    assert d["cancellation_ratio"] == pytest.approx(
        float(average.norm()) / sum(w * float(f.norm()) for w, f in zip(p, flat))
    )
    assert d["client_global_cosine"] == pytest.approx(sum(cos(f, average) for f in flat) / len(flat))
    pairs = [cos(flat[i], flat[j]) for i in range(3) for j in range(i + 1, 3)]
    assert d["pairwise_client_cosine"] == pytest.approx(sum(pairs) / len(pairs))
    assert d["update_norm"] == pytest.approx(sum(float(f.norm()) for f in flat) / len(flat))
    assert d["aggregated_update_norm"] == pytest.approx(float(new_flat.norm()))
    assert d["aggregation_error"] == pytest.approx(float((new_flat - average).norm() / average.norm()))
    overlaps = [dense_overlap(u.factors[m][0], new.factors[m][0]) for m in modules for u in updates]
    assert d["basis_overlap"] == pytest.approx(sum(overlaps) / len(overlaps))
    products = [
        dense_overlap(s * u.factors[m][0] @ u.factors[m][1], s * new.factors[m][0] @ new.factors[m][1])
        for m in modules
        for u in updates
    ]
    assert d["update_overlap"] == pytest.approx(sum(products) / len(products))
    assert 0.0 <= d["principal_angles"] <= 90.0


def test_exact_rule_has_zero_aggregation_error_and_identical_clients_no_cancellation():
    state, updates, _ = make_round(12, 9, 2, 1, seed=4)
    twins = [updates[0], updates[0]]
    new = get_method("svd", {"preserve_norm": False}).aggregate(state, twins, [0.5, 0.5])
    d = round_diagnostics(twins, [0.5, 0.5], new)
    assert d["aggregation_error"] < 1e-10  # rank-2 clients, rank-2 server: nothing is truncated
    assert d["cancellation_ratio"] == pytest.approx(1.0)
    assert d["pairwise_client_cosine"] == pytest.approx(1.0)
    assert d["basis_overlap"] == pytest.approx(1.0)


def test_update_overlap_ignores_directions_the_other_factor_removes():
    gen = torch.Generator().manual_seed(0)
    B = torch.randn(10, 3, generator=gen, dtype=torch.float64)
    A = torch.randn(3, 7, generator=gen, dtype=torch.float64)
    A[2] = 0  # the third column of B does not reach the product
    assert lowrank.product_basis(B, A).shape[1] == 2
    assert lowrank.orthonormal_basis(B).shape[1] == 3


# --- mixed client ranks and merging rules --------------------------------------------------------------


def test_diagnostics_on_mixed_ranks_match_dense_definitions():
    state, updates, p = mixed_round([2, 5, 3], seed=12)
    new = get_method("flexlora").aggregate(state, updates, p)
    d = round_diagnostics(updates, p, new)
    modules = list(MODULES)
    flat = [torch.cat([dense(u, m, state.scaling).flatten() for m in modules]) for u in updates]
    average = sum(w * f for w, f in zip(p, flat))
    new_flat = torch.cat([(new.scaling * new.factors[m][0] @ new.factors[m][1]).flatten() for m in modules])
    assert d["cancellation_ratio"] == pytest.approx(
        float(average.norm()) / sum(w * float(f.norm()) for w, f in zip(p, flat))
    )
    assert d["aggregation_error"] == pytest.approx(float((new_flat - average).norm() / average.norm()))
    assert 0.0 <= d["basis_overlap"] <= 1.0 and 0.0 <= d["update_overlap"] <= 1.0 + 1e-9


def test_diagnostics_compare_merging_rules_with_their_whole_round_update():
    state, updates, p = make_round(10, 8, 3, 3, seed=6)
    for name in ("fedex", "flora"):
        new = get_method(name).aggregate(state, updates, p)
        d = round_diagnostics(updates, p, new)
        assert d["aggregation_error"] < 1e-10  # exact rules, measured with the merge included
        exact = torch.cat([dense_average(updates, p, m, state.scaling).flatten() for m in state.factors])
        assert d["aggregated_update_norm"] == pytest.approx(float(exact.norm()))
    assert math.isnan(d["basis_overlap"])  # flora's global adapter is B = 0: no basis to compare
