"""fedex (FedEx-LoRA, ACL 2025): fedavg of the factors, plus the error fedavg makes merged into W0.

``B_bar = sum p_i B_i``, ``A_bar = sum p_i A_i``; the residual ``s (sum p_i B_i A_i - B_bar A_bar)`` is
added to the frozen weight in its own out x in layout (no transpose), so the new global model
``W0 + residual + s B_bar A_bar`` is the exact average of the clients' models. The increment is formed
once per module and round from the stacked factors ``[p_1 s B_1, ..., p_k s B_k, -s B_bar]`` and
``[A_1; ...; A_k; A_bar]``; clients catch up with it as the runner's merge ledger counts.
"""

from __future__ import annotations

import torch

from fedsubspace.methods.base import Method, register
from fedsubspace.methods.common import average_factors, average_heads, exact_sum, merged_residual
from fedsubspace.methods.privacy import individual_uploads
from fedsubspace.state import ClientUpdate, GlobalState


@register
class FedEx(Method):
    name = "fedex"
    privacy = individual_uploads("merges each client's product B_i A_i into W0")
    merges_into_base = True

    def aggregate(self, state: GlobalState, updates: list[ClientUpdate], weights: list[float]) -> GlobalState:
        s = state.scaling
        factors, merges = {}, {}
        for module in state.factors:
            B_bar, A_bar = average_factors(updates, weights, module)
            left, right = exact_sum(updates, weights, module, s)
            merges[module] = (torch.cat([left, -s * B_bar], dim=-1), torch.cat([right, A_bar], dim=-2))
            factors[module] = (B_bar, A_bar)
        return state.next(
            factors=factors,
            head=average_heads(updates, weights),
            residual=merged_residual(state, merges),
            merged=merges,
        )
