"""ffa (FFA-LoRA, ICLR 2024): A stays frozen at its random initialisation, clients train B only.

Every client shares the same A, so ``sum_i p_i s B_i A = s (sum_i p_i B_i) A``: averaging B is exact.
Uplink: B and the head. Downlink: B and the head; A never changes, and every client builds it from the
run seed exactly as it builds the frozen weights W0, so it never travels.
"""

from __future__ import annotations

import torch

from fedsubspace.methods.base import ClientContext, Method, register
from fedsubspace.methods.common import average_heads, weighted_sum
from fedsubspace.methods.privacy import summed_upload
from fedsubspace.state import ClientUpdate, GlobalState, flatten

Tensor = torch.Tensor


@register
class FFA(Method):
    name = "ffa"
    privacy = summed_upload("B and head (A is shared and fixed)")
    trains = frozenset({"B"})

    def downlink(self, state: GlobalState, ctx: ClientContext) -> dict[str, Tensor]:
        return flatten(state.factors, state.head, sides=("B",))

    def aggregate(self, state: GlobalState, updates: list[ClientUpdate], weights: list[float]) -> GlobalState:
        factors = {
            module: (weighted_sum([u.factors[module][0] for u in updates], weights), A_g)
            for module, (_, A_g) in state.factors.items()
        }
        return state.next(factors=factors, head=average_heads(updates, weights))
