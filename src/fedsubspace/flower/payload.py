"""What travels in Flower messages, and how it is counted and checked: no Flower runtime here.

Tensors travel as :class:`flwr.app.ArrayRecord` (one per purpose: the method's downlink or uplink, the
merged-weight catch-up), keyed by the flat names :func:`fedsubspace.state.flatten` defines
(``lora_B/<module>``, ``lora_A/<module>``, ``head/<name>``, ``extra/<name>``). Communication is counted
from those records: the bytes of the tensor data they hold, the quantity the in-process runner counts
(serialisation headers and message framing are not part of it).

A client sends only what its method uploads; the server rebuilds the full :class:`ClientUpdate` by
laying the upload over what the client started from (:func:`update_from_upload`), after checking names,
shapes, dtypes and finiteness (:func:`check_upload`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, RecordDict

from fedsubspace.methods.base import ClientStart, Method
from fedsubspace.methods.common import merged_residual
from fedsubspace.state import EXTRA, HEAD, LORA_A, LORA_B, ClientUpdate, GlobalState, MergeHistory, unflatten

Tensor = torch.Tensor
# numpy has no bfloat16: such tensors travel as their raw 16-bit patterns, the Array's dtype says so
_RAW16 = {"bfloat16": torch.bfloat16}


def to_record(tensors: Mapping[str, Tensor]) -> ArrayRecord:
    """An ArrayRecord holding ``tensors`` exactly (bit for bit, any dtype torch and numpy share, and
    bfloat16)."""
    record = ArrayRecord()
    for name, tensor in tensors.items():
        tensor = tensor.detach().cpu().contiguous()
        dtype = str(tensor.dtype).removeprefix("torch.")
        if dtype in _RAW16:
            array = Array.from_numpy_ndarray(tensor.view(torch.int16).numpy())
            record[name] = Array(dtype=dtype, shape=array.shape, stype=array.stype, data=array.data)
        else:
            record[name] = Array.from_numpy_ndarray(tensor.numpy())
    return record


def from_record(record: ArrayRecord) -> dict[str, Tensor]:
    """The tensors of an ArrayRecord built by :func:`to_record` (or by any numpy-based sender)."""
    tensors = {}
    for name, array in record.items():
        tensor = torch.from_numpy(array.numpy())
        tensors[name] = tensor.view(_RAW16[array.dtype]) if array.dtype in _RAW16 else tensor
    return tensors


def record_bytes(record: ArrayRecord) -> int:
    """Bytes of tensor data the record carries."""
    return sum(math.prod(array.shape) * _itemsize(array.dtype) for array in record.values())


def content_bytes(content: RecordDict) -> int:
    """Bytes of tensor data in all ArrayRecords of a message's content."""
    return sum(record_bytes(record) for record in content.array_records.values())


def _itemsize(dtype: str) -> int:
    return 2 if dtype in _RAW16 else np.dtype(dtype).itemsize


# --- uploads ----------------------------------------------------------------------------------------


def check_upload(
    method: Method, upload: Mapping[str, Tensor], start: ClientStart, trained: frozenset[str], rank: int
) -> str | None:
    """Why an upload is unusable (one line), or None when the server can aggregate it.

    The expected names are the method's upload of a client that started from ``start`` and trained
    ``trained``; factors must keep their module's outer sizes and dtype, with one inner rank of at most
    the client's ``rank`` (a factor that did not travel is the one the client started from), heads their
    shape and dtype, and every tensor, extras included, must be finite.
    """
    if not trained <= {"A", "B"}:
        return f"trained factors {sorted(trained)} are not a subset of A, B"
    reference = ClientUpdate(-1, 0, start.factors, start.head, 0.0, trained=trained)
    expected = {key for key in method.uplink(reference) if not key.startswith(EXTRA)}
    received = {key for key in upload if not key.startswith(EXTRA)}
    if received != expected:
        missing, unexpected = sorted(expected - received), sorted(received - expected)
        return f"tensor names differ from the upload (missing {missing[:3]}, unexpected {unexpected[:3]})"
    factors, heads, _ = unflatten(upload, start.factors)
    for module, (B0, A0) in start.factors.items():
        B, A = factors[module]
        if B.dim() != 2 or B.shape[0] != B0.shape[0] or B.dtype != B0.dtype:
            return f"{LORA_B}{module} is {tuple(B.shape)} {B.dtype}, expected ({B0.shape[0]}, r) {B0.dtype}"
        if A.dim() != 2 or A.shape[1] != A0.shape[1] or A.dtype != A0.dtype:
            return f"{LORA_A}{module} is {tuple(A.shape)} {A.dtype}, expected (r, {A0.shape[1]}) {A0.dtype}"
        if B.shape[1] != A.shape[0] or not 1 <= A.shape[0] <= rank:
            return f"module {module} has inner ranks {B.shape[1]} and {A.shape[0]}, expected one <= {rank}"
    for name, head in start.head.items():
        sent = heads.get(name)
        if sent is not None and (sent.shape != head.shape or sent.dtype != head.dtype):
            return (
                f"{HEAD}{name} is {tuple(sent.shape)} {sent.dtype}, expected {tuple(head.shape)} {head.dtype}"
            )
    for key, tensor in upload.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            return f"{key} holds NaN or Inf"
    return None


def update_from_upload(
    upload: Mapping[str, Tensor],
    start: ClientStart,
    *,
    client_id: int,
    num_examples: int,
    train_loss: float,
    scaling: float | None,
    trained: frozenset[str] | None,
) -> ClientUpdate:
    """The client's update as the server aggregates it: uploaded factors, and for the factors that did
    not travel the values the client started from (it did not train them)."""
    factors, head, extras = unflatten(upload, start.factors)
    return ClientUpdate(
        client_id=client_id,
        num_examples=num_examples,
        factors=factors,
        head=head,
        train_loss=train_loss,
        extras=extras,
        scaling=scaling,
        trained=trained,
    )


# --- merged base weights ----------------------------------------------------------------------------


def apply_catch_up(
    residual: Mapping[str, Tensor], payload: Mapping[str, Tensor], since: int
) -> dict[str, Tensor]:
    """A node's residual, current with round ``since``, brought up to date by
    :meth:`MergeHistory.catch_up <fedsubspace.state.MergeHistory.catch_up>`: dense modules replaced, the
    merges of later rounds replayed in order with the server's own update rule."""
    dense, merges = MergeHistory.read_catch_up(payload)
    current = {**residual, **dense}
    for t in sorted(t for t in merges if t > since):
        current = merged_residual(GlobalState(factors={}, head={}, scaling=1.0, residual=current), merges[t])
    return current
