"""hetlora (HetLoRA, 2024): zero-pad every client adapter to the largest rank and average the factors.

A client of rank r_k receives the first r_k components of the global adapter and sends back factors
that the server pads with zeros to the global rank R. Adapters of different ranks scale differently
(alpha / r), so padding converts the client's B to the global scaling first: ``s_g B_pad A_pad =
s_k B_k A_k``. Not exact (the product of averages); HetLoRA's rank self-pruning and sparsity-weighted
aggregation are not part of this rule.
"""

from __future__ import annotations

from fedsubspace import lowrank
from fedsubspace.methods.base import Method, TruncatingReadout, register
from fedsubspace.methods.common import average_heads, weighted_sum
from fedsubspace.methods.privacy import individual_uploads
from fedsubspace.state import ClientUpdate, GlobalState


@register
class HetLoRA(TruncatingReadout, Method):
    name = "hetlora"
    privacy = individual_uploads("zero-pads each client's factors of its own rank to the global rank")
    heterogeneous_ranks = True

    def aggregate(self, state: GlobalState, updates: list[ClientUpdate], weights: list[float]) -> GlobalState:
        s, rank = state.scaling, state.rank
        factors = {}
        for module in state.factors:
            padded = [lowrank.resize_rank(*u.product(module, s), rank, 1.0 / s) for u in updates]
            factors[module] = (
                weighted_sum([B for B, _ in padded], weights),
                weighted_sum([A for _, A in padded], weights),
            )
        return state.next(factors=factors, head=average_heads(updates, weights))
