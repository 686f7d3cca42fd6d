"""fedsa (FedSA-LoRA, ICLR 2025): clients share A; B and the head stay with each client.

The server averages A only (``A <- sum p_i A_i``); each client keeps its own B and head between its
rounds (client memory) and starts a round from (its B, the global A, its head); a client that has not
trained yet starts from the initial B (zero) and head. There is no global model to evaluate: each client
is evaluated with its own model on a held-out slice of its own partition (the runner's personalised
evaluation). The global state keeps the initial B and head, so its adapter product is zero and the
diagnostics that compare clients with a global B or update report exactly that. Uplink and downlink: A.
"""

from __future__ import annotations

import torch

from fedsubspace.methods.base import (
    ClientContext,
    ClientStart,
    LiveParameters,
    LocalPlan,
    LocalSchedule,
    Method,
    register,
)
from fedsubspace.methods.common import weighted_sum
from fedsubspace.methods.privacy import summed_upload
from fedsubspace.state import ClientUpdate, GlobalState, flatten

Tensor = torch.Tensor


@register
class FedSA(Method):
    name = "fedsa"
    privacy = summed_upload("A")
    personalised = True

    def client_start(self, state: GlobalState, ctx: ClientContext) -> ClientStart:
        factors = {
            module: (ctx.memory.get(f"B/{module}", B_g), A_g) for module, (B_g, A_g) in state.factors.items()
        }
        head = {name: ctx.memory.get(f"head/{name}", t) for name, t in state.head.items()}
        return ClientStart(factors, head)

    def local_plan(
        self, state: GlobalState, ctx: ClientContext, params: LiveParameters, schedule: LocalSchedule
    ) -> LocalPlan:
        plan = super().local_plan(state, ctx, params, schedule)

        def keep_local(update: ClientUpdate) -> ClientUpdate:
            ctx.memory.update({f"B/{module}": B for module, (B, _) in update.factors.items()})
            ctx.memory.update({f"head/{name}": t for name, t in update.head.items()})
            return update

        plan.finish = keep_local
        return plan

    def downlink(self, state: GlobalState, ctx: ClientContext) -> dict[str, Tensor]:
        return flatten(state.factors, {}, sides=("A",))

    def uplink(self, update: ClientUpdate) -> dict[str, Tensor]:
        return flatten(update.factors, {}, sides=("A",))

    def aggregate(self, state: GlobalState, updates: list[ClientUpdate], weights: list[float]) -> GlobalState:
        factors = {
            module: (B_g, weighted_sum([u.factors[module][1] for u in updates], weights))
            for module, (B_g, _) in state.factors.items()
        }
        return state.next(factors=factors)
