"""The mathematics of factored low-rank products, on plain tensors.

A LoRA update is ``dW = s * B @ A`` with ``B`` (m x r) and ``A`` (r x n), and a server only ever needs
sums of such products, their truncated SVDs, norms, inner products and subspaces. All of that reduces
to QR factorisations of the thin factors and small (k x k) cores, so nothing here forms an m x n
matrix: cost O((m + n) k^2) instead of O(m n min(m, n)).

Every function takes float32 or float64 tensors on any device and, where it makes sense, leading batch
dimensions (``...``), so a server can process all modules of one shape in a single call. This module
knows nothing of models, PEFT or Flower.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

Tensor = torch.Tensor
Split = Literal["symmetric", "orthonormal_B", "orthonormal_A"]


@dataclass(frozen=True)
class TruncatedSVD:
    """``U @ diag(S) @ Vh`` with U (..., m, q), S (..., q), Vh (..., q, n), S descending."""

    U: Tensor
    S: Tensor
    Vh: Tensor


# --- sums of products ---------------------------------------------------------------------------


def stack_weighted(
    lefts: Sequence[Tensor], rights: Sequence[Tensor], weights: Sequence[float] | Tensor
) -> tuple[Tensor, Tensor]:
    """``sum_i w_i L_i @ R_i`` as one product ``[w_1 L_1, ..., w_k L_k] @ [R_1; ...; R_k]``.

    Factors may have different inner ranks (heterogeneous clients); the result's inner size is their sum.
    """
    if not (len(lefts) == len(rights) == len(weights)) or len(lefts) == 0:
        raise ValueError("stack_weighted needs the same non-zero number of lefts, rights and weights")
    left = torch.cat([float(w) * L for w, L in zip(weights, lefts, strict=True)], dim=-1)
    right = torch.cat(list(rights), dim=-2)
    return left, right


def factored_svd(left: Tensor, right: Tensor, rank: int | None = None) -> TruncatedSVD:
    """Thin SVD of ``left @ right`` (m x k times k x n) without forming it, truncated to ``rank``.

    QR of ``left`` and of ``right^T`` leaves a small core ``R_l @ R_r^T`` whose SVD, multiplied back
    by the two orthonormal factors, is the SVD of the product. At most ``min(m, n, k)`` components exist;
    fewer than ``rank`` come back when the product is that small.
    """
    q_left, r_left = torch.linalg.qr(left)  # (m, a), (a, k) with a = min(m, k)
    q_right, r_right = torch.linalg.qr(right.mT)  # (n, b), (b, k) with b = min(n, k)
    # The core is small, so its SVD runs in float64 at no measurable cost; in float32 it added up to
    # 2.5x the error of a dense float32 SVD when s_r and s_r+1 are close (docs/performance.md).
    wide = torch.promote_types(left.dtype, torch.float64)
    core = r_left.to(wide) @ r_right.to(wide).mT  # (a, b): the only matrix we decompose
    u_core, s, vh_core = torch.linalg.svd(core, full_matrices=False)
    if rank is not None:
        u_core, s, vh_core = u_core[..., :rank], s[..., :rank], vh_core[..., :rank, :]
    dtype = left.dtype
    return TruncatedSVD(U=q_left @ u_core.to(dtype), S=s.to(dtype), Vh=vh_core.to(dtype) @ q_right.mT)


def clip_and_preserve(
    s_full: Tensor, rank: int, max_norm: float | None = None, preserve_norm: bool = True
) -> Tensor:
    """Singular values of the rank-``rank`` result, from all singular values of the exact update T.

    ``max_norm`` clips ``||T||_F`` (a uniform scale of all singular values). ``preserve_norm`` then
    rescales the kept values so the truncated update has the (clipped) norm of T, as the Subspace-Reg
    reference implementation does. Both are read off the singular values: no extra product is needed.
    """
    total = torch.linalg.vector_norm(s_full, dim=-1, keepdim=True)
    if max_norm is not None:
        s_full = s_full * torch.clamp(max_norm / total.clamp_min(torch.finfo(s_full.dtype).tiny), max=1.0)
        total = torch.linalg.vector_norm(s_full, dim=-1, keepdim=True)
    kept = s_full[..., :rank]
    if preserve_norm:
        kept_norm = torch.linalg.vector_norm(kept, dim=-1, keepdim=True)
        kept = torch.where(
            kept_norm > 0, kept * total / kept_norm.clamp_min(torch.finfo(kept.dtype).tiny), kept
        )
    return kept


def split_factors(
    svd: TruncatedSVD, scaling: float, split: Split, rank: int | None = None
) -> tuple[Tensor, Tensor]:
    """LoRA factors ``(B, A)`` with ``scaling * B @ A == U diag(S) Vh``.

    ``symmetric``: ``B = U sqrt(S) / sqrt(s)``, ``A = sqrt(S) Vh / sqrt(s)`` (svd method);
    ``orthonormal_B``: ``B = U``, ``A = S Vh / s`` (subspace_reg: B is the next round's reference basis);
    ``orthonormal_A``: ``A = Vh``, ``B = U S / s`` (fedsvd). With ``rank`` larger than the number of
    components, the factors are zero-padded to that rank (the product is unchanged).
    """
    U, S, Vh = svd.U, svd.S, svd.Vh
    if split == "symmetric":
        root = torch.sqrt(S / scaling)
        B, A = U * root.unsqueeze(-2), root.unsqueeze(-1) * Vh
    elif split == "orthonormal_B":
        B, A = U, (S / scaling).unsqueeze(-1) * Vh
    elif split == "orthonormal_A":
        B, A = U * (S / scaling).unsqueeze(-2), Vh
    else:
        raise ValueError(f"unknown split {split!r}")
    if rank is not None and B.shape[-1] < rank:
        missing = rank - B.shape[-1]
        B = torch.nn.functional.pad(B, (0, missing))
        A = torch.nn.functional.pad(A, (0, 0, 0, missing))
    return B, A


def resize_rank(B: Tensor, A: Tensor, rank: int, left_scale: float = 1.0) -> tuple[Tensor, Tensor]:
    """The first ``rank`` components ``(B[:, :rank] * left_scale, A[:rank])``, zero-padded beyond r.

    A LoRA adapter of rank r scales its product by alpha / r, so moving factors between clients of
    different ranks changes the scaling too: ``left_scale = s_from / s_to`` keeps ``s B A`` (padding) or
    its first components (truncation). The scale goes on B so that A keeps its initialisation's range.
    """
    r = B.shape[-1]
    B, A = B[..., :rank] * left_scale, A[..., :rank, :]
    if rank > r:
        B = torch.nn.functional.pad(B, (0, rank - r))
        A = torch.nn.functional.pad(A, (0, 0, 0, rank - r))
    return B, A


# --- norms and inner products ---------------------------------------------------------------------


def frobenius_inner(left1: Tensor, right1: Tensor, left2: Tensor, right2: Tensor) -> Tensor:
    """``<L1 R1, L2 R2>_F = tr((L1^T L2)(R2 R1^T))``, from two small Gram matrices."""
    return ((left1.mT @ left2) * (right1 @ right2.mT)).sum(dim=(-2, -1))


def product_norm(left: Tensor, right: Tensor) -> Tensor:
    """``||L @ R||_F`` from the QR core ``R_l R_r^T``: accurate to machine precision even when the product
    is a difference of nearly equal terms, where the Gram form ``sqrt(frobenius_inner(L, R, L, R))`` cancels
    catastrophically (relative accuracy only sqrt(eps))."""
    r_left = torch.linalg.qr(left, mode="r")[1]
    r_right = torch.linalg.qr(right.mT, mode="r")[1]
    norm: Tensor = torch.linalg.matrix_norm(r_left @ r_right.mT)
    return norm


def gram_matrix(lefts: Sequence[Tensor], rights: Sequence[Tensor]) -> Tensor:
    """Matrix of all pairwise inner products ``<L_i R_i, L_j R_j>_F`` (k x k)."""
    k = len(lefts)
    gram = torch.empty(k, k, dtype=lefts[0].dtype, device=lefts[0].device)
    for i in range(k):
        for j in range(i, k):
            gram[i, j] = gram[j, i] = frobenius_inner(lefts[i], rights[i], lefts[j], rights[j])
    return gram


# --- subspaces -----------------------------------------------------------------------------------


def default_rtol(rows: int, cols: int, dtype: torch.dtype) -> float:
    """The rank tolerance of ``numpy.linalg.matrix_rank``: max dimension times machine epsilon."""
    return max(rows, cols) * torch.finfo(dtype).eps


def orthonormal_basis(matrix: Tensor, rtol: float | None = None) -> Tensor:
    """Orthonormal basis (m x q) of the column space of ``matrix`` (m x k), q its numerical rank.

    Directions whose singular value is below ``rtol * largest`` are dropped, so zero and
    rank-deficient factors give a smaller (possibly empty, m x 0) basis instead of noise.
    """
    U: Tensor
    S: Tensor
    U, S, _ = torch.linalg.svd(matrix, full_matrices=False)
    if rtol is None:
        rows, cols = matrix.shape[-2:]
        rtol = default_rtol(rows, cols, matrix.dtype)
    if S.numel() == 0 or S[0] == 0:
        return U[..., :0]
    return U[..., : int((S > rtol * S[0]).sum())]


def consensus_basis(
    bases: Sequence[Tensor], weights: Sequence[float] | Tensor, rank: int
) -> tuple[Tensor, Tensor]:
    """Top-``rank`` eigenvectors of the weighted average projector ``sum_i p_i Q_i Q_i^T``.

    They are the left singular vectors of ``[sqrt(p_1) Q_1, ..., sqrt(p_k) Q_k]``; the eigenvalues
    (squared singular values, in [0, 1] for weights summing to 1) say how much weight of clients agrees
    on each direction. Returns ``(U_ref (m x q), eigenvalues (q,))`` with q <= rank.
    """
    stacked = torch.cat([math.sqrt(float(p)) * Q for p, Q in zip(weights, bases, strict=True)], dim=-1)
    U, S, _ = torch.linalg.svd(stacked, full_matrices=False)
    return U[..., :rank], S[..., :rank] ** 2


def joint_subspace(
    bases: Sequence[Tensor], weights: Sequence[float] | Tensor, max_angle_degrees: float
) -> tuple[Tensor, Tensor]:
    """The directions the subspaces ``span(Q_i)`` share, within ``max_angle_degrees`` (AJIVE-style).

    A unit vector u has ``u^T (sum_i p_i Q_i Q_i^T) u = sum_i p_i cos^2(phi_i)``, phi_i its angle to
    subspace i, so the eigenvectors of the average projector (:func:`consensus_basis`) rank directions
    by how closely all subspaces contain them. Two subspaces at principal angle theta have the bisector
    at theta / 2 from each, eigenvalue ``cos^2(theta / 2)``; keeping eigenvalues of at least
    ``cos^2(max_angle / 2)`` is therefore AJIVE's angle rule for two equally weighted subspaces, and for
    k subspaces keeps a direction only when on (weighted) average it lies that close to all of them: a
    direction only one client of k holds scores about ``p_i`` and is dropped. Weights should sum to 1.
    Returns ``(Phi (n x q), eigenvalues (q,))``, q possibly 0.
    """
    if not 0.0 < max_angle_degrees <= 180.0:
        raise ValueError(f"max_angle_degrees must be in (0, 180], got {max_angle_degrees}")
    total = sum(Q.shape[-1] for Q in bases)
    basis, eigenvalues = consensus_basis(bases, weights, total)
    threshold = math.cos(math.radians(max_angle_degrees) / 2.0) ** 2
    keep = int((eigenvalues >= threshold).sum())  # eigenvalues descend
    return basis[..., :keep], eigenvalues[..., :keep]


def principal_angles(basis1: Tensor, basis2: Tensor) -> Tensor:
    """Principal angles (radians, ascending) between two subspaces given by orthonormal bases.

    Cosines alone lose half the digits of small angles (``arccos(1 - eps) ~ sqrt(2 eps)``, 3e-4 rad
    in float32 for identical subspaces), and nearly aligned subspaces are the regime the diagnostics
    watch. Below pi/4 the angles come from the sines instead, the singular values of the part of the
    smaller basis outside the larger one's span (Knyazev & Argentati, SISC 2002).
    """
    if basis1.shape[-1] == 0 or basis2.shape[-1] == 0:
        return basis1.new_empty(0)
    if basis1.shape[-1] < basis2.shape[-1]:
        basis1, basis2 = basis2, basis1
    cross = basis1.mT @ basis2
    cosines = torch.linalg.svdvals(cross).clamp(0.0, 1.0)  # descending: angles ascending
    sines = torch.linalg.svdvals(basis2 - basis1 @ cross).flip(-1).clamp(0.0, 1.0)
    return torch.where(cosines.square() >= 0.5, torch.arcsin(sines), torch.arccos(cosines))


def basis_overlap(basis1: Tensor, basis2: Tensor) -> float:
    """The Subspace-Reg paper's overlap ``||Q_1^T Q_2||_F / sqrt(min(k_1, k_2))``, in [0, 1].

    NaN when either subspace is empty (a zero factor has no column space to compare).
    """
    k = min(basis1.shape[-1], basis2.shape[-1])
    if k == 0:
        return math.nan
    # Rounding puts nested subspaces a few ulps above 1.
    return min(1.0, float(torch.linalg.matrix_norm(basis1.mT @ basis2) / math.sqrt(k)))


# --- rotations -----------------------------------------------------------------------------------


def polar(matrix: Tensor) -> Tensor:
    """The rotation (orthogonal, det = +1) nearest to a square ``matrix``: ``U V^T`` from its SVD.

    When ``U V^T`` would be a reflection, the sign of the column paired with the smallest singular
    value is flipped, the standard special-orthogonal Procrustes solution.
    """
    U: Tensor
    Vh: Tensor
    U, _, Vh = torch.linalg.svd(matrix)
    sign = torch.sign(torch.linalg.det(U) * torch.linalg.det(Vh))
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    U = torch.cat([U[..., :-1], U[..., -1:] * sign.unsqueeze(-1).unsqueeze(-1)], dim=-1)
    return U @ Vh


def procrustes_rotation(source: Tensor, target: Tensor) -> Tensor:
    """Rotation R (det +1) minimising ``||source @ R - target||_F``: ``polar(source^T target)``."""
    return polar(source.mT @ target)


def soft_rotation(rotation: Tensor, lam: float) -> Tensor:
    """``polar((1 - lam) I + lam R)``: lam = 0 gives I (no alignment), lam = 1 gives R."""
    eye = torch.eye(rotation.shape[-1], dtype=rotation.dtype, device=rotation.device)
    return polar((1.0 - lam) * eye + lam * rotation)


def product_basis(left: Tensor, right: Tensor, rtol: float | None = None, rank: int | None = None) -> Tensor:
    """Orthonormal basis of the column space of ``left @ right`` (its left singular subspace).

    Unlike ``orthonormal_basis(left)`` it drops directions that ``right`` annihilates or barely keeps,
    so it depends only on the product, never on how the product is split into factors. ``rank`` keeps
    only the top ``rank`` left singular vectors (the product's top-r subspace).
    """
    svd = factored_svd(left, right)
    if rtol is None:
        rtol = default_rtol(left.shape[-2], right.shape[-1], left.dtype)
    if svd.S.numel() == 0 or svd.S[0] == 0:
        return svd.U[..., :0]
    kept = int((svd.S > rtol * svd.S[0]).sum())
    return svd.U[..., : kept if rank is None else min(kept, rank)]


def difference(left1: Tensor, right1: Tensor, left2: Tensor, right2: Tensor) -> tuple[Tensor, Tensor]:
    """``L1 R1 - L2 R2`` as one product ``[L1, -L2] @ [R1; R2]`` (inner size the sum of the two)."""
    return torch.cat([left1, -left2], dim=-1), torch.cat([right1, right2], dim=-2)
