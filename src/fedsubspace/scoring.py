"""Tokenise examples once, batch them with minimal padding, and score each example's options.

Every task is scored the same way: an example has ``num_choices`` options and gets one score per
option, trained and evaluated by cross entropy over them. Multiple choice: encoders score each
(context, ending) pair with their multiple-choice head. Classification: encoders run the example's one
sequence through a sequence-classification head that gives a score per label. Causal LMs score an
option (an ending, or a label's verbalizer word) by the mean log-likelihood of its tokens given the
context; by default the context runs once per example and the options continue from its key/value cache.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import datasets
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from fedsubspace.autocast import AUTOCAST_DTYPES, autocast
from fedsubspace.errors import UserError


@dataclass
class Encoded:
    """Token ids of every question, made once per run.

    Encoder: ``input_ids[i][c]`` is the (context, ending c) pair with special tokens, and
    ``token_type_ids`` matches it when the tokenizer has segment ids. Causal: ``context_ids[i]``
    and ``ending_ids[i][c]``, to be concatenated. With ``sequence_head`` (encoder classification)
    ``input_ids[i]`` holds the example's one sequence and the model's head scores the labels.
    """

    kind: str
    labels: list[int]
    num_choices: int
    pad_token_id: int
    input_ids: list[list[list[int]]] | None = None
    token_type_ids: list[list[list[int]]] | None = None
    context_ids: list[list[int]] | None = None
    ending_ids: list[list[list[int]]] | None = None
    sequence_head: bool = False

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def rows_per_example(self) -> int:
        """Rows the model scores for one example: one sequence under a sequence head, one per choice
        otherwise (encoders score (B, C, L) as B * C sequences; causal models without the shared context
        cache run one context+ending row per choice)."""
        return 1 if self.sequence_head else self.num_choices


@dataclass(frozen=True)
class ExamplePredictions:
    """Per-example outcome of one evaluation, in the evaluation set's order: what a paired comparison of
    two models on the same questions needs (predicted index, label, cross-entropy loss)."""

    predicted: list[int]
    labels: list[int]
    losses: list[float]

    def __len__(self) -> int:
        return len(self.labels)

    def correct(self) -> list[bool]:
        return [p == y for p, y in zip(self.predicted, self.labels, strict=True)]


@dataclass(frozen=True)
class EvalResult:
    loss: float
    accuracy: float
    num_examples: int
    examples: ExamplePredictions | None = field(default=None, compare=False, repr=False)

    def totals(self) -> dict[str, float]:
        """The three numbers a run's progress and metrics keep (JSON-ready)."""
        return {"loss": self.loss, "accuracy": self.accuracy, "num_examples": self.num_examples}


def result_from_scores(scores: Tensor, labels: Tensor) -> EvalResult:
    """An evaluation's result from its per-example scores (N x C, higher is better) and labels: the one
    place every scorer's numbers come from, so the totals are always those of the per-example record."""
    n = len(labels)
    if n == 0:
        return EvalResult(loss=float("nan"), accuracy=float("nan"), num_examples=0)
    predicted = scores.argmax(-1)
    return EvalResult(
        loss=F.cross_entropy(scores, labels).item(),
        accuracy=int((predicted == labels).sum()) / n,
        num_examples=n,
        examples=ExamplePredictions(
            predicted=predicted.tolist(),
            labels=labels.tolist(),
            losses=F.cross_entropy(scores, labels, reduction="none").tolist(),
        ),
    )


def encode(
    dataset: datasets.Dataset,
    tokenizer: PreTrainedTokenizerBase,
    kind: str,
    max_length: int,
) -> Encoded:
    """Tokenise ``context``/``choices``/``label`` columns; sequences never exceed ``max_length``."""
    missing = {"context", "choices", "label"} - set(dataset.column_names)
    if missing:
        raise UserError(f"the dataset lacks column(s) {', '.join(sorted(missing))}")
    # Slicing reads each column in one go; iterating a column reads it row by row.
    columns = dataset.select_columns(["context", "choices", "label"])[:]
    contexts: list[str] = columns["context"]
    choices: list[list[str]] = columns["choices"]
    labels = [int(label) for label in columns["label"]]
    num_choices = _check_choices(choices, labels)
    pad = tokenizer.pad_token_id
    if pad is None:
        raise UserError("the tokenizer has no pad token")
    if kind == "encoder":
        input_ids, token_type_ids = _encode_pairs(tokenizer, contexts, choices, max_length)
        return Encoded(kind, labels, num_choices, pad, input_ids, token_type_ids)
    if kind == "causal":
        context_ids, ending_ids = _encode_continuations(tokenizer, contexts, choices, max_length)
        return Encoded(kind, labels, num_choices, pad, context_ids=context_ids, ending_ids=ending_ids)
    raise UserError(f"unknown model kind {kind!r} (use encoder or causal)")


def encode_classification(
    dataset: datasets.Dataset,
    tokenizer: PreTrainedTokenizerBase,
    kind: str,
    max_length: int,
    label_words: Sequence[str],
) -> Encoded:
    """Tokenise ``text``/``text_pair``/``label`` columns of a classification table.

    Encoder: one sequence per example (the pair with special tokens), scored by a sequence-classification
    head over ``len(label_words)`` labels. Causal: the text is the context and label ``k`` is scored by
    the likelihood of ``label_words[k]`` continuing it, exactly as written (e.g. ``" positive"``).
    """
    columns = dataset.select_columns(["text", "text_pair", "label"])[:]
    texts: list[str] = columns["text"]
    pairs: list[str | None] = columns["text_pair"]
    labels = [int(label) for label in columns["label"]]
    num_labels = len(label_words)
    if any(not 0 <= label < num_labels for label in labels):
        raise UserError(f"labels must be in [0, {num_labels}) (the number of label words)")
    pad = tokenizer.pad_token_id
    if pad is None:
        raise UserError("the tokenizer has no pad token")
    if kind == "encoder":
        has_pairs = any(pair is not None for pair in pairs)
        enc = tokenizer(
            texts,
            [pair or "" for pair in pairs] if has_pairs else None,
            truncation=True,
            max_length=max_length,
        )
        types = enc.get("token_type_ids")
        return Encoded(
            kind,
            labels,
            num_labels,
            pad,
            input_ids=[[ids] for ids in enc["input_ids"]],
            token_type_ids=None if types is None else [[ids] for ids in types],
            sequence_head=True,
        )
    if kind == "causal":
        if max_length < 2:
            raise UserError("max_length must be at least 2 for causal scoring")
        # Trailing whitespace would double the space a label word starts with.
        contexts = [
            (text if pair is None else f"{text.rstrip()}\n{pair}").rstrip()
            for text, pair in zip(texts, pairs, strict=True)
        ]
        prefix = _leading_special_ids(tokenizer)
        context_ids = [prefix + ids for ids in tokenizer(contexts, add_special_tokens=False)["input_ids"]]
        words = [
            ids[: max_length - 1]
            for ids in tokenizer(list(label_words), add_special_tokens=False)["input_ids"]
        ]
        if not all(words):
            raise UserError("a label word tokenises to nothing; give each label a non-empty word")
        budget = max_length - max(len(w) for w in words)
        context_ids = [ids[-budget:] for ids in context_ids]  # keep the end, which the words continue
        if any(not ctx for ctx in context_ids):
            raise UserError("a text tokenises to nothing; drop empty texts")
        return Encoded(
            kind, labels, num_labels, pad, context_ids=context_ids, ending_ids=[words] * len(labels)
        )
    raise UserError(f"unknown model kind {kind!r} (use encoder or causal)")


def _check_choices(choices: list[list[str]], labels: list[int]) -> int:
    counts = {len(c) for c in choices}
    if len(counts) > 1:
        raise UserError(f"every question needs the same number of choices, got {sorted(counts)}")
    num_choices = counts.pop() if counts else 0
    if any(not 0 <= label < num_choices for label in labels):
        raise UserError(f"labels must be in [0, {num_choices}) (the number of choices)")
    return num_choices


def _encode_pairs(
    tokenizer: PreTrainedTokenizerBase,
    contexts: list[str],
    choices: list[list[str]],
    max_length: int,
) -> tuple[list[list[list[int]]], list[list[list[int]]] | None]:
    firsts = [ctx for ctx, endings in zip(contexts, choices, strict=True) for _ in endings]
    seconds = [ending for endings in choices for ending in endings]
    try:
        enc = tokenizer(firsts, seconds, truncation="only_first", max_length=max_length)
    except Exception:
        # The fast tokenizer rejects the whole batch when one ending alone overflows
        # max_length; only those rare pairs give up on keeping the ending whole.
        enc = _encode_pairs_one_by_one(tokenizer, firsts, seconds, max_length)
    n = len(choices[0]) if choices else 0
    ids = [enc["input_ids"][i : i + n] for i in range(0, len(firsts), n)]
    types = enc.get("token_type_ids")
    if types is None:
        return ids, None
    return ids, [types[i : i + n] for i in range(0, len(firsts), n)]


def _encode_pairs_one_by_one(
    tokenizer: PreTrainedTokenizerBase, firsts: list[str], seconds: list[str], max_length: int
) -> dict[str, list[list[int]]]:
    out: dict[str, list[list[int]]] = {}
    for first, second in zip(firsts, seconds, strict=True):
        try:
            one = tokenizer(first, second, truncation="only_first", max_length=max_length)
        except Exception:
            one = tokenizer(first, second, truncation="longest_first", max_length=max_length)
        for key in ("input_ids", "token_type_ids"):
            if key in one:
                out.setdefault(key, []).append(one[key])
    return out


def _encode_continuations(
    tokenizer: PreTrainedTokenizerBase,
    contexts: list[str],
    choices: list[list[str]],
    max_length: int,
) -> tuple[list[list[int]], list[list[list[int]]]]:
    if max_length < 2:
        raise UserError("max_length must be at least 2 for causal scoring")
    # lm-eval-harness convention: the ending starts with the space that separates it from the
    # context, and trailing whitespace of the context moves into the ending.
    stripped = [ctx.rstrip() for ctx in contexts]
    endings = [
        ctx[len(s) :] + ("" if ctx[len(s) :] else " ") + ending
        for ctx, s, row in zip(contexts, stripped, choices, strict=True)
        for ending in row
    ]
    prefix = _leading_special_ids(tokenizer)
    context_ids = [prefix + ids for ids in tokenizer(stripped, add_special_tokens=False)["input_ids"]]
    flat_endings = tokenizer(endings, add_special_tokens=False)["input_ids"]
    n = len(choices[0]) if choices else 0
    ending_ids: list[list[list[int]]] = []
    for i, ctx in enumerate(context_ids):
        row = [e[: max_length - 1] for e in flat_endings[i * n : (i + 1) * n]]
        # Keep the end of the context, which is what the endings continue from.
        budget = max_length - max(len(e) for e in row)
        context_ids[i] = ctx[-budget:] if len(ctx) > budget else ctx
        ending_ids.append(row)
    if any(not ctx for ctx in context_ids) or any(not e for row in ending_ids for e in row):
        raise UserError("a context or an ending tokenises to nothing; drop empty texts")
    return context_ids, ending_ids


def _leading_special_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """What the tokenizer puts before a text (e.g. BOS for Llama), without any trailing EOS."""
    with_special = tokenizer("a")["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    for start in range(len(with_special) - len(plain) + 1):
        if with_special[start : start + len(plain)] == plain:
            return list(with_special[:start])
    return []


def example_lengths(encoded: Encoded) -> list[int]:
    """Padded length each question needs (its longest choice), for sorting into batches."""
    if encoded.kind == "encoder":
        assert encoded.input_ids is not None
        return [max(len(c) for c in row) for row in encoded.input_ids]
    assert encoded.context_ids is not None and encoded.ending_ids is not None
    return [
        len(ctx) + max(len(e) for e in row)
        for ctx, row in zip(encoded.context_ids, encoded.ending_ids, strict=True)
    ]


def _pad(rows: Sequence[Sequence[int]], value: int, *, left: bool = False) -> tuple[Tensor, Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), value, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(width - len(row), width) if left else slice(0, len(row))
        ids[i, span] = torch.tensor(row, dtype=torch.long)
        mask[i, span] = 1
    return ids, mask


def collate(encoded: Encoded, indices: Sequence[int], device: torch.device | str) -> dict[str, Tensor]:
    """Tensors for the questions ``indices``, padded to this batch's longest sequence only.

    Encoder: ``input_ids``/``attention_mask`` (and ``token_type_ids``) of shape (B, C, L), or (B, L)
    for a sequence head. Causal: ``context_ids``/``context_mask`` (B, Lc), left-padded so every
    context ends at the same column, and ``ending_ids``/``ending_mask`` (B, C, Le), right-padded.
    """
    b, c = len(indices), encoded.num_choices
    batch: dict[str, Tensor] = {"labels": torch.tensor([encoded.labels[i] for i in indices])}
    if encoded.kind == "encoder":
        assert encoded.input_ids is not None
        # A sequence head reads one sequence per example: the (B, L) shape it expects.
        shape = (b, -1) if encoded.sequence_head else (b, c, -1)
        ids, mask = _pad([row for i in indices for row in encoded.input_ids[i]], encoded.pad_token_id)
        batch["input_ids"], batch["attention_mask"] = ids.view(shape), mask.view(shape)
        if encoded.token_type_ids is not None:
            types, _ = _pad([row for i in indices for row in encoded.token_type_ids[i]], 0)
            batch["token_type_ids"] = types.view(shape)
    else:
        assert encoded.context_ids is not None and encoded.ending_ids is not None
        ctx, ctx_mask = _pad([encoded.context_ids[i] for i in indices], encoded.pad_token_id, left=True)
        ends, end_mask = _pad([e for i in indices for e in encoded.ending_ids[i]], encoded.pad_token_id)
        batch["context_ids"], batch["context_mask"] = ctx, ctx_mask
        batch["ending_ids"], batch["ending_mask"] = ends.view(b, c, -1), end_mask.view(b, c, -1)
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def choice_scores(
    model: nn.Module, batch: dict[str, Tensor], kind: str, *, shared_context: bool = True
) -> Tensor:
    """Scores (B, C), higher is better, differentiable: train with cross entropy over choices.

    Encoder: the head's logits (multiple choice: one per choice; sequence classification: one per
    label). Causal: mean log-likelihood of each ending's tokens given
    the context. ``shared_context=False`` runs each context+ending row in full (the naive way,
    kept to measure the speed-up and to check the cached path against).
    """
    if kind == "encoder":
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}
        return model(**inputs).logits
    if kind != "causal":
        raise UserError(f"unknown model kind {kind!r} (use encoder or causal)")
    if shared_context:
        token_logprobs = _ending_logprobs_shared(model, batch)
    else:
        token_logprobs = _ending_logprobs_naive(model, batch)
    mask = batch["ending_mask"].flatten(0, 1).bool()
    b, c = batch["ending_ids"].shape[:2]
    # where, not multiply: a padded column may hold a non-finite value that 0 * x keeps.
    total = torch.where(mask, token_logprobs, 0.0).sum(-1)
    return (total / mask.sum(-1)).view(b, c)


def _positions(mask: Tensor) -> Tensor:
    """Position ids that skip left padding (pads get 0; they are masked anyway)."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


def _token_logprobs(logits: Tensor, targets: Tensor) -> Tensor:
    """log softmax(logits)[target] without materialising the full log-softmax."""
    logits = logits.float()
    picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return picked - logits.logsumexp(-1)


def _ending_logprobs_shared(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """(B*C, Le) log-probs of ending tokens: context once, endings from its expanded cache."""
    ctx, ctx_mask = batch["context_ids"], batch["context_mask"]
    ends, end_mask = batch["ending_ids"], batch["ending_mask"]
    b, c, le = ends.shape
    ends, end_mask = ends.reshape(b * c, le), end_mask.reshape(b * c, le)

    out = model(
        input_ids=ctx,
        attention_mask=ctx_mask,
        position_ids=_positions(ctx_mask),
        use_cache=True,
        logits_to_keep=1,  # only the last context column predicts an ending token
    )
    first = _token_logprobs(out.logits[:, -1].repeat_interleave(c, dim=0), ends[:, 0])
    if le == 1:
        return first.unsqueeze(-1)

    cache = out.past_key_values
    cache.batch_repeat_interleave(c)
    ctx_len = ctx_mask.sum(-1, keepdim=True).repeat_interleave(c, dim=0)
    out = model(
        input_ids=ends[:, :-1],  # the last ending token predicts nothing we score
        attention_mask=torch.cat([ctx_mask.repeat_interleave(c, dim=0), end_mask[:, :-1]], -1),
        position_ids=ctx_len + torch.arange(le - 1, device=ends.device),
        past_key_values=cache,
        use_cache=True,
    )
    rest = _token_logprobs(out.logits, ends[:, 1:])
    return torch.cat([first.unsqueeze(-1), rest], -1)


def _ending_logprobs_naive(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """(B*C, Le) log-probs of ending tokens from full context+ending rows, left-padded."""
    ctx, ctx_mask = batch["context_ids"], batch["context_mask"]
    ends, end_mask = batch["ending_ids"], batch["ending_mask"]
    b, c, le = ends.shape
    ends, end_mask = ends.reshape(b * c, le), end_mask.reshape(b * c, le)
    ids = torch.cat([ctx.repeat_interleave(c, dim=0), ends], -1)
    mask = torch.cat([ctx_mask.repeat_interleave(c, dim=0), end_mask], -1)
    # Rotate each row's right padding (after a short ending) to the front, so every row is a
    # contiguous left-padded sequence whose ending fills its last len(ending) columns.
    width = ids.shape[1]
    shift = le - end_mask.sum(-1, keepdim=True)
    gather = (torch.arange(width, device=ids.device) - shift) % width
    ids, mask = ids.gather(1, gather), mask.gather(1, gather)

    out = model(
        input_ids=ids,
        attention_mask=mask,
        position_ids=_positions(mask),
        use_cache=False,
        logits_to_keep=le + 1,
    )
    # Kept column j predicts token width - le + j, so each ending sits right-aligned; rotate
    # back to the left-aligned layout of ending_mask.
    right_aligned = _token_logprobs(out.logits[:, :-1], ids[:, width - le :])
    return right_aligned.gather(1, (torch.arange(le, device=ids.device) + shift) % le)


def evaluate(
    model: nn.Module,
    encoded: Encoded,
    kind: str,
    *,
    batch_size: int,
    device: torch.device | str,
    progress: bool = False,
    shared_context: bool = True,
    autocast_dtype: str | None = None,
) -> EvalResult:
    """Mean cross-entropy over choices and accuracy, in length-sorted batches.

    ``batch_size`` counts questions. Encoders batch ``batch_size * num_choices`` single
    sequences sorted by their own length, which pads less than whole questions would.
    ``autocast_dtype`` ("bfloat16" or "float16") runs the forward passes under
    ``torch.autocast``: about 2x faster on CPUs with bf16 instructions, not bit-exact.
    """
    if batch_size < 1:
        raise UserError(f"batch_size must be at least 1, got {batch_size}")
    if autocast_dtype not in (None, *AUTOCAST_DTYPES):
        raise UserError(f"unknown autocast_dtype {autocast_dtype!r} (use {' or '.join(AUTOCAST_DTYPES)})")
    n = len(encoded)
    if n == 0:
        return EvalResult(loss=float("nan"), accuracy=float("nan"), num_examples=0)
    was_training = model.training
    model.eval()
    try:
        with (
            torch.inference_mode(),
            autocast(device, autocast_dtype),
            tqdm(total=n, desc="eval", unit="q", disable=not progress, leave=False) as bar,
        ):
            if kind == "encoder" and not encoded.sequence_head:
                scores = _encoder_scores_by_sequence(model, encoded, batch_size, device, bar)
            else:
                scores = _scores_by_question(model, encoded, kind, batch_size, device, bar, shared_context)
    finally:
        model.train(was_training)
    return result_from_scores(scores, torch.tensor(encoded.labels))


def _scores_by_question(
    model: nn.Module,
    encoded: Encoded,
    kind: str,
    batch_size: int,
    device: torch.device | str,
    bar: tqdm,
    shared_context: bool,
) -> Tensor:
    lengths = example_lengths(encoded)
    # Longest first: similar lengths share a batch, and peak memory shows at once.
    order = sorted(range(len(encoded)), key=lambda i: -lengths[i])
    scores = torch.empty(len(encoded), encoded.num_choices)
    for start in range(0, len(order), batch_size):
        indices = order[start : start + batch_size]
        batch = collate(encoded, indices, device)
        scores[indices] = choice_scores(model, batch, kind, shared_context=shared_context).float().cpu()
        bar.update(len(indices))
    return scores


def _encoder_scores_by_sequence(
    model: nn.Module, encoded: Encoded, batch_size: int, device: torch.device | str, bar: tqdm
) -> Tensor:
    """Multiple-choice models flatten (B, C, L) to B*C sequences and score each on its own, so a
    (1, N, L) input scores N sequences from any questions, each padded only to its batch."""
    assert encoded.input_ids is not None
    c = encoded.num_choices
    flat = [seq for row in encoded.input_ids for seq in row]
    flat_types = (
        [seq for row in encoded.token_type_ids for seq in row] if encoded.token_type_ids is not None else None
    )
    order = sorted(range(len(flat)), key=lambda j: -len(flat[j]))
    scores = torch.empty(len(flat))
    step = batch_size * c
    for start in range(0, len(order), step):
        chunk = order[start : start + step]
        ids, mask = _pad([flat[j] for j in chunk], encoded.pad_token_id)
        inputs = {"input_ids": ids[None].to(device), "attention_mask": mask[None].to(device)}
        if flat_types is not None:
            inputs["token_type_ids"] = _pad([flat_types[j] for j in chunk], 0)[0][None].to(device)
        scores[chunk] = model(**inputs).logits[0].float().cpu()
        bar.update(len(chunk) // c)  # chunks hold whole multiples of c sequences
    return scores.view(-1, c)
