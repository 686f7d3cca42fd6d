"""The Flower app definition and its run config: the experiment config plus the federation's own knobs.

``[tool.flwr.app.config]`` carries every key of the YAML configs under the same name, empty meaning
"not set", and a ``config-file``: the experiment config is the defaults, then the file, then the keys
set in the run config (a string is read as YAML, exactly like ``--set``: ``client_ranks="[2, 4, 4]"``,
``max_train_samples="null"``). The dashed keys belong to the federation: where the ServerApp writes
results, how many replies a round needs, how long it waits. Every machine of the federation reads the
same run config (Flower sends it along), so all build the same :class:`ExperimentConfig`; paths in it
(the config file, a local dataset or model directory) are read on each machine, relative to the working
directory its SuperLink or SuperNode was started in (a ``dataset:`` path inside the config file: relative
to that file's folder).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedsubspace import __version__
from fedsubspace.config import ExperimentConfig
from fedsubspace.configure import defaults, load_config
from fedsubspace.errors import UserError
from fedsubspace.results import default_out

Value = bool | int | float | str  # what a Flower run config holds
SERVERAPP = "fedsubspace.flower.server_app:app"
CLIENTAPP = "fedsubspace.flower.client_app:app"
FEDERATION_DEFAULTS: dict[str, Value] = {
    "config-file": "",  # YAML experiment config; empty: the defaults
    "out-dir": "",  # results directory on the server machine; empty: runs/MODEL-METHOD-seedN
    "overwrite": False,  # replace a run already in out-dir
    "min-replies": 1,  # fewest usable updates a round aggregates; fewer leave the global model unchanged
    "round-timeout": 3600.0,  # seconds a round waits for replies; the late ones are missing
    "node-timeout": 300.0,  # seconds the first round waits for a node to hold every client's partition
}


def run_config_defaults() -> dict[str, Value]:
    """``[tool.flwr.app.config]``: the federation's keys, then every experiment key, unset."""
    return {**FEDERATION_DEFAULTS, **{name: "" for name in defaults()}}


def app_definition() -> dict[str, Any]:
    """The Flower app's ``pyproject.toml`` (the repository's own holds the same ``[tool.flwr.app]``)."""
    return {
        "project": {
            "name": "fedsubspace",
            "version": __version__,
            "description": "Federated LoRA fine-tuning with geometry-aware server aggregation",
            "license": "Apache-2.0",
        },
        "tool": {
            "flwr": {
                "app": {
                    "publisher": "fedsubspace",
                    "components": {"serverapp": SERVERAPP, "clientapp": CLIENTAPP},
                    "config": run_config_defaults(),
                }
            }
        },
    }


@dataclass(frozen=True)
class FlowerSettings:
    """A Flower run's experiment config and the federation's knobs, from its run config."""

    config: ExperimentConfig
    out: Path
    overwrite: bool
    min_replies: int
    round_timeout: float
    node_timeout: float

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Value]) -> FlowerSettings:
        """Settings from a run config; user mistakes raise :class:`UserError` (one line)."""
        unknown = sorted(set(run_config) - set(run_config_defaults()))
        if unknown:
            raise UserError(f"unknown run config key {unknown[0]!r}")
        values = {**FEDERATION_DEFAULTS, **run_config}
        path = str(values["config-file"])
        config = load_config(Path(path).expanduser() if path else None, experiment_overrides(run_config))
        out = Path(str(values["out-dir"])).expanduser() if values["out-dir"] else None
        settings = cls(
            config=config,
            out=out or default_out(config.model, config.method, config.seed),
            overwrite=_typed(values, "overwrite", bool),
            min_replies=_typed(values, "min-replies", int),
            round_timeout=float(_typed(values, "round-timeout", float)),
            node_timeout=float(_typed(values, "node-timeout", float)),
        )
        check_federation(settings.min_replies, settings.round_timeout, settings.node_timeout)
        return settings


def check_federation(min_replies: int, round_timeout: float, node_timeout: float) -> None:
    """The federation's knobs, checked before a SuperLink or SuperNode starts."""
    if min_replies < 1:
        raise UserError("min-replies must be at least 1")
    if round_timeout <= 0 or node_timeout < 0:
        raise UserError("round-timeout must be positive and node-timeout not negative")


def config_digest(config: ExperimentConfig) -> str:
    """A short fingerprint of a config: a node refuses to train for a server whose config differs (each
    machine reads its own config file and paths)."""
    return hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


def experiment_overrides(run_config: Mapping[str, Value]) -> list[str]:
    """The experiment keys set in a run config, as ``--set`` overrides (strings are YAML, as there)."""
    overrides, keys = [], defaults()
    for key, value in run_config.items():
        if key in keys and value != "":
            overrides.append(f"{key}={value if isinstance(value, str) else json.dumps(value)}")
    return overrides


def _typed(values: Mapping[str, Value], key: str, kind: type) -> Any:
    value = values[key]
    # bool is an int in Python; an int is fine where a float is expected
    ok = isinstance(value, kind) and not (kind is not bool and isinstance(value, bool))
    if not ok and not (kind is float and isinstance(value, int) and not isinstance(value, bool)):
        raise UserError(f"run config key {key!r} must be {kind.__name__}, got {value!r}")
    return value
