"""The report's plots, per setup: a metric per round for every method, mean over seeds with a band of
one standard error. Drawn on matplotlib's Agg canvas (files only, no display, no pyplot state).

- accuracy: round 0 is the model before training (each method's own initial evaluation: a
  personalised method's is on its clients' held-out data), the centralized reference's final accuracy
  a dashed line; the band is the binomial standard error of the mean over seeds,
  ``sqrt(sum_s a_s (1 - a_s) / n_s) / k`` (the evaluation questions' sampling error, defined for one
  seed too), or the seeds' ``std / sqrt(k)`` where a summary does not say n;
- basis overlap, update overlap, cancellation ratio and the round-delta diagnostics: the federated
  methods only (with one client the centralized reference has nothing to compare), band ``std /
  sqrt(k)`` over seeds; a diagnostic no run logged (runs older than it) gets no plot.
- the partition: one bar per client, split by label, from a federated run's ``partition_stats.json``
  (the split depends on the seed only, so the first seed's stands for the setup).
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from fedsubspace.experiments.layout import CENTRALIZED, RunRecord

DIAGNOSTICS = (
    ("basis_overlap", "basis overlap"),
    ("update_overlap", "update overlap"),
    ("cancellation_ratio", "cancellation ratio"),
    ("delta_overlap", "round-delta overlap (client vs aggregate)"),
    ("pairwise_delta_overlap", "pairwise round-delta overlap"),
    ("delta_cancellation_ratio", "round-delta cancellation ratio"),
    ("delta_cosine", "round-delta cosine (client vs aggregate)"),
)
# tab20's strong shades first, then its light ones: up to ten methods get strong colours.
_TAB20 = [tuple(float(v) for v in rgba[:3]) for rgba in colormaps["tab20"](np.arange(20))]
_PALETTE = [*_TAB20[0::2], *_TAB20[1::2]]


def colour_map(labels: list[str]) -> dict[str, Any]:
    """One colour per method, the same in every plot of a report."""
    return {label: _PALETTE[i % len(_PALETTE)] for i, label in enumerate(sorted(set(labels)))}


def _per_round(runs: list[RunRecord], key: str, initial: str | None = None) -> np.ndarray:
    """seeds x rounds (from round 0 when ``initial`` names the summary's value for it), NaN where a run
    has no value (fewer rounds, an undefined diagnostic)."""
    first = 0 if initial else 1
    rounds = max(max((row["round"] for row in run.rows), default=0) for run in runs)
    values = np.full((len(runs), rounds - first + 1), np.nan)
    for i, run in enumerate(runs):
        if initial and run.summary is not None:
            values[i, 0] = run.summary[initial]
        for row in run.rows:
            if row.get(key) is not None:
                values[i, row["round"] - first] = row[key]
    return values


def _accuracy_se(values: np.ndarray, runs: list[RunRecord]) -> np.ndarray | None:
    """Per round, the binomial standard error of the mean accuracy over seeds (None: n unknown)."""
    counts = [run.summary.get("eval_examples") if run.summary else None for run in runs]
    if None in counts:
        return None
    n = np.array(counts, dtype=np.float64)[:, None]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        present = (~np.isnan(values)).sum(axis=0)
        return np.sqrt(np.nansum(values * (1 - values) / n, axis=0)) / present


def _draw(
    ax: Axes, values: np.ndarray, first_round: int, label: str, colour: Any, se: np.ndarray | None = None
) -> None:
    with warnings.catch_warnings():  # rounds no seed has leave gaps, which is what NaN draws
        warnings.simplefilter("ignore", RuntimeWarning)
        mean = np.nanmean(values, axis=0)
        if se is None and len(values) > 1:
            se = np.nanstd(values, axis=0, ddof=1) / np.sqrt((~np.isnan(values)).sum(axis=0))
    if np.isnan(mean).all():
        return
    rounds = np.arange(first_round, first_round + values.shape[1])
    seeds = f"{len(values)} seed" + ("s" if len(values) > 1 else "")
    ax.plot(rounds, mean, marker="o", markersize=3, color=colour, label=f"{label} ({seeds})")
    if se is not None:
        ax.fill_between(rounds, mean - se, mean + se, color=colour, alpha=0.15, linewidth=0)


def _save(fig: Figure, ax: Axes, path: Path, title: str, ylabel: str) -> None:
    ax.set_title(title)
    ax.set_xlabel("round")
    ax.set_ylabel(ylabel)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False)
    fig.savefig(path, bbox_inches="tight")


def _figure() -> tuple[Figure, Axes]:
    fig = Figure(figsize=(7.5, 4.2), dpi=110)
    FigureCanvasAgg(fig)  # attaches itself: savefig renders with Agg
    return fig, fig.add_subplot()


def slug(setup: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", setup)


def plot_setup(out: Path, setup: str, runs: list[RunRecord], colours: dict[str, Any]) -> list[str]:
    """The setup's plots in ``out``, from its finished ``runs``; returns the file names."""
    by_label: dict[str, list[RunRecord]] = {}
    for run in runs:
        by_label.setdefault(run.label, []).append(run)
    federated = {label: group for label, group in sorted(by_label.items()) if label != CENTRALIZED}
    names = []

    fig, ax = _figure()
    for label, group in federated.items():
        accuracy = _per_round(group, "eval_accuracy", initial="initial_eval_accuracy")
        _draw(ax, accuracy, 0, label, colours[label], _accuracy_se(accuracy, group))
    if CENTRALIZED in by_label:
        finals = [r.summary["final_eval_accuracy"] for r in by_label[CENTRALIZED] if r.summary]
        ax.axhline(
            float(np.mean(finals)), color="black", linestyle="--", linewidth=1, label="centralized (final)"
        )
    names.append(f"{slug(setup)}-accuracy.png")
    _save(
        fig, ax, out / names[-1], f"{setup}: eval accuracy (round 0: before training; band: 1 SE)", "accuracy"
    )

    for key, title in DIAGNOSTICS:
        if not any(
            row.get(key) is not None for group in federated.values() for run in group for row in run.rows
        ):
            continue
        fig, ax = _figure()
        for label, group in federated.items():
            _draw(ax, _per_round(group, key), 1, label, colours[label])
        names.append(f"{slug(setup)}-{key}.png")
        _save(fig, ax, out / names[-1], f"{setup}: {title}", title)
    partition = _plot_partition(out, setup, [run for group in federated.values() for run in group])
    return names + partition


def _plot_partition(out: Path, setup: str, runs: list[RunRecord]) -> list[str]:
    """The label histogram of every client as stacked bars, or nothing when no run recorded one."""
    found = sorted(
        run.path / "partition_stats.json" for run in runs if (run.path / "partition_stats.json").is_file()
    )
    if not found:
        return []
    stats = json.loads(found[0].read_text())
    if not stats.get("clients"):
        return []
    histograms = np.array([client["label_histogram"] for client in stats["clients"]], dtype=float)
    names = stats.get("label_names") or [f"label {k}" for k in range(histograms.shape[1])]
    fig, ax = _figure()
    clients = np.arange(len(histograms))
    bottom = np.zeros(len(histograms))
    for k, name in enumerate(names):
        ax.bar(clients, histograms[:, k], bottom=bottom, color=_PALETTE[k % len(_PALETTE)], label=name)
        bottom += histograms[:, k]
    alpha = f" alpha {stats['alpha']}" if stats.get("scheme") == "dirichlet" else ""
    ax.set_title(
        f"{setup}: examples per client by label ({stats.get('scheme')}{alpha}, {found[0].parent.name})"
    )
    ax.set_xlabel("client")
    ax.set_ylabel("examples")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False)
    name = f"{slug(setup)}-partition.png"
    fig.savefig(out / name, bbox_inches="tight")
    return [name]
