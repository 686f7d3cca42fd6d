"""Every method against its defining property on random float64 factors: each server rule and client
term, on the global rank and on mixed client ranks.

Dense m x n products appear here only as oracles. Mixed-rank rounds give every client its own scaling
alpha / r_i, as the runner does.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import pytest
import torch
from helpers import (
    ALPHA,
    MODULES,
    best_rank,
    dense,
    dense_average,
    exact_average,
    make_round,
    mixed_round,
    rel,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from fedsubspace import lowrank
from fedsubspace.diagnostics import round_diagnostics
from fedsubspace.methods import (
    METHODS,
    ClientContext,
    LiveParameters,
    LocalSchedule,
    get_method,
)
from fedsubspace.methods.fedgalore import MOMENT_FLOOR, ProjectedAdam
from fedsubspace.methods.fedrot import FedRot
from fedsubspace.methods.subspace_reg import SubspaceRegOptions, SubspaceRegularizer
from fedsubspace.state import ClientUpdate, GlobalState, MergeHistory

F64 = torch.float64
HYPOTHESIS = settings(deadline=None, max_examples=25)


def at_round(state: GlobalState, round_index: int) -> GlobalState:
    """``state`` as the server holds it at the start of round ``round_index`` (1-based)."""
    return dataclasses.replace(state, round=round_index - 1)


def ctx(rank: int, round_index: int = 1, memory: dict | None = None) -> ClientContext:
    return ClientContext(0, round_index, rank, ALPHA / rank, {} if memory is None else memory)


SHAPES = [(12, 9, 3), (7, 20, 4), (16, 16, 8), (5, 6, 8)]  # (m, n, r); the last has r > m


# --- fedavg, svd, subspace_reg, fedsvd ---------------------------------------------------------------


CASES = [
    (m, n, r, clients, kinds)
    for (m, n, r) in SHAPES
    for clients in (1, 3)
    for kinds in (("full",), ("full", "zero"), ("deficient", "full"))
]


@pytest.mark.parametrize(("m", "n", "r", "clients", "kinds"), CASES)
@pytest.mark.parametrize("seed", [0, 1])
def test_fedavg_averages_each_factor(m, n, r, clients, kinds, seed):
    state, updates, p = make_round(m, n, r, clients, seed, kinds)
    new = get_method("fedavg").aggregate(state, updates, p)
    for module in state.factors:
        B = sum(w * u.factors[module][0] for w, u in zip(p, updates))
        A = sum(w * u.factors[module][1] for w, u in zip(p, updates))
        torch.testing.assert_close(new.factors[module][0], B)
        torch.testing.assert_close(new.factors[module][1], A)
    head = sum(w * u.head["classifier.weight"] for w, u in zip(p, updates))
    torch.testing.assert_close(new.head["classifier.weight"], head)


@pytest.mark.parametrize(("m", "n", "r", "clients", "kinds"), CASES)
@pytest.mark.parametrize("method", ["svd", "subspace_reg"])
def test_svd_rules_give_the_best_rank_r_approximation_of_the_exact_average(m, n, r, clients, kinds, method):
    state, updates, p = make_round(m, n, r, clients, seed=3, kinds=kinds)
    s = state.scaling
    new = get_method(method, {"preserve_norm": False}).aggregate(state, updates, p)
    for module, (B, A) in new.factors.items():
        assert B.shape == state.factors[module][0].shape and A.shape == state.factors[module][1].shape
        oracle = best_rank(dense_average(updates, p, module, s), r)
        assert rel(s * B @ A, oracle) < 1e-10
        if method == "subspace_reg":  # B = U has orthonormal columns (as many as the rank allows)
            q = min(r, B.shape[0], A.shape[1])
            gram = B.T @ B
            torch.testing.assert_close(gram[:q, :q], torch.eye(q, dtype=B.dtype), atol=1e-10, rtol=0)
        else:  # symmetric split: B and A^T carry the same singular values
            q = min(r, B.shape[0], A.shape[1])
            torch.testing.assert_close(
                torch.linalg.svdvals(B)[:q], torch.linalg.svdvals(A)[:q], atol=1e-10, rtol=1e-8
            )


@pytest.mark.parametrize("method", ["svd", "subspace_reg"])
def test_norm_clip_and_preserve(method):
    state, updates, p = make_round(30, 20, 2, 3, seed=5)
    s = state.scaling
    exact = {module: dense_average(updates, p, module, s) for module in state.factors}
    preserved = get_method(method, {"preserve_norm": True}).aggregate(state, updates, p)
    for module, (B, A) in preserved.factors.items():  # truncation loses energy; the rescale restores it
        assert abs(float((s * B @ A).norm()) - float(exact[module].norm())) < 1e-8 * float(
            exact[module].norm()
        )
        oracle = best_rank(exact[module], 2)
        torch.testing.assert_close((s * B @ A) * oracle.norm() / (s * B @ A).norm(), oracle)
    clipped = get_method(method, {"max_update_norm": 0.5, "preserve_norm": True}).aggregate(state, updates, p)
    for B, A in clipped.factors.values():
        assert abs(float((s * B @ A).norm()) - 0.5) < 1e-10


@pytest.mark.parametrize(("m", "n", "r", "clients", "kinds"), CASES)
def test_fedsvd_refactorises_the_averaged_B_against_the_shared_A(m, n, r, clients, kinds):
    state, updates, p = make_round(m, n, r, clients, seed=7, kinds=kinds)
    for u in updates:  # fedsvd clients never change A
        u.factors = {k: (B, state.factors[k][1].clone()) for k, (B, _) in u.factors.items()}
    s = state.scaling
    method = get_method("fedsvd")
    assert method.trains == {"B"}
    new = method.aggregate(state, updates, p)
    for module, (B, A) in new.factors.items():
        A_g = state.factors[module][1]
        B_bar = sum(w * u.factors[module][0] for w, u in zip(p, updates))
        oracle = s * B_bar @ A_g  # rank <= r: the re-factorisation is exact
        assert rel(s * B @ A, oracle) < 1e-10 or float(oracle.norm()) < 1e-12
        q = min(r, B.shape[0], A.shape[1])
        torch.testing.assert_close((A @ A.T)[:q, :q], torch.eye(q, dtype=A.dtype), atol=1e-10, rtol=0)
    upload = method.uplink(updates[0])
    assert upload and all(key.startswith(("lora_B/", "head/")) for key in upload)


def test_fedavg_uplink_sends_both_factors_and_the_head():
    _, updates, _ = make_round(6, 5, 2, 2, seed=0)
    upload = get_method("fedavg").uplink(updates[0])
    assert sum(k.startswith("lora_A/") for k in upload) == 2
    assert sum(k.startswith("lora_B/") for k in upload) == 2
    assert "head/classifier.weight" in upload


def dense_regulariser(params, state: GlobalState, o: SubspaceRegOptions) -> torch.Tensor:
    s, total = state.scaling, torch.zeros((), dtype=torch.float64)
    for name, (B, A) in params.items():
        B_g, A_g = state.factors[name]
        fit = (s * B @ A - s * B_g @ A_g).square().sum()
        total = total + 0.5 * (o.mu * fit + o.alpha * (B - B_g).square().sum())
        total = total + 0.5 * o.lambda_reg * (A.square().sum() + B.square().sum())
    return total / len(params)


@pytest.mark.parametrize("seed", range(4))
def test_subspace_regulariser_matches_the_dense_form_in_value_and_gradient(seed):
    state, updates, _ = make_round(14, 11, 3, 1, seed=seed)
    options = SubspaceRegOptions(mu=0.3, alpha=0.2, lambda_reg=0.1)
    params = {
        k: (B.clone().requires_grad_(), A.clone().requires_grad_())
        for k, (B, A) in updates[0].factors.items()
    }
    factored = SubspaceRegularizer(state, options)(params)
    grads = torch.autograd.grad(factored, [t for pair in params.values() for t in pair])
    dense = dense_regulariser(params, state, options)
    dense_grads = torch.autograd.grad(dense, [t for pair in params.values() for t in pair])
    torch.testing.assert_close(factored, dense)
    for g, d in zip(grads, dense_grads):
        torch.testing.assert_close(g, d)


def test_subspace_regulariser_is_zero_at_the_global_state_without_decay():
    state, _, _ = make_round(8, 6, 2, 1, seed=9)
    reg = SubspaceRegularizer(state, SubspaceRegOptions(lambda_reg=0.0))
    assert abs(float(reg(state.factors))) < 1e-9 * float(
        sum(B.square().sum() for B, _ in state.factors.values())
    )


def test_every_registered_method_has_a_distinct_name():
    assert {"fedavg", "svd", "fedsvd", "subspace_reg"} <= set(METHODS)
    for name, cls in METHODS.items():
        assert cls.name == name


# --- fedrot -----------------------------------------------------------------------------------------


def dense_rotation(M: torch.Tensor) -> torch.Tensor:
    """Oracle polar factor with det +1, from numpy-style SVD of a small square matrix."""
    U, _, Vh = torch.linalg.svd(M)
    D = torch.eye(M.shape[0], dtype=M.dtype)
    D[-1, -1] = torch.sign(torch.linalg.det(U @ Vh))
    return U @ D @ Vh


@HYPOTHESIS
@given(
    r=st.integers(1, 5),
    clients=st.integers(1, 4),
    round_index=st.integers(2, 5),
    seed=st.integers(0, 2**31),
)
def test_fedrot_hard_rotation_keeps_products_and_moves_factors_towards_the_reference(
    r: int, clients: int, round_index: int, seed: int
) -> None:
    state, updates, p = make_round(9, 7, r, clients, seed)
    state = at_round(state, round_index)
    method = get_method("fedrot", {"fedrot_lam": 1.0})
    assert isinstance(method, FedRot)
    factor = method.aligned_factor(round_index)
    assert factor == ("A" if round_index % 2 == 0 else "B")
    new = method.aggregate(state, updates, p)
    for module, (B_g, A_g) in state.factors.items():
        rotated_B, rotated_A = [], []
        for u in updates:
            B, A = u.factors[module]
            R = method.rotation(B, A, B_g, A_g, factor)
            torch.testing.assert_close(R.T @ R, torch.eye(r, dtype=F64), atol=1e-10, rtol=0)
            assert float(torch.linalg.det(R)) == pytest.approx(1.0)
            oracle = dense_rotation(A @ A_g.T if factor == "A" else B.T @ B_g)
            torch.testing.assert_close(R, oracle, atol=1e-8, rtol=0)
            # the product is unchanged; the aligned factor is no farther from the reference than before
            torch.testing.assert_close((B @ R) @ (R.T @ A), B @ A)
            if factor == "A":
                assert float((R.T @ A - A_g).norm()) <= float((A - A_g).norm()) + 1e-10
            else:
                assert float((B @ R - B_g).norm()) <= float((B - B_g).norm()) + 1e-10
            rotated_B.append(B @ R)
            rotated_A.append(R.T @ A)
        torch.testing.assert_close(new.factors[module][0], sum(w * B for w, B in zip(p, rotated_B)))
        torch.testing.assert_close(new.factors[module][1], sum(w * A for w, A in zip(p, rotated_A)))
    assert new.round == state.round + 1


@HYPOTHESIS
@given(r=st.integers(1, 5), round_index=st.integers(1, 5), align=st.sampled_from(["alternate", "A", "B"]))
def test_fedrot_without_rotation_is_fedavg(
    r: int, round_index: int, align: Literal["alternate", "A", "B"]
) -> None:
    state, updates, p = make_round(8, 6, r, 3, seed=r + round_index)
    state = at_round(state, round_index)
    fedavg = get_method("fedavg").aggregate(state, updates, p)
    soft0 = get_method("fedrot", {"fedrot_lam": 0.0, "fedrot_align": align}).aggregate(state, updates, p)
    for module in state.factors:
        for got, want in zip(soft0.factors[module], fedavg.factors[module]):
            torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)
    if round_index == 1:  # the first round aligns nothing, whatever lam
        hard = get_method("fedrot", {"fedrot_align": align}).aggregate(state, updates, p)
        for module in state.factors:
            torch.testing.assert_close(hard.factors[module][0], fedavg.factors[module][0])


def test_fedrot_parity_and_fixed_alignment():
    alternate = get_method("fedrot")
    assert [alternate.aligned_factor(t) for t in range(1, 6)] == [None, "A", "B", "A", "B"]
    only_b = get_method("fedrot", {"fedrot_align": "B"})
    assert [only_b.aligned_factor(t) for t in range(1, 4)] == [None, "B", "B"]


def test_fedrot_soft_rotation_keeps_the_product():
    state, updates, _ = make_round(10, 8, 3, 2, seed=11)
    state = at_round(state, 2)
    method = get_method("fedrot", {"fedrot_lam": 0.5})
    for module, (B_g, A_g) in state.factors.items():
        B, A = updates[0].factors[module]
        R = method.rotation(B, A, B_g, A_g, "A")
        torch.testing.assert_close((B @ R) @ (R.T @ A), B @ A)


# --- glora ------------------------------------------------------------------------------------------


def random_gauge(r: int, gen: torch.Generator) -> torch.Tensor:
    """A well-conditioned invertible r x r matrix (singular values in [0.5, 2])."""
    Q1 = torch.linalg.qr(torch.randn(r, r, generator=gen, dtype=F64))[0]
    Q2 = torch.linalg.qr(torch.randn(r, r, generator=gen, dtype=F64))[0]
    return Q1 @ torch.diag(0.5 + 1.5 * torch.rand(r, generator=gen, dtype=F64)) @ Q2


def glora_parts(state: GlobalState, module: str) -> tuple[torch.Tensor, torch.Tensor]:
    return state.extras[f"glora/U_ref/{module}"], state.extras[f"glora/Z/{module}"]


@HYPOTHESIS
@given(
    ranks=st.lists(st.integers(1, 4), min_size=1, max_size=4),
    server_rank=st.sampled_from([None, "union", 2]),
    seed=st.integers(0, 2**31),
)
def test_glora_is_invariant_to_every_clients_gauge(ranks, server_rank, seed):
    state, updates, p = mixed_round(ranks, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    regauged = []
    for u in updates:
        factors = {}
        for module, (B, A) in u.factors.items():
            G = random_gauge(B.shape[1], gen)
            factors[module] = (B @ G, torch.linalg.solve(G, A))
        regauged.append(dataclasses.replace(u, factors=factors))
    method = get_method("glora", {"glora_server_rank": server_rank})
    one, two = method.aggregate(state, updates, p), method.aggregate(state, regauged, p)
    for module in state.factors:
        U1, Z1 = glora_parts(one, module)
        U2, Z2 = glora_parts(two, module)
        exact = exact_average(updates, p, module, state.scaling)
        for U, Z in ((U1, Z1), (U2, Z2)):  # U_ref Z = P_ref sum_i p_i s_i B_i A_i, in either gauge
            torch.testing.assert_close(U @ Z, U @ (U.T @ exact), atol=1e-9, rtol=1e-9)
        # the consensus subspace is unique when the average projector has an eigengap at its rank
        Qs = [lowrank.orthonormal_basis(u.factors[module][0]) for u in updates]
        eig = torch.linalg.eigvalsh(sum(w * Q @ Q.T for w, Q in zip(p, Qs))).flip(0)
        q = U1.shape[1]
        if q < eig.numel() and eig[q - 1] - eig[q] < 1e-6:
            continue
        torch.testing.assert_close(U1 @ U1.T, U2 @ U2.T, atol=1e-8, rtol=0)
        torch.testing.assert_close(U1 @ Z1, U2 @ Z2, atol=1e-9, rtol=1e-9)
        s = state.scaling
        B1, A1 = one.factors[module]
        B2, A2 = two.factors[module]
        scale = float((U1 @ Z1).norm()) + 1e-300
        # the readout is the best rank-R approximation: unique when the spectrum has a gap
        S = torch.linalg.svdvals(U1 @ Z1)
        if S.numel() <= state.rank or S[state.rank - 1] - S[state.rank] > 1e-6 * S[0]:
            assert float((s * B1 @ A1 - s * B2 @ A2).norm()) <= 1e-8 * scale


@pytest.mark.parametrize("ranks", [[3, 3, 3], [2, 4, 1], [4]])
def test_glora_is_exact_at_the_union_rank(ranks):
    state, updates, p = mixed_round(ranks, seed=sum(ranks))
    new = get_method("glora", {"glora_server_rank": "union"}).aggregate(state, updates, p)
    for module in state.factors:
        U_ref, Z = glora_parts(new, module)
        assert U_ref.shape[1] == min(sum(ranks), MODULES[module][0])
        oracle = exact_average(updates, p, module, state.scaling)
        assert rel(U_ref @ Z, oracle) < 1e-10


@pytest.mark.parametrize("server_rank", [None, "union", 3])
def test_glora_reads_out_the_best_rank_k_approximation_for_every_client_rank(server_rank):
    ranks = [2, 5, 3]
    state, updates, p = mixed_round(ranks, seed=4)
    method = get_method("glora", {"glora_server_rank": server_rank})
    new = method.aggregate(state, updates, p)
    expected_R = {None: max(ranks), "union": sum(ranks), 3: 3}[server_rank]
    for k in (1, 2, 3, 5, 6):
        out = method.readout(new, k, ALPHA / k)
        for module, (B, A) in out.items():
            U_ref, Z = glora_parts(new, module)
            assert U_ref.shape[1] == min(expected_R, MODULES[module][0])
            assert B.shape == (MODULES[module][0], k) and A.shape == (k, MODULES[module][1])
            target = best_rank(U_ref @ Z, k)
            assert rel((ALPHA / k) * B @ A, target) < 1e-9
            # U_ref spans the top eigenvectors of the clients' average projector
            Qs = [lowrank.orthonormal_basis(u.factors[module][0]) for u in updates]
            average = sum(w * Q @ Q.T for w, Q in zip(p, Qs))
            eigvals, eigvecs = torch.linalg.eigh(average)
            top = eigvecs[:, eigvals.argsort(descending=True)[: U_ref.shape[1]]]
            torch.testing.assert_close(U_ref @ U_ref.T, top @ top.T, atol=1e-8, rtol=0)
    # the global adapter is the readout at the largest client rank
    for module, (B, A) in new.factors.items():
        Bg, Ag = method.readout(new, new.rank, new.scaling)[module]
        torch.testing.assert_close(B @ A, Bg @ Ag)
    assert new.rank == max(ranks)


def test_glora_before_any_aggregation_hands_out_the_initial_adapter_truncated():
    state, _, _ = mixed_round([4, 2], seed=8)
    out = get_method("glora").readout(state, 2, ALPHA / 2)
    for module, (B, A) in out.items():
        Bg, Ag = state.factors[module]
        torch.testing.assert_close((ALPHA / 2) * B @ A, state.scaling * Bg[:, :2] @ Ag[:2])
        torch.testing.assert_close(A, Ag[:2])


# --- baselines on the global rank -------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(3))
def test_ffa_averages_B_against_the_frozen_A_exactly(seed):
    state, updates, p = make_round(11, 8, 3, 3, seed)
    for u in updates:  # ffa clients never change A
        u.factors = {k: (B, state.factors[k][1].clone()) for k, (B, _) in u.factors.items()}
    method = get_method("ffa")
    new = method.aggregate(state, updates, p)
    for module, (B, A) in new.factors.items():
        assert A is state.factors[module][1]
        assert rel(state.scaling * B @ A, dense_average(updates, p, module, state.scaling)) < 1e-12
    assert all(k.startswith(("lora_B/", "head/")) for k in method.uplink(updates[0]))
    assert all(k.startswith(("lora_B/", "head/")) for k in method.downlink(state, ctx(3)))


def global_model(state: GlobalState, W0: dict, module: str) -> torch.Tensor:
    B, A = state.factors[module]
    return W0[module] + state.residual.get(module, 0) + state.scaling * B @ A


@pytest.mark.parametrize("method_name", ["fedex", "flora"])
def test_merging_rules_give_W0_plus_the_exact_average_of_client_models(method_name):
    state, updates, p = make_round(10, 7, 3, 3, seed=2)
    gen = torch.Generator().manual_seed(9)
    W0 = {
        m: torch.randn(B.shape[0], A.shape[1], generator=gen, dtype=F64)
        for m, (B, A) in state.factors.items()
    }
    method = get_method(method_name, seed=3)
    # two rounds, so the second starts from a state that already carries a residual
    for round_index in (1, 2):
        new = method.aggregate(state, updates, p)
        for module in state.factors:
            # each client's model is the base the round started from plus its adapter
            base = W0[module] + state.residual.get(module, 0)
            client_models = [base + dense(u, module, state.scaling) for u in updates]
            oracle = sum(w * M for w, M in zip(p, client_models))
            assert rel(global_model(new, W0, module), oracle) < 1e-12
            assert new.residual[module].shape == W0[module].shape  # out x in, no transpose
            left, right = new.merged[module]
            torch.testing.assert_close(left @ right, new.residual[module] - state.residual.get(module, 0))
        assert new.round == round_index
        state = new
        updates = [
            dataclasses.replace(u, factors={k: (B * 1.1, A) for k, (B, A) in u.factors.items()})
            for u in updates
        ]


def test_flora_reinitialises_B_zero_and_a_fresh_seeded_A_every_round():
    state, updates, p = mixed_round([4, 2, 3], seed=3)
    method = get_method("flora", seed=7)
    one = method.aggregate(state, updates, p)
    two = method.aggregate(one, updates, p)
    again = get_method("flora", seed=7).aggregate(state, updates, p)
    for module, (_, n) in MODULES.items():
        B, A = one.factors[module]
        assert not B.any() and A.shape == (4, n)
        assert float(A.abs().max()) <= 1 / math.sqrt(n) and float(A.abs().max()) > 0.5 / math.sqrt(n)
        assert not torch.equal(A, two.factors[module][1])  # fresh every round
        torch.testing.assert_close(A, again.factors[module][1])  # a function of seed and round
        # mixed ranks: the merge is the exact average with every client's own scaling
        assert rel(one.residual[module], exact_average(updates, p, module, state.scaling)) < 1e-12
        # a rank-2 client starts from B = 0 and the first two rows of the fresh A
        B2, A2 = method.readout(one, 2, ALPHA / 2)[module]
        assert not B2.any() and torch.equal(A2, A[:2])
    # the fresh A never travels: only the head and the round whose draw a client regenerates
    assert set(method.downlink(one, ctx(2))) == {"head/h", "extra/flora/drawn"}


@pytest.mark.parametrize("round_index", [1, 2, 3])
def test_rolora_alternates_the_trained_factor_and_averages_it_exactly(round_index):
    state, updates, p = make_round(9, 8, 3, 3, seed=round_index)
    state = at_round(state, round_index)
    method = get_method("rolora")
    trained = method.trains_in(round_index)
    assert trained == ({"B"} if round_index % 2 else {"A"})
    frozen = 1 if trained == {"B"} else 0
    for u in updates:  # the frozen factor is the global one
        u.factors = {
            k: tuple(state.factors[k][i].clone() if i == frozen else f[i] for i in range(2))
            for k, f in u.factors.items()
        }
        u.trained = trained
    new = method.aggregate(state, updates, p)
    for module in state.factors:
        assert new.factors[module][frozen] is state.factors[module][frozen]
        assert rel(state.scaling * new.factors[module][0] @ new.factors[module][1],
                   dense_average(updates, p, module, state.scaling)) < 1e-12  # fmt: skip
    sent = method.uplink(updates[0])
    kind = "lora_B/" if trained == {"B"} else "lora_A/"
    assert all(k.startswith((kind, "head/")) for k in sent) and any(k.startswith(kind) for k in sent)


def test_fedsa_shares_A_only_and_clients_keep_their_B_and_head():
    state, updates, p = make_round(8, 6, 2, 3, seed=5)
    method = get_method("fedsa")
    new = method.aggregate(state, updates, p)
    for module, (B, A) in new.factors.items():
        assert B is state.factors[module][0]
        torch.testing.assert_close(A, sum(w * u.factors[module][1] for w, u in zip(p, updates)))
    assert new.head is state.head
    assert all(k.startswith("lora_A/") for k in method.uplink(updates[0]))
    assert all(k.startswith("lora_A/") for k in method.downlink(new, ctx(2)))
    # a client that trained before starts from its own B and head and the global A
    memory = {f"B/{m}": B for m, (B, _) in updates[1].factors.items()}
    memory.update({f"head/{k}": v for k, v in updates[1].head.items()})
    start = method.client_start(new, ctx(2, 2, memory))
    for module, (B, A) in start.factors.items():
        assert B is updates[1].factors[module][0] and A is new.factors[module][1]
    assert start.head["classifier.weight"] is updates[1].head["classifier.weight"]
    fresh = method.client_start(new, ctx(2, 2))
    assert fresh.head["classifier.weight"] is state.head["classifier.weight"]


# --- heterogeneous ranks ------------------------------------------------------------------------------


@pytest.mark.parametrize("ranks", [[2, 4, 8], [8, 1], [3, 3, 5, 2]])
def test_flexlora_gives_each_client_the_best_rank_k_of_the_exact_average(ranks):
    state, updates, p = mixed_round(ranks, seed=len(ranks))
    method = get_method("flexlora", {"max_update_norm": 0.1})  # options of svd do not apply
    new = method.aggregate(state, updates, p)
    for k in sorted({*ranks, max(ranks)}):
        for module, (B, A) in method.readout(new, k, ALPHA / k).items():
            assert B.shape[1] == k
            oracle = best_rank(exact_average(updates, p, module, state.scaling), k)
            assert rel((ALPHA / k) * B @ A, oracle) < 1e-9


@pytest.mark.parametrize("ranks", [[2, 4, 8], [8, 1], [3, 3, 5, 2]])
def test_hetlora_zero_pads_to_the_largest_rank_and_averages(ranks):
    state, updates, p = mixed_round(ranks, seed=10 + len(ranks))
    method = get_method("hetlora")
    new = method.aggregate(state, updates, p)
    R, s = max(ranks), state.scaling
    for module in state.factors:
        B_pad = [torch.zeros(MODULES[module][0], R, dtype=F64) for _ in updates]
        A_pad = [torch.zeros(R, MODULES[module][1], dtype=F64) for _ in updates]
        for Bp, Ap, u in zip(B_pad, A_pad, updates):
            B, A = u.factors[module]
            Bp[:, : B.shape[1]] = B * (u.scaling / s)  # the client's product in the global scaling
            Ap[: A.shape[0]] = A
            torch.testing.assert_close(s * Bp @ Ap, dense(u, module, s))
        torch.testing.assert_close(new.factors[module][0], sum(w * B for w, B in zip(p, B_pad)))
        torch.testing.assert_close(new.factors[module][1], sum(w * A for w, A in zip(p, A_pad)))
    for k in sorted(set(ranks)):  # a client of rank k gets the first k components
        for module, (B, A) in method.readout(new, k, ALPHA / k).items():
            Bg, Ag = new.factors[module]
            torch.testing.assert_close((ALPHA / k) * B @ A, s * Bg[:, :k] @ Ag[:k])


def test_methods_without_mixed_rank_support_refuse_other_ranks():
    state, _, _ = mixed_round([4], seed=0)
    with pytest.raises(ValueError, match="only the global rank"):
        get_method("fedavg").readout(state, 2, ALPHA / 2)


# --- fedgalore ----------------------------------------------------------------------------------------


def galore_round(seed: int, ranks: list[int], shared: torch.Tensor | None = None):
    """fedgalore client updates: factors (B, A) with scaling 1 and projected second moments V."""
    gen = torch.Generator().manual_seed(seed)
    state, _, _ = mixed_round([4], seed)
    # a fedgalore state's adapter is B = 0 (clients train the weights, not the adapter)
    state.factors = {m: (torch.zeros_like(B), A) for m, (B, A) in state.factors.items()}
    updates = []
    for i, r in enumerate(ranks):
        factors, extras = {}, {}
        for module, (m, n) in MODULES.items():
            factors[module] = (
                torch.randn(m, r, generator=gen, dtype=F64),
                torch.randn(r, n, generator=gen, dtype=F64),
            )
            wide = n if m <= n else m  # the features V is indexed by
            rows = torch.rand(r, wide, generator=gen, dtype=F64)
            if shared is not None:
                # r - 1 rows mix the shared directions (well conditioned, so the noise stays small
                # against both), the last row is a direction of this client's own
                mixing = torch.linalg.qr(torch.randn(r - 1, shared.shape[1], generator=gen, dtype=F64))[0]
                signal = mixing @ shared[:wide].T + 0.003 * torch.randn(r - 1, wide, generator=gen, dtype=F64)
                rows = torch.cat([signal, torch.randn(1, wide, generator=gen, dtype=F64)])
            extras[f"V/{module}"] = rows
        updates.append(
            ClientUpdate(i, 4 + i, factors, {"h": torch.zeros(3, dtype=F64)}, 1.0, extras, scaling=1.0)
        )
    total = sum(u.num_examples for u in updates)
    return state, updates, [u.num_examples / total for u in updates]


def test_fedgalore_merges_exactly_the_weighted_sum_of_client_updates():
    state, updates, p = galore_round(1, [3, 2, 4])
    state = dataclasses.replace(
        state, residual={m: torch.ones(*shape, dtype=F64) for m, shape in MODULES.items()}
    )
    new = get_method("fedgalore").aggregate(state, updates, p)
    for module in MODULES:
        oracle = sum(w * u.factors[module][0] @ u.factors[module][1] for w, u in zip(p, updates))
        assert rel(new.residual[module] - state.residual[module], oracle) < 1e-12
        assert new.factors[module] is state.factors[module]  # the adapter stays B = 0 (untouched)
    d = round_diagnostics(updates, p, new)
    assert d["aggregation_error"] < 1e-10


def test_fedgalore_synchronisation_recovers_a_planted_shared_subspace():
    gen = torch.Generator().manual_seed(0)
    shared = lowrank.orthonormal_basis(torch.randn(12, 2, generator=gen, dtype=F64))
    state, updates, p = galore_round(2, [3, 3, 4, 3], shared=shared)
    new = get_method("fedgalore", {"fedgalore_angle_threshold": 60.0}).aggregate(state, updates, p)
    for module, (m, n) in MODULES.items():
        phi = new.extras[f"fedgalore/phi/{module}"]
        planted = shared[: (n if m <= n else m)]
        planted = lowrank.orthonormal_basis(planted)
        assert phi.shape[1] == 2
        assert float(lowrank.principal_angles(phi, planted).max()) < math.radians(3)


def test_fedgalore_warm_start_projects_the_clients_own_moment_onto_the_joint_subspace():
    state, updates, p = galore_round(3, [3, 3])
    method = get_method("fedgalore")
    new = method.aggregate(state, updates, p)
    gen = torch.Generator().manual_seed(1)
    memory = {}
    for module, (m, _) in MODULES.items():
        memory[f"P/{module}"] = lowrank.orthonormal_basis(torch.randn(m, 3, generator=gen, dtype=F64))
        memory[f"V/{module}"] = updates[0].extras[f"V/{module}"]
    warm = method.warm_start(new, ctx(3, 2, memory))
    for module in MODULES:
        phi = new.extras[f"fedgalore/phi/{module}"]
        P_old, V_start = warm[module]
        assert P_old is memory[f"P/{module}"]
        torch.testing.assert_close(V_start, (memory[f"V/{module}"] @ phi @ phi.T).clamp_min(MOMENT_FLOOR))
    assert method.warm_start(state, ctx(3, 1, memory)) == {}  # no joint subspace yet: cold start
    assert method.warm_start(new, ctx(3, 2)) == {}  # a client that never trained: cold start
    assert set(method.downlink(new, ctx(3))) == {"head/h", *(f"extra/fedgalore/phi/{m}" for m in MODULES)}


@pytest.mark.parametrize(("m", "n", "rank"), [(6, 9, 2), (9, 5, 3), (4, 4, 6)])
def test_projected_adam_updates_weights_by_exactly_P_N_with_P_from_the_first_gradient(m, n, rank):
    gen = torch.Generator().manual_seed(m * n)
    W = torch.nn.Parameter(torch.randn(m, n, generator=gen, dtype=F64))
    start = W.detach().clone()
    lr, eps = 0.01, 1e-8
    opt = ProjectedAdam({"w": W}, rank=rank, lr=lr, weight_decay=0.1, eps=eps)
    grads = [torch.randn(m, n, generator=gen, dtype=F64) for _ in range(4)]
    for step, G in enumerate(grads):
        W.grad = G.clone()
        before = W.detach().clone()
        opt.step()
        if step == 0:  # Adam's first step is lr * sign-like in the projected coordinates
            right = m > n
            Gp = G.T if right else G
            r = min(rank, m, n)
            U = torch.linalg.svd(Gp, full_matrices=False)[0][:, :r]
            P = opt.state[W]["P"]
            torch.testing.assert_close(P @ P.T, U @ U.T, atol=1e-10, rtol=0)
            R = P.T @ Gp
            Wp = before.T if right else before
            step_p = -lr * R / (R.abs() + eps) - lr * 0.1 * (P.T @ Wp)
            expected = (P @ step_p).T if right else P @ step_p
            torch.testing.assert_close(W.detach() - before, expected)
    (B, A), P, V = (t["w"] for t in opt.result())
    torch.testing.assert_close(W.detach() - start, B @ A, atol=1e-12, rtol=0)
    r = min(rank, m, n)
    assert B.shape == (m, r) and A.shape == (r, n)
    if m > n:  # right-sided: A is the projector's transpose and V is indexed by the m output features
        torch.testing.assert_close(A, P.T)
        assert V.shape == (r, m)
    else:
        torch.testing.assert_close(B, P)
        assert V.shape == (r, n)


def test_projected_adam_warm_start_maps_the_moment_into_the_new_projector():
    gen = torch.Generator().manual_seed(4)
    W = torch.nn.Parameter(torch.randn(5, 8, generator=gen, dtype=F64))
    P_old = lowrank.orthonormal_basis(torch.randn(5, 2, generator=gen, dtype=F64))
    V_start = torch.rand(2, 8, generator=gen, dtype=F64)
    opt = ProjectedAdam({"w": W}, rank=2, lr=0.1, warm={"w": (P_old, V_start)})
    G = torch.randn(5, 8, generator=gen, dtype=F64)
    W.grad = G.clone()
    before = W.detach().clone()
    opt.step()
    st = opt.state[W]
    P = st["P"]
    V0 = ((P.T @ P_old) ** 2) @ V_start
    R = P.T @ G
    torch.testing.assert_close(st["V"], 0.999 * V0 + 0.001 * R * R)
    # no bias correction of a warm-started moment; the first moment starts fresh
    torch.testing.assert_close(W.detach() - before, P @ (-0.1 * R / (st["V"].sqrt() + 1e-8)))


def test_fedgalore_plan_trains_the_base_weights_and_reports_P_N():
    gen = torch.Generator().manual_seed(5)
    base = {"w": torch.nn.Parameter(torch.randn(4, 6, generator=gen, dtype=F64), requires_grad=False)}
    factors = {
        "w": (
            torch.nn.Parameter(torch.zeros(4, 2, dtype=F64)),
            torch.nn.Parameter(torch.randn(2, 6, dtype=F64)),
        )
    }
    state = GlobalState(
        factors={"w": (torch.zeros(4, 2, dtype=F64), torch.zeros(2, 6, dtype=F64))}, head={}, scaling=8.0
    )
    memory: dict = {}
    method = get_method("fedgalore")
    schedule = LocalSchedule(3, 1, 1, 0.01, 0.0, None)
    plan = method.local_plan(state, ctx(2, 1, memory), LiveParameters(factors, {}, base), schedule)
    assert len(plan.parameters) == 1 and plan.parameters[0] is base["w"] and base["w"].requires_grad
    assert not any(p.requires_grad for pair in factors.values() for p in pair)
    start = base["w"].detach().clone()
    for _ in range(3):
        base["w"].grad = torch.randn(4, 6, generator=gen, dtype=F64)
        plan.optimizers[0].step()
    update = plan.finish(ClientUpdate(0, 5, {"w": (torch.zeros(4, 2), torch.zeros(2, 6))}, {}, 1.0))
    B, A = update.factors["w"]
    torch.testing.assert_close(B @ A, base["w"].detach() - start)
    assert update.scaling == 1.0 and update.extras["V/w"].shape == (2, 6)
    assert set(memory) == {"P/w", "V/w"}
    sent = method.uplink(update)
    assert set(sent) == {"lora_B/w", "lora_A/w", "extra/V/w"}


# --- communication of merged residuals ------------------------------------------------------------------


def test_merge_history_counts_what_brings_a_returning_client_to_exactly_the_current_base():
    """Partial participation: a client that skipped rounds applies the increments it missed."""
    state, _, _ = make_round(16, 12, 2, 1, seed=0)
    method = get_method("fedex")
    gen = torch.Generator().manual_seed(1)
    ledger = MergeHistory()
    clients = range(4)
    local = {c: {m: torch.zeros(16 if m.endswith("q") else 12, 12 if m.endswith("q") else 16, dtype=F64)
                 for m in state.factors} for c in clients}  # fmt: skip
    synced = dict.fromkeys(clients, 0)
    history: list[dict] = []
    returned_after_missing = False
    for _ in range(6):
        sampled = sorted(torch.randperm(4, generator=gen)[:2].tolist())
        for c in sampled:
            sent = ledger.catch_up_bytes(c, state)
            missed = history[synced[c] : state.round]
            returned_after_missing |= synced[c] > 0 and len(missed) > 1
            expected = sum(
                min(
                    sum(sum(t.numel() * 8 for t in merges[m]) for merges in missed),
                    state.residual[m].numel() * 8,
                )
                for m in state.residual
            )
            assert sent == expected
            for merges in missed:  # what the client downloads and applies
                for m, (left, right) in merges.items():
                    local[c][m] = local[c][m] + left @ right
            synced[c] = state.round
            for m in state.factors:  # it now holds exactly the current base
                torch.testing.assert_close(local[c][m], state.residual.get(m, torch.zeros_like(local[c][m])))
        updates = []
        for c in sampled:
            factors = {
                m: (
                    B + 0.1 * torch.randn(B.shape, generator=gen, dtype=F64),
                    A + 0.1 * torch.randn(A.shape, generator=gen, dtype=F64),
                )
                for m, (B, A) in state.factors.items()
            }
            updates.append(ClientUpdate(c, 5, factors, {}, 1.0))
        state = method.aggregate(state, updates, [0.5, 0.5])
        ledger.record(state)
        history.append(state.merged)
    assert returned_after_missing  # somebody came back after skipping rounds
