"""Per-example predictions of a run's evaluations, the material of paired comparisons.

``predictions/{initial,best,final}.safetensors`` in a results directory: the model before training, the
best round's and the last round's, each with one entry per evaluation example in the evaluation set's
order (``example`` its position, ``predicted`` the chosen index, ``label``, ``loss`` its cross-entropy)
and the round in the metadata. Two runs of one config evaluate the same examples in the same order
(per seed, or for every seed with ``eval_seed``), so their files pair example by example. Written whole
or not at all; an evaluation that kept no per-example record (a personalised method's clients evaluated
on Flower nodes) writes nothing.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from fedsubspace.results import own
from fedsubspace.scoring import EvalResult, ExamplePredictions

DIRECTORY = "predictions"
NAMES = ("initial", "best", "final")


@dataclass(frozen=True)
class RoundPredictions:
    round: int
    examples: ExamplePredictions


def predictions_path(run_path: Path, name: str) -> Path:
    return run_path / DIRECTORY / f"{name}.safetensors"


def write_predictions(run_path: Path, name: str, round_index: int, result: EvalResult) -> None:
    """Keep ``result``'s per-example record as ``name`` (initial, best or final) of the run."""
    examples = result.examples
    if examples is None:
        return
    path = predictions_path(run_path, name)
    own(run_path, DIRECTORY)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {
        "example": torch.arange(len(examples), dtype=torch.int32),
        "predicted": torch.tensor(examples.predicted, dtype=torch.int32),
        "label": torch.tensor(examples.labels, dtype=torch.int32),
        "loss": torch.tensor(examples.losses, dtype=torch.float32),
    }
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata={"round": str(round_index)})
    tmp.replace(path)


def copy_predictions(run_path: Path, source: str, target: str) -> None:
    """``target`` becomes a copy of ``source`` (the best model is the initial one when no round beat it)."""
    if predictions_path(run_path, source).exists():
        tmp = predictions_path(run_path, target).with_suffix(".tmp")
        shutil.copyfile(predictions_path(run_path, source), tmp)
        tmp.replace(predictions_path(run_path, target))


def read_predictions(run_path: Path, name: str) -> RoundPredictions | None:
    """The run's ``name`` predictions, or None when the run kept none (older runs, Flower nodes)."""
    path = predictions_path(run_path, name)
    if not path.exists():
        return None
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    tensors = load_file(str(path))
    examples = ExamplePredictions(
        predicted=tensors["predicted"].tolist(),
        labels=tensors["label"].tolist(),
        losses=tensors["loss"].tolist(),
    )
    return RoundPredictions(int(metadata.get("round", "0")), examples)
