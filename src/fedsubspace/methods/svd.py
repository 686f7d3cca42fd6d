"""svd ("SVD redistribution"): the exact average of client products, re-factorised symmetrically.

``T = sum p_i s B_i A_i`` (optionally clipped to ``max_update_norm``), rank-r truncated SVD
``U S V^T`` computed from the factors, ``B = U sqrt(S/s)``, ``A = sqrt(S/s) V^T``; ``preserve_norm``
rescales the result to ``||T||_F`` as the reference implementation does.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedsubspace.methods.base import Method, register
from fedsubspace.methods.common import svd_refactorise
from fedsubspace.methods.options import MAX_UPDATE_NORM, PRESERVE_NORM
from fedsubspace.methods.privacy import individual_uploads
from fedsubspace.state import ClientUpdate, GlobalState


@dataclass(frozen=True)
class SVDOptions:
    max_update_norm: float | None = MAX_UPDATE_NORM.field()
    preserve_norm: bool = PRESERVE_NORM.field()


@register
class SVD(Method):
    name = "svd"
    privacy = individual_uploads("needs each client's product s B_i A_i (the exact average of products)")
    Options = SVDOptions
    options: SVDOptions

    def aggregate(self, state: GlobalState, updates: list[ClientUpdate], weights: list[float]) -> GlobalState:
        o = self.options
        return svd_refactorise(state, updates, weights, "symmetric", o.max_update_norm, o.preserve_norm)
