"""rolora (RoLoRA, NeurIPS 2025): alternate which factor trains, and average only that one.

Odd rounds (1, 3, ...) train B with A frozen, even rounds train A with B frozen. The frozen factor is
the same for every client, so averaging the trained one is exact: ``sum p_i s B_i A = s B_bar A``.
Uplink: the trained factor and the head.
"""

from __future__ import annotations

from fedsubspace.methods.base import Method, register
from fedsubspace.methods.common import average_heads, weighted_sum
from fedsubspace.methods.privacy import summed_upload
from fedsubspace.state import ClientUpdate, GlobalState


@register
class RoLoRA(Method):
    name = "rolora"
    privacy = summed_upload("trained factor and head")

    def trains_in(self, round_index: int) -> frozenset[str]:
        return frozenset({"B"}) if round_index % 2 == 1 else frozenset({"A"})

    def aggregate(self, state: GlobalState, updates: list[ClientUpdate], weights: list[float]) -> GlobalState:
        trained = self.trains_in(state.round + 1)
        factors = {}
        for module, (B_g, A_g) in state.factors.items():
            # the frozen factor is taken from the state, not averaged: sum p_i X = X only up to rounding
            B = weighted_sum([u.factors[module][0] for u in updates], weights) if "B" in trained else B_g
            A = weighted_sum([u.factors[module][1] for u in updates], weights) if "A" in trained else A_g
            factors[module] = (B, A)
        return state.next(factors=factors, head=average_heads(updates, weights))
