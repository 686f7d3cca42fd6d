"""The classification task type: loading and its mistakes, the sequence head and the verbalizer against
hand-computed scores, label-Dirichlet partitions, and every method end to end on both tiny presets."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import METRIC_KEYS, ROOT, assert_same_rows, run_flower_in_process
from transformers import AutoModelForSequenceClassification

from fedsubspace import simulation
from fedsubspace.cli import main
from fedsubspace.configure import load_config
from fedsubspace.data import ClassificationFields, load_classification, partition_indices, partition_stats
from fedsubspace.errors import UserError
from fedsubspace.methods import METHODS
from fedsubspace.models import EncoderHead, load_model
from fedsubspace.results import read_metrics
from fedsubspace.scoring import choice_scores, collate, encode_classification, evaluate
from fedsubspace.state import load_state

SST2 = ROOT / "tests" / "fixtures" / "sst2"
NAMES = ["negative", "positive"]
# These runs check plumbing, not learning.
FAST = ["max_eval_samples=16", "max_local_steps=2"]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def sst2_config(preset: str, method: str, *overrides: str):
    return load_config(
        ROOT / "configs" / f"{preset}-sst2.yaml", [f"dataset={SST2}", *FAST, *overrides], method=method
    )


# --- loading ----------------------------------------------------------------------------------------


def test_the_fixture_loads_with_its_label_names_and_a_label_histogram_per_client():
    train = load_classification(str(SST2), "train", ClassificationFields(group="label"), NAMES)
    assert train.num_rows == 200 and train.features["label"].names == NAMES
    assert sorted(set(train["label"])) == [0, 1] and set(train["group"]) == {"0", "1"}
    assert train["text_pair"] == [None] * 200
    parts = partition_indices(train, 4, scheme="dirichlet", by="group", alpha=0.5, min_partition_size=5)
    stats = partition_stats(train, parts, scheme="dirichlet", alpha=0.5)
    assert stats["label_names"] == NAMES
    labels = train["label"]
    for client, rows in zip(stats["clients"], parts, strict=True):
        assert client["label_histogram"] == [sum(labels[i] == k for i in rows) for k in range(2)]
    assert sum(sum(c["label_histogram"]) for c in stats["clients"]) == 200


def test_labels_may_be_names_or_indices_and_a_pair_field_is_read(tmp_path):
    rows = [
        {"premise": "a", "hypothesis": "b", "gold": "entailment"},
        {"premise": "c", "hypothesis": "d", "gold": 2},
        {"premise": "e", "hypothesis": "f", "gold": "neutral"},
    ]
    fields = ClassificationFields(text="premise", text_pair="hypothesis", label="gold")
    table = load_classification(
        str(write_jsonl(tmp_path / "nli.jsonl", rows)),
        "train",
        fields,
        ["entailment", "neutral", "contradiction"],
    )
    assert table["label"] == [0, 2, 1] and table["text_pair"] == ["b", "d", "f"]
    assert table["group"] == ["", "", ""]  # no partition key read


@pytest.mark.parametrize(
    ("row", "message"),
    [
        (
            {"sentence": "fine", "label": "neutral"},
            r"x\.jsonl:2: field 'label' is str \"neutral\", not one of label_names",
        ),
        ({"sentence": "fine", "label": 2}, r"x\.jsonl:2: field 'label' is int 2, not one of label_names"),
        (
            {"text": "fine", "label": 1},
            r"x\.jsonl:2: field 'sentence' missing \(row has: label, text\); set text_field",
        ),
        ({"sentence": 3, "label": 1}, r"x\.jsonl:2: field 'sentence' must be a string"),
    ],
)
def test_a_bad_row_is_named_with_its_line_and_the_config_key(tmp_path, row, message):
    path = write_jsonl(tmp_path / "x.jsonl", [{"sentence": "good", "label": 0}, row])
    with pytest.raises(UserError, match=message):
        load_classification(str(path), "train", ClassificationFields(), NAMES)


def test_a_dataset_with_one_class_is_refused(tmp_path):
    path = write_jsonl(
        tmp_path / "x.jsonl", [{"sentence": "good", "label": 1}, {"sentence": "fine", "label": 1}]
    )
    with pytest.raises(
        UserError, match=r"every row has label 'positive'; classification needs rows of at least 2"
    ):
        load_classification(str(path), "train", ClassificationFields(), NAMES)


def test_a_dirichlet_split_that_leaves_a_client_without_examples_is_refused():
    train = load_classification(str(SST2), "train", ClassificationFields(group="label"), NAMES)
    with pytest.raises(UserError, match=r"keeps leaving a client below min_partition_size=1 .*got 0 rows"):
        partition_indices(train, 60, scheme="dirichlet", by="group", alpha=0.05, min_partition_size=1)


def test_config_mistakes_are_one_line_before_any_work(tmp_path, capsys):
    config = ROOT / "configs" / "tiny-encoder-sst2.yaml"
    for override, message in [
        ("label_names=[positive]", "task classification needs label_names: at least 2 distinct names"),
        ("label_words=[' bad']", "label_words must give one non-empty word per label name (2)"),
        ("task=regression", "unknown task 'regression'; choose one of: multiple_choice, classification"),
    ]:
        assert main(["run", "--config", str(config), "--set", override, "--out", str(tmp_path / "r")]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and message in err, err
        assert not (tmp_path / "r").exists()


def test_the_partition_field_is_named_by_its_config_key_and_not_needed_for_iid(tmp_path, capsys):
    config = ROOT / "configs" / "tiny-encoder-sst2.yaml"
    out = tmp_path / "r"
    args = ["run", "--config", str(config), "--set", f"dataset={SST2}", *(f"--set={o}" for o in FAST)]
    assert main([*args, "--set", "partition_field=topic", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "field 'topic' missing (row has: label, sentence); set partition_field in the config" in err
    assert main([*args, "--set", "partition_field=topic", "--set", "partition=iid", "--out", str(out)]) == 0


def test_a_multiple_choice_task_split_iid_needs_no_partition_field(tmp_path):
    rows = [{"question": f"q{i}", "options": ["a", "b"], "answer": i % 2} for i in range(12)]
    write_jsonl(tmp_path / "train.jsonl", rows)
    write_jsonl(tmp_path / "validation.jsonl", rows[:4])
    overrides = [
        f"dataset={tmp_path}", "partition=iid", "context_field=question", "choices_field=options",
        "label_field=answer", "num_clients=2", "min_partition_size=1", *FAST,
    ]  # fmt: skip
    config = load_config(ROOT / "configs" / "tiny-encoder.yaml", overrides, method="fedavg")
    simulation.run(config, tmp_path / "run", progress=False)
    assert [r["round"] for r in read_metrics(tmp_path / "run")] == [1, 2]


# --- scoring ----------------------------------------------------------------------------------------


class FirstByteHead(torch.nn.Module):
    """A stand-in sequence classifier whose logits depend only on the text's first byte: 'a' -> (2, 0),
    'b' -> (0, 1); padding after the text must not change them."""

    def __init__(self, a: int, b: int) -> None:
        super().__init__()
        self.a, self.b = a, b

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        first = input_ids[:, 1]  # after [CLS]
        logits = torch.zeros(len(first), 2)
        logits[first == self.a] = torch.tensor([2.0, 0.0])
        logits[first == self.b] = torch.tensor([0.0, 1.0])
        return SimpleNamespace(logits=logits)


def test_the_sequence_head_scores_match_a_hand_computed_example():
    tokenizer = load_model("tiny-encoder", None, device="cpu").tokenizer
    table = load_classification_rows(["a short one", "b", "a much longer text than the others"], [0, 1, 1])
    encoded = encode_classification(table, tokenizer, "encoder", 64, [" negative", " positive"])
    assert encoded.sequence_head and encoded.num_choices == 2
    assert encoded.input_ids is not None and encoded.input_ids[1] == [tokenizer("b")["input_ids"]]
    head = FirstByteHead(*tokenizer.convert_tokens_to_ids(["a", "b"]))
    result = evaluate(head, encoded, "encoder", batch_size=2, device="cpu")
    # cross entropy by hand: log(1 + e^-2), log(1 + e^-1), 2 + log(1 + e^-2)
    losses = [math.log1p(math.exp(-2)), math.log1p(math.exp(-1)), 2 + math.log1p(math.exp(-2))]
    assert result.loss == pytest.approx(sum(losses) / 3, rel=1e-6)
    assert result.accuracy == pytest.approx(2 / 3) and result.num_examples == 3


def load_classification_rows(texts: list[str], labels: list[int], pairs: list[str | None] | None = None):
    import datasets

    from fedsubspace.data.classification import features

    columns = {
        "text": texts,
        "text_pair": pairs or [None] * len(texts),
        "label": labels,
        "group": [""] * len(texts),
    }
    return datasets.Dataset.from_dict(columns, features=features(NAMES))


def test_a_real_sequence_head_scores_each_example_as_it_would_alone():
    loaded = load_model(
        "tiny-encoder", None, device="cpu", encoder_head=EncoderHead(AutoModelForSequenceClassification, 2)
    )
    texts, pairs = ["a short one", "b", "a much longer text"], ["x", "yy", "z"]
    table = load_classification_rows(texts, [0, 1, 1], pairs)
    encoded = encode_classification(table, loaded.tokenizer, "encoder", 64, ["n", "p"])
    batch = collate(encoded, [0, 1, 2], "cpu")
    assert batch["input_ids"].shape[:1] == (3,) and batch["input_ids"].dim() == 2
    with torch.no_grad():
        scores = choice_scores(loaded.model, batch, "encoder")
        for i, (text, pair) in enumerate(zip(texts, pairs, strict=True)):
            alone = loaded.model(**loaded.tokenizer(text, pair, return_tensors="pt")).logits[0]
            torch.testing.assert_close(scores[i], alone, atol=1e-5, rtol=1e-5)


def test_the_verbalizer_scores_the_label_words_by_their_mean_log_likelihood_after_the_text():
    loaded = load_model("tiny-causal", None, device="cpu")
    tokenizer, model = loaded.tokenizer, loaded.model
    words = [" bad", " good!"]
    texts = ["it is fine . ", "no"]  # the trailing space must not double the word's leading one
    encoded = encode_classification(load_classification_rows(texts, [1, 0]), tokenizer, "causal", 64, words)
    assert encoded.ending_ids == [[tokenizer(w, add_special_tokens=False)["input_ids"] for w in words]] * 2
    with torch.no_grad():
        scores = choice_scores(model, collate(encoded, [0, 1], "cpu"), "causal")
        for i, text in enumerate(texts):
            for k, word in enumerate(words):
                ids = tokenizer(text.rstrip() + word)["input_ids"]  # BOS, text, word
                word_len = len(tokenizer(word, add_special_tokens=False)["input_ids"])
                logprobs = model(torch.tensor([ids])).logits[0].log_softmax(-1)
                by_hand = (
                    sum(logprobs[t - 1, ids[t]] for t in range(len(ids) - word_len, len(ids))) / word_len
                )
                assert float(scores[i, k]) == pytest.approx(float(by_hand), abs=1e-5)


# --- end to end -------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", ["tiny-encoder", "tiny-causal"])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_runs_two_rounds_on_the_classification_fixture(tmp_path, preset, method):
    config = sst2_config(preset, method)
    simulation.run(config, tmp_path, progress=False)
    rows = read_metrics(tmp_path)
    assert [r["round"] for r in rows] == [1, 2]
    for row in rows:
        assert METRIC_KEYS <= set(row)
        assert 0.0 <= row["eval_accuracy"] <= 1.0 and math.isfinite(row["eval_loss"])
    stats = json.loads((tmp_path / "partition_stats.json").read_text())
    assert stats["label_names"] == NAMES and all(len(c["label_histogram"]) == 2 for c in stats["clients"])
    head = load_state(tmp_path / "checkpoints" / "last.safetensors").head
    if preset == "tiny-encoder" and method != "fedsa":  # fedsa keeps the head on the clients
        assert head["classifier.weight"].shape == (2, 32)  # one row per label
    if preset == "tiny-causal":
        assert head == {}


@pytest.mark.timeout(300)
@pytest.mark.usefixtures("one_experiment_per_config")
@pytest.mark.parametrize(("preset", "method"), [("tiny-encoder", "svd"), ("tiny-causal", "fedavg")])
def test_the_flower_runner_gives_the_in_process_numbers_on_classification(tmp_path, preset, method):
    config = sst2_config(preset, method)
    simulation.run(config, tmp_path / "in-process", progress=False)
    run_flower_in_process(config, tmp_path / "flower")
    assert_same_rows(read_metrics(tmp_path / "flower"), read_metrics(tmp_path / "in-process"))
    assert (tmp_path / "flower" / "partition_stats.json").read_text() == (
        tmp_path / "in-process" / "partition_stats.json"
    ).read_text()


def test_data_fetch_sst2_copies_a_local_copy_and_without_the_hub_says_what_to_do(
    tmp_path, capsys, monkeypatch
):
    import gzip

    import datasets

    dest = tmp_path / "sst2"
    assert main(["data", "fetch", "sst2", "--from", str(SST2), "--dest", str(dest)]) == 0
    with gzip.open(dest / "train.jsonl.gz", "rt") as handle:
        assert handle.read() == (SST2 / "train.jsonl").read_text()

    def offline(*args, **kwargs):
        raise ConnectionError("no route to huggingface.co\nmore detail")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    capsys.readouterr()
    assert main(["data", "fetch", "sst2", "--dest", str(tmp_path / "elsewhere")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "cannot load glue/sst2 from the Hugging Face hub" in err
    assert "--from DIR" in err and not (tmp_path / "elsewhere").exists()


def test_the_report_draws_each_clients_label_histogram(tmp_path):
    from fedsubspace.experiments.report import write_report

    for method in ("fedavg", "svd"):
        simulation.run(
            sst2_config("tiny-encoder", method), tmp_path / "toy" / method / "seed42", progress=False
        )
    out = write_report(tmp_path)
    page = (out / "index.html").read_text()
    assert "<img src='toy-partition.png'" in page
    assert (out / "toy-partition.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
