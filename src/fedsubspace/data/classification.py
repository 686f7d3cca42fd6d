"""Text-classification tasks as one fixed table: ``text``, ``text_pair``, ``label``, ``group``.

A row holds one sentence (or a sentence pair) and one of K labels, given either as the label's
name or as its index into the label names. Rows come from the same sources as multiple-choice tasks
(a JSONL file or directory, a registered dataset in the cache, ``hf:<dataset id>``) and are checked
row by row, so a bad row is reported with its file and line and the config key to fix.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import datasets
import numpy as np

from fedsubspace.data.multiple_choice import (
    HF_PREFIX,
    Record,
    _describe,
    _field,
    _file_records,
    _group,
    _hub_records,
    _resolve_file,
    _text,
)
from fedsubspace.errors import UserError


@dataclass(frozen=True)
class ClassificationFields:
    """Which JSON fields of a row hold the text, the optional second text, the label and the group
    (``group`` None: no partition key is read, as an IID split needs none)."""

    text: str = "sentence"
    label: str = "label"
    text_pair: str | None = None
    group: str | None = None


def features(label_names: Sequence[str]) -> datasets.Features:
    return datasets.Features(
        {
            "text": datasets.Value("string"),
            "text_pair": datasets.Value("string"),
            "label": datasets.ClassLabel(names=list(label_names)),
            "group": datasets.Value("string"),
        }
    )


def load_classification(
    source: str,
    split: str,
    fields: ClassificationFields,
    label_names: Sequence[str],
    limit: int | None = None,
    seed: int = 0,
) -> datasets.Dataset:
    """Load ``split`` as columns text, text_pair (None without a pair field), label (an index into
    ``label_names``), group ("" without a group field).

    ``limit`` keeps a random subset of that many rows, chosen by ``seed``, in file order. A split
    whose rows all carry one label is refused: nothing can be learnt or measured from it.
    """
    if len(set(label_names)) < 2 or len(set(label_names)) != len(label_names):
        raise UserError(f"label_names must list at least 2 distinct labels, got {list(label_names)}")
    if source.startswith(HF_PREFIX):
        records: Iterable[Record] = _hub_records(source[len(HF_PREFIX) :], split)
    else:
        records = _file_records(_resolve_file(source, split))
    columns = _convert(records, fields, list(label_names))
    n = len(columns["label"])
    if n == 0:
        raise UserError(f"data source {source!r} split {split!r} has no rows")
    present = Counter(columns["label"])
    if len(present) < 2:
        (only,) = present
        raise UserError(
            f"data source {source!r} split {split!r}: every row has label {label_names[only]!r}; "
            f"classification needs rows of at least 2 labels (check label_field={fields.label!r})"
        )
    if limit is not None and limit < n:
        keep = np.sort(np.random.default_rng(seed).choice(n, size=limit, replace=False))
        columns = {name: [values[i] for i in keep] for name, values in columns.items()}
    return datasets.Dataset.from_dict(columns, features=features(label_names))


def _convert(
    records: Iterable[Record], fields: ClassificationFields, label_names: list[str]
) -> dict[str, list[Any]]:
    texts: list[str] = []
    pairs: list[str | None] = []
    labels: list[int] = []
    groups: list[str] = []
    for where, row in records:
        texts.append(_text(row, fields.text, where, "text_field"))
        pairs.append(
            None if fields.text_pair is None else _text(row, fields.text_pair, where, "text_pair_field")
        )
        labels.append(_label(row, fields.label, label_names, where))
        groups.append("" if fields.group is None else _group(row, fields.group, where, "partition_field"))
    return {"text": texts, "text_pair": pairs, "label": labels, "group": groups}


def _label(row: Mapping[str, Any], name: str, label_names: list[str], where: str) -> int:
    """A label name, or an index into the label names (GLUE stores 0/1)."""
    value = _field(row, name, where, "label_field")
    if isinstance(value, str) and value in label_names:
        return label_names.index(value)
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(label_names):
        return value
    raise UserError(
        f"{where}: field {name!r} is {_describe(value)}, not one of label_names {label_names} "
        f"nor an index 0..{len(label_names) - 1}; fix label_names (or label_field) in the config"
    )
