"""flexlora (FlexLoRA, NeurIPS 2024): SVD of the exact average, each client takes its own top r_k.

``T = sum_i p_i s_i B_i A_i`` over clients of any ranks (each with its own alpha / r_i), its rank-R SVD
computed from the stacked factors (R the global, largest client rank), kept in SVD order with the
symmetric split ``B = U sqrt(S / s)``, ``A = sqrt(S / s) V^T``. A client of rank r_k reads the first r_k
components, the best rank-r_k approximation of T (its scaling change goes on B). No clipping or norm
preservation: those belong to the svd rule.
"""

from __future__ import annotations

from fedsubspace.methods.base import Method, TruncatingReadout, register
from fedsubspace.methods.common import svd_refactorise
from fedsubspace.methods.privacy import individual_uploads
from fedsubspace.state import ClientUpdate, GlobalState


@register
class FlexLoRA(TruncatingReadout, Method):
    name = "flexlora"
    privacy = individual_uploads("needs each client's product s_i B_i A_i (the exact average of products)")
    heterogeneous_ranks = True

    def aggregate(self, state: GlobalState, updates: list[ClientUpdate], weights: list[float]) -> GlobalState:
        return svd_refactorise(state, updates, weights, "symmetric", max_norm=None, preserve_norm=False)
