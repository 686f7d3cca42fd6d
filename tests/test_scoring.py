"""Tokenisation, batching and choice scoring for encoder and causal models."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import datasets
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from fedsubspace.adapters import add_lora, lora_parameters
from fedsubspace.errors import UserError
from fedsubspace.models import LoadedModel, fetch_model, load_model
from fedsubspace.scoring import (
    Encoded,
    choice_scores,
    collate,
    encode,
    evaluate,
    example_lengths,
)

HELLASWAG = Path("/work/shared/data/hellaswag/validation.jsonl.gz")

ROWS = [
    {
        "context": "A man is sitting on a roof. He",
        "choices": ["is using wrap.", "is ripping level tiles off.", "holds a cube.", "starts."],
        "label": 3,
        "group": "roof",
    },
    {
        "context": "Hi",
        "choices": ["a", "bb b", "ccc ccc ccc", "d"],
        "label": 2,
        "group": "short",
    },
    {
        "context": "The quick brown fox jumps over the lazy dog, and then it quietly ",
        "choices": ["runs", "sleeps", "eats a very long sandwich with pickles", "flies"],
        "label": 1,
        "group": "fox",
    },
]


def _dataset(rows: list[dict[str, object]] = ROWS) -> datasets.Dataset:
    return datasets.Dataset.from_list(rows)


def _hellaswag(n: int) -> datasets.Dataset:
    rows = []
    with gzip.open(HELLASWAG, "rt") as f:
        for line in f:
            r = json.loads(line)
            rows.append({"context": r["ctx"], "choices": r["endings"], "label": int(r["label"]), "group": ""})
            if len(rows) == n:
                break
    return datasets.Dataset.from_list(rows)


@pytest.fixture(scope="module")
def tiny_causal() -> LoadedModel:
    return load_model("tiny-causal", None, device="cpu")


@pytest.fixture(scope="module")
def tiny_encoder() -> LoadedModel:
    return load_model("tiny-encoder", None, device="cpu")


def _reference_causal_scores(model: torch.nn.Module, enc: Encoded) -> torch.Tensor:
    """One unpadded forward per (context, ending): the definition of the causal score."""
    assert enc.context_ids is not None and enc.ending_ids is not None
    out = torch.zeros(len(enc), enc.num_choices)
    for i, (ctx, row) in enumerate(zip(enc.context_ids, enc.ending_ids, strict=True)):
        for c, ending in enumerate(row):
            ids = torch.tensor([ctx + ending])
            logprobs = model(input_ids=ids).logits[0].log_softmax(-1)
            n, total = len(ending), ids.shape[1]
            picked = logprobs[total - n - 1 : total - 1].gather(-1, ids[0, total - n :, None])
            out[i, c] = picked.mean()
    return out


# ---------------------------------------------------------------------------------------------
# encode / collate


def test_causal_encoding_follows_lm_eval_convention(tiny_causal: LoadedModel) -> None:
    tok = tiny_causal.tokenizer
    enc = encode(_dataset(), tok, "causal", 128)
    assert enc.context_ids is not None and enc.ending_ids is not None
    assert enc.context_ids[0][0] == tok.bos_token_id
    assert tok.decode(enc.context_ids[0], skip_special_tokens=True) == ROWS[0]["context"]
    assert tok.decode(enc.ending_ids[0][1]) == " is ripping level tiles off."
    # Trailing whitespace of the context moves into the ending instead of doubling the space.
    assert str(tok.decode(enc.context_ids[2], skip_special_tokens=True)).endswith("quietly")
    assert tok.decode(enc.ending_ids[2][0]) == " runs"
    assert enc.labels == [3, 2, 1] and enc.num_choices == 4


def test_causal_truncation_keeps_the_end_of_the_context(tiny_causal: LoadedModel) -> None:
    tok = tiny_causal.tokenizer
    enc = encode(_dataset(), tok, "causal", 40)
    assert enc.context_ids is not None and enc.ending_ids is not None
    assert max(example_lengths(enc)) <= 40
    longest_ending = max(len(e) for e in enc.ending_ids[0])
    assert len(enc.context_ids[0]) == 40 - longest_ending
    assert str(tok.decode(enc.context_ids[0])).endswith("roof. He")


def test_encoder_pairs_truncate_the_context(tiny_encoder: LoadedModel) -> None:
    tok = tiny_encoder.tokenizer
    enc = encode(_dataset(), tok, "encoder", 40)
    assert enc.input_ids is not None and enc.token_type_ids is not None
    assert max(example_lengths(enc)) <= 40
    first = enc.input_ids[0][1]
    assert first[0] == tok.cls_token_id and first[-1] == tok.sep_token_id
    assert str(tok.decode(first, skip_special_tokens=True)).endswith("is ripping level tiles off.")
    assert enc.token_type_ids[0][1][-1] == 1 and enc.token_type_ids[0][1][0] == 0


def test_an_overlong_ending_still_encodes(tiny_encoder: LoadedModel) -> None:
    rows = [{"context": "ctx", "choices": ["x" * 50, "y"], "label": 0, "group": ""}]
    enc = encode(_dataset(rows), tiny_encoder.tokenizer, "encoder", 16)
    assert max(example_lengths(enc)) <= 16


def test_encode_rejects_bad_data(tiny_encoder: LoadedModel) -> None:
    ragged = [dict(ROWS[0]), dict(ROWS[1], choices=["a", "b"])]
    with pytest.raises(UserError, match="same number of choices"):
        encode(_dataset(ragged), tiny_encoder.tokenizer, "encoder", 32)
    with pytest.raises(UserError, match="labels must be in"):
        encode(_dataset([dict(ROWS[0], label=4)]), tiny_encoder.tokenizer, "encoder", 32)
    with pytest.raises(UserError, match="unknown model kind"):
        encode(_dataset(), tiny_encoder.tokenizer, "seq2seq", 32)
    with pytest.raises(UserError, match="lacks column"):
        encode(_dataset().remove_columns("choices"), tiny_encoder.tokenizer, "encoder", 32)


def test_collate_pads_to_the_batch_longest_only(tiny_causal: LoadedModel) -> None:
    enc = encode(_dataset(), tiny_causal.tokenizer, "causal", 256)
    assert enc.context_ids is not None and enc.ending_ids is not None
    batch = collate(enc, [0, 1], "cpu")
    assert batch["context_ids"].shape == (2, len(enc.context_ids[0]))
    longest = max(len(e) for i in (0, 1) for e in enc.ending_ids[i])
    assert batch["ending_ids"].shape == (2, 4, longest)
    # Contexts are left-padded, endings right-padded.
    assert batch["context_mask"][1, -1] == 1 and batch["context_mask"][1, 0] == 0
    assert batch["ending_mask"][1, 0, 0] == 1 and batch["ending_mask"][1, 0, -1] == 0
    assert batch["labels"].tolist() == [3, 2]


# ---------------------------------------------------------------------------------------------
# scores


def test_encoder_scores_shape(tiny_encoder: LoadedModel) -> None:
    enc = encode(_dataset(), tiny_encoder.tokenizer, "encoder", 64)
    scores = choice_scores(tiny_encoder.model, collate(enc, [0, 1, 2], "cpu"), "encoder")
    assert scores.shape == (3, 4)
    assert torch.isfinite(scores).all()


@pytest.mark.parametrize("shared_context", [True, False])
def test_causal_scores_match_unbatched_reference(tiny_causal: LoadedModel, shared_context: bool) -> None:
    enc = encode(_dataset(), tiny_causal.tokenizer, "causal", 128)
    with torch.no_grad():
        reference = _reference_causal_scores(tiny_causal.model, enc)
        scores = choice_scores(
            tiny_causal.model, collate(enc, [0, 1, 2], "cpu"), "causal", shared_context=shared_context
        )
    torch.testing.assert_close(scores, reference, atol=1e-5, rtol=1e-5)


def test_single_token_endings(tiny_causal: LoadedModel) -> None:
    rows = [{"context": "Pick one:", "choices": ["a", "b", "c"], "label": 0, "group": ""}]
    enc = encode(_dataset(rows), tiny_causal.tokenizer, "causal", 32)
    assert enc.ending_ids is not None
    batch = collate(enc, [0], "cpu")
    with torch.no_grad():
        shared = choice_scores(tiny_causal.model, batch, "causal", shared_context=True)
        naive = choice_scores(tiny_causal.model, batch, "causal", shared_context=False)
    torch.testing.assert_close(shared, naive, atol=1e-5, rtol=1e-5)


texts = st.text(alphabet="abcdefgh .,éx", min_size=1, max_size=30).filter(str.strip)


@settings(max_examples=15, deadline=None)
@given(
    contexts=st.lists(texts, min_size=1, max_size=3),
    endings=st.lists(st.lists(texts, min_size=3, max_size=3), min_size=3, max_size=3),
)
def test_shared_context_equals_naive_property(contexts: list[str], endings: list[list[str]]) -> None:
    tiny = load_model("tiny-causal", None, device="cpu")
    rows = [
        {"context": c, "choices": e, "label": 0, "group": ""} for c, e in zip(contexts, endings, strict=False)
    ]
    enc = encode(_dataset(rows), tiny.tokenizer, "causal", 48)
    batch = collate(enc, list(range(len(rows))), "cpu")
    with torch.no_grad():
        shared = choice_scores(tiny.model, batch, "causal", shared_context=True)
        naive = choice_scores(tiny.model, batch, "causal", shared_context=False)
    torch.testing.assert_close(shared, naive, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("kind", "shared_context"), [("encoder", True), ("causal", True), ("causal", False)])
def test_scores_do_not_depend_on_padding(
    tiny_encoder: LoadedModel, tiny_causal: LoadedModel, kind: str, shared_context: bool
) -> None:
    loaded = tiny_encoder if kind == "encoder" else tiny_causal
    enc = encode(_dataset(), loaded.tokenizer, kind, 128)
    with torch.no_grad():
        alone = choice_scores(loaded.model, collate(enc, [1], "cpu"), kind, shared_context=shared_context)
        batched = choice_scores(
            loaded.model, collate(enc, [0, 1, 2], "cpu"), kind, shared_context=shared_context
        )
    torch.testing.assert_close(batched[1:2], alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("name", "shared_context"),
    [("tiny-encoder", True), ("tiny-causal", True), ("tiny-causal", False)],
)
def test_gradient_reaches_lora_and_head(name: str, shared_context: bool) -> None:
    loaded = load_model(name, None, device="cpu")
    model = add_lora(
        loaded.model,
        loaded.kind,
        rank=4,
        alpha=8,
        dropout=0.0,
        target_modules=loaded.target_modules,
        seed=0,
        modules_to_save=loaded.head_modules,
    )
    with torch.no_grad():  # B starts at zero, which would zero the gradient of A
        for _, b in lora_parameters(model).values():
            b.normal_(std=0.1)
    model.train()
    batch = collate(encode(_dataset(), loaded.tokenizer, loaded.kind, 64), [0, 1, 2], "cpu")
    scores = choice_scores(model, batch, loaded.kind, shared_context=shared_context)
    F.cross_entropy(scores, batch["labels"]).backward()
    for name_, (a, b) in lora_parameters(model).items():
        for p in (a, b):
            assert p.grad is not None and torch.isfinite(p.grad).all(), name_
            assert p.grad.abs().sum() > 0, name_
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert all(p.grad is not None for p in trainable)
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


def test_shared_and_naive_gradients_agree(tiny_causal: LoadedModel) -> None:
    loaded = load_model("tiny-causal", None, device="cpu")
    model = add_lora(
        loaded.model, "causal", rank=2, alpha=4, dropout=0.0, target_modules=["q_proj", "v_proj"], seed=0
    )
    with torch.no_grad():
        for _, b in lora_parameters(model).values():
            b.normal_(std=0.1)
    batch = collate(encode(_dataset(), loaded.tokenizer, "causal", 64), [0, 1, 2], "cpu")
    grads = []
    for shared in (True, False):
        model.zero_grad()
        scores = choice_scores(model, batch, "causal", shared_context=shared)
        F.cross_entropy(scores, batch["labels"]).backward()
        grads.append(
            [p.grad.clone() for pair in lora_parameters(model).values() for p in pair if p.grad is not None]
        )
    for g_shared, g_naive in zip(*grads, strict=True):
        torch.testing.assert_close(g_shared, g_naive, atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# evaluate


def test_evaluate_matches_direct_scoring_and_restores_train_mode(
    tiny_encoder: LoadedModel,
) -> None:
    model = tiny_encoder.model
    enc = encode(_dataset(), tiny_encoder.tokenizer, "encoder", 64)
    with torch.no_grad():
        model.eval()
        scores = choice_scores(model, collate(enc, [0, 1, 2], "cpu"), "encoder")
    labels = torch.tensor(enc.labels)
    model.train()
    result = evaluate(model, enc, "encoder", batch_size=2, device="cpu")
    assert model.training
    assert result.num_examples == 3
    assert result.accuracy == pytest.approx((scores.argmax(-1) == labels).float().mean().item())
    assert result.loss == pytest.approx(F.cross_entropy(scores, labels).item(), abs=1e-5)
    one_by_one = evaluate(model, enc, "encoder", batch_size=1, device="cpu", progress=True)
    assert one_by_one.loss == pytest.approx(result.loss, abs=1e-5)
    assert one_by_one.accuracy == result.accuracy


def test_evaluate_rejects_bad_arguments(tiny_causal: LoadedModel) -> None:
    enc = encode(_dataset(), tiny_causal.tokenizer, "causal", 64)
    with pytest.raises(UserError, match="batch_size"):
        evaluate(tiny_causal.model, enc, "causal", batch_size=0, device="cpu")
    with pytest.raises(UserError, match="autocast_dtype"):
        evaluate(tiny_causal.model, enc, "causal", batch_size=2, device="cpu", autocast_dtype="int8")


@pytest.mark.parametrize("kind", ["encoder", "causal"])
def test_evaluate_under_bf16_autocast_is_close(
    tiny_encoder: LoadedModel, tiny_causal: LoadedModel, kind: str
) -> None:
    loaded = tiny_encoder if kind == "encoder" else tiny_causal
    enc = encode(_dataset(), loaded.tokenizer, kind, 64)
    exact = evaluate(loaded.model, enc, kind, batch_size=2, device="cpu")
    fast = evaluate(loaded.model, enc, kind, batch_size=2, device="cpu", autocast_dtype="bfloat16")
    assert fast.loss == pytest.approx(exact.loss, abs=0.05)
    assert fast.loss != exact.loss  # autocast really ran


# ---------------------------------------------------------------------------------------------
# Real models on real HellaSwag text


@pytest.mark.slow
def test_minilm_scores_real_questions(monkeypatch: pytest.MonkeyPatch) -> None:
    fetch_model("minilm-l6")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    loaded = load_model("minilm-l6", None, device="cpu")
    enc = encode(_hellaswag(8), loaded.tokenizer, "encoder", 256)
    assert enc.token_type_ids is not None
    with torch.no_grad():
        scores = choice_scores(loaded.model, collate(enc, [0, 1, 2], "cpu"), "encoder")
    assert scores.shape == (3, 4) and torch.isfinite(scores).all()
    result = evaluate(loaded.model, enc, "encoder", batch_size=4, device="cpu")
    assert result.num_examples == 8 and 0.0 <= result.accuracy <= 1.0


@pytest.mark.slow
def test_smollm2_shared_context_equals_naive_on_real_questions(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fetch_model("smollm2-135m")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    loaded = load_model("smollm2-135m", None, device="cpu")
    enc = encode(_hellaswag(3), loaded.tokenizer, "causal", 256)
    batch = collate(enc, [0, 1, 2], "cpu")
    with torch.inference_mode():
        shared = choice_scores(loaded.model, batch, "causal", shared_context=True)
        naive = choice_scores(loaded.model, batch, "causal", shared_context=False)
    torch.testing.assert_close(shared, naive, atol=1e-4, rtol=1e-4)
    # A pretrained LM puts real probability on plausible endings.
    assert shared.max() > -5.0
