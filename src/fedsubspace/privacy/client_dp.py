"""Client-level DP (DP-FedAvg) on the server: clip each client's change, noise their sum, one mean upload.

For a method whose server rule reads only the sum of the uploads (``privacy.client_dp.ok``), the round's
uploads are replaced by one noisy mean upload before the method aggregates it with weight 1:

- a client's change is its upload (:meth:`Method.uplink`) minus the same tensors of the global state it
  started from, all tensors together as one vector, clipped to norm ``clip``;
- the changes are summed, Gaussian noise of standard deviation ``noise_multiplier * clip`` is added to
  every coordinate, and the sum is divided by the fixed number of clients a round (public, so the
  division is post-processing; a round with fewer usable updates is divided by it all the same);
- the mean upload is the global state plus that mean change. The method's rule on it is post-processing.

So one client changes what the server releases by at most ``clip`` before the noise, whatever it
uploads: the Gaussian mechanism, accounted by :mod:`fedsubspace.privacy.accounting`. Clients are weighted
equally (their example counts would make the sensitivity depend on them). The noise is seeded by (seed,
round) for reproducibility; a deployment must keep the seed from everyone but the server.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from fedsubspace.methods import Method
from fedsubspace.state import ClientUpdate, GlobalState, flatten, unflatten

Tensor = torch.Tensor


@dataclass(frozen=True)
class ClientLevelDP:
    clip: float  # the norm a client's upload change is clipped to
    noise_multiplier: float  # noise std / clip
    clients_per_round: int  # the fixed denominator of the mean


def clipped_change(
    upload: Mapping[str, Tensor], start: Mapping[str, Tensor], clip: float
) -> dict[str, Tensor]:
    """``upload - start`` over the uploaded tensors, scaled to norm at most ``clip`` (all together)."""
    change = {key: (tensor - start[key]).double() for key, tensor in upload.items()}
    norm = torch.sqrt(sum((t.square().sum() for t in change.values()), torch.zeros((), dtype=torch.float64)))
    factor = min(1.0, clip / max(float(norm), 1e-12))
    return {key: t * factor for key, t in change.items()}


def noisy_mean_update(
    method: Method,
    state: GlobalState,
    updates: list[ClientUpdate],
    settings: ClientLevelDP,
    generator: torch.Generator,
) -> ClientUpdate:
    """The one upload the method aggregates under client-level DP (see the module docstring)."""
    start = flatten(state.factors, state.head)
    changes = [clipped_change(method.uplink(u), start, settings.clip) for u in updates]
    mean: dict[str, Tensor] = {}
    for key in changes[0]:
        total = sum((c[key] for c in changes), torch.tensor(0.0))
        std = settings.noise_multiplier * settings.clip
        noise = torch.normal(0.0, std, total.shape, generator=generator, dtype=torch.float64)
        mean[key] = (start[key].double() + (total + noise) / settings.clients_per_round).to(start[key].dtype)
    factors, head, _ = unflatten({**start, **mean})
    return dataclasses.replace(updates[0], client_id=-1, factors=factors, head=head, extras={})
