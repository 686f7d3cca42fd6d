"""The one boundary between the server's tensors and a client's: placement on the device and dtype.

The server holds plain tensors on the CPU, in float32 (float64 inside :mod:`fedsubspace.lowrank` where the
maths needs it), whatever the model's device and dtype: the global state, the clients' private memories,
the updates, checkpoints and diagnostics. A client round computes next to its model, on the device and in
the dtype of its adapter parameters. :func:`state_to_client` and :func:`tensors_to_client` place what a
client round reads (the global state, its memory) there; :func:`update_to_server` and
:func:`tensors_to_server` bring what it reports (its update, its memory) back to the CPU in at least float32.
Nothing else in a client round moves a tensor between devices (copying into a parameter with ``copy_``
aside), so a method, a regulariser or an optimiser never meets a tensor of the other side.
``tests/test_devices.py`` holds every method to this: it trains clients with the model on PyTorch's
``meta`` device under a guard that refuses any operation mixing devices.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from fedsubspace.state import ClientUpdate, Factors, GlobalState

Tensor = torch.Tensor

SERVER_DEVICE = torch.device("cpu")


@dataclass(frozen=True)
class Placement:
    """Where a client computes: its adapter parameters' device and dtype."""

    device: torch.device
    dtype: torch.dtype


def to_client(tensor: Tensor, placement: Placement) -> Tensor:
    """``tensor`` on the client's device; floating tensors in the client's dtype (no copy when already so)."""
    if tensor.is_floating_point():
        return tensor.to(placement.device, placement.dtype)
    return tensor.to(placement.device)


def tensors_to_client(tensors: Mapping[str, Tensor], placement: Placement) -> dict[str, Tensor]:
    return {name: to_client(t, placement) for name, t in tensors.items()}


def factors_to_client(factors: Factors, placement: Placement) -> Factors:
    return {name: (to_client(B, placement), to_client(A, placement)) for name, (B, A) in factors.items()}


def state_to_client(state: GlobalState, placement: Placement) -> GlobalState:
    """The global state as a client round reads it: every tensor on the client's device and dtype."""
    return dataclasses.replace(
        state,
        factors=factors_to_client(state.factors, placement),
        head=tensors_to_client(state.head, placement),
        extras=tensors_to_client(state.extras, placement),
        residual=tensors_to_client(state.residual, placement),
        merged=factors_to_client(state.merged, placement),
    )


def server_dtype(dtype: torch.dtype) -> torch.dtype:
    """The server's dtype for a client tensor: floating tensors at least float32 (bf16 never reaches it)."""
    return torch.promote_types(dtype, torch.float32) if dtype.is_floating_point else dtype


def download(tensor: Tensor, dtype: torch.dtype) -> Tensor:
    """A detached CPU copy of ``tensor`` in ``dtype``: the only way a client tensor reaches the server."""
    return tensor.detach().to(SERVER_DEVICE, dtype, copy=True)


def to_server(tensor: Tensor) -> Tensor:
    return download(tensor, server_dtype(tensor.dtype))


def tensors_to_server(tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {name: to_server(t) for name, t in tensors.items()}


def update_to_server(update: ClientUpdate) -> ClientUpdate:
    """A client's update as the server keeps it: CPU copies, at least float32."""
    return dataclasses.replace(
        update,
        factors={name: (to_server(B), to_server(A)) for name, (B, A) in update.factors.items()},
        head=tensors_to_server(update.head),
        extras=tensors_to_server(update.extras),
    )
