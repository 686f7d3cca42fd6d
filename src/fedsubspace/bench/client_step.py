"""``fedsubspace bench client-step``: what subspace_reg's extra loss terms cost against a fedavg step.

Both methods train the same client from the same global state in one process, interleaved, so machine
noise hits both alike; medians over repeats. Two numbers per model: the whole local round of
subspace_reg over fedavg's, and the regulariser's own forward+backward time against one fedavg
forward/backward step (as called: once per optimiser step, and per micro-step amortised over the
gradient-accumulation window).
"""

from __future__ import annotations

import statistics
import time
from typing import Any

from tqdm.auto import tqdm

from fedsubspace.client import client_context, train_client
from fedsubspace.config import ExperimentConfig
from fedsubspace.experiment import local_schedule, prepare
from fedsubspace.markdown import markdown_table
from fedsubspace.methods import get_method
from fedsubspace.methods.subspace_reg import SubspaceRegularizer


def bench_client_step(config: ExperimentConfig, repeats: int = 5, progress: bool = True) -> dict[str, Any]:
    exp = prepare(config)
    tm, schedule = exp.trainable, local_schedule(config)
    fedavg = get_method("fedavg", config.method_options, config.seed)
    subspace_reg = get_method("subspace_reg", config.method_options, config.seed)
    # A realistic reference: the state after one round of subspace_reg (orthonormal B, non-zero A).
    indices = max(exp.partitions, key=len)
    state = subspace_reg.aggregate(
        exp.initial_state,
        [
            train_client(
                tm, fedavg, exp.initial_state, exp.train, indices, schedule, client_context(exp, 0, 0), seed=0
            )[0]
        ],
        [1.0],
    )

    round_seconds: dict[str, list[float]] = {"fedavg": [], "subspace_reg": []}
    for repeat in tqdm(range(repeats), desc=f"client rounds ({config.model})", disable=not progress):
        for method in (fedavg, subspace_reg):
            started = time.perf_counter()
            ctx = client_context(exp, 0, repeat + 1)
            train_client(tm, method, state, exp.train, indices, schedule, ctx, seed=0)
            round_seconds[method.name].append(time.perf_counter() - started)

    tm.load(state)
    regularizer = SubspaceRegularizer(state, subspace_reg.options)
    params = [p for pair in tm.factors.values() for p in pair]
    for p in params:
        p.requires_grad_(True)
    reg_seconds = []
    for _ in range(max(50, 10 * repeats)):
        started = time.perf_counter()
        regularizer(tm.factors).backward()
        reg_seconds.append(time.perf_counter() - started)
        for p in params:
            p.grad = None

    fedavg_round = statistics.median(round_seconds["fedavg"])
    step = fedavg_round / config.max_local_steps
    reg = statistics.median(reg_seconds)
    windows = -(-config.max_local_steps // config.gradient_accumulation_steps)
    return {
        "model": config.model,
        "modules": len(tm.factors),
        "local_steps": config.max_local_steps,
        "accumulation": config.gradient_accumulation_steps,
        "fedavg_round_seconds": fedavg_round,
        "subspace_reg_round_seconds": statistics.median(round_seconds["subspace_reg"]),
        "round_ratio": statistics.median(round_seconds["subspace_reg"]) / fedavg_round,
        "fedavg_step_seconds": step,
        "regulariser_seconds": reg,
        "regulariser_per_call_pct": 100 * reg / step,
        "regulariser_amortised_pct": 100 * reg * windows / fedavg_round,
    }


def format_rows(rows: list[dict[str, Any]]) -> str:
    titles = [
        "model",
        "modules",
        "fedavg step (ms)",
        "regulariser fwd+bwd (ms)",
        "per call (% of step)",
        "amortised (% of step)",
        "round ratio subspace_reg / fedavg",
    ]
    cells = (
        [
            r["model"],
            str(r["modules"]),
            f"{1000 * r['fedavg_step_seconds']:.1f}",
            f"{1000 * r['regulariser_seconds']:.2f}",
            f"{r['regulariser_per_call_pct']:.2f}",
            f"{r['regulariser_amortised_pct']:.2f}",
            f"{r['round_ratio']:.3f}",
        ]
        for r in rows
    )
    return markdown_table(titles, cells)
