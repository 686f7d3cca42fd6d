"""An experiment's configuration: plain data, read from YAML plus ``key=value`` overrides.

Key names follow the Subspace-Reg paper's reference configs (num_rounds, num_clients, client_fraction,
max_local_steps, lora_rank, lora_alpha, learning_rate, dirichlet_alpha, mu, alpha, lambda_reg, ...) so
configs carry over. This module holds the core keys and the checks that need nothing but the config; each
method declares its own keys (mu, alpha, ...) in its own file. :mod:`fedsubspace.configure` joins the two
and validates once, before any work starts: everything below the command line receives an
:class:`ExperimentConfig` that has passed it, and no other layer re-checks user input. This module
imports nothing of fedsubspace above it.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fedsubspace.errors import UserError, reading


@dataclass(frozen=True)
class ExperimentConfig:
    # what to run
    method: str = "subspace_reg"
    seed: int = 42
    # model and adapter
    model: str = "tiny-encoder"
    model_kind: str | None = None  # encoder | causal; needed only for a model the presets do not know
    target_modules: list[str] | None = None  # default: the architecture's query/value projections
    dtype: str = "float32"  # the model's weights (LoRA factors stay float32: PEFT keeps adapters so)
    # Mixed precision: float32 weights, forward passes (training and evaluation) in this dtype under
    # torch.autocast. Only bfloat16: float16 would need loss scaling in training.
    autocast: str | None = None
    device: str = "auto"
    load_in_4bit: bool = False
    # Recompute activations in the backward pass instead of storing them (less memory, ~30% more compute);
    # the same gradients. The paper's code enables it.
    gradient_checkpointing: bool = False
    lora_rank: int = 8
    # Each client's own LoRA rank: a list (one per client) or "cycle(4,8,16)"; overrides lora_rank.
    # Only methods that serve mixed ranks accept different ones; the global model has the largest.
    client_ranks: list[int] | str | None = None
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    max_length: int = 256
    # data
    task: str = "multiple_choice"  # multiple_choice | classification (fedsubspace.tasks)
    dataset: str = "hellaswag"
    train_split: str = "train"
    eval_split: str = "validation"
    context_field: str = "ctx"
    choices_field: str = "endings"
    label_field: str = "label"
    partition_field: str = "activity_label"  # read only by a dirichlet split
    # classification: one text (or a pair) -> one of label_names; the label field holds a name or an index
    text_field: str = "sentence"
    text_pair_field: str | None = None
    label_names: list[str] | None = None
    label_words: list[str] | None = None  # what causal models score per label; default " " + name
    max_train_samples: int | None = 8000
    max_eval_samples: int | None = 1000
    # Which evaluation questions a run draws when max_eval_samples subsamples: null = the run's seed (a
    # different set per seed, the Subspace-Reg paper's protocol), an integer = that draw for every seed
    # and method (a fixed set: accuracies pair across seeds as well as across methods).
    eval_seed: int | None = None
    # federation
    num_clients: int = 10
    client_fraction: float = 0.3
    partition: str = "dirichlet"
    dirichlet_alpha: float = 0.3
    min_partition_size: int = 1
    num_rounds: int = 20
    # local training (a fresh AdamW every round)
    max_local_steps: int = 30  # forward/backward passes of batch_size examples
    batch_size: int = 1
    gradient_accumulation_steps: int = 8
    learning_rate: float = 1e-4
    weight_decay: float = 0.0
    max_grad_norm: float | None = 0.5
    eval_batch_size: int = 32
    # Evaluate with the adapter merged into the weights (the base model's cost; the same scores to float
    # rounding, the weights restored exactly after). Off: the adapters run beside the weights, as in training.
    merged_eval: bool = False
    # Method hyperparameters by config key (mu, alpha, ...), each declared in its method's file
    # (fedsubspace.methods.options): every method's, as fedsubspace.configure fills them (a key missing here
    # is read at its default). to_dict writes them among the other keys, in this place.
    method_options: dict[str, Any] = field(default_factory=dict)
    holdout_fraction: float = 0.2  # personalised methods (fedsa): share of each partition held out
    # live view of the run: tensorboard (event files under the results directory) or none
    tracker: str = "tensorboard"
    # privacy (all off by default; README "Privacy"). DP-SGD on the clients: on with dp_max_grad_norm, the
    # clip norm of one question's gradient, and either a noise multiplier or a target epsilon (per client,
    # over all its rounds) that sets it before the run.
    dp_max_grad_norm: float | None = None
    dp_noise_multiplier: float | None = None
    dp_epsilon: float | None = None
    # with dp_epsilon: each client's noise calibrated to its own sampling rate and rounds (every client
    # still at most dp_epsilon), instead of the largest multiplier for all (the default: one noise level)
    dp_noise_per_client: bool = False
    # Client-level DP (DP-FedAvg) on the server: on with dp_client_clip, the clip norm of a client's upload
    # change, and either a noise multiplier or a target epsilon (the server's, over all rounds).
    dp_client_clip: float | None = None
    dp_client_noise_multiplier: float | None = None
    dp_client_epsilon: float | None = None
    dp_delta: float = 1e-5  # delta of every epsilon above
    secagg: bool = False  # SecAgg+ on Flower: the server learns only the sum of the uploads
    # free-form label carried into results (e.g. the name of the paper setup)
    tags: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """The config as its keys, the method options among them (as a config file writes them)."""
        flat: dict[str, Any] = {}
        for key, value in dataclasses.asdict(self).items():
            if key == "method_options":
                flat.update(value)
            else:
                flat[key] = value
        return flat


# The core keys and the type each one's value has.
CORE_KEYS = {
    key: kind for key, kind in typing.get_type_hints(ExperimentConfig).items() if key != "method_options"
}


def coerce(key: str, value: Any, hint: Any) -> Any:
    """``value`` of config key ``key`` checked against its annotation ``hint`` (ints accepted for floats)."""
    allowed = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if value is None:
        if type(None) in allowed:
            return None
        raise UserError(f"config key {key!r} must not be empty")
    for kind in allowed:
        origin = typing.get_origin(kind) or kind
        if origin is float and isinstance(value, int | float) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise UserError(f"config key {key!r} must be a finite number, got {value!r}")
            return float(value)
        if origin is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if origin in (str, bool) and isinstance(value, origin):
            return value
        if origin is list and isinstance(value, list):
            (item,) = typing.get_args(kind)
            if all(isinstance(v, item) and not isinstance(v, bool) for v in value):
                return list(value)
    names = " or ".join(getattr(k, "__name__", str(k)) for k in allowed if k is not type(None))
    raise UserError(f"config key {key!r} must be {names}, got {value!r}")


def parse_override(text: str) -> tuple[str, Any]:
    """``key=value`` with the value read as YAML (``lr=1e-4``, ``target_modules=[q_proj, v_proj]``)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise UserError(f"--set expects key=value, got {text!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    # YAML 1.1 reads "1e-4" as a string; a number was meant.
    if isinstance(value, str) and re.fullmatch(r"[-+]?\d*\.?\d+([eE][-+]?\d+)?", value):
        value = float(value)
    return key.strip(), value


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML whose mappings refuse a key given twice (PyYAML silently keeps the last value)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} is given twice", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep)


def read_config_file(path: Path) -> dict[str, Any]:
    """The keys a config file sets, its ``dataset`` path (if relative) resolved against its folder."""
    if path.is_dir():
        raise UserError(f"{path} is a directory; --config takes a YAML config file")
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    with reading(path, "a config is a UTF-8 YAML mapping of config keys"):
        loaded = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)  # a SafeLoader
    if loaded is None:
        raise UserError(f"{path} is empty; a config sets at least one key (see configs/tiny-encoder.yaml)")
    if not isinstance(loaded, dict):
        raise UserError(f"{path} must hold a mapping of config keys")
    if isinstance(loaded.get("dataset"), str):
        loaded["dataset"] = _beside(path, loaded["dataset"])
    return loaded


def _beside(config_file: Path, dataset: str) -> str:
    """A relative data path in a config file names a file beside it, wherever the command runs (a bare
    name that is no file there is a registered dataset, ``hf:...`` a hub one)."""
    if dataset.startswith("hf:") or Path(dataset).expanduser().is_absolute():
        return dataset
    beside = config_file.parent / dataset
    if "/" not in dataset and not beside.exists():
        return dataset
    return os.path.normpath(beside)


def written_values(
    path: Path | None, overrides: list[str] | None, explicit: dict[str, Any]
) -> dict[str, Any]:
    """The keys the config file ``path`` sets (none without one), then ``--set`` overrides, then explicit
    CLI flags (those not None)."""
    values: dict[str, Any] = {}
    if path is not None:
        values.update(read_config_file(path))
    values.update(parse_override(o) for o in overrides or [])
    values.update({k: v for k, v in explicit.items() if v is not None})
    return values


_CYCLE = re.compile(r"cycle\(\s*(\d+(?:\s*,\s*\d+)*)\s*\)")


def client_ranks(c: ExperimentConfig) -> list[int]:
    """Every client's LoRA rank: ``client_ranks`` resolved (a list, or a ``cycle(r1,r2,...)`` rule
    giving client i the rank ``r_(i mod len)``), or ``lora_rank`` for all."""
    if c.client_ranks is None:
        return [c.lora_rank] * c.num_clients
    if isinstance(c.client_ranks, str):
        match = _CYCLE.fullmatch(c.client_ranks.strip())
        require(
            match is not None,
            f"client_ranks must list one rank per client or be cycle(r1,r2,...), got {c.client_ranks!r}",
        )
        assert match is not None
        cycle = [int(r) for r in match.group(1).split(",")]
        ranks = [cycle[i % len(cycle)] for i in range(c.num_clients)]
    else:
        require(
            len(c.client_ranks) == c.num_clients,
            f"client_ranks lists {len(c.client_ranks)} ranks but num_clients is {c.num_clients}",
        )
        ranks = list(c.client_ranks)
    require(all(r >= 1 for r in ranks), "client_ranks must all be at least 1")
    return ranks


def require(condition: bool, message: str) -> None:
    if not condition:
        raise UserError(message)


def check(c: ExperimentConfig) -> None:
    """Every check of the core keys that needs nothing but the config (fedsubspace.configure.validate runs
    it with those that need the methods, models, tasks and trackers)."""
    if c.task == "classification":
        names = c.label_names or []
        require(
            len(names) >= 2 and len(set(names)) == len(names),
            f"task classification needs label_names: at least 2 distinct names, got {c.label_names!r}",
        )
        require(
            c.label_words is None or (len(c.label_words) == len(names) and all(c.label_words)),
            f"label_words must give one non-empty word per label name ({len(names)}), got {c.label_words!r}",
        )
    require(0.0 < c.holdout_fraction < 1.0, "holdout_fraction must be in (0, 1)")
    require(c.model_kind in (None, "encoder", "causal"), "model_kind must be encoder or causal")
    require(c.dtype in ("float32", "bfloat16", "float16"), "dtype must be float32, bfloat16 or float16")
    require(c.autocast in (None, "bfloat16"), "autocast must be bfloat16 (or null for off)")
    require(
        c.autocast is None or c.dtype == "float32",
        "autocast keeps float32 weights and computes in bfloat16: set dtype=float32 (or drop autocast)",
    )
    require(
        re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", c.device) is not None,
        "device must be auto, cpu or cuda[:N]",
    )
    require(
        not (c.merged_eval and c.load_in_4bit),
        "merged_eval cannot merge adapters into 4-bit weights exactly: drop merged_eval or load_in_4bit",
    )
    require(c.partition in ("iid", "dirichlet"), "partition must be iid or dirichlet")
    require(0.0 < c.client_fraction <= 1.0, "client_fraction must be in (0, 1]")
    for key in ("lora_rank", "max_length", "num_clients", "num_rounds", "max_local_steps", "batch_size"):
        require(getattr(c, key) >= 1, f"{key} must be at least 1")
    for key in ("gradient_accumulation_steps", "eval_batch_size", "min_partition_size"):
        require(getattr(c, key) >= 1, f"{key} must be at least 1")
    client_ranks(c)
    for key in ("lora_alpha", "learning_rate", "dirichlet_alpha"):
        require(getattr(c, key) > 0, f"{key} must be positive")
    require(c.weight_decay >= 0, "weight_decay must not be negative")
    require(0.0 <= c.lora_dropout < 1.0, "lora_dropout must be in [0, 1)")
    require(
        c.max_grad_norm is None or c.max_grad_norm > 0, "max_grad_norm must be positive (or null to disable)"
    )
    require(c.eval_seed is None or c.eval_seed >= 0, "eval_seed must be a non-negative integer (or null)")
    for key in ("max_train_samples", "max_eval_samples"):
        value = getattr(c, key)
        require(value is None or value >= 1, f"{key} must be at least 1 (or null for all)")
    check_privacy(c)


def check_privacy(c: ExperimentConfig) -> None:
    """The privacy keys make sense together (whether the method honours them: configure.validate)."""
    for key in ("dp_max_grad_norm", "dp_noise_multiplier", "dp_epsilon", "dp_client_clip"):
        value = getattr(c, key)
        require(value is None or value > 0, f"{key} must be positive (or null: off)")
    for key in ("dp_client_noise_multiplier", "dp_client_epsilon"):
        value = getattr(c, key)
        require(value is None or value > 0, f"{key} must be positive (or null: off)")
    require(0.0 < c.dp_delta < 1.0, "dp_delta must be in (0, 1)")
    require(
        not c.dp_noise_per_client or c.dp_epsilon is not None,
        "dp_noise_per_client calibrates each client's noise to dp_epsilon: set dp_epsilon (and "
        "dp_max_grad_norm), not dp_noise_multiplier",
    )
    for clip, noise, target, mechanism in (
        ("dp_max_grad_norm", "dp_noise_multiplier", "dp_epsilon", "DP-SGD"),
        ("dp_client_clip", "dp_client_noise_multiplier", "dp_client_epsilon", "client-level DP"),
    ):
        on = getattr(c, clip) is not None
        given = [key for key in (noise, target) if getattr(c, key) is not None]
        require(on or not given, f"{given[0] if given else ''} needs {clip} (the clip norm of {mechanism})")
        require(not on or len(given) == 1, f"{mechanism} ({clip}) needs exactly one of {noise} or {target}")
    require(
        not (c.secagg and c.dp_client_clip is not None),
        "dp_client_clip with secagg: client-level DP clips each upload on the server, which SecAgg+ hides "
        "from it; use one of them (DP-SGD combines with SecAgg+)",
    )
    require(
        not c.secagg or round(c.client_fraction * c.num_clients) >= 2,
        "secagg needs at least 2 clients a round (client_fraction x num_clients): one client's sum is itself",
    )
