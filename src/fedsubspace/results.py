"""A run's results directory, owned by :class:`RunDirectory`: its file names, its status, the manifest
of the files fedsubspace wrote there, and the one reader of ``metrics.jsonl``.

Files: ``config.yaml``, ``partition_stats.json``, ``metrics.jsonl``, ``summary.json``,
``checkpoints/{last,best}.safetensors``, ``error.txt`` (why a matrix run failed), ``manifest.json``.
Every file is written whole or not at all (temp file, then rename), metrics are appended one line per
round as soon as the round ends (:meth:`RunDirectory.append_metrics`, the one place a metrics line is
written), and a directory holding a run is never overwritten by accident. ``manifest.json`` lists every
file fedsubspace wrote in the directory: ``--overwrite`` deletes those and nothing else, and a
``config.yaml`` it does not list (the user's own) is never replaced. A directory written before
manifests existed owns the files at fedsubspace's own names, if it holds a run.

``checkpoints/last.safetensors`` is the resume point: the global state after the last completed round,
with every client's private memory and the runner's progress (round, best and initial results, the
merge ledger) in the same file, so one atomic rename commits a round. Resuming keeps the metrics lines
up to that round and drops any written after it (a crash between the metrics append and the
checkpoint). A line torn by a crash mid-append is never read as a round (:func:`read_metrics`); for a
finished run, ``summary.json`` is the truth.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import torch
import yaml
from filelock import FileLock, Timeout

from fedsubspace.configure import with_defaults
from fedsubspace.errors import UserError, reading
from fedsubspace.state import (
    GlobalState,
    first_non_finite,
    global_tensors,
    load_sidecar,
    load_state,
    save_state,
)
from fedsubspace.tracking import TENSORBOARD_DIR, TensorBoardTracker, make_tracker

CONFIG = "config.yaml"
PARTITION_STATS = "partition_stats.json"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
CHECKPOINTS = "checkpoints"
LAST = f"{CHECKPOINTS}/last.safetensors"
ERROR = "error.txt"  # why a run failed, written by the matrix runner
MANIFEST = "manifest.json"
LOCK = "run.lock"
# What a directory written before manifests existed owns: the files at fedsubspace's own names.
LEGACY_FILES = (CONFIG, PARTITION_STATS, METRICS, SUMMARY, LAST, f"{CHECKPOINTS}/best.safetensors", ERROR)
IN_PROCESS = "fedsubspace run"  # the runners a manifest names (only the in-process one can resume)
FLOWER = "fedsubspace flower"
Memories = dict[int, dict[str, torch.Tensor]]  # client -> the tensors it keeps between its rounds


def default_out(model: str, method: str, seed: int) -> Path:
    """Where a run goes without ``--out``."""
    return Path("runs") / f"{Path(model).name}-{method}-seed{seed}"


class Status(Enum):
    FINISHED = "finished"
    FAILED = "failed"  # the last attempt raised (its error.txt says why)
    INCOMPLETE = "incomplete"  # interrupted, or running now (perhaps not past its config yet)
    EMPTY = "empty"  # no run at all


def holds_run(path: Path) -> bool:
    """A run committed at least its initial evaluation here (a config alone is not a run)."""
    return any((path / name).exists() for name in (METRICS, SUMMARY, LAST))


def status(path: Path) -> Status:
    if (path / SUMMARY).exists():
        return Status.FINISHED
    if (path / ERROR).exists():
        return Status.FAILED
    return Status.INCOMPLETE if holds_run(path) or (path / CONFIG).exists() else Status.EMPTY


def require_run(path: Path) -> None:
    """``--resume``: refuse a directory holding no run (a mistyped path must not start a fresh one)."""
    if not holds_run(path):
        raise UserError(f"{path} holds no run to resume; drop --resume to start one there")


def read_json(path: Path, fix: str) -> Any:
    with reading(path, fix):
        return json.loads(path.read_text(encoding="utf-8"))


def read_summary(path: Path) -> dict[str, Any]:
    """The summary of the finished run in ``path``."""
    summary = read_json(
        path / SUMMARY, "delete it and finish the run again with `fedsubspace run --resume` (same --out)"
    )
    if not isinstance(summary, dict):
        raise UserError(f"{path / SUMMARY} holds no summary; delete it and finish the run with --resume")
    return summary


def read_config(path: Path) -> dict[str, Any]:
    """The config the run in ``path`` was started with, as written."""
    file = path / CONFIG
    with reading(file, "it is not a config fedsubspace wrote; move it out of the results directory"):
        config = yaml.safe_load(file.read_text(encoding="utf-8"))
    if not isinstance(config, dict):
        raise UserError(
            f"{file} holds no mapping of config keys; it is not a config fedsubspace wrote: "
            "move it out of the results directory"
        )
    return config


def _metric_lines(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """``(line, row)`` of every whole metrics line; a line torn by a crash mid-append (or anything else
    that is not a round's JSON object) is no round."""
    file = path / METRICS
    if not file.exists():
        return []
    lines = []
    for line in file.read_text(encoding="utf-8", errors="replace").splitlines(keepends=True):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and isinstance(row.get("round"), int) and line.endswith("\n"):
            lines.append((line, row))
    return lines


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The rounds ``path/metrics.jsonl`` records, one dict each, torn lines left out: the one reader
    of metrics (resume, report, demo, matrix progress)."""
    return [row for _, row in _metric_lines(path)]


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
    if not (path / CONFIG).exists():
        return None
    # A key added since the run was written reads as its default, which is what that run did.
    return config_difference(with_defaults(read_config(path)), config)


def check_same_config(path: Path, config: dict[str, Any]) -> None:
    """Refuse to continue the run in ``path`` with a config other than the one it was started with."""
    difference = written_config_difference(path, config)
    if difference is not None:
        raise UserError(
            f"{path} holds a run of another config ({difference}); "
            "resume it with the same config or choose another output directory"
        )


def _manifest(path: Path) -> dict[str, Any]:
    """The manifest of ``path``: the runner and the files fedsubspace wrote there."""
    if (path / MANIFEST).exists():
        manifest = read_json(
            path / MANIFEST, "it is fedsubspace's list of its own files: restore or delete it"
        )
        if isinstance(manifest, dict) and isinstance(manifest.get("files"), list):
            return manifest
        raise UserError(f"{path / MANIFEST} is not a fedsubspace manifest; restore or delete it")
    # written before manifests: its files at fedsubspace's own names, if it holds a run
    legacy = [name for name in LEGACY_FILES if (path / name).exists()] if holds_run(path) else []
    return {"runner": None, "files": legacy}


def record_error(path: Path, text: str) -> None:
    """Write ``error.txt`` (why the run failed), listed as fedsubspace's own."""
    own(path, ERROR)
    _write_atomic(path / ERROR, text)


def clear_error(path: Path) -> None:
    (path / ERROR).unlink(missing_ok=True)


def own(path: Path, name: str, runner: str | None = None) -> None:
    """List ``name`` in ``path``'s manifest before it is written (a crash in between leaves a listed file
    missing, never an unlisted one of ours). The manifest names the runner that started the run. A listed
    folder (``predictions``, ``tensorboard``) is fedsubspace's whole: it writes every file in it."""
    manifest = _manifest(path)
    started_by = manifest.get("runner") or runner
    if name in manifest["files"] and started_by == manifest.get("runner"):
        return
    files = sorted({*manifest["files"], name})
    _write_atomic(path / MANIFEST, json.dumps({"runner": started_by, "files": files}) + "\n")


class RunDirectory:
    """A results directory. Without ``overwrite`` or ``resume`` it refuses one that holds a run; with
    ``resume`` it continues one (the same config only, see :meth:`write_config`); with ``overwrite`` it
    deletes the files fedsubspace wrote there, and only those. It never takes over a ``config.yaml``
    that fedsubspace did not write. ``runner`` names who writes it (only :data:`IN_PROCESS` resumes)."""

    def __init__(
        self, path: Path, *, overwrite: bool = False, resume: bool = False, runner: str = IN_PROCESS
    ) -> None:
        if overwrite and resume:
            raise UserError("--overwrite starts over and --resume continues: pass one of them")
        self.path, self.resume, self.runner = path, resume, runner
        self.tracker: TensorBoardTracker | None = None  # set by write_config, from the config's tracker
        owned = _manifest(path)["files"]
        if (path / CONFIG).exists() and CONFIG not in owned:
            raise UserError(
                f"{path / CONFIG} is not one fedsubspace wrote ({MANIFEST} does not list it); "
                "choose another output directory or move the file away"
            )
        if not (overwrite or resume):
            if self.finished:
                raise UserError(f"{path} already holds a finished run; pass --overwrite to replace it")
            if holds_run(path):
                continuing = "pass --resume to continue it or " if runner == IN_PROCESS else ""
                raise UserError(
                    f"{path} holds an unfinished run; {continuing}pass --overwrite to start it over"
                )
        if overwrite:
            self._delete(owned)
        path.mkdir(parents=True, exist_ok=True)

    def _delete(self, owned: list[str]) -> None:
        """Delete fedsubspace's files (and the checkpoints folder, if that leaves it empty)."""
        for name in owned:
            if (self.path / name).is_dir():
                shutil.rmtree(self.path / name)
            else:
                (self.path / name).unlink(missing_ok=True)
        checkpoints = self.path / CHECKPOINTS
        if checkpoints.is_dir() and not any(checkpoints.iterdir()):
            checkpoints.rmdir()
        (self.path / MANIFEST).unlink(missing_ok=True)

    def _own(self, name: str) -> Path:
        own(self.path, name, self.runner)
        return self.path / name

    @property
    def status(self) -> Status:
        return status(self.path)

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    @property
    def last_checkpoint(self) -> Path:
        return self.path / LAST

    def read_summary(self) -> dict[str, Any]:
        return read_summary(self.path)

    def read_metrics(self) -> list[dict[str, Any]]:
        return read_metrics(self.path)

    def write_json(self, name: str, data: Any) -> None:
        _write_atomic(self._own(name), json.dumps(_json_ready(data), indent=2) + "\n")

    def write_config(self, config: dict[str, Any]) -> None:
        if self.resume:
            check_same_config(self.path, config)
        _write_atomic(self._own(CONFIG), yaml.safe_dump(config, sort_keys=False))
        self.tracker = make_tracker(config.get("tracker", "none"), self.path, lambda: read_metrics(self.path))
        if self.tracker is not None:
            self._own(TENSORBOARD_DIR)

    def append_metrics(self, row: dict[str, Any]) -> None:
        """Write a round's metrics line: every runner's rounds go through here, once each."""
        with self._own(METRICS).open("a") as f:
            f.write(json.dumps(_json_ready(row)) + "\n")
        if self.tracker is not None:
            self.tracker.log(row)

    def save_checkpoint(self, name: str, state: GlobalState) -> None:
        save_state(self._own(f"{CHECKPOINTS}/{name}.safetensors"), state)

    def save_resume_point(self, state: GlobalState, memories: Memories, progress: dict[str, Any]) -> None:
        """Commit a round: the state, the clients' memories and ``progress`` in one atomic write."""
        sidecar = {
            f"client/{client}/{key}": tensor
            for client, memory in memories.items()
            for key, tensor in memory.items()
        }
        metadata = {"progress": json.dumps(_json_ready(progress))}
        save_state(self._own(LAST), state, sidecar=sidecar, metadata=metadata)

    def read_resume_point(self) -> ResumePoint:
        """The last committed round, exactly as saved (the runner also continues from this copy, so that
        a resumed run computes with the very tensors an uninterrupted one does)."""
        fix = "it cannot be resumed: pass --overwrite to start the run over"
        with reading(self.last_checkpoint, fix):
            sidecar, metadata = load_sidecar(self.last_checkpoint)
            state = load_state(self.last_checkpoint)
        if "progress" not in metadata:
            writer = _manifest(self.path).get("runner")
            who = "a Flower run, which cannot resume" if writer == FLOWER else "an older fedsubspace"
            raise UserError(f"{self.last_checkpoint} holds no resume data (written by {who}); {fix}")
        memories: Memories = {}
        for name, tensor in sidecar.items():
            _, client, key = name.split("/", 2)
            memories.setdefault(int(client), {})[key] = tensor
        return ResumePoint(state, memories, json.loads(metadata["progress"]))

    def resume_point(self) -> ResumePoint | None:
        """Where an interrupted run goes on from, its metrics cut back to that round; None (and no
        metrics kept) when it never committed a round. A global state holding NaN or Inf is refused."""
        point = self.read_resume_point() if self.last_checkpoint.exists() else None
        bad = None if point is None else first_non_finite(global_tensors(point.state))
        if bad is not None:
            raise UserError(
                f"{self.last_checkpoint} holds NaN or Inf in its global state ({bad}); "
                "it cannot be resumed: pass --overwrite to start the run over"
            )
        if (self.path / METRICS).exists():
            last = point.state.round if point is not None else -1
            kept = [line for line, row in _metric_lines(self.path) if row["round"] <= last]
            _write_atomic(self.path / METRICS, "".join(kept))
        return point
