"""flora (FLoRA, NeurIPS 2024): stack the client adapters, merge their exact average into W0, start over.

``sum_i p_i s_i B_i A_i`` is the product of the stacked factors ``[p_1 s_1 B_1, ..., p_k s_k B_k]`` and
``[A_1; ...; A_k]``, exact for any mix of client ranks (each with its own scaling alpha / r_i); it is
merged into the frozen weights, and every client re-initialises its adapter for the next round: B zero,
A fresh with PEFT's kaiming-uniform range ``U(-1/sqrt(n), 1/sqrt(n))``. The fresh A is drawn per round
from the run seed, shared by all clients (a client of rank r_k takes its first r_k rows), so every client
can regenerate it: only the merged increments, the head and the number of the round whose draw the state
holds (``extras["flora/drawn"]``; a round without usable updates keeps the previous draw) travel down.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from fedsubspace.methods.base import ClientContext, Method, TruncatingReadout, register
from fedsubspace.methods.common import average_heads, exact_sum, merged_residual
from fedsubspace.methods.privacy import individual_uploads
from fedsubspace.seeding import REINIT, stream_seed
from fedsubspace.state import ClientUpdate, Factors, GlobalState, flatten

Tensor = torch.Tensor
DRAWN = "flora/drawn"  # extras: the round whose fresh adapter the state holds (absent: the initial one)


@register
class FLoRA(TruncatingReadout, Method):
    name = "flora"
    privacy = individual_uploads("stacks each client's factors to merge the exact sum of products")
    heterogeneous_ranks = True
    merges_into_base = True

    def downlink(self, state: GlobalState, ctx: ClientContext) -> dict[str, Tensor]:
        drawn = {DRAWN: state.extras[DRAWN]} if DRAWN in state.extras else {}
        return flatten({}, state.head, drawn)

    def fresh_adapter(self, template: Factors, round_index: int) -> Factors:
        """The adapter every client starts from after round ``round_index``: B zero, A drawn afresh."""
        generator = torch.Generator().manual_seed(stream_seed(self.seed, REINIT, round_index))
        factors = {}
        for module, (B_g, A_g) in template.items():
            bound = 1.0 / math.sqrt(A_g.shape[-1])
            fresh = (torch.rand(A_g.shape, generator=generator, dtype=torch.float64) * 2 - 1) * bound
            factors[module] = (torch.zeros_like(B_g), fresh.to(A_g))
        return factors

    def client_view(
        self, received: Mapping[str, Tensor], initial: GlobalState, ctx: ClientContext
    ) -> GlobalState:
        view = super().client_view(received, initial, ctx)
        if DRAWN in view.extras:  # the adapter never travels: the client draws the server's fresh one itself
            view.factors = self.fresh_adapter(initial.factors, int(view.extras[DRAWN]))
        return view

    def aggregate(self, state: GlobalState, updates: list[ClientUpdate], weights: list[float]) -> GlobalState:
        merges = {module: exact_sum(updates, weights, module, state.scaling) for module in state.factors}
        return state.next(
            factors=self.fresh_adapter(state.factors, state.round + 1),
            extras={DRAWN: torch.tensor(state.round + 1)},
            head=average_heads(updates, weights),
            residual=merged_residual(state, merges),
            merged=merges,
        )
