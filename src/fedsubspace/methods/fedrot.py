"""fedrot (FedRot-LoRA, 2026): rotate each client's factors towards the round's starting global factors,
then average the rotated factors as fedavg.

An orthogonal r x r ``R_i`` (det +1) applied as ``B_i <- B_i R_i``, ``A_i <- R_i^T A_i`` leaves the
client's product unchanged and removes the part of the gauge mismatch a rotation can: aligning A solves
``min ||R^T A_i - A_g||`` (``R = polar(A_i A_g^T)``), aligning B ``min ||B_i R - B_g||``
(``R = polar(B_i^T B_g)``). The soft variant uses ``polar((1 - lam) I + lam R)``: lam = 0 is fedavg,
lam = 1 the hard alignment. The rotation needs only what the server already holds, so it runs on the
server and communication equals fedavg's.

Round parity. methods.md counts rounds from 0: no alignment in round 0 (the first round, whose starting
factors are the initialisation with B = 0, nothing to align to), A in odd rounds, B in even rounds.
The runner counts from 1, so with ``t`` the runner's round: ``t = 1`` aligns nothing, even ``t`` aligns
A, odd ``t >= 3`` aligns B. ``align = A`` or ``B`` aligns that factor in every round but the first.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedsubspace import lowrank
from fedsubspace.methods.base import Method, register
from fedsubspace.methods.common import average_heads, weighted_sum
from fedsubspace.methods.options import Check, Option, one_of
from fedsubspace.methods.privacy import individual_uploads
from fedsubspace.state import ClientUpdate, GlobalState

Tensor = torch.Tensor


@dataclass(frozen=True)
class FedRotOptions:
    fedrot_lam: float = Option(
        1.0,
        "strength of the rotation: 0 = fedavg, 1 = hard alignment",
        Check(lambda value: 0.0 <= value <= 1.0, "must be in [0, 1]"),
    ).field()
    fedrot_align: str = Option(
        "alternate", "which factor is aligned: alternate (A, then B), A or B", one_of("alternate", "A", "B")
    ).field()


@register
class FedRot(Method):
    name = "fedrot"
    privacy = individual_uploads("rotates each client's factors by its own R_i before averaging")
    Options = FedRotOptions
    options: FedRotOptions

    def aligned_factor(self, round_index: int) -> str | None:
        """Which factor round ``round_index`` (1-based) aligns: "A", "B" or None."""
        if round_index <= 1:
            return None
        if self.options.fedrot_align != "alternate":
            return self.options.fedrot_align
        return "A" if round_index % 2 == 0 else "B"

    def rotation(self, B: Tensor, A: Tensor, B_g: Tensor, A_g: Tensor, factor: str) -> Tensor:
        """The (soft) rotation that aligns one client's factor ``factor`` with the global one."""
        if factor == "A":
            hard = lowrank.procrustes_rotation(A.mT, A_g.mT)  # polar(A_i A_g^T)
        else:
            hard = lowrank.procrustes_rotation(B, B_g)  # polar(B_i^T B_g)
        return lowrank.soft_rotation(hard, self.options.fedrot_lam)

    def aggregate(self, state: GlobalState, updates: list[ClientUpdate], weights: list[float]) -> GlobalState:
        factor = self.aligned_factor(state.round + 1)
        factors = {}
        for module, (B_g, A_g) in state.factors.items():
            Bs, As = [], []
            for u in updates:
                B, A = u.factors[module]
                if factor is not None:
                    R = self.rotation(B, A, B_g, A_g, factor)
                    B, A = B @ R, R.mT @ A
                Bs.append(B)
                As.append(A)
            factors[module] = (weighted_sum(Bs, weights), weighted_sum(As, weights))
        return state.next(factors=factors, head=average_heads(updates, weights))
