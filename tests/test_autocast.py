"""bfloat16 autocast on CPUs without bfloat16 kernels: float32 kernels on bfloat16-rounded operands must
compute what the native kernels compute (same roundings, another summation order), forward and backward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from fedsubspace import autocast as autocast_module
from fedsubspace.autocast import autocast, emulated_bfloat16_autocast

BF16 = torch.bfloat16
PRODUCT_KERNELS = {"mm", "addmm", "bmm", "baddbmm", "addbmm", "_scaled_dot_product_flash_attention_for_cpu"}


class KernelDtypes(TorchDispatchMode):
    """The dtypes of the floating inputs of every matrix-product kernel that runs."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[torch.dtype] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in PRODUCT_KERNELS:
            self.seen |= {a.dtype for a in args if isinstance(a, torch.Tensor) and a.is_floating_point()}
        return func(*args, **(kwargs or {}))


def ulps_apart(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """How many bfloat16 units (of the larger magnitude) two bfloat16 tensors are apart."""
    a64, b64 = a.double(), b.double()
    unit = torch.exp2(torch.floor(torch.log2(torch.maximum(a64.abs(), b64.abs()).clamp_min(1e-30))) - 7)
    return (a64 - b64).abs() / unit


def products(generator: torch.Generator, m: int, k: int, n: int):
    """name: (product, operands), each product one that CPU autocast runs in bfloat16."""

    def draw(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator) * 3

    x, w, bias, bx, by = draw(m, k), draw(n, k), draw(n), draw(3, m, k), draw(3, k, n)
    return {
        "linear": (F.linear, (x, w, bias)),
        "@": (lambda a, b: a @ b.T, (x, w)),
        "matmul": (torch.matmul, (bx, by)),
        "bmm": (torch.Tensor.bmm, (bx, by)),
        "addmm": (torch.addmm, (bias, x, w.T)),
        "baddbmm": (torch.baddbmm, (draw(3, m, n), bx, by)),
    }


@pytest.mark.parametrize(("m", "k", "n"), [(5, 7, 3), (64, 384, 96), (33, 1000, 17)])
def test_emulated_products_equal_the_bfloat16_arithmetic(m, k, n):
    generator = torch.Generator().manual_seed(m * k * n)
    for name, (product, operands) in products(generator, m, k, n).items():
        with emulated_bfloat16_autocast():
            emulated = product(*operands)
        with torch.autocast("cpu", dtype=BF16):
            native = product(*operands)
        # The oracle: bfloat16 operands multiplied and summed exactly (float64), rounded once.
        oracle = product(*(o.to(BF16).double() for o in operands)).to(BF16)
        assert emulated.dtype == native.dtype == BF16, name
        for reference in (oracle, native):  # summation order may move a rounding by one unit
            apart = ulps_apart(emulated, reference)
            assert apart.max() <= 1, name
            assert (apart == 0).float().mean() > 0.99, name


def test_gradients_are_rounded_where_the_native_backward_rounds():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(48, 200, generator=generator)
    w = torch.randn(120, 200, generator=generator) * 0.1
    upstream = torch.randn(48, 120, generator=generator)
    grads = {}
    contexts = {"native": torch.autocast("cpu", dtype=BF16), "emulated": emulated_bfloat16_autocast()}
    for name, context in contexts.items():
        xi, wi = x.clone().requires_grad_(), w.clone().requires_grad_()
        with context:
            y = F.gelu(F.linear(xi, wi))
        (y.float() * upstream).sum().backward()
        grads[name] = (xi.grad, wi.grad)
    for native, emulated in zip(grads["native"], grads["emulated"], strict=True):
        # both are bfloat16 values held in float32: the backward products rounded to bfloat16
        assert torch.equal(emulated.to(BF16).float(), emulated)
        apart = ulps_apart(emulated.to(BF16), native.to(BF16))
        assert apart.max() <= 1 and (apart == 0).float().mean() > 0.99


def test_attention_follows_the_kernel_pytorch_would_pick():
    generator = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(4, 6, 40, 32, generator=generator) for _ in range(3))
    mask = torch.zeros(4, 1, 40, 40)
    mask[:2, :, :, 25:] = torch.finfo(torch.float32).min  # padded keys
    with torch.autocast("cpu", dtype=BF16):
        native = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    with emulated_bfloat16_autocast():
        emulated = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert emulated.dtype == BF16
    # The flash kernel's exponential is an approximation: most outputs identical, all within rounding
    # of the values they average (plain float32 attention rounded once matches only about 65%).
    assert (emulated == native).float().mean() > 0.9
    assert (emulated.float() - native.float()).abs().max() <= 2**-7 * v.abs().max()
    # With dropout PyTorch computes in float32 from bfloat16 inputs: identical, mask for mask.
    outputs = []
    for context in (torch.autocast("cpu", dtype=BF16), emulated_bfloat16_autocast()):
        torch.manual_seed(7)
        with context:
            outputs.append(F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.2))
    assert torch.equal(outputs[0], outputs[1])


def test_a_fully_masked_query_attends_to_nothing_instead_of_nan():
    q, k, v = (torch.randn(1, 1, 3, 8) for _ in range(3))
    mask = torch.tensor([[False, False, False], [True, False, False], [True, True, True]])
    with emulated_bfloat16_autocast():
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert torch.isfinite(out).all() and torch.equal(out[0, 0, 0], torch.zeros(8, dtype=BF16))


def test_what_autocast_leaves_alone_stays_alone():
    a64, b64 = torch.randn(4, 5, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    a, b = a64.float(), b64.float()
    with emulated_bfloat16_autocast():
        assert (a64 @ b64).dtype == torch.float64  # autocast never casts float64
        with torch.autocast("cpu", enabled=False):
            assert torch.equal(a @ b, torch.mm(a, b))  # a region that turns autocast off
        assert (a * 2).dtype == torch.float32  # not a product
        assert (torch.arange(6).view(2, 3) @ torch.arange(6).view(3, 2)).dtype == torch.int64
    assert (a @ b).dtype == torch.float32  # the mode ends with the context


@pytest.mark.parametrize("native", [False, True])
def test_autocast_emulates_only_where_the_cpu_has_no_bfloat16_kernels(monkeypatch, native):
    monkeypatch.setattr(autocast_module, "native_bfloat16", lambda: native)
    x = torch.randn(8, 16, requires_grad=True)
    w = torch.randn(4, 16, requires_grad=True)
    kernels = KernelDtypes()
    with kernels:
        with autocast("cpu", "bfloat16"):
            y = F.linear(x, w) @ torch.randn(4, 4)
        y.float().sum().backward()
    assert y.dtype == BF16
    assert kernels.seen == ({BF16} if native else {torch.float32})
    with autocast("cpu", None):
        assert F.linear(x, w).dtype == torch.float32
