"""Mixed precision: bfloat16 weights or float32 weights under bfloat16 autocast on the client; the server's
state stays float32 whatever the model computes in."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import MIXED_RANK_METHODS, tiny, update_tensors

from fedsubspace import autocast as autocast_module
from fedsubspace.client import client_context, run_round
from fedsubspace.configure import build_method
from fedsubspace.errors import UserError
from fedsubspace.evaluate import evaluate_loaded
from fedsubspace.experiment import local_schedule, prepare
from fedsubspace.methods import METHODS
from fedsubspace.simulation import run


def one_round(method: str, *overrides: str):
    """Two clients of round 1 and the aggregated state, with every tensor the server receives."""
    mixed = ["client_ranks=[4, 2, 2, 4]"] if method in MIXED_RANK_METHODS else []
    config = tiny(
        "tiny-encoder", method, "max_local_steps=2", "gradient_accumulation_steps=1", *mixed, *overrides
    )
    exp = prepare(config)
    rule = build_method(config)
    memories: list[dict[str, torch.Tensor]] = [{}, {}]
    schedule = local_schedule(config)

    def client(c: int):
        result = run_round(exp, rule, schedule, exp.initial_state, client_context(exp, c, 1, memories[c]))
        memories[c] = result.memory
        return result.update

    updates = [client(0), client(1)]
    state = rule.aggregate(exp.initial_state, updates, [0.5, 0.5])
    return exp, updates, memories, state


def server_tensors(state) -> list[torch.Tensor]:
    return [
        *(t for pair in state.factors.values() for t in pair),
        *state.head.values(),
        *state.extras.values(),
        *state.residual.values(),
    ]


@pytest.mark.parametrize("method", sorted(METHODS))
def test_bfloat16_weights_leave_the_server_in_float32(method: str) -> None:
    exp, updates, memories, state = one_round(method, "dtype=bfloat16")
    assert all(w.dtype == torch.bfloat16 for w in exp.trainable.base.values())
    received = [*server_tensors(exp.initial_state), *server_tensors(state)]
    received += [t for u in updates for t in update_tensors(u)] + [t for m in memories for t in m.values()]
    assert received and all(t.dtype == torch.float32 for t in received if t.is_floating_point())
    assert all(torch.isfinite(t).all() for t in received)


def test_autocast_computes_in_bfloat16_and_keeps_float32_weights() -> None:
    config = tiny("tiny-encoder", "subspace_reg", "autocast=bfloat16")
    exp = prepare(config)
    tm = exp.trainable
    seen: list[torch.dtype] = []
    layer = next(m for m in tm.model.modules() if isinstance(m, torch.nn.Linear))
    layer.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    rule = build_method(config)
    update = run_round(exp, rule, local_schedule(config), exp.initial_state, client_context(exp, 0, 1)).update
    assert seen and set(seen) == {torch.bfloat16}
    assert all(p.dtype == torch.float32 for p in tm.model.parameters())
    assert all(t.dtype == torch.float32 for t in update_tensors(update))
    seen.clear()
    mixed = evaluate_loaded(exp, exp.eval)
    assert set(seen) == {torch.bfloat16}
    tm.autocast = None
    full = evaluate_loaded(exp, exp.eval)
    assert mixed.loss == pytest.approx(full.loss, abs=0.02)  # bf16 keeps 8 bits of mantissa


@pytest.mark.parametrize("native", [False, True])
def test_a_run_says_when_its_bfloat16_autocast_was_emulated(monkeypatch, tmp_path, native: bool) -> None:
    monkeypatch.setattr(autocast_module, "native_bfloat16", lambda: native)
    summary = run(
        tiny("tiny-encoder", "fedavg", "autocast=bfloat16", "num_rounds=1"), tmp_path, progress=False
    )
    assert ("bfloat16_autocast" in summary) == (not native)
    assert json.loads((tmp_path / "summary.json").read_text()) == summary


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["autocast=float16"], "autocast must be bfloat16"),
        (["autocast=bfloat16", "dtype=bfloat16"], "autocast keeps float32 weights"),
    ],
)
def test_precision_mistakes_are_refused(overrides: list[str], message: str) -> None:
    with pytest.raises(UserError, match=message):
        tiny("tiny-encoder", "fedavg", *overrides)
