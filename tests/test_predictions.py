"""Per-example predictions: the scorer's record, the files a run keeps, and the fixed evaluation set."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from helpers import tiny_preset

from fedsubspace import simulation
from fedsubspace.configure import build_config
from fedsubspace.evaluate import pool
from fedsubspace.experiment import prepare
from fedsubspace.predictions import NAMES, read_predictions
from fedsubspace.scoring import EvalResult, result_from_scores


def test_result_from_scores_keeps_every_example_and_its_totals_agree():
    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(37, 4, generator=gen)
    labels = torch.randint(0, 4, (37,), generator=gen)
    result = result_from_scores(scores, labels)
    examples = result.examples
    assert examples is not None and len(examples) == 37
    assert examples.predicted == scores.argmax(-1).tolist() and examples.labels == labels.tolist()
    assert result.accuracy == sum(examples.correct()) / 37
    by_hand = [float(-torch.log_softmax(scores[i], -1)[labels[i]]) for i in range(37)]
    assert examples.losses == pytest.approx(by_hand, rel=1e-5)
    assert result.loss == pytest.approx(sum(by_hand) / 37, rel=1e-5)
    assert math.isnan(result_from_scores(torch.empty(0, 4), torch.empty(0, dtype=torch.long)).loss)


def test_pooled_results_concatenate_the_examples_in_order():
    a = result_from_scores(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 0]))
    b = result_from_scores(torch.tensor([[0.0, 2.0]]), torch.tensor([1]))
    pooled = pool([a, b])
    assert pooled.examples is not None
    assert pooled.examples.predicted == [0, 1, 1] and pooled.examples.labels == [0, 0, 1]
    assert pooled.accuracy == pytest.approx(2 / 3)
    assert pool([a, EvalResult(1.0, 0.5, 2)]).examples is None  # one part without a record: none


@pytest.mark.parametrize("method", ["fedavg", "fedsa"])
def test_a_run_keeps_initial_best_and_final_predictions_matching_its_summary(tmp_path: Path, method: str):
    summary = simulation.run(tiny_preset("tiny-encoder", method), tmp_path, progress=False)
    kept = {name: read_predictions(tmp_path, name) for name in NAMES}
    assert all(p is not None for p in kept.values())
    accuracy = {
        name: sum(p.examples.correct()) / len(p.examples) for name, p in kept.items() if p is not None
    }
    assert accuracy["initial"] == summary["initial_eval_accuracy"]
    assert accuracy["best"] == summary["best_eval_accuracy"]
    assert accuracy["final"] == summary["final_eval_accuracy"]
    assert kept["final"].round == summary["num_rounds"]  # type: ignore[union-attr]
    assert kept["best"].round == summary["best_round"]  # type: ignore[union-attr]
    assert len(kept["final"].examples) == summary["eval_examples"]  # type: ignore[union-attr]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = kept["final"].examples.losses  # type: ignore[union-attr]
    assert sum(losses) / len(losses) == pytest.approx(rows[-1]["eval_loss"], rel=1e-5)


def eval_questions(seed: int, eval_seed: int | None) -> list:
    config = tiny_preset("tiny-encoder", "fedavg", seed=seed)
    overrides = {"max_eval_samples": 20, "eval_seed": eval_seed}
    exp = prepare(build_config({**config.to_dict(), **overrides}))
    return exp.eval.input_ids  # type: ignore[return-value]


def test_eval_seed_fixes_the_evaluation_set_across_seeds_and_null_keeps_the_per_seed_draw():
    assert eval_questions(42, 0) == eval_questions(43, 0)
    assert eval_questions(42, None) != eval_questions(43, None)
    assert eval_questions(42, None) == eval_questions(7, 42)  # null is the run's seed: old runs reproduce
