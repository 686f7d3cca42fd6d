"""fedavg (FedIT): clients train A and B; the server averages each factor separately.

Not gauge-invariant: the product of the averaged factors is not the average of the products.
"""

from __future__ import annotations

from fedsubspace.methods.base import Method, register
from fedsubspace.methods.common import average_factors, average_heads
from fedsubspace.methods.privacy import summed_upload
from fedsubspace.state import ClientUpdate, GlobalState


@register
class FedAvg(Method):
    name = "fedavg"
    privacy = summed_upload("factors and head")

    def aggregate(self, state: GlobalState, updates: list[ClientUpdate], weights: list[float]) -> GlobalState:
        factors = {module: average_factors(updates, weights, module) for module in state.factors}
        return state.next(factors=factors, head=average_heads(updates, weights))
