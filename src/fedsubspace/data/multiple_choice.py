"""Multiple-choice tasks as one fixed table: ``context``, ``choices``, ``label``, ``group``.

Every source (a JSONL file, a fetched dataset in the cache, a Hugging Face hub dataset) goes
through the same row validation, so a bad row is reported with its file and line instead of
failing later inside tokenisation or training.
"""

from __future__ import annotations

import gzip
import json
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np

from fedsubspace.cache import cache_dir
from fedsubspace.errors import UserError

HF_PREFIX = "hf:"
# Names that resolve to ``cache_dir()/data/<name>/``, filled by ``fedsubspace data fetch <name>``.
REGISTERED_DATASETS = ("hellaswag", "sst2")

FEATURES = datasets.Features(
    {
        "context": datasets.Value("string"),
        "choices": datasets.List(datasets.Value("string")),
        "label": datasets.Value("int64"),
        "group": datasets.Value("string"),
    }
)


@dataclass(frozen=True)
class FieldMap:
    """Which JSON fields of a row hold the four columns.

    Raw HellaSwag rows (``ctx_a``/``ctx_b`` present, string labels) are recognised while
    ``context`` is ``"ctx"`` and converted to the preprocessed text, so both forms of the
    dataset give identical tables.
    """

    context: str = "ctx"
    choices: str = "endings"
    label: str = "label"
    group: str | None = "activity_label"  # the partition key; None: not read (an IID split needs none)


def data_root() -> Path:
    """Where fetched registered datasets live."""
    return cache_dir() / "data"


def load_multiple_choice(
    source: str,
    split: str,
    fields: FieldMap = FieldMap(),
    limit: int | None = None,
    seed: int = 0,
) -> datasets.Dataset:
    """Load ``split`` of a multiple-choice task as columns context, choices, label, group.

    ``source`` is a ``.jsonl``/``.jsonl.gz`` file (``split`` is then ignored), a directory
    holding ``{split}.jsonl`` or ``{split}.jsonl.gz``, a registered name (``hellaswag``, read
    from the cache) or ``hf:<dataset id>``. Rows keep file order; ``limit`` keeps a random
    subset of that many rows, chosen by ``seed`` and returned in file order.
    """
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise UserError(f"limit must be a positive integer or None, got {limit!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise UserError(f"seed must be a non-negative integer, got {seed!r}")
    if source.startswith(HF_PREFIX):
        records = _hub_records(source[len(HF_PREFIX) :], split)
    else:
        records = _file_records(_resolve_file(source, split))
    columns = _convert(records, fields)
    n = len(columns["label"])
    if n == 0:
        raise UserError(f"data source {source!r} split {split!r} has no rows")
    if limit is not None and limit < n:
        keep = np.sort(np.random.default_rng(seed).choice(n, size=limit, replace=False))
        columns = {name: [values[i] for i in keep] for name, values in columns.items()}
    return datasets.Dataset.from_dict(columns, features=FEATURES)


def check_same_choices(train: datasets.Dataset, evaluation: datasets.Dataset, source: str) -> None:
    """Training and evaluation questions offer as many choices each (chance and the classifier differ
    otherwise, and the accuracy no longer measures what training optimised)."""
    trained, evaluated = len(train[0]["choices"]), len(evaluation[0]["choices"])
    if trained != evaluated:
        raise UserError(
            f"data source {source!r}: training questions have {trained} choices but evaluation ones "
            f"{evaluated}; use splits with the same number of choices"
        )


def _resolve_file(source: str, split: str) -> Path:
    if source in REGISTERED_DATASETS:
        directory = data_root() / source
        if not directory.is_dir():
            raise UserError(
                f"dataset {source!r} is not in the cache ({directory}); "
                f"run `fedsubspace data fetch {source}` first"
            )
    else:
        path = Path(source).expanduser()
        if not path.exists():
            raise UserError(
                f"data source {source!r} not found: give a .jsonl or .jsonl.gz file, a directory "
                f"holding {split}.jsonl(.gz), 'hf:<dataset id>', or one of "
                f"{', '.join(REGISTERED_DATASETS)}"
            )
        if path.is_file():
            if not path.name.endswith((".jsonl", ".jsonl.gz")):
                raise UserError(f"data file {path} must end in .jsonl or .jsonl.gz")
            return path
        directory = path
    found = [p for p in (directory / f"{split}.jsonl", directory / f"{split}.jsonl.gz") if p.is_file()]
    if not found:
        present = sorted(p.name for p in directory.glob("*.jsonl*"))
        raise UserError(
            f"{directory} has no {split}.jsonl or {split}.jsonl.gz for split {split!r} "
            f"(present: {', '.join(present) or 'none'})"
        )
    if len(found) > 1:
        # Two copies of one split usually means one is stale; picking either silently would
        # train on data the user did not intend.
        raise UserError(f"{directory} holds both {split}.jsonl and {split}.jsonl.gz; remove one")
    return found[0]


# A record is (where, row): ``where`` names the file and line (or hub row) for error messages.
Record = tuple[str, Mapping[str, Any]]


def _file_records(path: Path) -> Iterator[Record]:
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8") as handle:
            for lineno, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                where = f"{path}:{lineno}"
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise UserError(f"{where}: not valid JSON ({err.msg})") from None
                if not isinstance(row, dict):
                    raise UserError(f"{where}: expected a JSON object, got {type(row).__name__}")
                yield where, row
    except (OSError, EOFError, UnicodeDecodeError) as err:
        raise UserError(f"cannot read {path}: {err}") from None


def _hub_records(dataset_id: str, split: str) -> Iterator[Record]:
    try:
        table = datasets.load_dataset(dataset_id, split=split)
    # The hub raises many unrelated exception types (network, auth, missing config, script).
    except Exception as err:
        lines = str(err).strip().splitlines()
        raise UserError(
            f"cannot load {HF_PREFIX}{dataset_id} split {split!r} from the Hugging Face hub "
            f"({type(err).__name__}: {lines[0] if lines else ''}); it needs hub access, "
            f"else use a local .jsonl"
        ) from None
    for index, row in enumerate(table, start=1):
        yield f"{HF_PREFIX}{dataset_id}[{split}] row {index}", row


def _convert(records: Iterable[Record], fields: FieldMap) -> dict[str, list[Any]]:
    contexts: list[str] = []
    all_choices: list[list[str]] = []
    labels: list[int] = []
    groups: list[str] = []
    raw_hellaswag: bool | None = None
    num_choices: int | None = None
    for where, row in records:
        if raw_hellaswag is None:
            # Only with the default context field: a FieldMap naming another field asked for it.
            raw_hellaswag = fields.context == "ctx" and "ctx_a" in row and "ctx_b" in row
        if raw_hellaswag:
            context = hellaswag_context(
                _text(row, "ctx_a", where, "context_field"), _text(row, "ctx_b", where, "context_field")
            )
        else:
            context = _text(row, fields.context, where, "context_field")
        choices = _choices(row, fields.choices, where)
        if raw_hellaswag:
            choices = [hellaswag_ending(choice) for choice in choices]
        if num_choices is None:
            num_choices = len(choices)
        elif len(choices) != num_choices:
            raise UserError(
                f"{where}: field {fields.choices!r} has {len(choices)} choices but the first row "
                f"has {num_choices}; every row needs the same number"
            )
        labels.append(_label(row, fields.label, len(choices), where))
        groups.append("" if fields.group is None else _group(row, fields.group, where, "partition_field"))
        contexts.append(context)
        all_choices.append(choices)
    return {"context": contexts, "choices": all_choices, "label": labels, "group": groups}


def _field(row: Mapping[str, Any], name: str, where: str, key: str) -> Any:
    """``row[name]``; ``key`` is the config key that names the field, for the message."""
    if name not in row:
        present = ", ".join(sorted(map(str, row))) or "none"
        raise UserError(f"{where}: field {name!r} missing (row has: {present}); set {key} in the config")
    return row[name]


def _text(row: Mapping[str, Any], name: str, where: str, key: str) -> str:
    value = _field(row, name, where, key)
    if not isinstance(value, str):
        raise UserError(f"{where}: field {name!r} must be a string, got {_describe(value)}")
    return value


def _choices(row: Mapping[str, Any], name: str, where: str) -> list[str]:
    value = _field(row, name, where, "choices_field")
    if not isinstance(value, list):
        raise UserError(f"{where}: field {name!r} must be a list of strings, got {_describe(value)}")
    if not value:
        raise UserError(f"{where}: field {name!r} is an empty list; a row needs at least one choice")
    for position, choice in enumerate(value):
        if not isinstance(choice, str):
            raise UserError(
                f"{where}: field {name!r} choice {position} must be a string, got {_describe(choice)}"
            )
        if not choice.strip():
            raise UserError(f"{where}: field {name!r} choice {position} is empty")
    return value


_INT_TEXT = re.compile(r"-?\d+")


def _label(row: Mapping[str, Any], name: str, num_choices: int, where: str) -> int:
    value = _field(row, name, where, "label_field")
    # Raw HellaSwag stores labels as strings ("3"); any other type is a mistake.
    if isinstance(value, str) and _INT_TEXT.fullmatch(value.strip()):
        label = int(value)
    elif isinstance(value, int) and not isinstance(value, bool):
        label = value
    else:
        raise UserError(f"{where}: field {name!r} must be an integer, got {_describe(value)}")
    if not 0 <= label < num_choices:
        raise UserError(
            f"{where}: field {name!r} is {label}, outside 0..{num_choices - 1} for {num_choices} choices"
        )
    return label


def _group(row: Mapping[str, Any], name: str, where: str, key: str) -> str:
    value = _field(row, name, where, key)
    # Integer group ids (topic numbers, user ids) are common in user tasks; keep them as text
    # so the column has one type.
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        raise UserError(f"{where}: field {name!r} must be a string, got {_describe(value)}")
    return value


def _describe(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False, default=str)
    return f"{type(value).__name__} {text[:40]}{'...' if len(text) > 40 else ''}"


# HellaSwag raw -> preprocessed text. The reference files (OLMES request documents) were built
# by preprocessing "activity_label: ctx" as one string and keeping what follows ": ", so a tag
# at the very start of ctx leaves no leading space; a stand-in prefix reproduces that exactly.
# Checked against all 10,042 validation rows of the raw Hugging Face split (contexts and endings).
_QUERY_PREFIX = "x: "
_TAG = re.compile(r"\[.*?\]")


def _wikihow_clean(text: str) -> str:
    text = text.strip()
    # "[title]" starts a new sentence; only add the full stop when the text has none already.
    text = text.replace(". [title]", ". ").replace(" [title]", ". ")
    text = _TAG.sub("", text)
    return text.replace("  ", " ")


def hellaswag_context(ctx_a: str, ctx_b: str) -> str:
    """The preprocessed HellaSwag context for the raw ``ctx_a`` and ``ctx_b`` fields."""
    query = _wikihow_clean(_QUERY_PREFIX + ctx_a + " " + ctx_b.capitalize())
    return query[len(_QUERY_PREFIX) :]


def hellaswag_ending(ending: str) -> str:
    """The preprocessed text of one raw HellaSwag ending."""
    return _wikihow_clean(ending)
