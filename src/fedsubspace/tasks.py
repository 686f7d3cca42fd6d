"""Task types: what a config's ``task`` means for loading, encoding and the encoder's head.

Everything above this layer (clients, methods, runners, matrix, report) sees only an
:class:`~fedsubspace.scoring.Encoded` split whose examples each have ``num_choices`` scored options,
so a new task type is one more entry in ``TASKS``: a loader into a table, an encoder into ``Encoded``,
and the transformers head an encoder model gets.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import datasets
from transformers import AutoModelForSequenceClassification, PreTrainedTokenizerBase

from fedsubspace.config import ExperimentConfig
from fedsubspace.data import (
    ClassificationFields,
    FieldMap,
    check_same_choices,
    load_classification,
    load_multiple_choice,
)
from fedsubspace.models import EncoderHead
from fedsubspace.scoring import Encoded, encode, encode_classification


@dataclass(frozen=True)
class TaskType:
    # (config, split name, row limit, subsample seed) -> the task's table
    load: Callable[[ExperimentConfig, str, int | None, int], datasets.Dataset]
    # (table, tokenizer, model kind, config) -> token ids of every example
    encode: Callable[[datasets.Dataset, PreTrainedTokenizerBase, str, ExperimentConfig], Encoded]
    encoder_head: Callable[[ExperimentConfig], EncoderHead]
    # (train table, evaluation table, config) -> refuse splits the model cannot be trained and scored on
    check_splits: Callable[[datasets.Dataset, datasets.Dataset, ExperimentConfig], None]


def _partition_key(config: ExperimentConfig) -> str | None:
    return None if config.partition == "iid" else config.partition_field


def _load_multiple_choice(
    config: ExperimentConfig, split: str, limit: int | None, seed: int
) -> datasets.Dataset:
    fields = FieldMap(
        context=config.context_field,
        choices=config.choices_field,
        label=config.label_field,
        group=_partition_key(config),
    )
    return load_multiple_choice(config.dataset, split, fields, limit=limit, seed=seed)


def _encode_multiple_choice(
    dataset: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, kind: str, config: ExperimentConfig
) -> Encoded:
    return encode(dataset, tokenizer, kind, config.max_length)


def label_words(config: ExperimentConfig) -> list[str]:
    """What a causal model scores for each label: ``label_words``, else each name after a space."""
    assert config.label_names is not None  # validated for classification
    return list(config.label_words or [f" {name}" for name in config.label_names])


def _load_classification(
    config: ExperimentConfig, split: str, limit: int | None, seed: int
) -> datasets.Dataset:
    assert config.label_names is not None  # validated for classification
    fields = ClassificationFields(
        text=config.text_field,
        label=config.label_field,
        text_pair=config.text_pair_field,
        group=_partition_key(config),
    )
    return load_classification(config.dataset, split, fields, config.label_names, limit=limit, seed=seed)


def _encode_classification(
    dataset: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, kind: str, config: ExperimentConfig
) -> Encoded:
    return encode_classification(dataset, tokenizer, kind, config.max_length, label_words(config))


TASKS: dict[str, TaskType] = {
    "multiple_choice": TaskType(
        load=_load_multiple_choice,
        encode=_encode_multiple_choice,
        encoder_head=lambda config: EncoderHead(),
        check_splits=lambda train, evaluation, config: check_same_choices(train, evaluation, config.dataset),
    ),
    "classification": TaskType(
        load=_load_classification,
        encode=_encode_classification,
        encoder_head=lambda config: EncoderHead(
            AutoModelForSequenceClassification, len(config.label_names or ())
        ),
        # both splits' labels are checked against the config's label_names as they load
        check_splits=lambda train, evaluation, config: None,
    ),
}
