"""``fedsubspace bench causal-eval`` on the tiny random-weight causal model and the committed fixture."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
from helpers import FIXTURE, ROOT

from fedsubspace.bench import bfloat16, causal_eval
from fedsubspace.cli import main
from fedsubspace.configure import load_config
from fedsubspace.scoring import EvalResult

TINY = ["--config", str(ROOT / "configs" / "tiny-causal.yaml"), "--set", f"dataset={FIXTURE}"]


def test_causal_eval_bench_times_both_paths_on_the_same_questions(capsys: pytest.CaptureFixture) -> None:
    args = ["bench", "causal-eval", "--model", "tiny-causal", "--questions", "12", "--repeats", "2"]
    assert main([*args, *TINY, "--json"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert (row["model"], row["questions"], row["repeats"]) == ("tiny-causal", 12, 2)
    assert row["shared_questions_per_second"] > 0 and row["naive_questions_per_second"] > 0
    rates = row["shared_questions_per_second"], row["naive_questions_per_second"]
    assert math.isclose(row["speedup"], rates[0] / rates[1])
    assert math.isfinite(row["loss"]) and (12 * row["accuracy"]).is_integer()

    assert main([*args, *TINY]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].startswith("| model | questions |") and table[2].startswith("| tiny-causal | 12 |")


def test_causal_eval_bench_refuses_paths_that_disagree(monkeypatch: pytest.MonkeyPatch) -> None:
    real = causal_eval.evaluate

    def naive_path_off_by_one_question(*args, shared_context: bool, **kwargs) -> EvalResult:
        result = real(*args, shared_context=shared_context, **kwargs)
        if shared_context:
            return result
        return dataclasses.replace(result, accuracy=result.accuracy + 1 / result.num_examples)

    monkeypatch.setattr(causal_eval, "evaluate", naive_path_off_by_one_question)
    config = load_config(ROOT / "configs" / "tiny-causal.yaml", [f"dataset={FIXTURE}", "max_eval_samples=8"])
    with pytest.raises(RuntimeError, match="disagree"):
        causal_eval.bench_causal_eval(config, repeats=1, progress=False)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--model", "tiny-encoder"], "needs a causal model"),
        (["--repeats", "0"], "repeats must be at least 1"),
    ],
)
def test_causal_eval_bench_mistakes_are_one_line_errors(
    extra: list[str], message: str, capsys: pytest.CaptureFixture
) -> None:
    assert main(["bench", "causal-eval", "--questions", "4", *extra, *TINY]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_bfloat16_bench_times_three_modes_on_one_batch(capsys: pytest.CaptureFixture) -> None:
    tiny = ["--config", str(ROOT / "configs" / "tiny-encoder-sst2.yaml"), "--repeats", "1"]
    assert main(["bench", "bfloat16", *tiny, "--json"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert set(row["step_seconds"]) == set(row["loss"]) == set(bfloat16.MODES)
    assert all(s > 0 for s in row["step_seconds"].values())
    # the same arithmetic: the first projection nearly bit for bit, the loss within bfloat16 rounding
    assert row["first_projection_identical"] > 0.99
    assert math.isclose(row["loss"][bfloat16.EMULATED], row["loss"][bfloat16.NATIVE], abs_tol=1e-2)
    assert main(["bench", "bfloat16", *tiny]) == 0
    assert "| mode | training step (ms) |" in capsys.readouterr().out
    assert main(["bench", "bfloat16", *tiny, "--repeats", "0"]) == 2
    assert "repeats must be at least 1" in capsys.readouterr().err
