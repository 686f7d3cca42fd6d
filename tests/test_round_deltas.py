"""Round-delta geometry (diagnostics.round_delta_diagnostics) against dense float64 oracles, and its
gauge invariance: every delta metric depends on products only."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from helpers import make_round, mixed_round, random_factors, tiny_preset
from hypothesis import given, settings
from hypothesis import strategies as st

from fedsubspace.diagnostics import DELTA_KEYS, round_delta_diagnostics
from fedsubspace.methods import get_method
from fedsubspace.state import ClientUpdate, GlobalState


def top_basis(M: torch.Tensor, rank: int) -> torch.Tensor:
    U, S, _ = torch.linalg.svd(M, full_matrices=False)
    if S[0] == 0:
        return U[:, :0]
    tol = max(M.shape) * torch.finfo(M.dtype).eps * S[0]
    return U[:, : min(rank, int((S > tol).sum()))]


def overlap(Q1: torch.Tensor, Q2: torch.Tensor) -> float:
    k = min(Q1.shape[1], Q2.shape[1])
    return math.nan if k == 0 else min(1.0, float(torch.linalg.matrix_norm(Q1.T @ Q2)) / math.sqrt(k))


def nanmean(values: list[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return sum(finite) / len(finite) if finite else math.nan


def dense_delta_metrics(updates, weights, previous: GlobalState, new: GlobalState) -> dict[str, float]:
    """The definitions of methods.md on dense matrices; every client started from ``previous``."""
    s, modules = previous.scaling, list(previous.factors)

    def product(factors, module):
        return s * factors[module][0] @ factors[module][1]

    client_deltas = {
        m: [product(u.factors, m) - product(previous.factors, m) for u in updates] for m in modules
    }
    aggregate = {
        m: product(new.factors, m)
        + (new.merged[m][0] @ new.merged[m][1] if m in new.merged else 0)
        - product(previous.factors, m)
        for m in modules
    }
    flat = [torch.cat([client_deltas[m][i].flatten() for m in modules]) for i in range(len(updates))]
    flat_aggregate = torch.cat([aggregate[m].flatten() for m in modules])
    average = sum(p * f for p, f in zip(weights, flat))
    weighted = sum(p * float(f.norm()) for p, f in zip(weights, flat))
    cosines = [
        float(f @ flat_aggregate / (f.norm() * flat_aggregate.norm()))
        if f.norm() > 0 and flat_aggregate.norm() > 0
        else math.nan
        for f in flat
    ]
    r = previous.rank
    overlaps, pairwise = [], []
    for m in modules:
        bases = [top_basis(D, r) for D in client_deltas[m]]
        target = top_basis(aggregate[m], r) if aggregate[m].norm() > 0 else aggregate[m][:, :0]
        overlaps += [overlap(Q, target) for Q in bases]
        pairwise += [overlap(bases[i], bases[j]) for i in range(len(bases)) for j in range(i + 1, len(bases))]
    return {
        "delta_overlap": nanmean(overlaps),
        "pairwise_delta_overlap": nanmean(pairwise),
        "delta_cancellation_ratio": float(average.norm()) / weighted if weighted > 0 else math.nan,
        "delta_cosine": nanmean(cosines),
    }


def assert_metrics_equal(got: dict[str, float], expected: dict[str, float], rel: float = 1e-9) -> None:
    for key in DELTA_KEYS:
        if math.isnan(expected[key]):
            assert math.isnan(got[key]), key
        else:
            assert got[key] == pytest.approx(expected[key], rel=rel, abs=1e-12), key


def starts_of(previous: GlobalState, updates) -> list:
    return [previous.factors for _ in updates]


@pytest.mark.parametrize("method", ["fedavg", "svd", "subspace_reg", "fedex", "fedsvd"])
@pytest.mark.parametrize(
    ("m", "n", "r", "clients", "kinds"),
    [
        (12, 9, 3, 3, ("full",)),
        (7, 20, 4, 2, ("full", "deficient")),
        (16, 16, 8, 4, ("full", "zero")),
        (5, 6, 8, 3, ("deficient", "full")),  # r > m
        (10, 8, 2, 1, ("full",)),  # one client: no pairs
    ],
)
def test_delta_metrics_match_dense_definitions(method, m, n, r, clients, kinds):
    for seed in (0, 1):
        previous, updates, p = make_round(m, n, r, clients, seed=seed, kinds=kinds)
        new = get_method(method).aggregate(previous, updates, p)
        got = round_delta_diagnostics(updates, starts_of(previous, updates), p, previous, new)
        assert_metrics_equal(got, dense_delta_metrics(updates, p, previous, new))


def test_deltas_of_a_round_that_changes_nothing_are_undefined_not_noise():
    previous, _, _ = make_round(9, 7, 3, 1, seed=3)
    unchanged = [ClientUpdate(i, 5, dict(previous.factors), {}, 1.0) for i in range(2)]
    new = previous.next()
    got = round_delta_diagnostics(unchanged, starts_of(previous, unchanged), [0.5, 0.5], previous, new)
    assert all(math.isnan(got[key]) for key in DELTA_KEYS)


def test_identical_client_steps_agree_completely_and_opposite_ones_cancel():
    gen = torch.Generator().manual_seed(5)
    previous, _, _ = make_round(10, 8, 3, 1, seed=5)
    step = {name: random_factors(B.shape[0], A.shape[1], 3, gen) for name, (B, A) in previous.factors.items()}

    def moved(sign: float) -> ClientUpdate:
        factors = {
            name: (torch.cat([B, sign * step[name][0]], 1), torch.cat([A, step[name][1]], 0))
            for name, (B, A) in previous.factors.items()
        }
        return ClientUpdate(0, 10, factors, {}, 1.0)

    start6 = {
        name: (torch.cat([B, 0 * B], 1), torch.cat([A, A], 0)) for name, (B, A) in previous.factors.items()
    }
    twins, opposite = [moved(1.0), moved(1.0)], [moved(1.0), moved(-1.0)]
    new = get_method("svd", {"preserve_norm": False}).aggregate(previous, twins, [0.5, 0.5])
    same = round_delta_diagnostics(twins, [start6, start6], [0.5, 0.5], previous, new)
    assert same["delta_cancellation_ratio"] == pytest.approx(1.0)
    assert same["pairwise_delta_overlap"] == pytest.approx(1.0)
    cancelled = round_delta_diagnostics(opposite, [start6, start6], [0.5, 0.5], previous, new)
    assert cancelled["delta_cancellation_ratio"] == pytest.approx(0.0, abs=1e-7)


def gauge(factors: dict, gen: torch.Generator) -> dict:
    """``(B G, G^-1 A)`` with a random well-conditioned G per module."""
    out = {}
    for name, (B, A) in factors.items():
        r = B.shape[1]
        G = torch.linalg.qr(torch.randn(r, r, generator=gen, dtype=torch.float64))[0] @ torch.diag(
            torch.rand(r, generator=gen, dtype=torch.float64) + 0.5
        )
        out[name] = (B @ G, torch.linalg.solve(G, A))
    return out


@settings(max_examples=25, deadline=None)
@given(
    m=st.integers(3, 12),
    n=st.integers(3, 12),
    r=st.integers(1, 5),
    clients=st.integers(1, 4),
    seed=st.integers(0, 2**16),
    method=st.sampled_from(["fedavg", "svd", "fedex"]),
)
def test_delta_metrics_are_gauge_invariant(m, n, r, clients, seed, method):
    previous, updates, p = make_round(m, n, r, clients, seed=seed)
    new = get_method(method).aggregate(previous, updates, p)
    before = round_delta_diagnostics(updates, starts_of(previous, updates), p, previous, new)
    gen = torch.Generator().manual_seed(seed + 1)
    moved_updates = [dataclasses.replace(u, factors=gauge(u.factors, gen)) for u in updates]
    moved_starts = [gauge(previous.factors, gen) for _ in updates]
    moved_previous = dataclasses.replace(previous, factors=gauge(previous.factors, gen))
    moved_new = dataclasses.replace(new, factors=gauge(new.factors, gen))
    after = round_delta_diagnostics(moved_updates, moved_starts, p, moved_previous, moved_new)
    assert_metrics_equal(after, before, rel=1e-6)


@pytest.mark.parametrize("method", ["fedex", "flora"])
def test_a_run_logs_the_delta_metrics_every_round(tmp_path, method):

    from fedsubspace import simulation
    from fedsubspace.results import read_metrics

    summary = simulation.run(tiny_preset("tiny-encoder", method), tmp_path, progress=False)
    rows = read_metrics(tmp_path)
    assert len(rows) == summary["num_rounds"]
    for row in rows:
        for key in (*DELTA_KEYS, "client_average_norm"):
            assert row[key] is not None and math.isfinite(row[key]), key
        assert 0.0 <= row["delta_overlap"] <= 1.0 and 0.0 <= row["delta_cancellation_ratio"] <= 1.0 + 1e-9
    assert set(DELTA_KEYS) <= set(summary["final_diagnostics"])


@pytest.mark.parametrize("method", ["hetlora", "flexlora", "glora", "flora"])
@pytest.mark.parametrize("ranks", [[2, 4, 4], [1, 3]])
def test_delta_metrics_on_mixed_ranks_match_dense_definitions(method, ranks):
    """Each client starts from the global adapter read out at its own rank and scaling (the server's
    round_start); its delta and top-r_i subspace are at that rank."""
    from fedsubspace.server import round_start

    previous, updates, p = mixed_round(ranks, seed=sum(ranks))
    rule = get_method(method)
    new = rule.aggregate(previous, updates, p)
    starts = [round_start(rule, previous, u) for u in updates]
    got = round_delta_diagnostics(updates, starts, p, previous, new)

    modules = list(previous.factors)
    s_prev = previous.scaling

    def client_delta(u, start, m):
        return u.scaling * u.factors[m][0] @ u.factors[m][1] - u.scaling * start[m][0] @ start[m][1]

    aggregate = {
        m: new.scaling * new.factors[m][0] @ new.factors[m][1]
        + (new.merged[m][0] @ new.merged[m][1] if m in new.merged else 0)
        - s_prev * previous.factors[m][0] @ previous.factors[m][1]
        for m in modules
    }
    deltas = {m: [client_delta(u, st, m) for u, st in zip(updates, starts)] for m in modules}
    flat = [torch.cat([deltas[m][i].flatten() for m in modules]) for i in range(len(updates))]
    flat_aggregate = torch.cat([aggregate[m].flatten() for m in modules])
    weighted = sum(w * float(f.norm()) for w, f in zip(p, flat))
    assert got["delta_cancellation_ratio"] == pytest.approx(
        float(sum(w * f for w, f in zip(p, flat)).norm()) / weighted
    )
    cosines = [float(f @ flat_aggregate / (f.norm() * flat_aggregate.norm())) for f in flat]
    assert got["delta_cosine"] == pytest.approx(sum(cosines) / len(cosines))
    overlaps = [
        overlap(top_basis(deltas[m][i], ranks[i]), top_basis(aggregate[m], previous.rank))
        for m in modules
        for i in range(len(updates))
    ]
    assert got["delta_overlap"] == pytest.approx(sum(overlaps) / len(overlaps))
    pairs = [
        overlap(top_basis(deltas[m][i], ranks[i]), top_basis(deltas[m][j], ranks[j]))
        for m in modules
        for i in range(len(updates))
        for j in range(i + 1, len(updates))
    ]
    assert got["pairwise_delta_overlap"] == pytest.approx(sum(pairs) / len(pairs))
