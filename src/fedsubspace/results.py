"""A run's results directory: config.yaml, partition_stats.json, metrics.jsonl, summary.json, checkpoints/.

Every file is written whole or not at all (temp file, then rename), metrics are appended one line per
round as soon as the round ends, and a directory holding a run is never overwritten by accident.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import yaml

from fedsubspace.errors import UserError
from fedsubspace.state import GlobalState, save_state

OWNED = ("config.yaml", "partition_stats.json", "metrics.jsonl", "summary.json", "checkpoints")


def _json_ready(value: Any) -> Any:
    """NaN and Inf become null: JSON has no such numbers and downstream tools choke on them."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_ready(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_ready(v) for v in value]
    return value


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


class RunDirectory:
    def __init__(self, path: Path, *, overwrite: bool = False) -> None:
        self.path = path
        if (path / "summary.json").exists() and not overwrite:
            raise UserError(f"{path} already holds a finished run; pass --overwrite to replace it")
        if (path / "metrics.jsonl").exists() and not overwrite:
            raise UserError(f"{path} holds an unfinished run; pass --overwrite to start it over")
        if overwrite:
            for name in OWNED:
                target = path / name
                if target.is_dir():
                    shutil.rmtree(target)
                elif target.exists():
                    target.unlink()
        path.mkdir(parents=True, exist_ok=True)

    def write_json(self, name: str, data: Any) -> None:
        _write_atomic(self.path / name, json.dumps(_json_ready(data), indent=2) + "\n")

    def write_config(self, config: dict[str, Any]) -> None:
        _write_atomic(self.path / "config.yaml", yaml.safe_dump(config, sort_keys=False))

    def append_metrics(self, row: dict[str, Any]) -> None:
        with (self.path / "metrics.jsonl").open("a") as f:
            f.write(json.dumps(_json_ready(row)) + "\n")

    def save_checkpoint(self, name: str, state: GlobalState) -> None:
        save_state(self.path / "checkpoints" / f"{name}.safetensors", state)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    with (path / "metrics.jsonl").open() as f:
        return [json.loads(line) for line in f if line.strip()]
