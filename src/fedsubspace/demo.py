"""``fedsubspace demo``: two methods on one config, then their rounds side by side.

A second ``make demo`` reuses what the first one did: a finished run is read as it is, an interrupted
one resumes after its last completed round. A run of another config (``configs/demo.yaml`` edited) is
started over.
"""

from __future__ import annotations

from pathlib import Path

from fedsubspace.config import ExperimentConfig
from fedsubspace.configure import build_config
from fedsubspace.results import CONFIG, Status, read_metrics, read_summary, status, written_config_difference
from fedsubspace.simulation import run

# The paper's basis overlap (each client's adapter against the global one) and the round-delta overlap
# (each client's change in the round against the aggregate's change), which the shared start of a round
# cannot inflate; update_overlap is left out: it equals basis_overlap whenever A has full row rank.
COLUMNS = (
    ("eval_accuracy", "accuracy"),
    ("basis_overlap", "basis overlap"),
    ("delta_overlap", "delta overlap"),
)


def _cell(value: float | None) -> str:
    return "   -  " if value is None else f"{value:.4f}"


def side_by_side(run_dirs: dict[str, Path]) -> str:
    """One row per round (round 0 = before training), each metric once per method."""
    metrics = {method: read_metrics(path) for method, path in run_dirs.items()}
    summaries = {method: read_summary(path) for method, path in run_dirs.items()}
    methods = list(run_dirs)
    header = ["round"] + [f"{label} ({m})" for _, label in COLUMNS for m in methods]
    widths = [len(h) for h in header]
    rows = [
        ["0"]
        + [_cell(summaries[m]["initial_eval_accuracy"]) for m in methods]
        + ["   -  "] * (2 * len(methods))
    ]
    for index in range(max(len(rows_) for rows_ in metrics.values())):
        cells = [str(index + 1)]
        for key, _ in COLUMNS:
            cells += [_cell(metrics[m][index].get(key) if index < len(metrics[m]) else None) for m in methods]
        rows.append(cells)
    lines = ["  ".join(h.rjust(w) for h, w in zip(header, widths))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(cells, widths)) for cells in rows]
    return "\n".join(lines)


def run_demo(config: ExperimentConfig, methods: list[str], out: Path) -> str:
    run_dirs = {}
    for method in methods:
        method_config = build_config({**config.to_dict(), "method": method})
        run_dir = out / method
        run_dirs[method] = run_dir
        same = (run_dir / CONFIG).exists() and (
            written_config_difference(run_dir, method_config.to_dict()) is None
        )
        if same and status(run_dir) is Status.FINISHED:
            print(f"{method}: reusing the finished run in {run_dir}")
        elif same:
            print(f"{method}: resuming the unfinished run in {run_dir}")
            run(method_config, run_dir, resume=True)
        else:
            print(f"{method}: running into {run_dir}")
            run(method_config, run_dir, overwrite=True)
    return side_by_side(run_dirs)
