"""SecAgg+ on Flower: the server learns only the weighted sum of the round's uploads, never one of them.

Flower 1.41 runs SecAgg+ through its legacy workflow API: :class:`flwr.server.workflow.SecAggPlusWorkflow`
on the server, :func:`flwr.client.mod.secaggplus_mod` on the clients. The workflow asks a legacy
``Strategy`` for each round's ``FitIns`` and hands it the weighted average of the ``FitRes`` parameters
(each client's upload weighted by its example count, quantised, masked, summed and unmasked). So one
round under ``secagg`` is: :class:`SecAggRound` (that Strategy face) builds the TRAIN messages exactly as
:class:`~fedsubspace.flower.strategy.SubspaceStrategy` does and carries them as ``FitIns``; the client
app trains from them as from any TRAIN message and answers with its uplink as ``FitRes`` parameters, which
the mod masks; the average comes back as one pooled update, which the method aggregates with weight 1.
That is the method's rule only when the rule reads nothing but the weighted sum of the uploads
(``privacy.secagg`` in the method's file; ``configure.validate`` refuses the others).

Tensors travel by name elsewhere; ``FitIns``/``FitRes`` parameters are an ordered list, so the
downlink's names go along in the ``FitIns`` config (``keys``, one string) and an upload is ordered by
the sorted names of the method's uplink, which server and clients compute alike.

Precision. The mod scales a client's upload by its weight ``n_i / max_weight`` (the server sets
``max_weight`` to the largest partition, so no weight exceeds 1), clips every value to
``[-CLIPPING_RANGE, CLIPPING_RANGE]`` and rounds it stochastically onto ``QUANTIZATION_RANGE`` levels
(Flower's defaults). Each client's rounding moves a value by less than one level,
``2 * CLIPPING_RANGE / QUANTIZATION_RANGE``, so the unmasked average differs from the exact weighted
average by less than ``k * level * max_weight / sum_i n_i`` per value for k clients (the rounding draws
from NumPy's global generator: SecAgg+ runs do not reproduce bit for bit).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import Code, FitIns, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common import recorddict_compat as compat

# The client app imports this module for its mod; torch is imported by the functions that use it, so
# that the query mapping nodes to clients does not pay for it (client_app.py).
if TYPE_CHECKING:
    import torch

CLIPPING_RANGE = 8.0  # Flower's default: every uploaded value is clipped to [-8, 8] before quantising
QUANTIZATION_RANGE = 2**22  # Flower's default number of quantisation levels


def secagg_when_asked(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
    """Flower's ``secaggplus_mod`` for the messages of a SecAgg+ round; every other message passes."""
    if RECORD_KEY_CONFIGS in msg.content.config_records:
        return secaggplus_mod(msg, ctxt, call_next)
    return call_next(msg, ctxt)


def as_fitins(content: RecordDict) -> FitIns:
    """A TRAIN message's content (``arrays`` and ``config``) as the ``FitIns`` SecAgg+ carries."""
    from fedsubspace.flower.payload import from_record

    arrays = from_record(content.array_records["arrays"])
    keys = sorted(arrays)
    config = dict(content.config_records["config"])
    config["keys"] = "\n".join(keys)  # a legacy config holds scalars only
    parameters = ndarrays_to_parameters([arrays[key].numpy() for key in keys])
    return FitIns(parameters=parameters, config=config)  # type: ignore[arg-type]


def is_fitins(content: RecordDict) -> bool:
    return "fitins.config" in content.config_records


def from_fitins(content: RecordDict) -> RecordDict:
    """The TRAIN content a ``FitIns`` carries (the inverse of :func:`as_fitins`)."""
    import numpy as np
    import torch

    from fedsubspace.flower.payload import to_record

    fitins = compat.recorddict_to_fitins(content, keep_input=True)
    config = dict(fitins.config)
    keys = str(config.pop("keys")).split("\n")
    arrays = {
        key: torch.from_numpy(np.array(a))
        for key, a in zip(keys, parameters_to_ndarrays(fitins.parameters), strict=True)
    }
    return RecordDict({"arrays": to_record(arrays), "config": ConfigRecord(config)})  # type: ignore[arg-type]


def as_fitres(content: RecordDict) -> RecordDict:
    """A TRAIN reply (``arrays``, ``metrics``, ``config``) as the ``FitRes`` the mod masks: the upload in
    the order of its sorted names, the example count as its weight."""
    from fedsubspace.flower.payload import from_record

    upload = from_record(content["arrays"])  # type: ignore[arg-type]
    metrics, config = content["metrics"], content["config"]
    fitres = FitRes(
        status=Status(code=Code.OK, message=""),
        parameters=ndarrays_to_parameters([upload[key].numpy() for key in sorted(upload)]),
        num_examples=int(metrics["num-examples"]),  # type: ignore[arg-type]
        metrics={"partition-id": config["partition-id"], "train-loss": metrics["train-loss"]},  # type: ignore[dict-item]
    )
    return compat.fitres_to_recorddict(fitres, keep_input=True)


def pooled_upload(keys: list[str], fitres: FitRes) -> dict[str, torch.Tensor]:
    """The weighted average of the uploads that SecAgg+ hands the server, by name."""
    import numpy as np
    import torch

    arrays = parameters_to_ndarrays(fitres.parameters)
    return {
        key: torch.from_numpy(np.asarray(a, dtype=np.float32)) for key, a in zip(keys, arrays, strict=True)
    }
