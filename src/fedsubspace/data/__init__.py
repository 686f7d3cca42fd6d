"""Data: multiple-choice loading, fetching registered datasets, federated partitioning."""

from fedsubspace.data.fetch import fetch_hellaswag
from fedsubspace.data.multiple_choice import FieldMap, check_same_choices, load_multiple_choice
from fedsubspace.data.partition import partition_indices, partition_stats

__all__ = [
    "FieldMap",
    "check_same_choices",
    "fetch_hellaswag",
    "load_multiple_choice",
    "partition_indices",
    "partition_stats",
]
