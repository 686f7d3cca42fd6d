"""The experiment config as every runner receives it: read from what the user wrote, every key defaulted,
validated once before any work starts.

:mod:`fedsubspace.config` holds the core keys and the checks that need nothing but the config; each
method declares the keys it reads in its own file (:mod:`fedsubspace.methods.options`). This module sits
above both, and above models, tasks and trackers: it refuses a key that neither knows, fills every
default and runs the checks that need another layer (the method exists and serves the ranks and privacy
asked for, the model, task, tracker, dtype and device).
"""

from __future__ import annotations

import difflib
import importlib.util
from pathlib import Path
from typing import Any

from fedsubspace.config import (
    CORE_KEYS,
    ExperimentConfig,
    check,
    client_ranks,
    coerce,
    require,
    written_values,
)
from fedsubspace.errors import UserError
from fedsubspace.methods import METHODS, Method, declared_options, get_method, heterogeneous_methods
from fedsubspace.models import PRESETS, validate_dtype, validate_quantization
from fedsubspace.shapes import shape_models
from fedsubspace.tasks import TASKS
from fedsubspace.tracking import TRACKERS


def defaults() -> dict[str, Any]:
    """Every config key at its default, in the order a config file is written."""
    methods = {key: declared.option.default for key, declared in declared_options().items()}
    return ExperimentConfig(method_options=methods).to_dict()


def with_defaults(written: dict[str, Any]) -> dict[str, Any]:
    """A resolved config as written by a run, with the keys added to fedsubspace since then at their
    defaults (a new key's default always reproduces what runs did before it existed)."""
    return {**written, **{key: value for key, value in defaults().items() if key not in written}}


def build_config(values: dict[str, Any]) -> ExperimentConfig:
    """The config that ``values`` (config keys) sets, the other keys at their defaults, validated."""
    options = declared_options()
    unknown = [key for key in values if key not in CORE_KEYS and key not in options]
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(key, [*CORE_KEYS, *options], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise UserError(f"unknown config key {key!r}{hint}")
    core = {key: coerce(key, value, CORE_KEYS[key]) for key, value in values.items() if key in CORE_KEYS}
    method_options = {
        key: coerce(key, values[key], declared.kind) if key in values else declared.option.default
        for key, declared in options.items()
    }
    config = ExperimentConfig(**core, method_options=method_options)
    validate(config)
    return config


def load_config(path: Path | None, overrides: list[str] | None = None, **explicit: Any) -> ExperimentConfig:
    """The config in ``path`` (or the defaults), then ``--set`` overrides, then explicit CLI flags."""
    return build_config(written_values(path, overrides, explicit))


def build_method(config: ExperimentConfig) -> Method:
    """The config's method, with its own options and the run's seed."""
    return get_method(config.method, config.method_options, config.seed)


def validate(c: ExperimentConfig) -> None:
    """Every check that can fail before any work starts: the core keys' own (config.check) and those that
    need the methods, models, tasks and trackers."""
    require(c.method in METHODS, f"unknown method {c.method!r}; choose one of: {', '.join(sorted(METHODS))}")
    require(c.task in TASKS, f"unknown task {c.task!r}; choose one of: {', '.join(TASKS)}")
    for key, declared in declared_options().items():
        declared.option.validate(key, c.method_options[key])
    check(c)
    require(c.tracker in TRACKERS, f"tracker must be {' or '.join(TRACKERS)}, got {c.tracker!r}")
    require(
        c.tracker != "tensorboard" or importlib.util.find_spec("tensorboard") is not None,
        "tracker: tensorboard needs the tensorboard package (pip install tensorboard), or set tracker: none",
    )
    looks_like_path_or_id = "/" in c.model or Path(c.model).expanduser().exists()
    require(
        c.model in PRESETS or c.model in shape_models() or looks_like_path_or_id,
        f"unknown model {c.model!r}: use a preset ({', '.join(PRESETS)}), a random-weight shape "
        f"({', '.join(shape_models())}), a local directory or a hub id",
    )
    validate_quantization(c.load_in_4bit, c.device)
    validate_dtype(c.dtype, c.device, c.autocast)
    method = METHODS[c.method]
    require(
        len(set(client_ranks(c))) == 1 or method.heterogeneous_ranks,
        f"method {c.method!r} cannot serve mixed client_ranks; methods that can: "
        f"{', '.join(heterogeneous_methods())}",
    )
    support = method.privacy
    require(
        c.dp_max_grad_norm is None or support.dp_sgd.ok,
        f"method {c.method!r} cannot run under DP-SGD: {support.dp_sgd.why}",
    )
    require(
        c.dp_client_clip is None or support.client_dp.ok,
        f"method {c.method!r} cannot run under client-level DP: {support.client_dp.why}",
    )
    require(
        not c.secagg or support.secagg.ok,
        f"method {c.method!r} cannot run under SecAgg+: {support.secagg.why}",
    )
