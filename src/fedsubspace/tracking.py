"""Live views of a run: its metrics lines as TensorBoard scalars, under ``<results dir>/tensorboard/``.

``tensorboard --logdir runs/`` then shows every run of a matrix side by side. The events mirror
``metrics.jsonl``, which stays the record: one scalar per numeric key of a round's line (accuracy,
losses, every diagnostic, bytes, seconds), at the round as step. Each process that writes a run starts
the mirror afresh from the metrics lines on disk (which a resumed run has cut back to its last committed
round) and then adds its own rounds, so an interrupted and resumed run holds every round exactly once.
"""

from __future__ import annotations

import shutil
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

TRACKERS = ("tensorboard", "none")
TENSORBOARD_DIR = "tensorboard"


def scalars(row: dict[str, Any]) -> dict[str, float]:
    """The numeric entries of a metrics line, but its round (lists and missing values are not scalars)."""
    return {
        key: float(value)
        for key, value in row.items()
        if key != "round" and isinstance(value, int | float) and not isinstance(value, bool)
    }


class TensorBoardTracker:
    """Writes a run's metrics lines into one event file per process; ``history`` reads the lines on disk."""

    def __init__(self, directory: Path, history: Callable[[], list[dict[str, Any]]]) -> None:
        self.directory, self.history = directory, history
        self._writer: Any = None

    def log(self, row: dict[str, Any]) -> None:
        """Add the round ``row`` (already appended to the metrics file)."""
        if self._writer is None:
            self._start()  # the history holds ``row`` too
        else:
            self._add(row)
        self._writer.flush()

    def _start(self) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # Events of an earlier process may hold rounds a resume has since dropped: begin again from the
        # metrics lines, so no round appears twice.
        shutil.rmtree(self.directory, ignore_errors=True)
        self._writer = SummaryWriter(log_dir=str(self.directory))
        weakref.finalize(self, self._writer.close)
        for row in self.history():
            self._add(row)

    def _add(self, row: dict[str, Any]) -> None:
        for key, value in scalars(row).items():
            self._writer.add_scalar(key, value, global_step=row["round"])


def make_tracker(
    name: str, run_path: Path, history: Callable[[], list[dict[str, Any]]]
) -> TensorBoardTracker | None:
    """The tracker a config's ``tracker`` key names (None for ``none``)."""
    return TensorBoardTracker(run_path / TENSORBOARD_DIR, history) if name == "tensorboard" else None
