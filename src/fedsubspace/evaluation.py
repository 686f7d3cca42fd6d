"""``fedsubspace eval``: score a trained model (a run, an export, or the base model) on any split the
project can load, with the scoring the runs use (:func:`fedsubspace.scoring.evaluate`).

The evaluation data, batch size, sequence length and device come from the config given; the model from
the target: a results directory (its ``--round`` checkpoint rebuilt), an export directory (a PEFT adapter
on the base model its run config names, or a merged model), or ``--base``, the config's own model before
any training. A model is refused on data whose number of choices (or labels) differs from what it was
trained on: its head scores that set, and a score over another set would not mean what it says.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peft import PeftModel
from torch import nn
from transformers import PreTrainedTokenizerBase

from fedsubspace.config import ExperimentConfig
from fedsubspace.errors import UserError
from fedsubspace.experiment import encode_split, load_eval_split
from fedsubspace.export import RUN_CONFIG
from fedsubspace.models import load_model, resolve_device
from fedsubspace.scoring import Encoded, evaluate
from fedsubspace.trained import factors_at_rank, load_base, open_run, read_config, rebuild


@dataclass
class ScoringModel:
    """A model ready to score, with its tokenizer, kind, and the config it was trained with (None: base)."""

    model: nn.Module
    tokenizer: PreTrainedTokenizerBase
    kind: str
    description: str
    trained_with: ExperimentConfig | None


def _base(config: ExperimentConfig, device: str) -> ScoringModel:
    loaded = load_base(config, device)
    return ScoringModel(loaded.model, loaded.tokenizer, loaded.kind, f"base model {config.model}", None)


def _from_run(path: Path, which: str, rank: int | None, device: str) -> ScoringModel:
    run = open_run(path)
    state = run.checkpoint(which)
    trained = rebuild(run.config, state, factors_at_rank(run.config, state, rank), device=device)
    loaded = trained.loaded
    description = f"{path} ({which} checkpoint, round {state.round})"
    return ScoringModel(trained.peft_model, loaded.tokenizer, loaded.kind, description, run.config)


def _from_export(path: Path, config: ExperimentConfig, device: str) -> ScoringModel:
    trained_with = read_config(path / RUN_CONFIG) if (path / RUN_CONFIG).is_file() else None
    if (path / "adapter_config.json").is_file():
        base = _base(trained_with or config, device)
        with warnings.catch_warnings():
            # PEFT 0.21 still reads a transformers attribute that warns about its v6 rename.
            warnings.filterwarnings("ignore", "`is_gradient_checkpointing`", FutureWarning)
            model = PeftModel.from_pretrained(base.model, str(path))
        return ScoringModel(model, base.tokenizer, base.kind, f"adapter {path}", trained_with)
    kind = (trained_with or config).model_kind
    loaded = load_model(str(path), kind, dtype=config.dtype, device=device)
    return ScoringModel(loaded.model, loaded.tokenizer, loaded.kind, f"model {path}", trained_with)


def default_config(target: Path | None) -> Path:
    """The config a target was trained with, for evaluating it on its own data when no --config is given."""
    for candidate in [target / "config.yaml", target / RUN_CONFIG] if target is not None else []:
        if candidate.is_file():
            return candidate
    raise UserError("--config is needed: name a config whose evaluation split to score on")


def scoring_model(
    target: Path | None, config: ExperimentConfig, *, base: bool, which: str | None, rank: int | None
) -> ScoringModel:
    if base == (target is not None):
        raise UserError("give a run or export directory to evaluate, or --base for the config's model")
    if target is None:
        return _base(config, config.device)
    if not target.is_dir():
        raise UserError(f"{target} is not a directory")
    if (target / "config.yaml").is_file() or (target / "checkpoints").is_dir():
        return _from_run(target, which or "best", rank, config.device)
    if (target / "adapter_config.json").is_file() or (target / "config.json").is_file():
        if rank is not None or which is not None:
            raise UserError("--rank and --round choose from a run's checkpoints; an export holds one model")
        return _from_export(target, config, config.device)
    raise UserError(
        f"{target} is neither a fedsubspace results directory (config.yaml, checkpoints/) nor a model "
        "or adapter directory (config.json or adapter_config.json)"
    )


def _describe(config: ExperimentConfig) -> str:
    return f"{config.dataset} {config.eval_split}"


def check_choices(scored: ScoringModel, config: ExperimentConfig, encoded: Encoded) -> None:
    """Refuse data whose choice (or label) count differs from the one the model was trained on."""
    trained_with = scored.trained_with
    if trained_with is None:
        return
    same_data = (_describe(trained_with), trained_with.choices_field) == (
        _describe(config),
        config.choices_field,
    )
    trained = encoded
    if not same_data:
        trained = encode_split(trained_with, load_eval_split(trained_with), scored.tokenizer, scored.kind)
    if encoded.num_choices != trained.num_choices:
        raise UserError(
            f"the model was trained on {trained.num_choices}-way questions ({_describe(trained_with)}) but "
            f"{_describe(config)} has {encoded.num_choices}; its head scores {trained.num_choices} choices"
        )


def evaluate_target(
    target: Path | None,
    config: ExperimentConfig,
    *,
    base: bool = False,
    which: str | None = None,
    rank: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Accuracy (with its binomial standard error) and mean loss of the model on ``config``'s eval split."""
    resolve_device(config.device)
    data = load_eval_split(config)
    scored = scoring_model(target, config, base=base, which=which, rank=rank)
    encoded = encode_split(config, data, scored.tokenizer, scored.kind)
    check_choices(scored, config, encoded)
    result = evaluate(
        scored.model,
        encoded,
        scored.kind,
        batch_size=config.eval_batch_size,
        device=resolve_device(config.device),
        progress=progress,
    )
    n = result.num_examples
    return {
        "model": scored.description,
        "dataset": config.dataset,
        "split": config.eval_split,
        "examples": n,
        "accuracy": result.accuracy,
        "accuracy_stderr": math.sqrt(result.accuracy * (1.0 - result.accuracy) / n) if n else math.nan,
        "loss": result.loss,
    }


def eval_line(scores: dict[str, Any]) -> str:
    return (
        f"{scores['model']} on {scores['dataset']} {scores['split']} ({scores['examples']} examples): "
        f"accuracy {scores['accuracy']:.4f} ± {scores['accuracy_stderr']:.4f}, loss {scores['loss']:.4f}"
    )
