"""Evaluating the run's models after each round (and before the first): the global model on the
evaluation split, or, for a personalised method, every client's own model on its held-out examples.
Both runners call it after the server side of a round; the Flower ClientApp calls
:func:`evaluate_personal` on the node that holds a client's memory. (``fedsubspace eval``, scoring a
finished run or an export, is :mod:`fedsubspace.evaluation`.)
"""

from __future__ import annotations

from contextlib import nullcontext

from fedsubspace.client import client_context
from fedsubspace.experiment import Experiment
from fedsubspace.methods import ClientContext, Method
from fedsubspace.results import Memories
from fedsubspace.scoring import Encoded, EvalResult, ExamplePredictions, evaluate
from fedsubspace.state import GlobalState


def evaluate_model(exp: Experiment, method: Method, state: GlobalState, memories: Memories) -> EvalResult:
    """The global model on the evaluation split; for a personalised method, every client's own model
    (as it would start its next round) on its held-out examples, pooled in client order."""
    if not method.personalised:
        exp.trainable.load(state)
        return evaluate_loaded(exp, exp.eval)
    assert exp.holdouts is not None
    return pool(
        [
            evaluate_personal(
                exp, method, state, client_context(exp, client_id, state.round + 1, memories.get(client_id))
            )
            for client_id in range(len(exp.holdouts))
        ]
    )


def pool(results: list[EvalResult]) -> EvalResult:
    """Results on disjoint example sets as one, weighted by their sizes (summed in the order given, so
    that every runner adds the same floats in the same order)."""
    loss_sum, correct, count = 0.0, 0.0, 0
    for result in results:
        loss_sum += result.loss * result.num_examples
        correct += result.accuracy * result.num_examples
        count += result.num_examples
    if count == 0:
        return EvalResult(loss=float("nan"), accuracy=float("nan"), num_examples=0)
    parts = [r.examples for r in results]
    examples = (
        None
        if any(part is None for part in parts)
        else ExamplePredictions(
            predicted=[v for part in parts for v in part.predicted],  # type: ignore[union-attr]
            labels=[v for part in parts for v in part.labels],  # type: ignore[union-attr]
            losses=[v for part in parts for v in part.losses],  # type: ignore[union-attr]
        )
    )
    return EvalResult(loss=loss_sum / count, accuracy=correct / count, num_examples=count, examples=examples)


def evaluate_personal(exp: Experiment, method: Method, state: GlobalState, ctx: ClientContext) -> EvalResult:
    """The client's own model, as it starts round ``ctx.round_index``, on its held-out examples."""
    assert exp.holdouts is not None
    tm = exp.trainable
    tm.activate(ctx.rank)
    start = method.client_start(state, ctx)
    tm.load_weights(start.factors, start.head, state.residual)
    return evaluate_loaded(exp, exp.holdouts[ctx.client_id])


def evaluate_loaded(exp: Experiment, encoded: Encoded, *, merged: bool | None = None) -> EvalResult:
    """The model as loaded on ``encoded``, its adapter merged for the time when ``merged`` (default: the
    config's ``merged_eval``), under the config's autocast."""
    tm, config = exp.trainable, exp.config
    with tm.merged() if (config.merged_eval if merged is None else merged) else nullcontext():
        return evaluate(
            tm.model,
            encoded,
            tm.kind,
            batch_size=config.eval_batch_size,
            device=tm.device,
            autocast_dtype=tm.autocast,
        )
