"""Where a matrix keeps its runs, what state a results directory is in, and reading them back.

``OUT/<setup>/<label>/seed<seed>/``: the setup is the config file's stem, the label a method name or
``centralized`` (the reference run of one client holding all the data). ``OUT/report/`` holds the
report. ``initial`` (the model before training) is a reference row of the report, not a directory: it
comes from the runs' summaries.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import yaml

from fedsubspace.errors import UserError
from fedsubspace.results import ERROR

CENTRALIZED = "centralized"
INITIAL = "initial"
REPORT = "report"
_SEED_DIR = re.compile(r"seed(-?\d+)")


class Status(Enum):
    FINISHED = "finished"
    FAILED = "failed"  # the last attempt raised (its error.txt says why)
    INCOMPLETE = "incomplete"  # interrupted, or running now


def run_path(out: Path, setup: str, label: str, seed: int) -> Path:
    return out / setup / label / f"seed{seed}"


def status(path: Path) -> Status:
    if (path / "summary.json").exists():
        return Status.FINISHED
    return Status.FAILED if (path / ERROR).exists() else Status.INCOMPLETE


def locate(root: Path, path: Path, method: str) -> tuple[str, str]:
    """``(setup, label)`` of the results directory ``path`` under ``root``: from the matrix layout, or
    for a directory laid out otherwise, its parent directory and the method its config names."""
    parts = path.relative_to(root).parts
    if len(parts) >= 3 and _SEED_DIR.fullmatch(parts[-1]):
        return "/".join(parts[:-2]), parts[-2]
    return "/".join(parts[:-1]) or root.name, method


@dataclass
class RunRecord:
    """One results directory as the report sees it."""

    path: Path
    setup: str
    label: str  # the method, or CENTRALIZED
    seed: int
    num_rounds: int
    status: Status
    rows: list[dict[str, Any]]  # metrics.jsonl, one a round
    summary: dict[str, Any] | None  # finished runs only
    error: str | None  # failed runs: the first line of error.txt

    @property
    def global_evaluation(self) -> bool:
        """Evaluated on the shared evaluation split (personalised methods use each client's own data)."""
        return self.summary is not None and self.summary.get("evaluation", "global") == "global"


def _rows(path: Path) -> list[dict[str, Any]]:
    """The metrics lines, without one torn by a crash mid-append (an unfinished run may end in one)."""
    rows = []
    if (path / "metrics.jsonl").exists():
        for line in (path / "metrics.jsonl").read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def collect(root: Path) -> list[RunRecord]:
    """Every results directory (a directory holding config.yaml) under ``root``, in path order."""
    if not root.is_dir():
        raise UserError(f"{root} is not a directory")
    records = []
    for config_file in sorted(root.rglob("config.yaml")):
        path = config_file.parent
        if REPORT in path.relative_to(root).parts[:1]:
            continue
        config = yaml.safe_load(config_file.read_text()) or {}
        setup, label = locate(root, path, config.get("method", "?"))
        state = status(path)
        records.append(
            RunRecord(
                path=path,
                setup=setup,
                label=label,
                seed=config.get("seed", 0),
                num_rounds=config.get("num_rounds", 0),
                status=state,
                rows=_rows(path),
                summary=json.loads((path / "summary.json").read_text()) if state is Status.FINISHED else None,
                error=(path / ERROR).read_text().split("\n", 1)[0] if state is Status.FAILED else None,
            )
        )
    if not records:
        raise UserError(f"no results directories (holding config.yaml) under {root}")
    return records
