"""Each server rule and client term against dense float64 oracles on random factors."""

from __future__ import annotations

import pytest
import torch

from fedsubspace.methods import METHODS, get_method
from fedsubspace.methods.subspace_reg import SubspaceRegOptions, SubspaceRegularizer
from fedsubspace.state import ClientUpdate, GlobalState

SHAPES = [(12, 9, 3), (7, 20, 4), (16, 16, 8), (5, 6, 8)]  # (m, n, r); the last has r > m


def random_factors(m: int, n: int, r: int, gen: torch.Generator, kind: str = "full") -> tuple:
    B = torch.randn(m, r, generator=gen, dtype=torch.float64)
    A = torch.randn(r, n, generator=gen, dtype=torch.float64)
    if kind == "zero":
        B = torch.zeros_like(B)
    elif kind == "deficient":  # rank 1 whatever r is
        B = B[:, :1].repeat(1, r)
    return B, A


def make_round(m: int, n: int, r: int, clients: int, seed: int, kinds: tuple[str, ...] = ("full",)):
    gen = torch.Generator().manual_seed(seed)
    modules = {"layer.0.q": (m, n), "layer.0.v": (n, m)}
    state = GlobalState(
        factors={name: random_factors(a, b, r, gen) for name, (a, b) in modules.items()},
        head={"classifier.weight": torch.randn(1, 5, generator=gen, dtype=torch.float64)},
        scaling=2.0,
    )
    updates = []
    for i in range(clients):
        kind = kinds[i % len(kinds)]
        factors = {name: random_factors(a, b, r, gen, kind) for name, (a, b) in modules.items()}
        head = {"classifier.weight": torch.randn(1, 5, generator=gen, dtype=torch.float64)}
        updates.append(ClientUpdate(i, 10 + 7 * i, factors, head, train_loss=1.0))
    total = sum(u.num_examples for u in updates)
    return state, updates, [u.num_examples / total for u in updates]


def dense_average(updates, weights, module: str, s: float) -> torch.Tensor:
    return sum(p * s * u.factors[module][0] @ u.factors[module][1] for p, u in zip(weights, updates))


def best_rank(T: torch.Tensor, r: int) -> torch.Tensor:
    U, S, Vh = torch.linalg.svd(T, full_matrices=False)
    return U[:, :r] @ torch.diag(S[:r]) @ Vh[:r]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


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
    s, total = state.scaling, 0.0
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
