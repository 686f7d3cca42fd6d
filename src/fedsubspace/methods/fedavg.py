"""fedavg (FedIT): clients train A and B; the server averages each factor separately.

Not gauge-invariant: the product of the averaged factors is not the average of the products.
"""

from __future__ import annotations

from fedsubspace.methods.base import Method, register
from fedsubspace.methods.common import average_heads
from fedsubspace.state import ClientUpdate, GlobalState, weighted_average


@register
class FedAvg(Method):
    name = "fedavg"

    def aggregate(self, state: GlobalState, updates: list[ClientUpdate], weights: list[float]) -> GlobalState:
        factors = {}
        for module in state.factors:
            averaged = weighted_average(
                [dict(zip("BA", u.factors[module], strict=True)) for u in updates], weights
            )
            factors[module] = (averaged["B"], averaged["A"])
        return GlobalState(factors=factors, head=average_heads(updates, weights), scaling=state.scaling)
