"""``fedsubspace bench causal-eval``: causal scoring with the shared context against one full forward
per (context, ending) row.

Both paths score the same evaluation questions with the same model, interleaved in one process, so
machine noise hits both alike; questions per second are medians over repeats. The two results must be
the same (loss to float rounding, accuracy exactly), which is checked on every repeat: a speed-up that
changed the scores would not count.
"""

from __future__ import annotations

import math
import statistics
import time
from typing import Any

from tqdm.auto import tqdm

from fedsubspace.config import ExperimentConfig
from fedsubspace.errors import UserError
from fedsubspace.experiment import prepare
from fedsubspace.markdown import markdown_table
from fedsubspace.scoring import EvalResult, evaluate

PATHS = {"shared context": True, "one row per ending": False}


def bench_causal_eval(config: ExperimentConfig, repeats: int = 3, progress: bool = True) -> dict[str, Any]:
    if repeats < 1:
        raise UserError(f"repeats must be at least 1, got {repeats}")
    exp = prepare(config)
    tm = exp.trainable
    if tm.kind != "causal":
        raise UserError(f"bench causal-eval needs a causal model; {config.model} is {tm.kind}")
    tm.load(exp.initial_state)
    seconds: dict[str, list[float]] = {name: [] for name in PATHS}
    results: dict[str, EvalResult] = {}
    for _ in tqdm(range(repeats), desc=f"causal eval ({config.model})", disable=not progress):
        for name, shared_context in PATHS.items():
            started = time.perf_counter()
            results[name] = evaluate(
                tm.model,
                exp.eval,
                tm.kind,
                batch_size=config.eval_batch_size,
                device=tm.device,
                shared_context=shared_context,
            )
            seconds[name].append(time.perf_counter() - started)
        shared, naive = results["shared context"], results["one row per ending"]
        if shared.accuracy != naive.accuracy or not math.isclose(shared.loss, naive.loss, rel_tol=1e-4):
            raise RuntimeError(f"the two scoring paths disagree: {shared} against {naive}")
    questions = len(exp.eval)
    per_second = {name: questions / statistics.median(times) for name, times in seconds.items()}
    return {
        "model": config.model,
        "questions": questions,
        "batch_size": config.eval_batch_size,
        "repeats": repeats,
        "shared_questions_per_second": per_second["shared context"],
        "naive_questions_per_second": per_second["one row per ending"],
        "speedup": per_second["shared context"] / per_second["one row per ending"],
        "loss": shared.loss,
        "accuracy": shared.accuracy,
    }


def format_row(row: dict[str, Any]) -> str:
    titles = [
        "model",
        "questions",
        "batch",
        "one row per ending (q/s)",
        "shared context (q/s)",
        "speed-up",
        "loss",
        "accuracy",
    ]
    cells = [
        row["model"],
        str(row["questions"]),
        str(row["batch_size"]),
        f"{row['naive_questions_per_second']:.2f}",
        f"{row['shared_questions_per_second']:.2f}",
        f"{row['speedup']:.2f}x",
        f"{row['loss']:.4f}",
        f"{row['accuracy']:.3f}",
    ]
    return markdown_table(titles, [cells])
