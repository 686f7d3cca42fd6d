"""Privacy: the compatibility declarations, DP-SGD, client-level DP, SecAgg+ and their refusals."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from fedsubspace.methods import METHODS, MethodOptions, get_method
from fedsubspace.privacy.table import compatibility_table
from fedsubspace.state import ClientUpdate, GlobalState
from tests.test_methods import make_round

ROOT = Path(__file__).resolve().parents[1]


def test_readme_holds_the_table_the_declarations_render():
    assert compatibility_table() in (ROOT / "README.md").read_text()


def test_every_method_declares_all_three_mechanisms_with_a_reason():
    for name, cls in METHODS.items():
        for support in dataclasses.astuple(cls.privacy):
            assert isinstance(support[0], bool) and support[1], name


def mean_update(updates: list[ClientUpdate], weights: list[float]) -> ClientUpdate:
    """One update holding the weighted mean of every uploaded tensor."""
    first = updates[0]
    factors = {
        module: tuple(sum(p * u.factors[module][k] for p, u in zip(weights, updates)) for k in (0, 1))
        for module in first.factors
    }
    head = {name: sum(p * u.head[name] for p, u in zip(weights, updates)) for name in first.head}
    return dataclasses.replace(first, factors=factors, head=head)


def at_round(state: GlobalState, round_index: int) -> GlobalState:
    return dataclasses.replace(state, round=round_index)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("round_index", [0, 1, 3])
def test_methods_declared_summable_aggregate_the_mean_upload_as_they_aggregate_the_uploads(seed, round_index):
    """What client-level DP and SecAgg+ rely on: for every method that says its rule reads only the sum
    of the uploads, aggregating the clients equals aggregating their (weighted) mean as one upload."""
    state, updates, weights = make_round(9, 7, 3, 3, seed)
    state = at_round(state, round_index)
    summable = [name for name, cls in METHODS.items() if cls.privacy.secagg.ok]
    assert summable and all(METHODS[n].privacy.client_dp.ok for n in summable)
    for name in summable:
        method = get_method(name, MethodOptions())
        plain = method.aggregate(state, updates, weights)
        pooled = method.aggregate(state, [mean_update(updates, weights)], [1.0])
        for module in state.factors:
            for k in (0, 1):
                torch.testing.assert_close(pooled.factors[module][k], plain.factors[module][k], msg=name)
        for key in plain.head:
            torch.testing.assert_close(pooled.head[key], plain.head[key], msg=name)


@pytest.mark.parametrize("name", ["svd", "subspace_reg", "flexlora", "fedex", "flora", "glora", "fedrot"])
def test_methods_declared_individual_do_not_aggregate_the_mean_upload_as_the_uploads(name):
    """The declarations that say no are not arbitrary: these rules differ on the mean upload."""
    assert not METHODS[name].privacy.secagg.ok and not METHODS[name].privacy.client_dp.ok
    state, updates, weights = make_round(9, 7, 3, 3, seed=5)
    state = at_round(state, 1)  # fedrot aligns from its second round on
    method = get_method(name, MethodOptions())
    plain = method.aggregate(state, updates, weights)
    pooled = method.aggregate(state, [mean_update(updates, weights)], [1.0])
    differs = [
        not torch.allclose(plain.factors[m][k], pooled.factors[m][k]) for m in state.factors for k in (0, 1)
    ] + [not torch.allclose(plain.residual[m], pooled.residual[m]) for m in plain.residual]
    assert any(differs)
