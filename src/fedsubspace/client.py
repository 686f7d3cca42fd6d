"""One client's local round: start from the global state, train with the method's rules, report back.

Reads top to bottom like a training recipe: copy the global adapter in, pick what trains, a fresh
AdamW, ``max_local_steps`` forward/backward passes with gradient accumulation (the method's extra loss
term is added once per optimiser step: its gradient does not depend on the micro-batch), gradient
clipping, and the final adapter copied out. Data order and dropout draw from generators seeded by
(seed, round, client), so the result does not depend on which engine or process runs the client.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from fedsubspace.methods import Method
from fedsubspace.scoring import Encoded, choice_scores, collate
from fedsubspace.state import ClientUpdate, GlobalState

Tensor = torch.Tensor


@dataclass
class TrainableModel:
    """A model with its adapter parameters mapped once: module -> (B, A) and head name -> tensor."""

    model: nn.Module
    kind: str
    factors: dict[str, tuple[nn.Parameter, nn.Parameter]]
    head: dict[str, nn.Parameter]
    device: torch.device

    def load(self, state: GlobalState) -> None:
        with torch.no_grad():
            for name, (B, A) in self.factors.items():
                B_g, A_g = state.factors[name]
                B.copy_(B_g)
                A.copy_(A_g)
            for name, param in self.head.items():
                param.copy_(state.head[name])

    def snapshot(self) -> tuple[dict[str, tuple[Tensor, Tensor]], dict[str, Tensor]]:
        factors = {
            name: (B.detach().cpu().clone(), A.detach().cpu().clone())
            for name, (B, A) in self.factors.items()
        }
        head = {name: p.detach().cpu().clone() for name, p in self.head.items()}
        return factors, head


@dataclass(frozen=True)
class LocalSchedule:
    max_local_steps: int
    batch_size: int
    gradient_accumulation_steps: int
    learning_rate: float
    weight_decay: float
    max_grad_norm: float | None


def stream_seed(*parts: int) -> int:
    """A 63-bit seed for one purpose, round and client: independent streams from one run seed."""
    return int(np.random.SeedSequence(list(parts)).generate_state(2, dtype=np.uint64)[0] >> np.uint64(1))


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
) -> ClientUpdate:
    tm.load(state)
    trainable: list[nn.Parameter] = list(tm.head.values())
    for B, A in tm.factors.values():
        B.requires_grad_("B" in method.trains)
        A.requires_grad_("A" in method.trains)
        trainable += [p for p in (B, A) if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=schedule.learning_rate, weight_decay=schedule.weight_decay)
    regularizer = method.client_regularizer(state)
    order = example_stream(indices, np.random.default_rng(stream_seed(seed, 1, round_index, client_id)))
    torch.manual_seed(stream_seed(seed, 2, round_index, client_id))  # dropout
    tm.model.train()

    steps, window = schedule.max_local_steps, schedule.gradient_accumulation_steps
    losses: list[float] = []
    optimizer.zero_grad(set_to_none=True)
    for step in range(steps):
        window_start = step - step % window
        window_size = min(window, steps - window_start)  # the last window may be shorter
        batch = collate(encoded, [next(order) for _ in range(schedule.batch_size)], tm.device)
        scores = choice_scores(tm.model, batch, tm.kind)
        loss = nn.functional.cross_entropy(scores.float(), batch["labels"])
        (loss / window_size).backward()
        losses.append(loss.item())
        if step + 1 == window_start + window_size:
            if regularizer is not None:
                regularizer(tm.factors).backward()
            if schedule.max_grad_norm is not None:
                nn.utils.clip_grad_norm_(trainable, schedule.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    factors, head = tm.snapshot()
    return ClientUpdate(
        client_id=client_id,
        num_examples=len(indices),
        factors=factors,
        head=head,
        train_loss=float(np.mean(losses)),
    )
