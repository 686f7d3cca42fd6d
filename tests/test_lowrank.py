"""lowrank against dense float64 oracles: every factored result is checked against the m x n matrix."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from helpers import frobenius_norm, project
from hypothesis import given, settings
from hypothesis import strategies as st

from fedsubspace import lowrank
from fedsubspace.bench.aggregation import format_table, run_aggregation_bench

F64 = torch.float64
DTYPES = (torch.float32, torch.float64)
HYPOTHESIS = settings(deadline=None, max_examples=40)


# --- oracles and helpers ---------------------------------------------------------------------------


def eps(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps


def tol(dtype: torch.dtype) -> float:
    """Relative tolerance of a backward-stable computation on our small shapes (<= ~30)."""
    return 200 * eps(dtype)


def dense_sum(lefts, rights, weights) -> torch.Tensor:
    """The oracle ``sum_i w_i L_i @ R_i``, an explicit float64 loop."""
    total = torch.zeros(lefts[0].shape[-2], rights[0].shape[-1], dtype=F64)
    for w, L, R in zip(weights, lefts, rights, strict=True):
        total += float(w) * L.to(F64) @ R.to(F64)
    return total


def projector(basis: torch.Tensor) -> torch.Tensor:
    basis = basis.to(F64)
    return basis @ basis.mT


def assert_orthonormal_columns(Q: torch.Tensor, atol: float) -> None:
    Q = Q.to(F64)
    eye = torch.eye(Q.shape[-1], dtype=F64).expand(*Q.shape[:-2], -1, -1)
    torch.testing.assert_close(Q.mT @ Q, eye, atol=atol, rtol=0)


def dense_truncation(T: torch.Tensor, rank: int) -> torch.Tensor:
    U, S, Vh = torch.linalg.svd(T.to(F64), full_matrices=False)
    return U[:, :rank] @ torch.diag(S[:rank]) @ Vh[:rank]


def truncation_gap(S: torch.Tensor, rank: int) -> float:
    """``s_rank - s_{rank+1}``: what decides whether a rank-``rank`` truncation is well defined."""
    if rank == 0:
        return math.inf
    below = float(S[rank]) if rank < S.numel() else 0.0
    return float(S[rank - 1]) - below if rank <= S.numel() else math.inf


def random_rotation(r: int, gen: torch.Generator, dtype=F64) -> torch.Tensor:
    Q, R = torch.linalg.qr(torch.randn(r, r, generator=gen, dtype=F64))
    Q = Q * torch.sign(torch.diagonal(R)).unsqueeze(-2)
    if torch.linalg.det(Q) < 0:
        Q[:, 0] = -Q[:, 0]
    return Q.to(dtype)


def rotation_2d(theta: float) -> torch.Tensor:
    c, s = math.cos(theta), math.sin(theta)
    return torch.tensor([[c, -s], [s, c]], dtype=F64)


def nearest_rotation_2d(M: torch.Tensor) -> torch.Tensor:
    """Brute force in closed form: over R(t), ``tr(R(t)^T M) = cos t (M00 + M11) + sin t (M10 - M01)``."""
    M = M.to(F64)
    return rotation_2d(math.atan2(float(M[1, 0] - M[0, 1]), float(M[0, 0] + M[1, 1])))


def dense_principal_angles(Q1: torch.Tensor, Q2: torch.Tensor) -> torch.Tensor:
    """Oracle from the dense projectors: cos^2 of the angles are the top eigenvalues of P1 P2 P1.

    The bases are re-orthonormalised in float64 first: a float32 basis is orthonormal only to ~eps32,
    and ``Q Q^T`` of it is no projector, which alone would fake angles of sqrt(eps32).
    """
    P1, P2 = (projector(torch.linalg.qr(Q.to(F64)).Q) for Q in (Q1, Q2))
    k = min(Q1.shape[-1], Q2.shape[-1])
    cos2 = torch.linalg.eigvalsh(P1 @ P2 @ P1).flip(-1)[:k].clamp(0.0, 1.0)
    return torch.arccos(cos2.sqrt())


@dataclass
class Clients:
    lefts: list[torch.Tensor]
    rights: list[torch.Tensor]
    weights: list[float]
    dtype: torch.dtype

    @property
    def m(self) -> int:
        return self.lefts[0].shape[0]

    @property
    def n(self) -> int:
        return self.rights[0].shape[1]

    def scale(self) -> float:
        """``sum |w_i| ||L_i|| ||R_i||``: the size of the rounding errors of any backward-stable method."""
        return sum(
            abs(w) * float(torch.linalg.matrix_norm(L.to(F64)) * torch.linalg.matrix_norm(R.to(F64)))
            for w, L, R in zip(self.weights, self.lefts, self.rights, strict=True)
        )


CASES = ("random", "zero_client", "all_zero", "dup_columns", "dup_client", "single")


@st.composite
def client_sets(draw, max_dim: int = 9, max_rank: int = 5, max_clients: int = 4) -> Clients:
    """Clients with heterogeneous ranks, often larger than m or n (and kr larger than both)."""
    case = draw(st.sampled_from(CASES))
    dtype = draw(st.sampled_from(DTYPES))
    m = draw(st.integers(1, max_dim))
    n = draw(st.integers(1, max_dim))
    k = 1 if case == "single" else draw(st.integers(2 if case == "dup_client" else 1, max_clients))
    ranks = draw(st.lists(st.integers(1, max_rank), min_size=k, max_size=k))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1)))
    lefts = [torch.randn(m, r, generator=gen, dtype=F64) for r in ranks]
    rights = [torch.randn(r, n, generator=gen, dtype=F64) for r in ranks]
    weights = (torch.rand(k, generator=gen, dtype=F64) + 0.1).tolist()
    if case == "zero_client":
        lefts[0] = torch.zeros_like(lefts[0])
    elif case == "all_zero":
        lefts = [torch.zeros_like(L) for L in lefts]
    elif case == "dup_columns":
        for L in lefts:
            L[:, -1] = L[:, 0]
    elif case == "dup_client":
        lefts[1], rights[1] = lefts[0].clone(), rights[0].clone()
    return Clients([L.to(dtype) for L in lefts], [R.to(dtype) for R in rights], weights, dtype)


# --- stack_weighted --------------------------------------------------------------------------------


@HYPOTHESIS
@given(clients=client_sets())
def test_stack_weighted_product_is_the_weighted_sum(clients: Clients) -> None:
    left, right = lowrank.stack_weighted(clients.lefts, clients.rights, clients.weights)
    total_rank = sum(L.shape[-1] for L in clients.lefts)
    assert left.shape == (clients.m, total_rank) and right.shape == (total_rank, clients.n)
    assert left.dtype == clients.dtype
    torch.testing.assert_close(
        left.to(F64) @ right.to(F64),
        dense_sum(clients.lefts, clients.rights, clients.weights),
        atol=tol(clients.dtype) * clients.scale(),
        rtol=0,
    )


def test_stack_weighted_accepts_tensor_weights_and_rejects_mismatches() -> None:
    gen = torch.Generator().manual_seed(0)
    lefts = [torch.randn(5, 2, generator=gen, dtype=F64), torch.randn(5, 3, generator=gen, dtype=F64)]
    rights = [torch.randn(2, 4, generator=gen, dtype=F64), torch.randn(3, 4, generator=gen, dtype=F64)]
    left, right = lowrank.stack_weighted(lefts, rights, torch.tensor([0.25, 0.75]))
    torch.testing.assert_close(left @ right, dense_sum(lefts, rights, [0.25, 0.75]))
    with pytest.raises(ValueError):
        lowrank.stack_weighted(lefts, rights, [1.0])
    with pytest.raises(ValueError):
        lowrank.stack_weighted([], [], [])


@settings(deadline=None, max_examples=25)
@given(clients=client_sets(), seed=st.integers(0, 2**32 - 1))
def test_gauge_invariance(clients: Clients, seed: int) -> None:
    """``(B G, G^-1 A)`` is the same update: the sum and its singular values must not notice."""
    gen = torch.Generator().manual_seed(seed)
    gauged_lefts, gauged_rights = [], []
    for L, R in zip(clients.lefts, clients.rights, strict=True):
        r = L.shape[-1]
        # Condition number <= 4, so the float32 rounding of G^-1 stays at the tolerance scale.
        d = torch.rand(r, generator=gen, dtype=F64) * 1.5 + 0.5
        G = random_rotation(r, gen) @ torch.diag(d) @ random_rotation(r, gen)
        gauged_lefts.append((L.to(F64) @ G).to(clients.dtype))
        gauged_rights.append((torch.linalg.inv(G) @ R.to(F64)).to(clients.dtype))
    left, right = lowrank.stack_weighted(clients.lefts, clients.rights, clients.weights)
    g_left, g_right = lowrank.stack_weighted(gauged_lefts, gauged_rights, clients.weights)
    atol = 20 * tol(clients.dtype) * clients.scale()
    torch.testing.assert_close(
        g_left.to(F64) @ g_right.to(F64), left.to(F64) @ right.to(F64), atol=atol, rtol=0
    )
    torch.testing.assert_close(
        lowrank.factored_svd(g_left, g_right).S.to(F64),
        lowrank.factored_svd(left, right).S.to(F64),
        atol=atol,
        rtol=0,
    )


# --- factored_svd ----------------------------------------------------------------------------------


@HYPOTHESIS
@given(clients=client_sets(), rank=st.integers(1, 12))
def test_factored_svd_matches_dense_truncated_svd(clients: Clients, rank: int) -> None:
    left, right = lowrank.stack_weighted(clients.lefts, clients.rights, clients.weights)
    svd = lowrank.factored_svd(left, right, rank=rank)
    T = dense_sum(clients.lefts, clients.rights, clients.weights)
    S_dense = torch.linalg.svdvals(T)
    q = min(rank, clients.m, clients.n, left.shape[-1])
    assert svd.U.shape == (clients.m, q) and svd.S.shape == (q,) and svd.Vh.shape == (q, clients.n)
    assert svd.S.dtype == clients.dtype

    err = tol(clients.dtype) * clients.scale()  # backward error of the whole computation
    torch.testing.assert_close(svd.S.to(F64), S_dense[:q], atol=err, rtol=0)
    assert torch.all(svd.S[:-1] >= svd.S[1:])
    assert_orthonormal_columns(svd.U, 10 * tol(clients.dtype))
    assert_orthonormal_columns(svd.Vh.mT, 10 * tol(clients.dtype))

    # Wedin: the truncation moves by ~ err (1 + s_1 / gap); exact ties make it undefined (tol -> inf).
    gap = truncation_gap(S_dense, q)
    s1 = float(S_dense[0]) if S_dense.numel() else 0.0
    recon = svd.U.to(F64) @ torch.diag(svd.S.to(F64)) @ svd.Vh.to(F64)
    recon_tol = err * (3 + 2 * s1 / gap) if gap > 0 else math.inf
    torch.testing.assert_close(recon, dense_truncation(T, q), atol=recon_tol, rtol=0)

    # Subspaces of the components that carry signal and are separated from the rest.
    signal = int((S_dense[:q] > 1e3 * err).sum())
    gap = truncation_gap(S_dense, signal)
    if signal > 0 and gap > 1e3 * err:
        U_dense, _, Vh_dense = torch.linalg.svd(T, full_matrices=False)
        sub_tol = 4 * err / gap
        torch.testing.assert_close(
            projector(svd.U[:, :signal]), projector(U_dense[:, :signal]), atol=sub_tol, rtol=0
        )
        torch.testing.assert_close(
            projector(svd.Vh[:signal].mT), projector(Vh_dense[:signal].mT), atol=sub_tol, rtol=0
        )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("m", "n", "r", "k"), [(30, 20, 3, 4), (7, 40, 5, 3), (50, 6, 8, 2), (12, 12, 4, 1), (4, 30, 6, 2)]
)
def test_factored_svd_planted_spectrum(dtype: torch.dtype, m: int, n: int, r: int, k: int) -> None:
    """Well-separated singular values: reconstruction and subspaces must match to rounding level."""
    gen = torch.Generator().manual_seed(m * 100 + n)
    q = min(m, n, k * r)
    U0, _ = torch.linalg.qr(torch.randn(m, q, generator=gen, dtype=F64))
    V0, _ = torch.linalg.qr(torch.randn(n, q, generator=gen, dtype=F64))
    S0 = torch.linspace(1.0, 0.3, q, dtype=F64)
    # Spread U0 diag(S0) V0^T over k clients in random gauges.
    lefts, rights, weights = [], [], [1.0 / k] * k
    for idx in torch.arange(q).tensor_split(k):
        L = torch.zeros(m, r, dtype=F64)
        R = torch.zeros(r, n, dtype=F64)
        L[:, : idx.numel()] = U0[:, idx] * S0[idx] * k
        R[: idx.numel()] = V0[:, idx].mT
        G = random_rotation(r, gen)
        lefts.append((L @ G).to(dtype))
        rights.append((G.mT @ R).to(dtype))
    T = dense_sum(lefts, rights, weights)
    for rank in range(1, q + 2):
        svd = lowrank.factored_svd(*lowrank.stack_weighted(lefts, rights, weights), rank=rank)
        kept = min(rank, q)
        recon = svd.U.to(F64) @ torch.diag(svd.S.to(F64)) @ svd.Vh.to(F64)
        torch.testing.assert_close(recon, dense_truncation(T, kept), atol=20 * tol(dtype), rtol=0)
        torch.testing.assert_close(
            projector(svd.U[:, :kept]), projector(U0[:, :kept]), atol=20 * tol(dtype), rtol=0
        )


@pytest.mark.parametrize("dtype", DTYPES)
def test_factored_svd_batched_equals_loop(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(1)
    left = torch.randn(3, 2, 9, 6, generator=gen, dtype=F64).to(dtype)
    right = torch.randn(3, 2, 6, 5, generator=gen, dtype=F64).to(dtype)
    batched = lowrank.factored_svd(left, right, rank=4)
    assert (
        batched.U.shape == (3, 2, 9, 4) and batched.S.shape == (3, 2, 4) and batched.Vh.shape == (3, 2, 4, 5)
    )
    for i in range(3):
        for j in range(2):
            single = lowrank.factored_svd(left[i, j], right[i, j], rank=4)
            torch.testing.assert_close(batched.S[i, j], single.S, atol=tol(dtype), rtol=0)
            torch.testing.assert_close(
                batched.U[i, j] * batched.S[i, j] @ batched.Vh[i, j],
                single.U * single.S @ single.Vh,
                atol=10 * tol(dtype),
                rtol=0,
            )


# --- clip_and_preserve -----------------------------------------------------------------------------


singular_values = st.builds(
    lambda seed, q, dtype: torch.sort(
        torch.rand(q, generator=torch.Generator().manual_seed(seed), dtype=F64) * 5, descending=True
    ).values.to(dtype),
    st.integers(0, 2**32 - 1),
    st.integers(1, 10),
    st.sampled_from(DTYPES),
)


@HYPOTHESIS
@given(s_full=singular_values, rank=st.integers(1, 12), frac=st.floats(0.05, 0.95))
def test_clip_and_preserve(s_full: torch.Tensor, rank: int, frac: float) -> None:
    dt = s_full.dtype
    total = float(torch.linalg.vector_norm(s_full.to(F64)))
    max_norm = frac * total
    kept = min(rank, s_full.numel())
    rtol = 10 * eps(dt)

    # Clipping alone scales every singular value by max_norm / ||T||.
    clipped = lowrank.clip_and_preserve(s_full, rank, max_norm=max_norm, preserve_norm=False)
    torch.testing.assert_close(clipped.to(F64), s_full[:kept].to(F64) * frac, rtol=rtol, atol=0)
    full = lowrank.clip_and_preserve(s_full, s_full.numel(), max_norm=max_norm, preserve_norm=False)
    assert math.isclose(float(torch.linalg.vector_norm(full.to(F64))), max_norm, rel_tol=rtol)

    # Preserving: the kept values carry the (clipped) norm of T, in the same proportions.
    for bound, target in ((None, total), (max_norm, max_norm)):
        out = lowrank.clip_and_preserve(s_full, rank, max_norm=bound, preserve_norm=True)
        assert out.shape == (kept,) and out.dtype == dt
        assert math.isclose(float(torch.linalg.vector_norm(out.to(F64))), target, rel_tol=rtol)
        ratio = out.to(F64) / s_full[:kept].to(F64)
        torch.testing.assert_close(ratio, ratio[:1].expand_as(ratio), rtol=rtol, atol=0)

    # No-ops: nothing requested, a bound that is not binding, nothing truncated.
    torch.testing.assert_close(
        lowrank.clip_and_preserve(s_full, rank, None, False), s_full[:kept], rtol=0, atol=0
    )
    torch.testing.assert_close(
        lowrank.clip_and_preserve(s_full, rank, max_norm=2 * total, preserve_norm=False), s_full[:kept]
    )
    torch.testing.assert_close(
        lowrank.clip_and_preserve(s_full, s_full.numel() + 1), s_full, rtol=rtol, atol=0
    )


@pytest.mark.parametrize("dtype", DTYPES)
def test_clip_and_preserve_zero_and_batched(dtype: torch.dtype) -> None:
    zeros = torch.zeros(4, dtype=dtype)
    for bound in (None, 1.0):
        out = lowrank.clip_and_preserve(zeros, 2, max_norm=bound, preserve_norm=True)
        assert torch.equal(out, torch.zeros(2, dtype=dtype))
    s = torch.tensor([[3.0, 2.0, 1.0], [4.0, 0.5, 0.0], [0.0, 0.0, 0.0]], dtype=dtype)
    batched = lowrank.clip_and_preserve(s, 2, max_norm=2.5)
    for i in range(3):
        torch.testing.assert_close(batched[i], lowrank.clip_and_preserve(s[i], 2, max_norm=2.5))


# --- split_factors ---------------------------------------------------------------------------------


SPLITS: tuple[lowrank.Split, ...] = ("symmetric", "orthonormal_B", "orthonormal_A")


@HYPOTHESIS
@given(clients=client_sets(), rank=st.integers(1, 8), scaling=st.sampled_from([0.5, 1.0, 2.0, 16.0]))
def test_split_factors(clients: Clients, rank: int, scaling: float) -> None:
    svd = lowrank.factored_svd(
        *lowrank.stack_weighted(clients.lefts, clients.rights, clients.weights), rank=rank
    )
    q = svd.S.shape[-1]
    target = svd.U.to(F64) @ torch.diag(svd.S.to(F64)) @ svd.Vh.to(F64)
    atol = tol(clients.dtype) * (1 + float(svd.S[0]) if q else 1.0)
    for split in SPLITS:
        B, A = lowrank.split_factors(svd, scaling, split)
        assert B.shape == (clients.m, q) and A.shape == (q, clients.n) and B.dtype == clients.dtype
        torch.testing.assert_close(scaling * B.to(F64) @ A.to(F64), target, atol=atol, rtol=0)
        if split == "orthonormal_B":
            assert_orthonormal_columns(B, 10 * tol(clients.dtype))
        elif split == "orthonormal_A":
            assert_orthonormal_columns(A.mT, 10 * tol(clients.dtype))
        else:
            torch.testing.assert_close(
                torch.linalg.svdvals(B.to(F64)), torch.linalg.svdvals(A.mT.to(F64)), atol=atol, rtol=0
            )

        # A larger rank zero-pads; the product does not change. A rank already met changes nothing.
        padded_B, padded_A = lowrank.split_factors(svd, scaling, split, rank=q + 3)
        assert padded_B.shape == (clients.m, q + 3) and padded_A.shape == (q + 3, clients.n)
        assert torch.equal(padded_B[:, :q], B) and torch.equal(padded_A[:q], A)
        assert not padded_B[:, q:].any() and not padded_A[q:].any()
        same_B, same_A = lowrank.split_factors(svd, scaling, split, rank=q)
        assert torch.equal(same_B, B) and torch.equal(same_A, A)


def test_split_factors_batched_equals_loop_and_rejects_unknown_split() -> None:
    gen = torch.Generator().manual_seed(2)
    svd = lowrank.factored_svd(
        torch.randn(4, 8, 5, generator=gen, dtype=F64), torch.randn(4, 5, 6, generator=gen, dtype=F64), rank=3
    )
    for split in SPLITS:
        B, A = lowrank.split_factors(svd, 2.0, split, rank=5)
        for i in range(4):
            one = lowrank.TruncatedSVD(U=svd.U[i], S=svd.S[i], Vh=svd.Vh[i])
            B_i, A_i = lowrank.split_factors(one, 2.0, split, rank=5)
            torch.testing.assert_close(B[i], B_i, rtol=0, atol=1e-14)
            torch.testing.assert_close(A[i], A_i, rtol=0, atol=1e-14)
    with pytest.raises(ValueError):
        lowrank.split_factors(svd, 1.0, "transpose")  # type: ignore[arg-type]


# --- norms and inner products ----------------------------------------------------------------------


@HYPOTHESIS
@given(clients=client_sets())
def test_frobenius_inner_norm_gram(clients: Clients) -> None:
    L, R = clients.lefts, clients.rights
    dense = [L[i].to(F64) @ R[i].to(F64) for i in range(len(L))]
    scale = max(
        float(torch.linalg.matrix_norm(Li.to(F64)) * torch.linalg.matrix_norm(Ri.to(F64)))
        for Li, Ri in zip(L, R)
    )
    atol = tol(clients.dtype) * (scale**2 + 1e-30)
    gram = lowrank.gram_matrix(L, R)
    assert gram.shape == (len(L), len(L)) and gram.dtype == clients.dtype
    torch.testing.assert_close(gram, gram.mT, rtol=0, atol=0)
    for i in range(len(L)):
        norm = frobenius_norm(L[i], R[i])
        # sqrt of a rounded square: absolute error ~ sqrt(atol) near zero, relative otherwise.
        assert abs(float(norm) - float(torch.linalg.matrix_norm(dense[i]))) <= math.sqrt(atol) + atol
        for j in range(len(L)):
            inner = float((dense[i] * dense[j]).sum())
            assert abs(float(lowrank.frobenius_inner(L[i], R[i], L[j], R[j])) - inner) <= atol
            assert abs(float(gram[i, j]) - inner) <= atol


@pytest.mark.parametrize("dtype", DTYPES)
def test_frobenius_inner_batched_equals_loop(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(4)
    L1, L2 = (torch.randn(3, 7, r, generator=gen, dtype=F64).to(dtype) for r in (2, 4))
    R1, R2 = (torch.randn(3, r, 6, generator=gen, dtype=F64).to(dtype) for r in (2, 4))
    batched = lowrank.frobenius_inner(L1, R1, L2, R2)
    norms = frobenius_norm(L1, R1)
    assert batched.shape == (3,) and norms.shape == (3,)
    for i in range(3):
        torch.testing.assert_close(batched[i], lowrank.frobenius_inner(L1[i], R1[i], L2[i], R2[i]))
        torch.testing.assert_close(norms[i], frobenius_norm(L1[i], R1[i]))
        torch.testing.assert_close(
            batched[i].to(F64),
            ((L1[i].to(F64) @ R1[i].to(F64)) * (L2[i].to(F64) @ R2[i].to(F64))).sum(),
            atol=tol(dtype) * 100,
            rtol=tol(dtype),
        )


# --- subspaces -------------------------------------------------------------------------------------


@st.composite
def matrices_of_known_rank(draw) -> tuple[torch.Tensor, int]:
    """``m x k`` with a planted rank: Gaussian columns, some repeated or combined, or all zero."""
    dtype = draw(st.sampled_from(DTYPES))
    m = draw(st.integers(1, 10))
    k = draw(st.integers(1, 8))
    distinct = draw(st.integers(0, k))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1)))
    rank = min(m, distinct)
    # Orthonormal x well-conditioned x orthonormal, so the planted rank is also the numerical rank.
    U, _ = torch.linalg.qr(torch.randn(m, max(rank, 1), generator=gen, dtype=F64))
    core = torch.diag(torch.rand(rank, generator=gen, dtype=F64) + 0.5)
    V, _ = torch.linalg.qr(torch.randn(k, max(rank, 1), generator=gen, dtype=F64))
    matrix = U[:, :rank] @ core @ V[:, :rank].mT
    if draw(st.booleans()) and rank > 0:
        # Literal duplicated columns on top of the combinations.
        matrix = torch.cat([matrix, matrix[:, :1]], dim=-1)
    return matrix.to(dtype), rank


@HYPOTHESIS
@given(case=matrices_of_known_rank())
def test_orthonormal_basis(case: tuple[torch.Tensor, int]) -> None:
    matrix, rank = case
    Q = lowrank.orthonormal_basis(matrix)
    assert Q.shape == (matrix.shape[0], rank) and Q.dtype == matrix.dtype
    assert_orthonormal_columns(Q, 10 * tol(matrix.dtype))
    if rank:
        U, _, _ = torch.linalg.svd(matrix.to(F64), full_matrices=False)
        torch.testing.assert_close(projector(Q), projector(U[:, :rank]), atol=100 * tol(matrix.dtype), rtol=0)
        # The column space itself: projecting the matrix onto it changes nothing.
        torch.testing.assert_close(
            project(Q, matrix).to(F64), matrix.to(F64), atol=100 * tol(matrix.dtype), rtol=0
        )


@pytest.mark.parametrize("dtype", DTYPES)
def test_orthonormal_basis_edge_cases(dtype: torch.dtype) -> None:
    assert lowrank.orthonormal_basis(torch.zeros(5, 3, dtype=dtype)).shape == (5, 0)
    assert lowrank.orthonormal_basis(torch.zeros(5, 0, dtype=dtype)).shape == (5, 0)
    column = torch.arange(1.0, 6.0, dtype=dtype).unsqueeze(-1)
    Q = lowrank.orthonormal_basis(column.expand(5, 4))
    assert Q.shape == (5, 1)
    torch.testing.assert_close(projector(Q), projector(column / column.norm()), atol=10 * tol(dtype), rtol=0)
    # rtol: a tiny but real direction is kept by default and dropped by a coarse tolerance.
    e = torch.eye(4, 2, dtype=dtype)
    e[1, 1] = 1e-3
    assert lowrank.orthonormal_basis(e).shape == (4, 2)
    assert lowrank.orthonormal_basis(e, rtol=1e-2).shape == (4, 1)
    assert lowrank.default_rtol(7, 3, dtype) == 7 * eps(dtype)


@HYPOTHESIS
@given(case=matrices_of_known_rank(), seed=st.integers(0, 2**32 - 1))
def test_project_matches_dense_projector(case: tuple[torch.Tensor, int], seed: int) -> None:
    matrix, _ = case
    Q = lowrank.orthonormal_basis(matrix)
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(matrix.shape[0], 3, generator=gen, dtype=F64).to(matrix.dtype)
    projected = project(Q, X)
    assert projected.shape == X.shape
    torch.testing.assert_close(projected.to(F64), projector(Q) @ X.to(F64), atol=10 * tol(X.dtype), rtol=0)
    torch.testing.assert_close(project(Q, projected), projected, atol=10 * tol(X.dtype), rtol=0)


def random_bases(gen: torch.Generator, m: int, ranks: list[int], dtype: torch.dtype) -> list[torch.Tensor]:
    return [lowrank.orthonormal_basis(torch.randn(m, r, generator=gen, dtype=F64)).to(dtype) for r in ranks]


@HYPOTHESIS
@given(
    m=st.integers(1, 10),
    ranks=st.lists(st.integers(0, 6), min_size=1, max_size=4),
    rank=st.integers(1, 12),
    seed=st.integers(0, 2**32 - 1),
    dtype=st.sampled_from(DTYPES),
    duplicate=st.booleans(),
)
def test_consensus_basis_matches_average_projector(
    m: int, ranks: list[int], rank: int, seed: int, dtype: torch.dtype, duplicate: bool
) -> None:
    gen = torch.Generator().manual_seed(seed)
    bases = random_bases(gen, m, ranks, dtype)
    if duplicate:
        bases.append(bases[0].clone())
    raw = torch.rand(len(bases), generator=gen, dtype=F64) + 0.1
    weights = (raw / raw.sum()).tolist()
    U_ref, eig = lowrank.consensus_basis(bases, weights, rank)
    average = sum(p * projector(Q) for p, Q in zip(weights, bases, strict=True))
    dense_eig, dense_vecs = torch.linalg.eigh(average)
    dense_eig, dense_vecs = dense_eig.flip(-1), dense_vecs.flip(-1)
    q = U_ref.shape[-1]
    assert q == min(rank, m, sum(Q.shape[-1] for Q in bases)) and eig.shape == (q,)
    assert_orthonormal_columns(U_ref, 10 * tol(dtype))
    torch.testing.assert_close(eig.to(F64), dense_eig[:q], atol=10 * tol(dtype), rtol=0)
    assert torch.all(eig <= 1 + 10 * tol(dtype)) and torch.all(eig >= 0)
    # Compare the span of the leading eigenvectors wherever the eigengap makes it well defined.
    gap = truncation_gap(dense_eig, q)
    if q and gap > 1e-3:
        torch.testing.assert_close(
            projector(U_ref), projector(dense_vecs[:, :q]), atol=100 * tol(dtype) / gap, rtol=0
        )


@pytest.mark.parametrize("dtype", DTYPES)
def test_consensus_basis_finds_a_planted_shared_direction(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(5)
    m = 20
    shared = torch.randn(m, 1, generator=gen, dtype=F64)
    shared /= shared.norm()
    bases = [
        lowrank.orthonormal_basis(
            torch.cat([shared, torch.randn(m, 3, generator=gen, dtype=F64)], dim=-1)
        ).to(dtype)
        for _ in range(5)
    ]
    # A Tensor, as servers pass them; float64 so that the weights sum to 1 to rounding level.
    weights = torch.tensor([0.1, 0.2, 0.3, 0.15, 0.25], dtype=F64)
    U_ref, eig = lowrank.consensus_basis(bases, weights, rank=3)
    assert math.isclose(float(eig[0]), 1.0, abs_tol=10 * tol(dtype))
    assert float(eig[1]) < 0.9
    torch.testing.assert_close(projector(U_ref[:, :1]), projector(shared), atol=100 * tol(dtype), rtol=0)


def test_consensus_basis_with_empty_bases() -> None:
    gen = torch.Generator().manual_seed(6)
    Q = random_bases(gen, 6, [2], F64)[0]
    U_ref, eig = lowrank.consensus_basis([Q, torch.zeros(6, 0, dtype=F64)], [0.5, 0.5], rank=4)
    assert U_ref.shape == (6, 2)
    torch.testing.assert_close(eig, torch.tensor([0.5, 0.5], dtype=F64))
    torch.testing.assert_close(projector(U_ref), projector(Q))


@HYPOTHESIS
@given(
    m=st.integers(1, 10),
    ranks=st.lists(st.integers(0, 5), min_size=1, max_size=4),
    angle=st.floats(5.0, 180.0),
    seed=st.integers(0, 2**32 - 1),
)
def test_joint_subspace_keeps_the_eigenvectors_above_the_angle_rule(
    m: int, ranks: list[int], angle: float, seed: int
) -> None:
    gen = torch.Generator().manual_seed(seed)
    bases = random_bases(gen, m, ranks, F64)
    raw = torch.rand(len(bases), generator=gen, dtype=F64) + 0.1
    weights = (raw / raw.sum()).tolist()
    phi, eig = lowrank.joint_subspace(bases, weights, angle)
    dense_eig = torch.linalg.eigvalsh(sum(p * projector(Q) for p, Q in zip(weights, bases, strict=True)))
    threshold = math.cos(math.radians(angle) / 2) ** 2
    # eigenvalues within rounding of the threshold may fall either way
    expected = dense_eig[(dense_eig - threshold).abs() > 1e-9]
    assert phi.shape == (m, eig.shape[0])
    assert eig.shape[0] in (int((expected >= threshold).sum()), int((dense_eig >= threshold).sum()))
    assert_orthonormal_columns(phi, 1e-10)


def test_joint_subspace_two_subspaces_is_the_ajive_angle_rule() -> None:
    # two planes in R^3 meeting at 50 degrees share one line: kept at 60 degrees, and the bisector
    # of the other pair of directions (at 50 degrees) too; at 40 degrees only the shared line is.
    e = torch.eye(3, dtype=F64)
    theta = math.radians(50)
    tilted = torch.stack([e[0], math.cos(theta) * e[1] + math.sin(theta) * e[2]], dim=-1)
    bases = [e[:, :2], tilted]
    phi60, eig60 = lowrank.joint_subspace(bases, [0.5, 0.5], 60.0)
    phi40, _ = lowrank.joint_subspace(bases, [0.5, 0.5], 40.0)
    assert phi60.shape[1] == 2 and phi40.shape[1] == 1
    torch.testing.assert_close(eig60[1], torch.tensor(math.cos(theta / 2) ** 2, dtype=F64))
    torch.testing.assert_close(projector(phi40), projector(e[:, :1]))
    with pytest.raises(ValueError, match="max_angle_degrees"):
        lowrank.joint_subspace(bases, [0.5, 0.5], 0.0)


@pytest.mark.parametrize("clients", [3, 6])
def test_joint_subspace_recovers_a_planted_shared_subspace_among_client_noise(clients: int) -> None:
    gen = torch.Generator().manual_seed(clients)
    n, shared_dim, private_dim = 40, 2, 3
    shared = lowrank.orthonormal_basis(torch.randn(n, shared_dim, generator=gen, dtype=F64))
    bases = []
    for _ in range(clients):
        # each client's subspace: the shared one slightly perturbed, plus its own random directions
        signal = shared + 0.01 * torch.randn(n, shared_dim, generator=gen, dtype=F64)
        private = torch.randn(n, private_dim, generator=gen, dtype=F64)
        bases.append(lowrank.orthonormal_basis(torch.cat([signal, private], dim=-1)))
    weights = [1.0 / clients] * clients
    phi, eig = lowrank.joint_subspace(bases, weights, 60.0)
    assert phi.shape == (n, shared_dim)
    assert torch.all(eig > 0.9)
    angles = lowrank.principal_angles(phi, shared)
    assert float(angles.max()) < math.radians(5)


@pytest.mark.parametrize("rank", [1, 3, 5, 7])
def test_resize_rank_truncates_or_pads_with_the_scale_on_B(rank: int) -> None:
    gen = torch.Generator().manual_seed(rank)
    B = torch.randn(6, 5, generator=gen, dtype=F64)
    A = torch.randn(5, 4, generator=gen, dtype=F64)
    B2, A2 = lowrank.resize_rank(B, A, rank, left_scale=2.5)
    assert B2.shape == (6, rank) and A2.shape == (rank, 4)
    kept = min(rank, 5)
    torch.testing.assert_close(B2 @ A2, 2.5 * B[:, :kept] @ A[:kept])
    torch.testing.assert_close(A2[:kept], A[:kept])  # A keeps its initialisation's range
    assert not B2[:, kept:].any() and not A2[kept:].any()


@HYPOTHESIS
@given(
    m=st.integers(1, 10),
    k1=st.integers(1, 6),
    k2=st.integers(1, 6),
    seed=st.integers(0, 2**32 - 1),
    dtype=st.sampled_from(DTYPES),
)
def test_principal_angles_and_overlap_match_dense(
    m: int, k1: int, k2: int, seed: int, dtype: torch.dtype
) -> None:
    gen = torch.Generator().manual_seed(seed)
    Q1, Q2 = random_bases(gen, m, [k1, k2], dtype)
    angles = lowrank.principal_angles(Q1, Q2)
    k = min(Q1.shape[-1], Q2.shape[-1])
    assert angles.shape == (k,) and angles.dtype == dtype
    assert torch.all(angles[1:] >= angles[:-1])
    assert torch.all((angles >= 0) & (angles <= math.pi / 2))
    # The oracle itself resolves angles near 0 and pi/2 only to sqrt(eps64) ~ 1.5e-8.
    oracle = dense_principal_angles(Q1, Q2)
    torch.testing.assert_close(angles.to(F64), oracle, atol=100 * eps(dtype) + 1e-7, rtol=0)
    overlap = lowrank.basis_overlap(Q1, Q2)
    assert 0.0 <= overlap <= 1.0
    dense_overlap = math.sqrt(float((projector(Q1) * projector(Q2)).sum()) / k)
    assert math.isclose(overlap, dense_overlap, abs_tol=10 * tol(dtype))
    # The overlap is the root mean squared cosine of the principal angles.
    assert math.isclose(overlap, float(torch.cos(oracle).pow(2).mean().sqrt()), abs_tol=10 * tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_principal_angles_known_cases(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(7)
    Q = random_bases(gen, 12, [4], dtype)[0]
    same = lowrank.principal_angles(Q, Q)
    # Identical subspaces: exactly 0 up to rounding, not the sqrt(eps) floor that arccos alone gives.
    torch.testing.assert_close(same, torch.zeros(4, dtype=dtype), atol=10 * tol(dtype), rtol=0)
    assert lowrank.basis_overlap(Q, Q) == pytest.approx(1.0, abs=10 * tol(dtype))
    assert lowrank.basis_overlap(Q, Q) <= 1.0
    rotated = Q @ random_rotation(4, gen, dtype)
    torch.testing.assert_close(
        lowrank.principal_angles(Q, rotated), torch.zeros(4, dtype=dtype), atol=10 * tol(dtype), rtol=0
    )

    eye = torch.eye(6, dtype=dtype)
    torch.testing.assert_close(
        lowrank.principal_angles(eye[:, :2], eye[:, 2:5]), torch.full((2,), math.pi / 2, dtype=dtype)
    )
    assert lowrank.basis_overlap(eye[:, :2], eye[:, 2:5]) == 0.0

    # One plane rotated by known small and large angles: theta_j back, to relative accuracy.
    thetas = [1e-6, 1e-3, 0.3, 1.2]
    turned = torch.zeros(8, 4, dtype=F64)
    for j, theta in enumerate(thetas):
        turned[j, j] = math.cos(theta)
        turned[4 + j, j] = math.sin(theta)
    angles = lowrank.principal_angles(torch.eye(8, 4, dtype=dtype), turned.to(dtype))
    torch.testing.assert_close(angles.to(F64), torch.tensor(thetas, dtype=F64), rtol=100 * eps(dtype), atol=0)

    # A subspace contained in a larger one has only zero angles.
    torch.testing.assert_close(
        lowrank.principal_angles(eye[:, :2], eye[:, :4]), torch.zeros(2, dtype=dtype), atol=0, rtol=0
    )
    empty = eye[:, :0]
    assert lowrank.principal_angles(empty, eye[:, :2]).shape == (0,)
    assert math.isnan(lowrank.basis_overlap(empty, eye[:, :2]))
    assert math.isnan(lowrank.basis_overlap(eye[:, :2], empty))


# --- rotations -------------------------------------------------------------------------------------


def assert_rotation(R: torch.Tensor, dtype: torch.dtype) -> None:
    assert R.dtype == dtype
    assert_orthonormal_columns(R, 10 * tol(dtype))
    det = torch.linalg.det(R.to(F64))
    torch.testing.assert_close(det, torch.ones_like(det), atol=10 * tol(dtype), rtol=0)


def dense_nearest_rotation(M: torch.Tensor) -> torch.Tensor:
    """Oracle: ``M (M^T M)^{-1/2}`` when det M > 0; otherwise flip the weakest direction of it."""
    M = M.to(F64)
    U, S, Vh = torch.linalg.svd(M)
    d = torch.ones_like(S)
    d[-1] = torch.sign(torch.linalg.det(M))
    if d[-1] > 0:
        evals, evecs = torch.linalg.eigh(M.mT @ M)
        return M @ evecs @ torch.diag(evals.rsqrt()) @ evecs.mT
    return U @ torch.diag(d) @ Vh


@HYPOTHESIS
@given(
    r=st.integers(1, 6), seed=st.integers(0, 2**32 - 1), dtype=st.sampled_from(DTYPES), reflect=st.booleans()
)
def test_polar_is_the_nearest_rotation(r: int, seed: int, dtype: torch.dtype, reflect: bool) -> None:
    gen = torch.Generator().manual_seed(seed)
    # Well-separated singular values, so the nearest rotation is unique and well conditioned.
    S = torch.linspace(3.0, 1.0, r, dtype=F64)
    M = random_rotation(r, gen) @ torch.diag(S) @ random_rotation(r, gen)
    if reflect:
        M[:, 0] = -M[:, 0]  # det M < 0: U V^T would be a reflection
    R = lowrank.polar(M.to(dtype))
    assert_rotation(R, dtype)
    torch.testing.assert_close(R.to(F64), dense_nearest_rotation(M), atol=100 * tol(dtype), rtol=0)
    best = float((R.to(F64) * M).sum())
    for _ in range(5):
        assert float((random_rotation(r, gen) * M).sum()) <= best + 10 * tol(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_polar_2d_brute_force_and_batched(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(8)
    M = torch.randn(16, 2, 2, generator=gen, dtype=F64)
    M[::2, :, 0] *= -1  # half of them with the opposite determinant sign
    R = lowrank.polar(M.to(dtype))
    assert R.shape == (16, 2, 2)
    for i in range(16):
        assert_rotation(R[i], dtype)
        torch.testing.assert_close(R[i].to(F64), nearest_rotation_2d(M[i]), atol=1e3 * tol(dtype), rtol=0)
        torch.testing.assert_close(R[i], lowrank.polar(M[i].to(dtype)), atol=10 * tol(dtype), rtol=0)
    assert torch.equal(lowrank.polar(torch.ones(1, 1, dtype=dtype) * -2), torch.ones(1, 1, dtype=dtype))


@HYPOTHESIS
@given(
    m=st.integers(1, 10), r=st.integers(1, 5), seed=st.integers(0, 2**32 - 1), dtype=st.sampled_from(DTYPES)
)
def test_procrustes_rotation_minimises_the_objective(m: int, r: int, seed: int, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(seed)
    source = torch.randn(m, r, generator=gen, dtype=F64).to(dtype)
    target = torch.randn(m, r, generator=gen, dtype=F64).to(dtype)
    R = lowrank.procrustes_rotation(source, target)
    assert_rotation(R, dtype)

    def objective(rotation: torch.Tensor) -> float:
        return float(torch.linalg.matrix_norm(source.to(F64) @ rotation.to(F64) - target.to(F64)))

    best = objective(R)
    slack = 1e3 * tol(dtype) * (1 + float(source.norm() * target.norm()))
    for _ in range(10):
        assert best <= objective(random_rotation(r, gen)) + slack
    # Exact recovery of a planted rotation when the source has full column rank.
    planted = random_rotation(r, gen)
    if m >= r:
        well = torch.linalg.qr(torch.randn(m, r, generator=gen, dtype=F64)).Q
        recovered = lowrank.procrustes_rotation(well.to(dtype), (well @ planted).to(dtype))
        torch.testing.assert_close(recovered.to(F64), planted, atol=100 * tol(dtype), rtol=0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_procrustes_2d_against_brute_force(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(9)
    for _ in range(10):
        source = torch.randn(7, 2, generator=gen, dtype=F64)
        target = torch.randn(7, 2, generator=gen, dtype=F64)
        R = lowrank.procrustes_rotation(source.to(dtype), target.to(dtype))
        grid = [rotation_2d(2 * math.pi * t / 3600) for t in range(3600)]
        objective = [float(torch.linalg.matrix_norm(source @ G - target)) for G in grid]
        found = float(torch.linalg.matrix_norm(source @ R.to(F64) - target))
        assert found <= min(objective) + 1e3 * tol(dtype)
        torch.testing.assert_close(
            R.to(F64), nearest_rotation_2d(source.mT @ target), atol=1e3 * tol(dtype), rtol=0
        )


@pytest.mark.parametrize("dtype", DTYPES)
def test_soft_rotation(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(10)
    for r in (1, 2, 4, 7):
        R = random_rotation(r, gen, dtype)
        torch.testing.assert_close(
            lowrank.soft_rotation(R, 0.0), torch.eye(r, dtype=dtype), atol=10 * tol(dtype), rtol=0
        )
        torch.testing.assert_close(lowrank.soft_rotation(R, 1.0), R, atol=10 * tol(dtype), rtol=0)
        for lam in (0.25, 0.5, 0.75):
            assert_rotation(lowrank.soft_rotation(R, lam), dtype)
    # In the plane the soft rotation turns by atan2(lam sin t, 1 - lam + lam cos t): half way at lam 1/2.
    for theta in (0.3, 1.0, 2.5, -2.0):
        for lam in (0.25, 0.5, 0.9):
            expected = math.atan2(lam * math.sin(theta), 1 - lam + lam * math.cos(theta))
            torch.testing.assert_close(
                lowrank.soft_rotation(rotation_2d(theta).to(dtype), lam).to(F64),
                rotation_2d(expected),
                atol=10 * tol(dtype),
                rtol=0,
            )


# --- the aggregation benchmark ---------------------------------------------------------------------


def test_aggregation_bench_rows_are_well_formed() -> None:
    rows = run_aggregation_bench(sizes=(64,), ranks=(4,), clients=(3,), repeats=1, progress=False)
    assert len(rows) == 1
    row = rows[0]
    assert (row["m"], row["n"], row["r"], row["clients"]) == (64, 64, 4, 3)
    for key in ("dense_seconds", "factored_seconds", "speedup"):
        assert row[key] > 0 and math.isfinite(row[key])
    assert row["rel_error"] < 1e-4
    assert row["dense_rel_error"] < 1e-4
    assert row["factored_peak_bytes"] < row["dense_peak_bytes"]
    table = format_table(rows)
    assert table.count("\n") == 2 and "speedup" in table and "| 64 |" in table
