"""fedsvd (FedSVD, NeurIPS 2025): clients train only B against the shared A; the server re-orthonormalises A.

Uplink B only. ``B_bar = sum p_i B_i``; ``T = s B_bar A_g`` has rank <= r, so its rank-r SVD is exact;
``A = V^T`` (orthonormal rows), ``B = U S / s``. A changes every round, so the downlink carries both.

``max_update_norm`` is applied: ``||T||_F`` is clipped to it per module before the split, as the
Subspace-Reg paper's fedsvd baseline does (its configs set 15 for the encoder, 25 for the causal model).
FedSVD's own code has no clip; leave ``max_update_norm`` null (the default) to reproduce it. The truncation
is exact here, so ``preserve_norm`` has nothing to restore and does not apply.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedsubspace import lowrank
from fedsubspace.methods.base import Method, register
from fedsubspace.methods.common import average_heads, weighted_sum
from fedsubspace.methods.options import MAX_UPDATE_NORM
from fedsubspace.methods.privacy import summed_upload
from fedsubspace.state import ClientUpdate, GlobalState


@dataclass(frozen=True)
class FedSVDOptions:
    max_update_norm: float | None = MAX_UPDATE_NORM.field()


@register
class FedSVD(Method):
    name = "fedsvd"
    privacy = summed_upload("B and head (the SVD re-factorises the sum)")
    trains = frozenset({"B"})
    Options = FedSVDOptions
    options: FedSVDOptions

    def aggregate(self, state: GlobalState, updates: list[ClientUpdate], weights: list[float]) -> GlobalState:
        factors = {}
        for module, (B_g, A_g) in state.factors.items():
            rank = B_g.shape[-1]
            B_bar = weighted_sum([u.factors[module][0] for u in updates], weights)
            svd = lowrank.factored_svd(state.scaling * B_bar, A_g, rank)
            clipped = lowrank.clip_and_preserve(
                svd.S, rank, self.options.max_update_norm, preserve_norm=False
            )
            svd = lowrank.TruncatedSVD(U=svd.U, S=clipped, Vh=svd.Vh)
            factors[module] = lowrank.split_factors(svd, state.scaling, "orthonormal_A", rank)
        return state.next(factors=factors, head=average_heads(updates, weights))
