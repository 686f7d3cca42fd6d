"""Mixed precision: ``torch.autocast``, and its bfloat16 arithmetic on CPUs that have no bfloat16 kernels.

Under ``torch.autocast("cpu", dtype=torch.bfloat16)`` PyTorch runs matrix products on bfloat16
operands with float32 accumulation and rounds the result to bfloat16 (oneDNN's kernels, AVX-512 or
Arm BF16). On a CPU without those instructions PyTorch falls back to scalar code, 20-60x slower than
float32 (docs/performance.md). There :func:`autocast` keeps ``torch.autocast`` for every other operation
and computes each product the native kernels would have computed in bfloat16 with float32 kernels on the
bfloat16-rounded operands, rounding the result to bfloat16: a product of two bfloat16 numbers is exact in
float32, so this is the same arithmetic, summed in another order (measured: 99.99% of a linear layer's
outputs bit-identical to the native kernel's, the rest one bfloat16 unit apart). Gradients follow from
the casts: autograd rounds each product's input gradients to bfloat16 where the native backward does.

Attention (``scaled_dot_product_attention``) follows the kernel PyTorch would choose: with dropout it is
PyTorch's math path, which computes in float32 from bfloat16 inputs anyway; without, PyTorch's CPU flash
kernel, whose probabilities are rounded to bfloat16 before their product with the values. That kernel's
exponential is a vectorised approximation, so about 95% of its outputs come out bit-identical here,
the rest within rounding; its backward is autograd's through this forward, not the fused kernel's.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

AUTOCAST_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}

# The matrix products of CPU autocast's lower-precision list that our models call (convolutions and
# RNNs are not used; an uncovered product still runs, in native bfloat16).
_PRODUCTS: frozenset[Callable[..., Any]] = frozenset(
    {
        F.linear,
        torch.matmul,
        torch.mm,
        torch.bmm,
        torch.addmm,
        torch.baddbmm,
        torch.addbmm,
        Tensor.matmul,
        Tensor.__matmul__,
        Tensor.__rmatmul__,
        Tensor.mm,
        Tensor.bmm,
        Tensor.addmm,
        Tensor.baddbmm,
        Tensor.addbmm,
    }
)
# Autocast casts only these (float64 stays as it is).
_CAST_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def native_bfloat16() -> bool:
    """Whether this CPU has the instructions oneDNN's bfloat16 matrix products need (AVX-512 BW/VL/DQ on
    x86, BF16 on Arm). Without them PyTorch falls back to scalar code: on an AVX2-only AMD EPYC
    (2026-12-01) a 512x384 @ 384x1536 product took 482 ms in bfloat16 against 8.3 ms in float32."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def autocast(device: torch.device | str, dtype: str | None) -> AbstractContextManager[Any]:
    """``torch.autocast`` on ``device`` in ``dtype`` (a name in AUTOCAST_DTYPES), or nothing for None
    (torch.autocast refuses some device types, such as meta, even disabled). bfloat16 on a CPU without
    bfloat16 kernels: the same arithmetic with float32 kernels (the module docstring)."""
    if dtype is None:
        return nullcontext()
    if emulates_bfloat16(device, dtype):
        return emulated_bfloat16_autocast()
    return torch.autocast(torch.device(device).type, dtype=AUTOCAST_DTYPES[dtype])


def emulates_bfloat16(device: torch.device | str, dtype: str | None) -> bool:
    """Whether :func:`autocast` computes bfloat16 products with float32 kernels on ``device``."""
    return dtype == "bfloat16" and torch.device(device).type == "cpu" and not native_bfloat16()


@contextmanager
def emulated_bfloat16_autocast() -> Iterator[None]:
    with torch.autocast("cpu", dtype=torch.bfloat16), Bfloat16ProductsInFloat32():
        yield


class Bfloat16ProductsInFloat32(TorchFunctionMode):
    """Under CPU bfloat16 autocast, each matrix product and attention computed by float32 kernels on
    bfloat16-rounded operands, the result rounded to bfloat16; everything else as autocast does."""

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        emulated = func in _PRODUCTS or func is F.scaled_dot_product_attention
        if not (emulated and torch.is_autocast_enabled("cpu") and _castable(args, kwargs)):
            return func(*args, **kwargs)
        args, kwargs = tuple(_rounded(a) for a in args), {k: _rounded(v) for k, v in kwargs.items()}
        with torch.autocast("cpu", enabled=False):
            if func is F.scaled_dot_product_attention:
                return _attention(*args, **kwargs).to(torch.bfloat16)
            return func(*args, **kwargs).to(torch.bfloat16)


def _tensors(args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[Tensor]:
    return [a for a in (*args, *kwargs.values()) if isinstance(a, Tensor)]


def _castable(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """What native autocast would cast: CPU floating tensors, none of them float64."""
    floating = [t for t in _tensors(args, kwargs) if t.is_floating_point()]
    return bool(floating) and all(t.device.type == "cpu" and t.dtype in _CAST_DTYPES for t in floating)


def _rounded(value: Any) -> Any:
    if isinstance(value, Tensor) and value.is_floating_point():
        return value.to(torch.bfloat16).float()
    return value


def _attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> Tensor:
    """Attention on bfloat16-valued float32 inputs, rounded where the kernel PyTorch would pick for
    bfloat16 rounds: the math path (dropout, grouped queries) rounds only its output; the flash kernel
    also its unnormalised probabilities, before their product with the values."""
    if dropout_p > 0 or enable_gqa:
        return F.scaled_dot_product_attention(
            query, key, value, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa
        )
    scores = (query @ key.transpose(-2, -1)) * (1 / math.sqrt(query.shape[-1]) if scale is None else scale)
    if is_causal:
        lq, lk = scores.shape[-2:]
        attn_mask = torch.ones(lq, lk, dtype=torch.bool, device=scores.device).tril()
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask
    peak = scores.amax(-1, keepdim=True)
    weights = torch.exp(scores - peak.nan_to_num(neginf=0.0))  # a fully masked row: weights 0
    total = weights.sum(-1, keepdim=True)
    return (_rounded(weights) @ value) / torch.where(total > 0, total, 1.0)
