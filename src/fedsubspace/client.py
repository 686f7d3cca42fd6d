"""One client's local round: start from the global state, train with the method's rules, report back.

Reads top to bottom like a training recipe: activate the adapter of the client's rank, copy in what the
method says the client starts from (and the merged base weights), let the method pick what trains and
with which optimisers, ``max_local_steps`` forward/backward passes with gradient accumulation (the
method's extra loss term is added once per optimiser step: its gradient does not depend on the
micro-batch), gradient clipping, and the result copied out for the method to report. Data order and
dropout draw from generators seeded by (seed, round, client), so the result does not depend on which
engine or process runs the client.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch import nn

from fedsubspace.adapters import TrainableModel
from fedsubspace.methods import ClientContext, LocalSchedule, Method
from fedsubspace.placement import (
    state_to_client,
    tensors_to_client,
    tensors_to_server,
    to_server,
    update_to_server,
)
from fedsubspace.privacy.dpsgd import ExampleLevelDP, PrivateGradients
from fedsubspace.scoring import Encoded, autocast, choice_scores, collate
from fedsubspace.seeding import DATA_ORDER, DP_NOISE, DROPOUT, stream_seed
from fedsubspace.state import ClientUpdate, GlobalState

Tensor = torch.Tensor

__all__ = ["example_stream", "train_client"]


def example_stream(indices: list[int], rng: np.random.Generator) -> Iterator[int]:
    """The client's examples in a fresh random order per pass, for as many passes as the steps need."""
    while True:
        yield from (indices[i] for i in rng.permutation(len(indices)))


def train_client(
    tm: TrainableModel,
    method: Method,
    state: GlobalState,
    encoded: Encoded,
    indices: list[int],
    schedule: LocalSchedule,
    *,
    seed: int,
    round_index: int,
    client_id: int,
    rank: int | None = None,
    memory: dict[str, Tensor] | None = None,
    dp: ExampleLevelDP | None = None,
) -> ClientUpdate:
    """One local round. ``rank`` is the client's LoRA rank (default: the global one); ``memory`` the
    tensors it keeps privately between its rounds (default: none kept), updated in place; ``dp`` DP-SGD's
    settings (default: none: plain training).

    ``state`` and ``memory`` are the server's (CPU); the round works on copies placed on the model's
    device and dtype, and the update and memory come back as the server keeps them
    (:mod:`fedsubspace.placement`)."""
    adapter = tm.activate(state.rank if rank is None else rank)
    state = state_to_client(state, tm.placement)
    on_client = tensors_to_client({} if memory is None else memory, tm.placement)
    ctx = ClientContext(client_id, round_index, adapter.rank, adapter.scaling, on_client)
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
            dp, tm.model, plan.parameters, schedule.batch_size, encoded.num_choices, noise
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
    if memory is not None:
        memory.clear()
        memory.update(tensors_to_server(ctx.memory))
    return update_to_server(update)
