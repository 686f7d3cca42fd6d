"""The four documented departures from the papers' code (docs/methods.md, "Departures"), each pinned:
fedsvd's clip, the two aggregate norms, subspace_reg's optional paper-code split, the cosine edge cases."""

from __future__ import annotations

import math

import pytest
import torch
import yaml
from helpers import dense_average, make_round

from fedsubspace.configure import build_config, defaults
from fedsubspace.diagnostics import round_diagnostics
from fedsubspace.errors import UserError
from fedsubspace.methods import get_method
from fedsubspace.results import written_config_difference
from fedsubspace.state import ClientUpdate


def fedsvd_round(seed: int):
    state, updates, p = make_round(14, 11, 3, 3, seed=seed)
    for u in updates:  # fedsvd clients never change A
        u.factors = {k: (B, state.factors[k][1].clone()) for k, (B, _) in u.factors.items()}
    return state, updates, p


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fedsvd_applies_max_update_norm_per_module_and_keeps_the_direction(seed):
    state, updates, p = fedsvd_round(seed)
    s = state.scaling
    free = get_method("fedsvd").aggregate(state, updates, p)
    norms = {m: float((s * B @ A).norm()) for m, (B, A) in free.factors.items()}
    bound = 0.5 * min(norms.values())  # binds in every module
    clipped = get_method("fedsvd", {"max_update_norm": bound}).aggregate(state, updates, p)
    loose = get_method("fedsvd", {"max_update_norm": 2 * max(norms.values())}).aggregate(state, updates, p)
    for module, (B, A) in clipped.factors.items():
        B_bar = sum(w * u.factors[module][0] for w, u in zip(p, updates))
        T = s * B_bar @ state.factors[module][1]  # the dense oracle of the unclipped update
        assert float((s * B @ A).norm()) == pytest.approx(bound, rel=1e-10)
        torch.testing.assert_close(s * B @ A, T * bound / T.norm(), rtol=1e-9, atol=1e-12)
        q = A.shape[0]
        torch.testing.assert_close(A @ A.T, torch.eye(q, dtype=A.dtype), atol=1e-10, rtol=0)
        B_loose, A_loose = loose.factors[module]
        torch.testing.assert_close(s * B_loose @ A_loose, T, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("method", ["fedavg", "svd", "fedsvd", "fedex"])
@pytest.mark.parametrize("seed", [3, 4])
def test_the_two_aggregate_norms_against_dense_oracles(method, seed):
    state, updates, p = make_round(10, 13, 3, 4, seed=seed, kinds=("full", "deficient", "zero"))
    new = get_method(method, {"preserve_norm": False}).aggregate(state, updates, p)
    d = round_diagnostics(updates, p, new)
    s = state.scaling
    new_update = [
        s * B @ A + (new.merged[m][0] @ new.merged[m][1] if m in new.merged else 0)
        for m, (B, A) in new.factors.items()
    ]
    exact = [dense_average(updates, p, m, s) for m in new.factors]
    assert d["aggregated_update_norm"] == pytest.approx(
        math.sqrt(sum(float(X.norm()) ** 2 for X in new_update))
    )
    assert d["client_average_norm"] == pytest.approx(math.sqrt(sum(float(X.norm()) ** 2 for X in exact)))
    if method == "fedavg":  # the product of averages is not the average of products
        assert abs(d["aggregated_update_norm"] - d["client_average_norm"]) > 1e-3 * d["client_average_norm"]
    if method == "fedex":  # exact: the merge restores the average
        assert d["aggregated_update_norm"] == pytest.approx(d["client_average_norm"], rel=1e-9)


@pytest.mark.parametrize("preserve_norm", [True, False])
@pytest.mark.parametrize("max_update_norm", [None, 0.3])
@pytest.mark.parametrize("seed", [5, 6])
def test_subspace_reg_paper_code_split_gives_the_same_products_and_rescaled_factors(
    preserve_norm, max_update_norm, seed
):
    state, updates, p = make_round(12, 9, 2, 3, seed=seed)  # rank 2 of a rank-6 average: truncation
    options = {"preserve_norm": preserve_norm, "max_update_norm": max_update_norm}
    ours = get_method("subspace_reg", options).aggregate(state, updates, p)
    paper = get_method("subspace_reg", {**options, "subspace_reg_split": "paper_code"}).aggregate(
        state, updates, p
    )
    s = state.scaling
    for module, (B, A) in ours.factors.items():
        B_paper, A_paper = paper.factors[module]
        torch.testing.assert_close(B_paper @ A_paper, B @ A, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(B.T @ B, torch.eye(2, dtype=B.dtype), atol=1e-10, rtol=0)
        # the reference code's gain sqrt(||T|| / ||T_r||), T clipped, T_r its rank-2 truncation
        T = dense_average(updates, p, module, s)
        if max_update_norm is not None:
            T = T * min(1.0, max_update_norm / float(T.norm()))
        S = torch.linalg.svdvals(T)
        gain = float(S.norm() / S[:2].norm()) if preserve_norm else 1.0
        torch.testing.assert_close(B_paper.T @ B_paper, gain * torch.eye(2, dtype=B.dtype), atol=1e-9, rtol=0)
    if preserve_norm:
        assert gain > 1.01  # the split differs where it matters


def test_subspace_reg_split_is_validated():
    assert (
        build_config({"subspace_reg_split": "paper_code"}).method_options["subspace_reg_split"]
        == "paper_code"
    )
    with pytest.raises(UserError, match="subspace_reg_split must be orthonormal or paper_code"):
        build_config({"subspace_reg_split": "rescaled"})


def test_a_run_written_before_a_config_key_existed_compares_equal_at_its_default(tmp_path):
    config = defaults()
    old = {k: v for k, v in config.items() if k not in ("subspace_reg_split", "eval_seed")}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(old, sort_keys=False))
    assert written_config_difference(tmp_path, config) is None
    changed = {**config, "eval_seed": 0}
    assert written_config_difference(tmp_path, changed) == "eval_seed was None, now 0"


def test_cosines_leave_out_a_zero_update_client_and_a_single_client_has_no_pair():
    state, updates, p = make_round(9, 8, 2, 3, seed=8, kinds=("full", "full", "zero"))
    new = get_method("svd").aggregate(state, updates, p)
    d = round_diagnostics(updates, p, new)
    s = state.scaling
    flat = [torch.cat([(s * B @ A).flatten() for B, A in u.factors.values()]) for u in updates]
    average = sum(w * f for w, f in zip(p, flat))

    def cos(a, b):
        return float(a @ b / (a.norm() * b.norm()))

    assert float(flat[2].norm()) == 0.0
    # ours: the zero client has no direction and is left out (the paper's code would count it as 0)
    assert d["client_global_cosine"] == pytest.approx((cos(flat[0], average) + cos(flat[1], average)) / 2)
    assert d["pairwise_client_cosine"] == pytest.approx(cos(flat[0], flat[1]))
    paper_code_mean = (cos(flat[0], average) + cos(flat[1], average) + 0.0) / 3
    assert d["client_global_cosine"] != pytest.approx(paper_code_mean)

    alone = [updates[0]]
    single = round_diagnostics(alone, [1.0], get_method("svd").aggregate(state, alone, [1.0]))
    assert math.isnan(single["pairwise_client_cosine"])  # the paper's code returns 1.0
    assert single["client_global_cosine"] == pytest.approx(1.0)


def test_all_zero_clients_give_undefined_cosines_and_ratios():
    state, updates, p = make_round(6, 5, 2, 2, seed=9, kinds=("zero",))
    zeros = [ClientUpdate(u.client_id, u.num_examples, u.factors, u.head, 1.0) for u in updates]
    d = round_diagnostics(zeros, p, get_method("fedavg").aggregate(state, zeros, p))
    for key in ("client_global_cosine", "pairwise_client_cosine", "cancellation_ratio", "aggregation_error"):
        assert math.isnan(d[key]), key
    assert d["client_average_norm"] == 0.0
