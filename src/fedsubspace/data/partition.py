"""Split a dataset's rows over federated clients with flwr-datasets partitioners."""

from __future__ import annotations

import math
import warnings
from collections import Counter
from typing import Any

import datasets
import numpy as np
from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, Partitioner

from fedsubspace.errors import UserError

SCHEMES = ("iid", "dirichlet")
_ROW = "__row__"


def partition_indices(
    dataset: datasets.Dataset,
    num_clients: int,
    scheme: str = "dirichlet",
    by: str = "group",
    alpha: float = 0.3,
    min_partition_size: int = 1,
    seed: int = 42,
) -> list[list[int]]:
    """Row indices (sorted) of each client; every row goes to exactly one client.

    ``iid`` deals out a seeded shuffle in equal shares. ``dirichlet`` draws, for every value of
    column ``by``, the clients' shares from Dirichlet(``alpha``): small alpha gives clients few,
    dominant groups. Each client gets at least ``min_partition_size`` rows, else UserError.
    """
    if scheme not in SCHEMES:
        raise UserError(f"partition scheme {scheme!r} is unknown; use one of {', '.join(SCHEMES)}")
    if isinstance(num_clients, bool) or not isinstance(num_clients, int) or num_clients < 1:
        raise UserError(f"num_clients must be a positive integer, got {num_clients!r}")
    if (
        isinstance(min_partition_size, bool)
        or not isinstance(min_partition_size, int)
        or min_partition_size < 1
    ):
        raise UserError(f"min_partition_size must be a positive integer, got {min_partition_size!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise UserError(f"partition seed must be a non-negative integer, got {seed!r}")
    num_rows = dataset.num_rows
    if num_clients > num_rows:
        raise UserError(f"num_clients={num_clients} is more than the {num_rows} rows to share out")
    if scheme == "iid":
        return _iid(num_rows, num_clients, min_partition_size, seed)
    if (
        isinstance(alpha, bool)
        or not isinstance(alpha, int | float)
        or not (math.isfinite(alpha) and alpha > 0)
    ):
        raise UserError(f"dirichlet alpha must be a positive number, got {alpha!r}")
    if by not in dataset.column_names:
        raise UserError(f"partition key {by!r} is not a column; use one of {', '.join(dataset.column_names)}")
    if not isinstance(dataset.features[by], datasets.Value | datasets.ClassLabel):
        raise UserError(f"partition key {by!r} must be a column of single values, not lists")
    keyed = datasets.Dataset.from_dict({by: _values(dataset, by), _ROW: list(range(num_rows))})
    return _dirichlet(keyed, num_clients, by, float(alpha), min_partition_size, seed)


def _iid(num_rows: int, num_clients: int, min_partition_size: int, seed: int) -> list[list[int]]:
    # Shares differ by at most one row, so the last client is always among the smallest.
    smallest = num_rows // num_clients
    if smallest < min_partition_size:
        raise UserError(
            f"iid split of {num_rows} rows over {num_clients} clients gives client "
            f"{num_clients - 1} only {smallest} rows, below min_partition_size="
            f"{min_partition_size}; use fewer clients or a smaller min_partition_size"
        )
    # IidPartitioner hands out contiguous shards, so shuffling first is what makes them random.
    rows = datasets.Dataset.from_dict({_ROW: list(range(num_rows))}).shuffle(seed=seed)
    return _assign(IidPartitioner(num_partitions=num_clients), rows, num_clients)


def _dirichlet(
    keyed: datasets.Dataset,
    num_clients: int,
    by: str,
    alpha: float,
    min_partition_size: int,
    seed: int,
) -> list[list[int]]:
    def partitioner(min_size: int) -> DirichletPartitioner:
        return DirichletPartitioner(
            num_partitions=num_clients,
            partition_by=by,
            alpha=alpha,
            min_partition_size=min_size,
            shuffle=False,
            seed=seed,
        )

    # The partitioner warns on every redraw and raises ValueError after its last attempt.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return _assign(partitioner(min_partition_size), keyed, num_clients)
        except ValueError:
            # Redraw without the size constraint: same seed, so this is the first draw the
            # failed attempts started from, and shows the user how small clients end up.
            sizes = [len(rows) for rows in _assign(partitioner(0), keyed, num_clients)]
    client = int(np.argmin(sizes))
    raise UserError(
        f"dirichlet split (alpha={alpha}, seed={seed}) of {keyed.num_rows} rows over "
        f"{num_clients} clients keeps leaving a client below min_partition_size="
        f"{min_partition_size} (e.g. client {client} got {sizes[client]} rows); use fewer clients, "
        f"a larger alpha or a smaller min_partition_size"
    ) from None


def _assign(partitioner: Partitioner, rows: datasets.Dataset, num_clients: int) -> list[list[int]]:
    partitioner.dataset = rows
    return [sorted(_values(partitioner.load_partition(client), _ROW)) for client in range(num_clients)]


def _values(dataset: datasets.Dataset, column: str) -> list[Any]:
    # Iterating ``dataset[column]`` goes row by row (seconds on a full split); this is one batch.
    return dataset.select_columns([column]).to_dict()[column]


def partition_stats(
    dataset: datasets.Dataset,
    partitions: list[list[int]],
    by: str = "group",
    *,
    scheme: str | None = None,
    alpha: float | None = None,
) -> dict[str, Any]:
    """JSON-ready summary of a partition: sizes, groups and label histogram per client.

    ``scheme`` and ``alpha`` are only recorded in the summary (the partition itself does not
    know how it was made).
    """
    keys = _values(dataset, by)
    labels = np.asarray(_values(dataset, "label"), dtype=np.int64)
    num_choices = len(dataset[0]["choices"]) if "choices" in dataset.column_names else 0
    label_feature = dataset.features["label"]
    label_names = label_feature.names if isinstance(label_feature, datasets.ClassLabel) else None
    num_labels = max(num_choices, len(label_names or ()), int(labels.max()) + 1 if labels.size else 0)
    clients = []
    for client, rows in enumerate(partitions):
        counts = Counter(keys[row] for row in rows)
        top = sorted(counts.items(), key=lambda item: (-item[1], str(item[0])))[:3]
        histogram = np.bincount(labels[list(rows)], minlength=num_labels)
        clients.append(
            {
                "client": client,
                "size": len(rows),
                "num_groups": len(counts),
                "top_groups": [{"group": group, "count": count} for group, count in top],
                "label_histogram": [int(count) for count in histogram],
            }
        )
    return {
        "num_clients": len(partitions),
        "scheme": scheme,
        "alpha": alpha,
        "by": by,
        "num_rows": sum(len(rows) for rows in partitions),
        "sizes": [len(rows) for rows in partitions],
        "label_names": label_names,  # a classification task's labels (the histograms' order), else None
        "clients": clients,
    }
