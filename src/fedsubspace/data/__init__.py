"""Data: multiple-choice and classification loading, fetching registered datasets, federated partitioning."""

from fedsubspace.data.classification import ClassificationFields, load_classification
from fedsubspace.data.fetch import fetch_hellaswag, fetch_sst2
from fedsubspace.data.multiple_choice import FieldMap, check_same_choices, load_multiple_choice
from fedsubspace.data.partition import partition_indices, partition_stats

__all__ = [
    "ClassificationFields",
    "FieldMap",
    "check_same_choices",
    "fetch_hellaswag",
    "fetch_sst2",
    "load_classification",
    "load_multiple_choice",
    "partition_indices",
    "partition_stats",
]
