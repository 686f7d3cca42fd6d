"""The in-process federation, the default runner: every round reads top to bottom.

sample clients -> each receives what it needs and trains from the global state -> the method
aggregates -> diagnostics -> evaluate the new global model (or, for personalised methods, every
client's own model on its held-out data) -> one metrics line and a checkpoint. A client whose update
holds NaN or Inf is reported and left out of the round; the run goes on.

Clients keep private tensors between their rounds in ``memories`` (fedsa's B and head, fedgalore's
projector and second moment); the server never reads them. ``bytes_down`` counts, per sampled client,
the method's downlink plus the merged base-weight increments the client missed (a :class:`MergeLedger`).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from fedsubspace.client import train_client
from fedsubspace.config import ExperimentConfig
from fedsubspace.diagnostics import round_diagnostics
from fedsubspace.experiment import Experiment, local_schedule, method_options, prepare, sample_clients
from fedsubspace.methods import ClientContext, Method, get_method
from fedsubspace.results import RunDirectory
from fedsubspace.scoring import EvalResult, evaluate
from fedsubspace.state import GlobalState, MergeLedger, payload_bytes

DIAGNOSTIC_KEYS = (
    "basis_overlap",
    "update_overlap",
    "cancellation_ratio",
    "client_global_cosine",
    "pairwise_client_cosine",
    "update_norm",
    "aggregated_update_norm",
    "aggregation_error",
    "principal_angles",
)


def round_line(row: dict[str, Any], num_rounds: int) -> str:
    def fmt(key: str) -> str:
        value = row.get(key)
        return "n/a" if value is None or value != value else f"{value:.4f}"

    return (
        f"round {row['round']:>3}/{num_rounds}  acc {fmt('eval_accuracy')}  loss {fmt('eval_loss')}  "
        f"train {fmt('train_loss')}  overlap {fmt('basis_overlap')}  update_overlap {fmt('update_overlap')}  "
        f"{row['seconds']:.1f}s"
    )


Memories = dict[int, dict[str, torch.Tensor]]


def client_context(exp: Experiment, memories: Memories, client_id: int, round_index: int) -> ClientContext:
    rank = exp.client_ranks[client_id]
    scaling = exp.trainable.adapters[rank].scaling
    return ClientContext(client_id, round_index, rank, scaling, memories[client_id])


def evaluate_model(exp: Experiment, method: Method, state: GlobalState, memories: Memories) -> EvalResult:
    """The global model on the evaluation split; for a personalised method, every client's own model
    (as it would start its next round) on its held-out examples, pooled."""
    tm, batch_size = exp.trainable, exp.config.eval_batch_size
    if not method.personalised:
        tm.load(state)
        return evaluate(tm.model, exp.eval, tm.kind, batch_size=batch_size, device=tm.device)
    assert exp.holdouts is not None
    loss_sum, correct, count = 0.0, 0.0, 0
    for client_id, held_out in enumerate(exp.holdouts):
        ctx = client_context(exp, memories, client_id, state.round + 1)
        tm.activate(ctx.rank)
        start = method.client_start(state, ctx)
        tm.load_weights(start.factors, start.head, state.residual)
        result = evaluate(tm.model, held_out, tm.kind, batch_size=batch_size, device=tm.device)
        loss_sum += result.loss * result.num_examples
        correct += result.accuracy * result.num_examples
        count += result.num_examples
    return EvalResult(loss=loss_sum / count, accuracy=correct / count, num_examples=count)


def run(
    config: ExperimentConfig, out: Path, *, overwrite: bool = False, progress: bool = True
) -> dict[str, Any]:
    run_dir = RunDirectory(out, overwrite=overwrite)
    run_dir.write_config(config.to_dict())
    exp = prepare(config)
    run_dir.write_json("partition_stats.json", exp.partition_stats)
    tm, method, schedule = (
        exp.trainable,
        get_method(config.method, method_options(config)),
        local_schedule(config),
    )

    memories: Memories = {client_id: {} for client_id in range(config.num_clients)}
    ledger = MergeLedger()

    state = exp.initial_state
    initial = evaluate_model(exp, method, state, memories)
    best_accuracy, best_round = initial.accuracy, 0
    row: dict[str, Any] = {}
    bar = tqdm(range(1, config.num_rounds + 1), desc=f"{config.method}", unit="round", disable=not progress)
    for round_index in bar:
        started = time.perf_counter()
        selected = sample_clients(config.seed, round_index, config.num_clients, config.client_fraction)
        updates, skipped, bytes_down = [], [], 0
        for client_id in selected:
            ctx = client_context(exp, memories, client_id, round_index)
            bytes_down += payload_bytes(method.downlink(state, ctx)) + ledger.catch_up_bytes(client_id, state)
            kept = dict(ctx.memory)  # a discarded round must not leave its tensors in the client's memory
            update = train_client(
                tm,
                method,
                state,
                exp.train,
                exp.partitions[client_id],
                schedule,
                seed=config.seed,
                round_index=round_index,
                client_id=client_id,
                rank=ctx.rank,
                memory=ctx.memory,
            )
            bad = update.non_finite_tensor()
            if bad is not None:
                tqdm.write(
                    f"round {round_index}: client {client_id} sent non-finite values in {bad}; skipped"
                )
                skipped.append(client_id)
                ctx.memory.clear()
                ctx.memory.update(kept)
                continue
            updates.append(update)
        trained = time.perf_counter()

        diagnostics: dict[str, float] = {}
        total = sum(u.num_examples for u in updates)
        weights = [u.num_examples / total for u in updates]
        if updates:
            state = method.aggregate(state, updates, weights)
            aggregated = time.perf_counter()
            diagnostics = round_diagnostics(updates, weights, state)
        else:
            tqdm.write(f"round {round_index}: no usable client update; the global model is unchanged")
            state = state.next()
            aggregated = time.perf_counter()
        ledger.record(state)
        diagnosed = time.perf_counter()

        result = evaluate_model(exp, method, state, memories)
        finished = time.perf_counter()
        row = {
            "round": round_index,
            "selected_clients": selected,
            "skipped_clients": skipped,
            "train_loss": (sum(u.train_loss * u.num_examples for u in updates) / total) if updates else None,
            "eval_loss": result.loss,
            "eval_accuracy": result.accuracy,
            **{key: diagnostics.get(key) for key in DIAGNOSTIC_KEYS},
            "bytes_up": sum(payload_bytes(method.uplink(u)) for u in updates),
            "bytes_down": bytes_down,
            "seconds": finished - started,
            "train_seconds": trained - started,
            "aggregate_seconds": aggregated - trained,
            "diagnostics_seconds": diagnosed - aggregated,
            "eval_seconds": finished - diagnosed,
        }
        run_dir.append_metrics(row)
        run_dir.save_checkpoint("last", state)
        if result.accuracy > best_accuracy:
            best_accuracy, best_round = result.accuracy, round_index
            run_dir.save_checkpoint("best", state)
        if progress:
            tqdm.write(round_line(row, config.num_rounds))

    summary = {
        "method": config.method,
        "model": config.model,
        "seed": config.seed,
        "num_rounds": config.num_rounds,
        "initial_eval_accuracy": initial.accuracy,
        "initial_eval_loss": initial.loss,
        "best_eval_accuracy": best_accuracy,
        "best_round": best_round,
        "final_eval_accuracy": row.get("eval_accuracy"),
        "final_eval_loss": row.get("eval_loss"),
        "final_diagnostics": {key: row.get(key) for key in DIAGNOSTIC_KEYS},
        "eval_examples": initial.num_examples,
        "evaluation": "personalised" if method.personalised else "global",
        "client_ranks": exp.client_ranks,
    }
    if best_round == 0:
        run_dir.save_checkpoint("best", exp.initial_state)
    run_dir.write_json("summary.json", summary)
    return summary
