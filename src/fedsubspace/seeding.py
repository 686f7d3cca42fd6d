"""Independent random streams from one run seed, one per purpose (and round, and client).

Every random draw of a run takes its generator from :func:`stream_seed` with one of the purposes below,
so adding a draw for one purpose never shifts another's numbers, and a run is a function of its seed
whichever engine or process executes which client.
"""

from __future__ import annotations

import numpy as np

SAMPLING = 0  # (seed, SAMPLING, round): the clients of a round
DATA_ORDER = 1  # (seed, DATA_ORDER, round, client): a client's example order
DROPOUT = 2  # (seed, DROPOUT, round, client): dropout masks during local training
HOLDOUT = 3  # (seed, HOLDOUT, client): the personalised-evaluation split of a client's partition
REINIT = 4  # (seed, REINIT, round): adapters a server re-initialises (flora's fresh A)
ADAPTERS = 5  # (seed, ADAPTERS, rank): the initial adapter of each client rank
DP_NOISE = 6  # (seed, DP_NOISE, round, client): DP-SGD's Gaussian noise on a client
CLIENT_DP_NOISE = 7  # (seed, CLIENT_DP_NOISE, round): client-level DP's noise on the server's sum


def stream_seed(*parts: int) -> int:
    """A 63-bit seed for one purpose, round and client: independent streams from one run seed."""
    return int(np.random.SeedSequence(list(parts)).generate_state(2, dtype=np.uint64)[0] >> np.uint64(1))
