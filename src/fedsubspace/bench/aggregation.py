"""Server aggregation, dense against factored: ``T = sum_i p_i s B_i @ A_i``, rank-r SVD, LoRA split.

The dense route forms the m x n matrix ``T`` and takes its full SVD, as a naive server would; the
factored route is what the library does (``lowrank.stack_weighted`` + ``factored_svd`` +
``split_factors``). Both produce the same rank-r factors; the benchmark reports their time, their
accuracy against a float64 dense oracle, and their memory.

Memory is estimated from shapes, not measured: CPU tensors come from the system allocator, which
neither tracemalloc nor the process RSS attributes to one step reliably (freed arenas are reused,
large blocks are mapped and unmapped). The estimate adds up every tensor a route allocates, plus the
minimum LAPACK workspace of its SVD, excluding the client factors both routes receive. Summing
ignores that some of them are freed before others exist, so it bounds the peak from above; for the
dense route it is also close to the peak, since T, its LAPACK copy, U, Vh and the workspace coexist.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from tqdm import tqdm

from fedsubspace import lowrank
from fedsubspace.markdown import markdown_table

Tensor = torch.Tensor

# lora_alpha = 2 r, the usual setting (r 8, alpha 16), gives s = 2 at every rank.
SCALING = 2.0
# Above this size a dense SVD takes 10+ s on 2 cores: one run is far above timer noise, and more
# would turn a 10-minute benchmark into an hour.
LARGE_SIZE = 4096

_INT32_BYTES = 4


def _client_factors(
    m: int, n: int, rank: int, clients: int, dtype: torch.dtype
) -> tuple[list[Tensor], list[Tensor], list[float]]:
    """Factors at the scale of trained LoRA adapters, and example-count weights.

    A keeps PEFT's kaiming-uniform init range (bound 1/sqrt(n)); B, zero at init, has grown to ~1e-3
    after a round of local steps at lr 1e-4.
    """
    gen = torch.Generator().manual_seed(m * 10_000 + rank * 100 + clients)
    bound = n**-0.5
    lefts = [torch.randn(m, rank, generator=gen, dtype=dtype) * 1e-3 for _ in range(clients)]
    rights = [(torch.rand(rank, n, generator=gen, dtype=dtype) * 2 - 1) * bound for _ in range(clients)]
    counts = torch.randint(100, 1000, (clients,), generator=gen).double()
    return lefts, rights, (counts / counts.sum()).tolist()


def _dense_aggregate(
    lefts: Sequence[Tensor], rights: Sequence[Tensor], weights: Sequence[float], rank: int
) -> tuple[Tensor, Tensor]:
    total = torch.zeros(lefts[0].shape[0], rights[0].shape[1], dtype=lefts[0].dtype)
    for p, B, A in zip(weights, lefts, rights, strict=True):
        total.addmm_(B, A, alpha=p * SCALING)
    U, S, Vh = torch.linalg.svd(total, full_matrices=False)
    svd = lowrank.TruncatedSVD(U=U[:, :rank], S=S[:rank], Vh=Vh[:rank])
    return lowrank.split_factors(svd, SCALING, "symmetric")


def _factored_aggregate(
    lefts: Sequence[Tensor], rights: Sequence[Tensor], weights: Sequence[float], rank: int
) -> tuple[Tensor, Tensor]:
    left, right = lowrank.stack_weighted(lefts, rights, [p * SCALING for p in weights])
    svd = lowrank.factored_svd(left, right, rank=rank)
    return lowrank.split_factors(svd, SCALING, "symmetric")


def _oracle_truncation(
    lefts: Sequence[Tensor], rights: Sequence[Tensor], weights: Sequence[float], rank: int
) -> tuple[Tensor, float]:
    """The float64 dense rank-r reconstruction and ``s_{r+1} / s_r``, which decides its conditioning."""
    total = torch.zeros(lefts[0].shape[0], rights[0].shape[1], dtype=torch.float64)
    for p, B, A in zip(weights, lefts, rights, strict=True):
        total.addmm_(B.double(), A.double(), alpha=p * SCALING)
    U, S, Vh = torch.linalg.svd(total, full_matrices=False)
    ratio = float(S[rank] / S[rank - 1]) if rank < S.numel() else 0.0
    return (U[:, :rank] * S[:rank]) @ Vh[:rank], ratio


def _rel_error(factors: tuple[Tensor, Tensor], oracle: Tensor) -> float:
    B, A = factors
    recon = SCALING * B.double() @ A.double()
    return float(torch.linalg.matrix_norm(recon - oracle) / torch.linalg.matrix_norm(oracle))


def _gesdd_workspace_bytes(q: int, itemsize: int) -> int:
    """LAPACK ?gesdd with JOBZ='S': LWORK >= 4 q^2 + 7 q floats and IWORK = 8 q integers."""
    return (4 * q * q + 7 * q) * itemsize + 8 * q * _INT32_BYTES


def dense_peak_bytes(m: int, n: int, rank: int, clients: int, itemsize: int) -> int:
    """T, LAPACK's copy of it, U, S, Vh and the workspace of the full SVD, then the split factors."""
    del clients  # the sum accumulates in place into T: no per-client temporaries
    q = min(m, n)
    svd = m * n + m * q + q + q * n
    split = rank + m * rank + rank * n
    return (m * n + svd + split) * itemsize + _gesdd_workspace_bytes(q, itemsize)


def factored_peak_bytes(m: int, n: int, rank: int, clients: int, itemsize: int) -> int:
    """Weighted copies and the stacked factors, two thin QRs, the k r x k r core SVD, the split."""
    k = clients * rank
    a, b = min(m, k), min(n, k)
    stack = m * k + m * k + k * n
    # torch.linalg.qr: Q, R, the Householder scalars and a block-size (~32) workspace per column.
    qrs = (m * a + a * k + a + 32 * k) + (n * b + b * k + b + 32 * k)
    core = a * b
    c = min(a, b)
    core_svd = a * b + a * c + c + c * b
    back = m * rank + rank * n
    split = rank + m * rank + rank * n
    elements = stack + qrs + core + core_svd + back + split
    return elements * itemsize + _gesdd_workspace_bytes(c, itemsize)


def _timed(fn: Callable[..., Any], *args: Any) -> tuple[float, Any]:
    start = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - start, out


def run_aggregation_bench(
    sizes: Sequence[int] = (1024, 2048, 4096),
    ranks: Sequence[int] = (8, 16),
    clients: Sequence[int] = (3, 10),
    repeats: int = 3,
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
    *,
    large_dense_repeats: int = 1,
) -> list[dict]:
    """One row per (m = n, r, k): median seconds of both routes, speedup, error, estimated memory.

    Each repeat times the dense route and then the factored one, so both see the same machine load.
    At sizes >= ``LARGE_SIZE`` the dense route runs only ``large_dense_repeats`` times.
    """
    if repeats < 1:
        raise ValueError("repeats must be at least 1")
    configs = [(size, r, k) for size in sizes for r in ranks for k in clients]
    itemsize = torch.empty(0, dtype=dtype).element_size()
    rows = []
    with tqdm(total=len(configs), desc="aggregation bench", disable=not progress) as bar:
        for size, r, k in configs:
            label = f"m=n={size} r={r} k={k}"
            lefts, rights, weights = _client_factors(size, size, r, k, dtype)
            bar.set_postfix_str(f"{label}: float64 oracle")
            oracle, sv_ratio = _oracle_truncation(lefts, rights, weights, r)
            # One untimed call, so the first factored sample does not pay one-off kernel setup.
            _factored_aggregate(lefts, rights, weights, r)
            dense_repeats = min(repeats, large_dense_repeats) if size >= LARGE_SIZE else repeats
            dense_times, factored_times = [], []
            for i in range(repeats):
                if i < dense_repeats:
                    bar.set_postfix_str(f"{label}: dense {i + 1}/{dense_repeats}")
                    seconds, dense_out = _timed(_dense_aggregate, lefts, rights, weights, r)
                    dense_times.append(seconds)
                bar.set_postfix_str(f"{label}: factored {i + 1}/{repeats}")
                seconds, factored_out = _timed(_factored_aggregate, lefts, rights, weights, r)
                factored_times.append(seconds)
            dense_seconds = statistics.median(dense_times)
            factored_seconds = statistics.median(factored_times)
            rows.append(
                {
                    "m": size,
                    "n": size,
                    "r": r,
                    "clients": k,
                    "dtype": str(dtype).removeprefix("torch."),
                    "dense_repeats": dense_repeats,
                    "factored_repeats": repeats,
                    "dense_seconds": dense_seconds,
                    "factored_seconds": factored_seconds,
                    "speedup": dense_seconds / factored_seconds,
                    "rel_error": _rel_error(factored_out, oracle),
                    "dense_rel_error": _rel_error(dense_out, oracle),
                    "sv_ratio": sv_ratio,
                    "dense_peak_bytes": dense_peak_bytes(size, size, r, k, itemsize),
                    "factored_peak_bytes": factored_peak_bytes(size, size, r, k, itemsize),
                    # Other processes on the machine slow both routes, the dense one by far the most.
                    "load_avg": os.getloadavg()[0],
                }
            )
            bar.update()
    return rows


_COLUMNS = (
    ("m", "m", "{}"),
    ("n", "n", "{}"),
    ("r", "r", "{}"),
    ("clients", "clients", "{}"),
    ("dense_seconds", "dense s (median)", "{:.4g}"),
    ("dense_repeats", "dense runs", "{}"),
    ("factored_seconds", "factored s (median)", "{:.3g}"),
    ("factored_repeats", "factored runs", "{}"),
    ("speedup", "speedup", "{:.0f}"),
    ("rel_error", "rel_error factored", "{:.1e}"),
    ("dense_rel_error", "rel_error dense", "{:.1e}"),
    ("sv_ratio", "s_r+1 / s_r", "{:.3f}"),
    ("dense_peak_bytes", "dense peak MiB (est.)", "{:.1f}"),
    ("factored_peak_bytes", "factored peak MiB (est.)", "{:.2f}"),
    ("load_avg", "load avg (1 min)", "{:.1f}"),
)


def format_table(rows: Sequence[dict]) -> str:
    """A markdown table of ``run_aggregation_bench`` rows (memory in MiB, estimated from shapes)."""
    return markdown_table(
        [title for _, title, _ in _COLUMNS],
        (
            [fmt.format(row[key] / 2**20 if key.endswith("_bytes") else row[key]) for key, _, fmt in _COLUMNS]
            for row in rows
        ),
        rule="---:",
    )
