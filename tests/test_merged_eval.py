"""Evaluation with the adapter merged into the weights: the same scores to float rounding, the base model's
forward (no adapter runs), and the weights restored bit for bit afterwards."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny
from peft.tuners.lora import LoraLayer

from fedsubspace.evaluate import evaluate_loaded
from fedsubspace.experiment import prepare
from fedsubspace.scoring import choice_scores, collate, evaluate

EVERY_DENSE = {
    "tiny-encoder": "target_modules=[query, key, value, dense]",
    "tiny-causal": "target_modules=[q_proj, k_proj, v_proj, o_proj, up_proj, down_proj, gate_proj]",
}


def trained_looking(preset: str, *overrides: str, method: str = "fedavg"):
    """An experiment whose adapters (every rank) hold random non-zero factors, as after training."""
    exp = prepare(tiny(preset, method, EVERY_DENSE[preset], *overrides))
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for adapter in exp.trainable.adapters.values():
            for B, A in adapter.factors.values():
                B.copy_(0.1 * torch.randn(B.shape, generator=generator))
                A.copy_(0.1 * torch.randn(A.shape, generator=generator))
    return exp


@pytest.mark.parametrize("preset", sorted(EVERY_DENSE))
@pytest.mark.parametrize("rank", [4, 2])
def test_merged_forward_matches_unmerged_and_restores_weights(preset: str, rank: int) -> None:
    exp = trained_looking(preset, "client_ranks=[4, 2, 2, 4]", method="glora")
    tm = exp.trainable
    tm.activate(rank)
    tm.model.eval()
    before = {name: w.detach().clone() for name, w in tm.base.items()}
    batch = collate(exp.eval, list(range(8)), tm.device)
    with torch.inference_mode():
        unmerged = choice_scores(tm.model, batch, tm.kind)
        with tm.merged():
            layers = [m for m in tm.model.modules() if isinstance(m, LoraLayer)]
            assert layers and all(layer.merged for layer in layers)  # the forward runs no adapter
            merged = choice_scores(tm.model, batch, tm.kind)
    assert not any(layer.merged for layer in layers)
    torch.testing.assert_close(merged, unmerged, rtol=1e-5, atol=1e-5)
    for name, weight in tm.base.items():
        assert torch.equal(weight, before[name]), name  # bit for bit, not to tolerance


def test_merged_eval_key_gives_the_unmerged_results_to_rounding() -> None:
    exp = trained_looking("tiny-encoder")
    tm = exp.trainable
    plain = evaluate(tm.model, exp.eval, tm.kind, batch_size=8, device=tm.device)
    merged_exp = trained_looking("tiny-encoder", "merged_eval=true")
    merged = evaluate_loaded(merged_exp, merged_exp.eval)
    assert merged.num_examples == plain.num_examples
    assert merged.accuracy == plain.accuracy
    assert merged.loss == pytest.approx(plain.loss, rel=1e-5)
