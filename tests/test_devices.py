"""Device correctness without a GPU: every method's client round with the model on another device.

CI has no GPU, so the client side is built on PyTorch's ``meta`` device (shapes without data) while the
server keeps its tensors on the CPU, as on a GPU machine. Meta alone does not refuse every mix (a meta
tensor times a CPU matrix gives a meta result), so the round also runs under :class:`DeviceGuard`, which
refuses any torch operation whose tensor arguments sit on two devices, as CUDA kernels do. The only
tensors that may cross are the explicit transfers, and the one place a client tensor reaches the server,
``placement.download``, which cannot read a meta tensor's (absent) values and is replaced here by a zero
CPU tensor of the same shape and dtype.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
from helpers import MIXED_RANK_METHODS, tiny, update_tensors
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from fedsubspace import placement
from fedsubspace.adapters import TrainableModel
from fedsubspace.client import client_context, run_round
from fedsubspace.configure import build_method
from fedsubspace.experiment import local_schedule, prepare
from fedsubspace.methods import METHODS
from fedsubspace.state import ClientUpdate

Tensor = torch.Tensor
META = torch.device("meta")
# What moves a tensor between devices on purpose; every other operation must see one device.
TRANSFERS = {Tensor.to, Tensor.copy_, Tensor.cpu, Tensor.cuda}


# A meta tensor has no value to read; where code branches on one (transformers skips an all-ones
# attention mask), the guard answers as for a mask without padding.
VALUE_READS = {Tensor.__bool__: True, Tensor.item: 1}


def is_cpu_scalar(t: Tensor) -> bool:
    """CUDA kernels accept 0-dim CPU tensors as scalars (Adam's step counters are such)."""
    return t.device.type == "cpu" and t.dim() == 0


class DeviceGuard(TorchFunctionMode):
    """Raises on any torch operation that mixes tensors of two devices (CPU scalars aside)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in VALUE_READS and args[0].device == META:
            return VALUE_READS[func]
        if func not in TRANSFERS:
            devices = {
                t.device
                for t in tree_flatten((args, kwargs))[0]
                if isinstance(t, Tensor) and not is_cpu_scalar(t)
            }
            if len(devices) > 1:
                raise AssertionError(
                    f"{getattr(func, '__name__', func)} mixes devices {sorted(map(str, devices))}"
                )
        return func(*args, **kwargs)


def test_guard_refuses_what_meta_lets_through() -> None:
    meta, cpu = torch.ones(3, 3, device=META), torch.ones(3, 3)
    assert (meta @ cpu).device == META  # meta alone: no error
    with DeviceGuard(), pytest.raises(AssertionError, match="mixes devices"):
        meta @ cpu
    with DeviceGuard():
        meta.copy_(cpu)
        assert (meta * torch.tensor(2.0)).device == META


@contextmanager
def client_on_meta(tm: TrainableModel) -> Iterator[None]:
    """The client side (model, pristine base weights, batches) on meta; parameter maps stay valid
    because conversion swaps the tensors inside the same Parameter objects."""
    swap = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        tm.model.to(META)
    finally:
        torch.__future__.set_swap_module_params_on_conversion(swap)
    if tm.pristine is not None:
        tm.pristine = {name: w.to(META) for name, w in tm.pristine.items()}
    tm.device = META
    yield


def assert_on_server(tensors: list[Tensor], what: str) -> None:
    for t in tensors:
        assert t.device.type == "cpu", f"{what}: a tensor on {t.device}"
        assert not t.is_floating_point() or t.dtype in (torch.float32, torch.float64), f"{what}: {t.dtype}"


@pytest.mark.parametrize("method", sorted(METHODS))
def test_client_round_never_mixes_devices(method: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Round 1 trains two clients on the CPU (so the state carries what later rounds read: merged
    residuals, fedgalore's joint subspaces, fedsa's private B); round 2 trains client 0 on meta."""
    mixed = ["client_ranks=[4, 2, 2, 4]"] if method in MIXED_RANK_METHODS else []
    config = tiny("tiny-encoder", method, "max_local_steps=4", "gradient_accumulation_steps=2", *mixed)
    exp = prepare(config)
    tm, schedule = exp.trainable, local_schedule(config)
    rule = build_method(config)
    memories: dict[int, dict[str, Tensor]] = {0: {}, 1: {}}

    def client_round(state, round_index: int, client_id: int) -> ClientUpdate:
        ctx = client_context(exp, client_id, round_index, memories[client_id])
        result = run_round(exp, rule, schedule, state, ctx)
        memories[client_id] = result.memory
        return result.update

    updates = [client_round(exp.initial_state, 1, client) for client in (0, 1)]
    total = sum(u.num_examples for u in updates)
    state = rule.aggregate(exp.initial_state, updates, [u.num_examples / total for u in updates])

    monkeypatch.setattr(placement, "download", lambda t, dtype: torch.zeros(t.shape, dtype=dtype))
    with client_on_meta(tm), DeviceGuard():
        update = client_round(state, 2, 0)
    assert_on_server(update_tensors(update), "update")
    assert_on_server(list(memories[0].values()), "client memory")
    assert update.train_loss == 0.0  # the zero download of the losses: they did come through it
