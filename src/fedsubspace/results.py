"""A run's results directory: config.yaml, partition_stats.json, metrics.jsonl, summary.json, checkpoints/.

Every file is written whole or not at all (temp file, then rename), metrics are appended one line per
round as soon as the round ends, and a directory holding a run is never overwritten by accident.

``checkpoints/last.safetensors`` is the resume point: the global state after the last completed round,
with every client's private memory and the runner's progress (round, best and initial results, the
merge ledger) in the same file, so one atomic rename commits a round. Resuming keeps the metrics lines
up to that round and drops any written after it (a crash between the metrics append and the
checkpoint).
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from filelock import FileLock, Timeout

from fedsubspace.config import with_defaults
from fedsubspace.errors import UserError
from fedsubspace.state import GlobalState, load_sidecar, load_state, save_state
from fedsubspace.tracking import TENSORBOARD_DIR, TensorBoardTracker, make_tracker

ERROR = "error.txt"  # why a run failed, written by the matrix runner
OWNED = (
    "config.yaml",
    "partition_stats.json",
    "metrics.jsonl",
    "summary.json",
    "checkpoints",
    "predictions",  # fedsubspace.predictions.DIRECTORY
    ERROR,
    TENSORBOARD_DIR,
)
LOCK = "run.lock"
Memories = dict[int, dict[str, torch.Tensor]]  # client -> the tensors it keeps between its rounds


class RunBusy(UserError):
    """Another process is running this results directory."""


@contextmanager
def claim(path: Path) -> Iterator[None]:
    """Hold the run in ``path`` for this process: two processes running one results directory would
    interleave their rounds and checkpoints. The operating system drops the lock with its process, so a
    killed run never leaves its directory locked."""
    path.mkdir(parents=True, exist_ok=True)
    lock = FileLock(path / LOCK, timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise RunBusy(f"{path} is being run by another process; wait for it to end or stop it") from None
    try:
        yield
    finally:
        lock.release()


@dataclass
class ResumePoint:
    """What the round after ``state.round`` starts from."""

    state: GlobalState
    memories: Memories  # only clients that hold something
    progress: dict[str, Any]  # the runner's own counters, JSON-ready


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


def config_difference(before: dict[str, Any], now: dict[str, Any]) -> str | None:
    """The first key (in ``now``'s order) whose value differs between two configs, described; or None."""
    for key in [*now, *(k for k in before if k not in now)]:
        if before.get(key) != now.get(key):
            return f"{key} was {before.get(key)!r}, now {now.get(key)!r}"
    return None


def written_config_difference(path: Path, config: dict[str, Any]) -> str | None:
    """How ``config`` differs from the one the run in ``path`` was started with (None: same, or no run)."""
    written = path / "config.yaml"
    if not written.exists():
        return None
    # A key added since the run was written reads as its default, which is what that run did.
    return config_difference(with_defaults(yaml.safe_load(written.read_text()) or {}), config)


def check_same_config(path: Path, config: dict[str, Any]) -> None:
    """Refuse to continue the run in ``path`` with a config other than the one it was started with."""
    difference = written_config_difference(path, config)
    if difference is not None:
        raise UserError(
            f"{path} holds a run of another config ({difference}); "
            "resume it with the same config or choose another output directory"
        )


class RunDirectory:
    """A results directory. Without ``overwrite`` or ``resume`` it refuses one that holds a run; with
    ``resume`` it continues one (the same config only, see :meth:`write_config`)."""

    def __init__(self, path: Path, *, overwrite: bool = False, resume: bool = False) -> None:
        if overwrite and resume:
            raise UserError("--overwrite starts over and --resume continues: pass one of them")
        self.path, self.resume = path, resume
        self.tracker: TensorBoardTracker | None = None  # set by write_config, from the config's tracker
        if not (overwrite or resume):
            if self.finished:
                raise UserError(f"{path} already holds a finished run; pass --overwrite to replace it")
            if (path / "metrics.jsonl").exists() or self.last_checkpoint.exists():
                raise UserError(
                    f"{path} holds an unfinished run; pass --resume to continue it "
                    "or --overwrite to start it over"
                )
        if overwrite:
            for name in OWNED:
                target = path / name
                if target.is_dir():
                    shutil.rmtree(target)
                elif target.exists():
                    target.unlink()
        path.mkdir(parents=True, exist_ok=True)

    @property
    def finished(self) -> bool:
        return (self.path / "summary.json").exists()

    @property
    def last_checkpoint(self) -> Path:
        return self.path / "checkpoints" / "last.safetensors"

    def read_summary(self) -> dict[str, Any]:
        return json.loads((self.path / "summary.json").read_text())

    def write_json(self, name: str, data: Any) -> None:
        _write_atomic(self.path / name, json.dumps(_json_ready(data), indent=2) + "\n")

    def write_config(self, config: dict[str, Any]) -> None:
        if self.resume:
            check_same_config(self.path, config)
        _write_atomic(self.path / "config.yaml", yaml.safe_dump(config, sort_keys=False))
        self.tracker = make_tracker(config.get("tracker", "none"), self.path, lambda: read_metrics(self.path))

    def append_metrics(self, row: dict[str, Any]) -> None:
        with (self.path / "metrics.jsonl").open("a") as f:
            f.write(json.dumps(_json_ready(row)) + "\n")
        if self.tracker is not None:
            self.tracker.log(row)

    def save_checkpoint(self, name: str, state: GlobalState) -> None:
        save_state(self.path / "checkpoints" / f"{name}.safetensors", state)

    def save_resume_point(self, state: GlobalState, memories: Memories, progress: dict[str, Any]) -> None:
        """Commit a round: the state, the clients' memories and ``progress`` in one atomic write."""
        sidecar = {
            f"client/{client}/{key}": tensor
            for client, memory in memories.items()
            for key, tensor in memory.items()
        }
        metadata = {"progress": json.dumps(_json_ready(progress))}
        save_state(self.last_checkpoint, state, sidecar=sidecar, metadata=metadata)

    def read_resume_point(self) -> ResumePoint:
        """The last committed round, exactly as saved (the runner also continues from this copy, so that
        a resumed run computes with the very tensors an uninterrupted one does)."""
        sidecar, metadata = load_sidecar(self.last_checkpoint)
        if "progress" not in metadata:
            raise UserError(
                f"{self.last_checkpoint} holds no resume data (written by an older fedsubspace); "
                "pass --overwrite to start the run over"
            )
        memories: Memories = {}
        for name, tensor in sidecar.items():
            _, client, key = name.split("/", 2)
            memories.setdefault(int(client), {})[key] = tensor
        return ResumePoint(load_state(self.last_checkpoint), memories, json.loads(metadata["progress"]))

    def resume_point(self) -> ResumePoint | None:
        """Where an interrupted run goes on from, its metrics cut back to that round; None (and no
        metrics kept) when it never committed a round."""
        point = self.read_resume_point() if self.last_checkpoint.exists() else None
        metrics = self.path / "metrics.jsonl"
        if metrics.exists():
            last = point.state.round if point is not None else -1
            kept = [line for line in metrics.read_text().splitlines(keepends=True) if _round_of(line) <= last]
            _write_atomic(metrics, "".join(kept))
        return point


def _round_of(line: str) -> float:
    """The round a metrics line records; a torn line (a crash mid-append) counts as after every round."""
    try:
        return json.loads(line)["round"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return math.inf


def read_metrics(path: Path) -> list[dict[str, Any]]:
    with (path / "metrics.jsonl").open() as f:
        return [json.loads(line) for line in f if line.strip()]
