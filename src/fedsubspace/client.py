"""One client's local round: start from the global state, train with the method's rules, report back.

:func:`run_round` is every runner's client round (in-process and the Flower ClientApp): from the client's
context (:func:`client_context`: who, when, at which rank, with which private memory) and the global state
as the client knows it, it returns the update and the memory the client keeps, the memory it started
with when the update holds NaN or Inf (the server refuses such an update, so the round leaves nothing
behind). :func:`evaluate_personal` scores a client's own model on its held-out examples.

:func:`train_client` reads top to bottom like a training recipe: activate the adapter of the client's
rank, copy in what the method says the client starts from (and the merged base weights), let the method
pick what trains and with which optimisers, ``max_local_steps`` forward/backward passes with gradient
accumulation (the method's extra loss term is added once per optimiser step: its gradient does not
depend on the micro-batch), gradient clipping, and the result copied out for the method to report. Data
order and dropout draw from generators seeded by (seed, round, client), so the result does not depend on
which engine or process runs the client.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from fedsubspace.adapters import TrainableModel
from fedsubspace.autocast import autocast
from fedsubspace.experiment import Experiment
from fedsubspace.methods import ClientContext, LocalSchedule, Method
from fedsubspace.placement import (
    state_to_client,
    tensors_to_client,
    tensors_to_server,
    to_server,
    update_to_server,
)
from fedsubspace.privacy.dpsgd import ExampleLevelDP, PrivateGradients
from fedsubspace.scoring import Encoded, choice_scores, collate
from fedsubspace.seeding import DATA_ORDER, DP_NOISE, DROPOUT, stream_seed
from fedsubspace.state import ClientUpdate, GlobalState

Tensor = torch.Tensor

__all__ = [
    "ClientRound",
    "client_context",
    "example_stream",
    "run_round",
    "train_client",
]


def example_stream(indices: list[int], rng: np.random.Generator) -> Iterator[int]:
    """The client's examples in a fresh random order per pass, for as many passes as the steps need."""
    while True:
        yield from (indices[i] for i in rng.permutation(len(indices)))


@dataclass
class ClientRound:
    """What one client's round leaves, as the server keeps tensors (CPU, at least float32)."""

    update: ClientUpdate
    memory: dict[str, Tensor]  # the tensors the client keeps for its next round
    # The update's first tensor holding NaN or Inf, or None. The server refuses such an update, so the
    # round leaves nothing behind: ``memory`` is then the one the round started from.
    non_finite: str | None = None


def client_context(
    exp: Experiment, client_id: int, round_index: int, memory: dict[str, Tensor] | None = None
) -> ClientContext:
    """Client ``client_id`` in round ``round_index``: its LoRA rank and scaling, and ``memory``, the
    tensors it kept from its previous rounds (default: none; the server side never holds them)."""
    rank = exp.client_ranks[client_id]
    scaling = exp.trainable.adapters[rank].scaling
    return ClientContext(client_id, round_index, rank, scaling, {} if memory is None else memory)


def run_round(
    exp: Experiment,
    method: Method,
    schedule: LocalSchedule,
    state: GlobalState,
    ctx: ClientContext,
    *,
    dp: ExampleLevelDP | None = None,
) -> ClientRound:
    """Client ``ctx.client_id``'s round of ``ctx.round_index`` on its partition, from ``state`` (the global
    state as the client knows it) and the memory in ``ctx`` (left unchanged), with DP-SGD's settings
    ``dp`` (default: plain training): every runner's client round."""
    update, memory = train_client(
        exp.trainable,
        method,
        state,
        exp.train,
        exp.partitions[ctx.client_id],
        schedule,
        ctx,
        seed=exp.config.seed,
        dp=dp,
    )
    non_finite = update.non_finite_tensor()
    return ClientRound(update, ctx.memory if non_finite is not None else memory, non_finite)


def train_client(
    tm: TrainableModel,
    method: Method,
    state: GlobalState,
    encoded: Encoded,
    indices: list[int],
    schedule: LocalSchedule,
    ctx: ClientContext,
    *,
    seed: int,
    dp: ExampleLevelDP | None = None,
) -> tuple[ClientUpdate, dict[str, Tensor]]:
    """One local round on the examples ``indices`` of ``encoded``: the update and the client's memory
    after it. ``dp``: DP-SGD's settings (default: none: plain training).

    ``state`` and ``ctx.memory`` are the server's (CPU, never changed); the round works on copies placed
    on the model's device and dtype, and the update and memory come back as the server keeps them
    (:mod:`fedsubspace.placement`)."""
    round_index, client_id = ctx.round_index, ctx.client_id
    adapter = tm.activate(ctx.rank)
    state = state_to_client(state, tm.placement)
    ctx = dataclasses.replace(ctx, memory=tensors_to_client(ctx.memory, tm.placement))
    start = method.client_start(state, ctx)
    tm.load_weights(start.factors, start.head, state.residual)
    tm.freeze()
    plan = method.local_plan(state, ctx, tm.live(), schedule)
    order = example_stream(
        indices, np.random.default_rng(stream_seed(seed, DATA_ORDER, round_index, client_id))
    )
    torch.manual_seed(stream_seed(seed, DROPOUT, round_index, client_id))
    tm.model.train()

    steps, window = schedule.max_local_steps, schedule.gradient_accumulation_steps
    losses: list[Tensor] = []  # kept on the device: reading one is a device synchronisation
    private = None
    if dp is not None:  # Opacus' hooks on the model until the round's end
        noise = stream_seed(seed, DP_NOISE, round_index, client_id)
        private = PrivateGradients(
            dp, client_id, tm.model, plan.parameters, schedule.batch_size, encoded.rows_per_example, noise
        )
    for optimizer in plan.optimizers:
        optimizer.zero_grad(set_to_none=True)
    for step in range(steps):
        window_start = step - step % window
        window_size = min(window, steps - window_start)  # the last window may be shorter
        batch = collate(encoded, [next(order) for _ in range(schedule.batch_size)], tm.device)
        with autocast(tm.device, tm.autocast):
            # DP-SGD needs each question's gradient in its own rows: no context cache shared by its endings
            scores = choice_scores(tm.model, batch, tm.kind, shared_context=private is None)
        loss = nn.functional.cross_entropy(scores.float(), batch["labels"])
        if private is None:
            (loss / window_size).backward()
        else:
            private.backward(loss)
        losses.append(loss.detach())
        if step + 1 == window_start + window_size:
            if private is not None:  # each question's gradient clipped, their sum noised: the window's
                private.release()
            if plan.regularizer is not None:
                plan.regularizer(tm.factors).backward()
            if schedule.max_grad_norm is not None:
                nn.utils.clip_grad_norm_(plan.parameters, schedule.max_grad_norm)
            for optimizer in plan.optimizers:
                optimizer.step()
            for optimizer in plan.optimizers:
                optimizer.zero_grad(set_to_none=True)
    if private is not None:
        private.detach()

    update = ClientUpdate(
        client_id=client_id,
        num_examples=len(indices),
        factors={name: (B.detach(), A.detach()) for name, (B, A) in tm.factors.items()},
        head={name: p.detach() for name, p in tm.head.items()},
        # the mean of the float32 losses in float64, as numpy takes it
        train_loss=float(np.mean(to_server(torch.stack(losses)).double().numpy())),
        scaling=adapter.scaling,
        trained=plan.trains,
    )
    if plan.finish is not None:
        update = plan.finish(update)
    return update_to_server(update), tensors_to_server(ctx.memory)
