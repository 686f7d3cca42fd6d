"""``fedsubspace report DIR``: every results directory under DIR in tables and plots, in ``DIR/report/``.

One row per setup (config) and method: the mean and sample standard deviation over seeds of each
finished run's numbers (:data:`METRICS`), plus two reference rows per setup: ``initial`` (the model
before training, from the runs' summaries: no run of its own) and ``centralized`` (see
:mod:`fedsubspace.experiments.matrix`). Runs that failed or did not finish are listed apart, never
averaged. Writes ``summary.md``, ``summary.csv``, the plots of :mod:`.plots` and ``index.html``.
"""

from __future__ import annotations

import csv
import html
import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedsubspace.experiments import stats
from fedsubspace.experiments.layout import CENTRALIZED, INITIAL, REPORT, RunRecord, Status, collect
from fedsubspace.experiments.plots import colour_map, plot_setup
from fedsubspace.markdown import markdown_table


def _final(key: str) -> Callable[[RunRecord], float | None]:
    """A finished run's final diagnostic: its summary is the truth (a metrics line torn by a crash
    must not make an earlier round's value the final one)."""
    return lambda run: (run.summary or {}).get("final_diagnostics", {}).get(key)


def _per_round(
    value: Callable[[dict[str, Any]], float | None],
    reduce: Callable[[list[float]], float] = statistics.fmean,
) -> Callable[[RunRecord], float | None]:
    """``reduce`` (the mean) over a run's rounds of ``value`` (rounds where it is undefined left out)."""

    def over_rounds(run: RunRecord) -> float | None:
        values = [v for v in map(value, run.rows) if v is not None]
        return reduce(values) if values else None

    return over_rounds


def _summary(key: str) -> Callable[[RunRecord], float | None]:
    return lambda run: run.summary.get(key) if run.summary else None


@dataclass(frozen=True)
class Metric:
    key: str  # the CSV column stem
    title: str  # the table header
    value: Callable[[RunRecord], float | None]  # one finished run's number
    digits: int  # decimals in the tables


METRICS = (
    Metric("best_accuracy", "best acc.", _summary("best_eval_accuracy"), 4),
    Metric("final_accuracy", "final acc.", _summary("final_eval_accuracy"), 4),
    Metric("final_eval_loss", "final loss", _summary("final_eval_loss"), 4),
    Metric("final_basis_overlap", "final basis overlap", _final("basis_overlap"), 4),
    Metric("final_update_overlap", "final update overlap", _final("update_overlap"), 4),
    Metric("cancellation_ratio", "cancellation ratio", _per_round(lambda r: r.get("cancellation_ratio")), 4),
    Metric("aggregation_error", "aggregation error", _per_round(lambda r: r.get("aggregation_error")), 4),
    Metric("bytes_per_round", "bytes / round", _per_round(lambda r: r["bytes_up"] + r["bytes_down"]), 0),
    # the median: a round during which the machine was paused or shared must not move a run's figure
    Metric(
        "seconds_per_round", "seconds / round", _per_round(lambda r: r.get("seconds"), statistics.median), 2
    ),
)
# The model before training has an accuracy and a loss only.
INITIAL_METRICS: dict[str, Callable[[RunRecord], float | None]] = {
    "best_accuracy": _summary("initial_eval_accuracy"),
    "final_accuracy": _summary("initial_eval_accuracy"),
    "final_eval_loss": _summary("initial_eval_loss"),
}
# A lone client has no one to disagree with: its overlaps are 1 and its aggregation exact by construction.
CENTRALIZED_METRICS = {
    m.key: m.value
    for m in METRICS
    if m.key not in ("final_basis_overlap", "final_update_overlap", "cancellation_ratio", "aggregation_error")
}
DEFINITIONS = (
    "Mean ± sample standard deviation over seeds (finished runs only). Accuracy and loss on the "
    "evaluation split (fedsa: each client's own model on its held-out data). Overlaps: the last round's. "
    "Cancellation ratio, aggregation error and bytes (up + down): the mean over a run's rounds; "
    "seconds: the median over a run's rounds. "
    f"'{INITIAL}': the model before training (from the runs' summaries; no run of its own). "
    f"'{CENTRALIZED}': one client holding all the training data, trained as fedavg for as many "
    "forward/backward passes as the federation's sampled clients make in total, round by round "
    "(its diagnostics are trivial and left out)."
)


@dataclass
class Stat:
    mean: float
    std: float | None  # None for a single seed


@dataclass
class TableRow:
    setup: str
    label: str
    seeds: list[int]
    stats: dict[str, Stat | None]  # metric key -> over seeds (None: undefined for this row)


def _stat(values: list[float | None]) -> Stat | None:
    present = [v for v in values if v is not None and math.isfinite(v)]
    if not present:
        return None
    return Stat(statistics.fmean(present), statistics.stdev(present) if len(present) > 1 else None)


def _order(label: str) -> tuple[int, str]:
    return (0 if label == INITIAL else 2 if label == CENTRALIZED else 1, label)


def table(records: list[RunRecord]) -> list[TableRow]:
    """The rows of the summary: per setup, ``initial``, the methods by name, then ``centralized``."""
    finished = [r for r in records if r.status is Status.FINISHED]
    groups: dict[tuple[str, str], list[RunRecord]] = {}
    for run in finished:
        groups.setdefault((run.setup, run.label), []).append(run)
    for setup in sorted({r.setup for r in finished}):
        # Per seed one run evaluated on the shared split, the centralized one first: any such run's
        # initial model is the same, and a personalised method's initial numbers are on other data.
        candidates = sorted(
            (r for r in finished if r.setup == setup and r.global_evaluation),
            key=lambda r: r.label != CENTRALIZED,
        )
        by_seed: dict[int, RunRecord] = {}
        for run in candidates:
            by_seed.setdefault(run.seed, run)
        if by_seed:
            groups[(setup, INITIAL)] = list(by_seed.values())
    rows = []
    for (setup, label), runs in sorted(groups.items(), key=lambda item: (item[0][0], _order(item[0][1]))):
        values = {INITIAL: INITIAL_METRICS, CENTRALIZED: CENTRALIZED_METRICS}.get(
            label, {m.key: m.value for m in METRICS}
        )
        stats = {m.key: _stat([values[m.key](r) for r in runs]) if m.key in values else None for m in METRICS}
        rows.append(TableRow(setup, label, sorted(r.seed for r in runs), stats))
    return rows


MIXED_SEEDS = (
    "Rows over different seeds: a seed fixes its own partition and evaluation questions, so these rows "
    "compare only over the seeds they share."
)


def seed_groups(rows: list[TableRow]) -> dict[str, str]:
    """Per setup whose rows do not all hold the same seeds, which rows hold which (a matrix in progress)."""
    groups: dict[str, str] = {}
    for setup in sorted({row.setup for row in rows}):
        labels_by_seeds: dict[tuple[int, ...], list[str]] = {}
        for row in rows:
            if row.setup == setup:
                labels_by_seeds.setdefault(tuple(row.seeds), []).append(row.label)
        if len(labels_by_seeds) > 1:
            groups[setup] = "; ".join(
                f"{', '.join(labels)}: seeds {', '.join(map(str, seeds))}"
                for seeds, labels in labels_by_seeds.items()
            )
    return groups


def _cell(stat: Stat | None, digits: int) -> str:
    if stat is None:
        return "–"
    text = f"{stat.mean:,.{digits}f}"
    return text if stat.std is None else f"{text} ± {stat.std:,.{digits}f}"


def _incomplete_detail(run: RunRecord) -> str:
    if run.status is Status.FAILED:
        return run.error or "failed"
    return f"{len(run.rows)} of {run.num_rounds} rounds"


def write_markdown(
    path: Path,
    rows: list[TableRow],
    mixed: dict[str, str],
    unfinished: list[RunRecord],
    root: Path,
    statistics: Sequence[str] = (),
) -> None:
    header = ["config", "method", "seeds", *(m.title for m in METRICS)]
    body = (
        [row.setup, row.label, str(len(row.seeds)), *(_cell(row.stats[m.key], m.digits) for m in METRICS)]
        for row in rows
    )
    lines = ["# fedsubspace report", "", DEFINITIONS, "", markdown_table(header, body)]
    if mixed:
        lines += ["", MIXED_SEEDS, ""] + [f"- {setup}: {groups}" for setup, groups in mixed.items()]
    lines += list(statistics)
    if unfinished:
        listed = (
            # an error message must not split the row
            [str(run.path.relative_to(root)), run.status.value, _incomplete_detail(run).replace("|", "\\|")]
            for run in unfinished
        )
        lines += [
            "",
            "## Failed or incomplete runs (not averaged)",
            "",
            markdown_table(["run", "status", "detail"], listed),
        ]
    path.write_text("\n".join(lines) + "\n")


def write_csv(path: Path, rows: list[TableRow]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(
            ["config", "method", "seeds", *(f"{m.key}_{s}" for m in METRICS for s in ("mean", "std"))]
        )
        for row in rows:
            cells: list[Any] = [row.setup, row.label, len(row.seeds)]
            for metric in METRICS:
                stat = row.stats[metric.key]
                cells += ["", ""] if stat is None else [stat.mean, "" if stat.std is None else stat.std]
            writer.writerow(cells)


def _html_table(header: list[str], body: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    rows = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>" for cells in body)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"


STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: right; }
th:nth-child(-n+2), td:nth-child(-n+2) { text-align: left; }
img { max-width: 48%; margin: 0.5em 0.5%; border: 1px solid #eee; }
"""


def write_html(
    path: Path,
    rows: list[TableRow],
    mixed: dict[str, str],
    unfinished: list[RunRecord],
    plots: dict[str, list[str]],
    root: Path,
    statistics: dict[str, list[tuple[str, list[str], list[list[str]]]]] | None = None,
) -> None:
    header = ["method", "seeds", *(m.title for m in METRICS)]
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>fedsubspace report</title>",
        f"<style>{STYLE}</style></head><body><h1>fedsubspace report: {html.escape(str(root))}</h1>",
        f"<p>{html.escape(DEFINITIONS)}</p>",
        "<p>Also as <a href='summary.md'>summary.md</a> and <a href='summary.csv'>summary.csv</a>.</p>",
    ]
    for setup in sorted({row.setup for row in rows}):
        body = [
            [row.label, str(len(row.seeds)), *(_cell(row.stats[m.key], m.digits) for m in METRICS)]
            for row in rows
            if row.setup == setup
        ]
        parts += [f"<h2>{html.escape(setup)}</h2>", _html_table(header, body)]
        if setup in mixed:
            parts.append(f"<p>{html.escape(MIXED_SEEDS)} {html.escape(mixed[setup])}.</p>")
        for caption, header, body in (statistics or {}).get(setup, []):
            parts.append(f"<p>{html.escape(caption)}</p>")
            if header:
                parts.append(_html_table(header, body))
        parts += [
            f"<a href='{html.escape(name)}'><img src='{html.escape(name)}' alt='{html.escape(name)}'></a>"
            for name in plots.get(setup, [])
        ]
    if unfinished:
        parts.append("<h2>Failed or incomplete runs (not averaged)</h2>")
        body = [[str(r.path.relative_to(root)), r.status.value, _incomplete_detail(r)] for r in unfinished]
        parts.append(_html_table(["run", "status", "detail"], body))
    parts.append("</body></html>")
    path.write_text("\n".join(parts) + "\n")


def write_report(root: Path, baseline: str = "fedavg") -> Path:
    """The report of every run under ``root``, in ``root/report/``; returns that directory. Paired
    differences are taken to the method ``baseline`` (:mod:`.stats`)."""
    records = collect(root)
    out = root / REPORT
    out.mkdir(exist_ok=True)
    rows = table(records)
    unfinished = [r for r in records if r.status is not Status.FINISHED]
    colours = colour_map([r.label for r in records if r.label != CENTRALIZED])  # drawn in black
    plots = {
        setup: plot_setup(
            out, setup, [r for r in records if r.setup == setup and r.status is Status.FINISHED], colours
        )
        for setup in sorted({row.setup for row in rows})
    }
    mixed = seed_groups(rows)
    statistics = stats.all_statistics(records, baseline)
    write_markdown(
        out / "summary.md", rows, mixed, unfinished, root, stats.markdown_section(statistics, baseline)
    )
    write_csv(out / "summary.csv", rows)
    stats.write_csv(out / "comparisons.csv", statistics)
    tables = {s.setup: stats.setup_tables(s, baseline) for s in statistics}
    write_html(out / "index.html", rows, mixed, unfinished, plots, root, tables)
    return out
