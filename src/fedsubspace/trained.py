"""A finished run's trained model, rebuilt from its results directory for export and evaluation.

The run directory holds the resolved config (which model, seed, adapter shape) and the global state of
its best and last rounds (``checkpoints/{best,last}.safetensors``). The model is rebuilt the way the run
built it (same preset, seed, targets and head modules), with one PEFT adapter at the chosen rank, the
state copied in through the same parameter maps the run evaluated with, and the merged residual of
fedex, flora and fedgalore added to the frozen weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from peft import PeftModel
from safetensors import SafetensorError

from fedsubspace.adapters import TrainableModel, adapt
from fedsubspace.config import ExperimentConfig
from fedsubspace.configure import build_config, build_method
from fedsubspace.errors import UserError
from fedsubspace.experiment import lora_spec
from fedsubspace.models import LoadedModel, load_model
from fedsubspace.results import CONFIG, ERROR, LAST, Status, read_metrics, status
from fedsubspace.state import Factors, GlobalState, load_state

ROUNDS = ("best", "last")


@dataclass
class TrainedRun:
    """A finished results directory and the config it ran."""

    path: Path
    config: ExperimentConfig

    def checkpoint(self, which: str) -> GlobalState:
        if which not in ROUNDS:
            raise UserError(f"--round must be best or last, not {which!r}")
        path = self.path / "checkpoints" / f"{which}.safetensors"
        if not path.is_file():
            raise UserError(f"{self.path} has no checkpoints/{which}.safetensors; use --round last")
        try:
            return load_state(path)
        except (OSError, SafetensorError, KeyError, ValueError) as exc:
            raise UserError(f"{path} is not a fedsubspace checkpoint: {exc}") from None


def read_config(path: Path) -> ExperimentConfig:
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise UserError(f"cannot read {path}: {str(exc).splitlines()[0]}") from None
    if not isinstance(values, dict):
        raise UserError(f"{path} is not a fedsubspace config (not a mapping of keys)")
    try:
        return build_config(values)
    except UserError as exc:
        raise UserError(f"{path} is not a fedsubspace config this version reads: {exc}") from None


def _rounds_text(rows: list[dict[str, Any]]) -> str:
    """The rounds the metrics lines hold, e.g. ``rounds 1-3``."""
    rounds = [row["round"] for row in rows if isinstance(row.get("round"), int)]
    if not rounds:
        return "no round"
    if len(rounds) == 1:
        return f"round {rounds[0]}"
    if rounds == list(range(rounds[0], rounds[-1] + 1)):
        return f"rounds {rounds[0]}-{rounds[-1]}"
    return f"rounds {', '.join(map(str, rounds))}"


def open_run(path: Path) -> TrainedRun:
    """The finished fedsubspace run in ``path``, or one line saying why ``path`` is not one."""
    if not path.is_dir():
        raise UserError(f"{path} is not a directory")
    missing = [name for name in (CONFIG, LAST) if not (path / name).is_file()]
    if missing:
        raise UserError(
            f"{path} is not a fedsubspace results directory (it has no {' or '.join(missing)}); "
            "give a directory written by fedsubspace run or matrix"
        )
    config = read_config(path / CONFIG)
    rows = read_metrics(path)
    if status(path) is Status.FAILED:
        raise UserError(f"{path} holds a failed run ({_rounds_text(rows)} done); see its {ERROR}")
    if status(path) is not Status.FINISHED:
        raise UserError(
            f"{path} holds an unfinished run ({_rounds_text(rows)} of {config.num_rounds} done); "
            f"finish it with: fedsubspace run --config {path / CONFIG} --out {path} --resume"
        )
    return TrainedRun(path=path, config=config)


def factors_at_rank(config: ExperimentConfig, state: GlobalState, rank: int | None) -> Factors:
    """The global adapter as the method reads it out at ``rank`` (default: the global, largest rank)."""
    method = build_method(config)
    if method.personalised:
        raise UserError(
            f"{config.method} is personalised: each client keeps its own model and no global model was "
            "evaluated, so there is no single model to take away"
        )
    if rank is None or rank == state.rank:
        return state.factors
    if not method.heterogeneous_ranks:
        raise UserError(
            f"{config.method} reads out only its global rank {state.rank}; use --rank {state.rank}"
        )
    if not 1 <= rank <= state.rank:
        raise UserError(
            f"{config.method} reads out ranks 1 to {state.rank} (the run's largest client rank), not {rank}"
        )
    return method.readout(state, rank, config.lora_alpha / rank)


@dataclass
class TrainedModel:
    peft_model: PeftModel
    loaded: LoadedModel  # its ``model`` is the base model inside ``peft_model``
    trainable: TrainableModel


def load_base(config: ExperimentConfig, device: str) -> LoadedModel:
    """The config's model before training, built as a run builds it (the same seeded new weights)."""
    return load_model(
        config.model,
        config.model_kind,
        dtype=config.dtype,
        device=device,
        seed=config.seed,
        target_modules=config.target_modules,
    )


def rebuild(config: ExperimentConfig, state: GlobalState, factors: Factors, *, device: str) -> TrainedModel:
    """The run's model with ``factors`` (one adapter, their rank), ``state``'s head and merged residual."""
    loaded = load_base(config, device)
    rank = next(iter(factors.values()))[0].shape[-1]
    spec = lora_spec(config, loaded, [rank])
    device_of_model = next(loaded.model.parameters()).device
    tm = adapt(loaded.model, loaded.kind, spec, device=device_of_model, keep_pristine=bool(state.residual))
    tm.load_weights(factors, state.head, state.residual)
    return TrainedModel(tm.model, loaded, tm)
