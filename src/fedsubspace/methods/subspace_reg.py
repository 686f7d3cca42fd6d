"""subspace_reg (Subspace-Reg): clients stay near a shared reference basis; the server hands one out.

Client loss: ``L_task + (1/L) sum_modules [(mu/2)||s B A - dW_g||^2 + (alpha/2)||B - B_g||^2
+ (lambda/2)(||A||^2 + ||B||^2)]``. The first term is evaluated in factored form from r x r Gram
matrices, batched over modules of equal shape, never forming an m x n matrix per step. Server: the
exact average of client products, truncated to rank r, split as ``B = U`` (orthonormal columns: the
next round's reference basis) and ``A = S V^T / s``; same clip and norm-preserve options as svd.

Departure from the paper's code (docs/methods.md): here B is orthonormal, as the paper's text and its
code's docstring say it should be, and ``preserve_norm`` scales the kept singular values. The paper's code
splits first and then rescales both factors by ``sqrt(||T|| / ||T_r||)``, so its B is orthonormal only up
to that factor. The products are identical. ``subspace_reg_split: paper_code`` reproduces the paper
code's factors exactly (which matters to the next round's ``||B - B_g||`` anchor and to basis_overlap's
input, not to the model).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from fedsubspace import lowrank
from fedsubspace.methods.base import Method, Regularizer, register
from fedsubspace.methods.common import svd_refactorise
from fedsubspace.methods.options import MAX_UPDATE_NORM, NOT_NEGATIVE, PRESERVE_NORM, Option, one_of
from fedsubspace.methods.privacy import Support, individual_uploads
from fedsubspace.state import ClientUpdate, GlobalState

Tensor = torch.Tensor


@dataclass(frozen=True)
class SubspaceRegOptions:
    mu: float = Option(0.05, "weight of the product fit (mu/2)||s B A - dW_g||^2", NOT_NEGATIVE).field()
    alpha: float = Option(0.01, "weight of the basis anchor (alpha/2)||B - B_g||^2", NOT_NEGATIVE).field()
    lambda_reg: float = Option(
        1e-5, "weight decay of both factors (lambda/2)(||A||^2 + ||B||^2)", NOT_NEGATIVE
    ).field()
    max_update_norm: float | None = MAX_UPDATE_NORM.field()
    preserve_norm: bool = PRESERVE_NORM.field()
    subspace_reg_split: str = Option(
        "orthonormal",
        "the server's split: orthonormal (B = U) or paper_code (the reference code's factors, both "
        "rescaled by sqrt(||T|| / ||T_r||); the same product)",
        one_of("orthonormal", "paper_code"),
    ).field()


class SubspaceRegularizer:
    """The Subspace-Reg penalty against a fixed global state, for one client round."""

    def __init__(self, state: GlobalState, options: SubspaceRegOptions) -> None:
        self.options = options
        self.scaling = state.scaling
        self.num_modules = len(state.factors)
        # Modules of one shape are stacked so each step costs a few batched matmuls, not a Python loop.
        groups: dict[tuple[tuple[int, ...], tuple[int, ...]], list[str]] = {}
        for name, (B, A) in state.factors.items():
            groups.setdefault((tuple(B.shape), tuple(A.shape)), []).append(name)
        self.groups = []
        for names in groups.values():
            B_g = torch.stack([state.factors[n][0] for n in names]).detach()
            A_g = torch.stack([state.factors[n][1] for n in names]).detach()
            global_sq = lowrank.frobenius_inner(B_g, A_g, B_g, A_g).sum()
            self.groups.append((names, B_g, A_g, global_sq))

    def __call__(self, params: Mapping[str, tuple[Tensor, Tensor]]) -> Tensor:
        o, s = self.options, self.scaling
        total = torch.zeros((), dtype=self.groups[0][1].dtype, device=self.groups[0][1].device)
        for names, B_g, A_g, global_sq in self.groups:
            B = torch.stack([params[n][0] for n in names])
            A = torch.stack([params[n][1] for n in names])
            # ||sBA - sB_gA_g||^2 = s^2 (<BA, BA> - 2 <BA, B_gA_g> + <B_gA_g, B_gA_g>)
            fit = (
                s
                * s
                * (
                    lowrank.frobenius_inner(B, A, B, A).sum()
                    - 2 * lowrank.frobenius_inner(B, A, B_g, A_g).sum()
                    + global_sq
                )
            )
            anchor = (B - B_g).square().sum()
            decay = B.square().sum() + A.square().sum()
            total = total + 0.5 * (o.mu * fit + o.alpha * anchor + o.lambda_reg * decay)
        return total / self.num_modules


@register
class SubspaceReg(Method):
    name = "subspace_reg"
    privacy = individual_uploads(
        "needs each client's product s B_i A_i (the exact average of products)",
        dp_sgd=Support(
            True,
            "clients train by AdamW steps; the regulariser reads no example, so its gradient is added "
            "after clipping and noise and costs no privacy",
        ),
    )
    Options = SubspaceRegOptions
    options: SubspaceRegOptions

    def client_regularizer(self, state: GlobalState) -> Regularizer:
        return SubspaceRegularizer(state, self.options)

    def aggregate(self, state: GlobalState, updates: list[ClientUpdate], weights: list[float]) -> GlobalState:
        o = self.options
        return svd_refactorise(
            state,
            updates,
            weights,
            "orthonormal_B",
            o.max_update_norm,
            o.preserve_norm,
            rescale_factors=o.subspace_reg_split == "paper_code",
        )
