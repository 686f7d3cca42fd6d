"""The report's statistics: standard errors of accuracies and paired differences between methods.

Per setup (config) and method, over its finished runs:

- **standard error** of an accuracy on n evaluation examples, ``sqrt(a (1 - a) / n)`` (the binomial
  sampling error of the questions); of a mean over k seeds, ``sqrt(sum_s a_s (1 - a_s) / n_s) / k``.
- **paired difference** of a method to a baseline, in final and in best accuracy, over the seeds both
  ran: per seed the mean over examples of ``correct_method - correct_baseline`` on the same questions
  (the runs' kept predictions, :mod:`fedsubspace.predictions`), averaged over the seeds; its 95% interval
  from a paired bootstrap: each resample draws every seed's examples with replacement (the same draw for
  both methods) and averages the seeds' differences; the interval is the 2.5th to 97.5th percentile of
  :data:`RESAMPLES` resamples from a fixed seed (so a report reproduces byte for byte). It covers the
  sampling of the evaluation questions; seed-to-seed training variation enters only through the average.
- runs without kept predictions (written before fedsubspace kept them) get the **unpaired** normal
  interval ``d +- 1.96 sqrt(sum_s (se_method_s^2 + se_baseline_s^2)) / k`` from accuracies and n alone:
  wider than the paired one whenever the two methods tend to get the same questions right (positively
  correlated), so it marks fewer differences, never more for that reason.
- **per seed and over seeds**: each shared seed's paired difference, and from them (two or more seeds)
  the t interval over seeds, ``mean +- t(0.975, k - 1) sd / sqrt(k)``: it treats each seed's whole
  training run as one draw, so it covers training variation as well as the questions; with 3 seeds it
  is wide (t = 4.30), and a difference it excludes 0 for holds across training runs, not only questions.
  ``sd`` is the sample standard deviation of the per-seed differences, floored, where the runs are
  paired, at the questions' sampling standard deviation of one seed's difference (the root mean square
  of the per-seed paired standard errors): a per-seed difference varies at least that much from the
  questions alone, and differences are multiples of 1/n, so a few seeds can tie exactly (sample sd 0)
  and would otherwise give a zero-width interval that "excludes 0" on a difference of one question.
  Unpaired runs have no such floor (their standard error ignores the pairing, an upper bound, not a
  lower one); where no spread is left to estimate from, there is no interval.
- **win / tie / loss** of every method against every other: by the question-level final-accuracy
  interval, win if it lies above 0, loss if below, tie if it holds 0.
- **round-delta geometry** (the diagnostics of :mod:`fedsubspace.diagnostics` on what clients change in
  a round): per run the mean of each over its rounds from round 2 on, then the mean and sample standard
  deviation over seeds, and each method's per-seed difference to the baseline with the t interval over
  the shared seeds (no floor: a run's mean over rounds has no question sampling to bound its spread).

Best accuracy is each run's best round on the evaluation set itself: an optimistic selection, reported
because the Subspace-Reg paper reports it; final accuracy is the unbiased one.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml
from scipy import stats as scipy_stats

from fedsubspace.experiments.layout import CENTRALIZED, RunRecord
from fedsubspace.markdown import markdown_table
from fedsubspace.predictions import read_predictions
from fedsubspace.results import Status

RESAMPLES = 2000
LEVEL = 0.95
Z = 1.959963984540054  # the standard normal's 97.5th percentile
KINDS = (("final", "final_eval_accuracy"), ("best", "best_eval_accuracy"))


def accuracy_se(accuracy: float, n: int) -> float:
    """The binomial standard error of an accuracy on ``n`` examples."""
    return math.sqrt(max(accuracy * (1.0 - accuracy), 0.0) / n)


def mean_se(accuracies: list[float], counts: list[int]) -> float:
    """The standard error of the mean of independent accuracies (one per seed)."""
    return math.sqrt(sum(a * (1.0 - a) / n for a, n in zip(accuracies, counts, strict=True))) / len(
        accuracies
    )


@dataclass(frozen=True)
class Interval:
    estimate: float
    low: float
    high: float
    test: str  # "paired bootstrap" or "unpaired normal"
    per_seed: tuple[float, ...] = ()  # each shared seed's difference, in seed order
    per_seed_se: tuple[float, ...] = ()  # paired: its standard error over the questions, in seed order

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    @property
    def verdict(self) -> str:
        return "win" if self.low > 0 else "loss" if self.high < 0 else "tie"

    def over_seeds(self) -> Interval | None:
        """The t interval over the per-seed differences, ``sd`` floored at the root mean square of the
        per-seed paired standard errors (module docstring)."""
        k = len(self.per_seed)
        floor = math.sqrt(sum(se * se for se in self.per_seed_se) / k) if self.per_seed_se else 0.0
        return t_over_seeds(self.per_seed, floor, self.per_seed_se)


def t_over_seeds(
    per_seed: tuple[float, ...], floor: float = 0.0, per_seed_se: tuple[float, ...] = ()
) -> Interval | None:
    """``mean +- t(0.975, k - 1) sd / sqrt(k)`` over k per-seed values, ``sd`` their sample standard
    deviation floored at ``floor``; None under two seeds or without any spread to estimate."""
    k = len(per_seed)
    if k < 2:
        return None
    sd = max(float(np.std(per_seed, ddof=1)), floor)
    if sd == 0.0:
        return None
    mean = sum(per_seed) / k
    half = float(scipy_stats.t.ppf(0.5 + LEVEL / 2.0, k - 1)) * sd / math.sqrt(k)
    return Interval(mean, mean - half, mean + half, "t over seeds", per_seed, per_seed_se)


def paired_bootstrap(
    pairs: list[tuple[np.ndarray, np.ndarray]], resamples: int = RESAMPLES, seed: int = 0
) -> Interval:
    """Mean over seeds of ``mean(correct_a - correct_b)``, with its paired-bootstrap interval.

    ``pairs`` holds per seed the two methods' per-example correctness on the same examples (0/1 arrays
    of one length); each resample redraws every seed's examples with replacement.
    """
    rng = np.random.default_rng(seed)
    estimates, ses, draws = [], [], np.zeros(resamples)
    for a, b in pairs:
        difference = a.astype(np.float64) - b.astype(np.float64)
        estimates.append(float(difference.mean()))
        ses.append(float(difference.std()) / math.sqrt(len(difference)))  # the bootstrap's own spread
        draws += difference[rng.integers(0, len(difference), size=(resamples, len(difference)))].mean(axis=1)
    draws /= len(pairs)
    tail = (1.0 - LEVEL) / 2.0
    low, high = np.quantile(draws, [tail, 1.0 - tail])
    return Interval(
        sum(estimates) / len(estimates),
        float(low),
        float(high),
        "paired bootstrap",
        tuple(estimates),
        tuple(ses),
    )


def unpaired_normal(seeds: list[tuple[float, int, float, int]]) -> Interval:
    """Mean over seeds of ``a - b`` from ``(a, n_a, b, n_b)`` per seed, with the normal interval that
    treats the two accuracies as independent (no per-example predictions to pair)."""
    k = len(seeds)
    per_seed = tuple(a - b for a, _, b, _ in seeds)
    estimate = sum(per_seed) / k
    se = math.sqrt(sum(accuracy_se(a, na) ** 2 + accuracy_se(b, nb) ** 2 for a, na, b, nb in seeds)) / k
    return Interval(estimate, estimate - Z * se, estimate + Z * se, "unpaired normal", per_seed)


def compare(runs_a: dict[int, RunRecord], runs_b: dict[int, RunRecord], kind: str) -> Interval | None:
    """``kind`` (final or best) accuracy of runs_a minus runs_b over their shared seeds: paired where
    every shared seed kept predictions on the same questions (same labels in the same order), else
    unpaired; None without shared seeds or without the numbers either needs."""
    seeds = sorted(set(runs_a) & set(runs_b))
    if not seeds:
        return None
    pairs = []
    for seed in seeds:
        a, b = read_predictions(runs_a[seed].path, kind), read_predictions(runs_b[seed].path, kind)
        if a is None or b is None or a.examples.labels != b.examples.labels:
            break
        pairs.append((np.array(a.examples.correct(), np.int8), np.array(b.examples.correct(), np.int8)))
    else:
        return paired_bootstrap(pairs)
    key = dict(KINDS)[kind]
    summaries = [(runs_a[s].summary or {}, runs_b[s].summary or {}) for s in seeds]
    if any("eval_examples" not in sa or "eval_examples" not in sb for sa, sb in summaries):
        return None
    return unpaired_normal(
        [(sa[key], sa["eval_examples"], sb[key], sb["eval_examples"]) for sa, sb in summaries]
    )


def _eval_protocol(runs: list[RunRecord]) -> str:
    """How the setup's evaluation questions were drawn, from the runs' configs."""
    protocols = set()
    for run in runs:
        config = yaml.safe_load((run.path / "config.yaml").read_text()) or {}
        eval_seed = config.get("eval_seed")
        if "max_eval_samples" in config and config["max_eval_samples"] is None:  # no draw: the whole split
            protocols.add("the whole evaluation split, the same for every seed")
        else:
            protocols.add(
                "drawn per seed (eval_seed null)" if eval_seed is None else f"fixed (eval_seed {eval_seed})"
            )
    return "; ".join(sorted(protocols))


def _by_label(records: list[RunRecord], setup: str) -> dict[str, dict[int, RunRecord]]:
    """The setup's finished runs evaluated on the shared split, per label and seed (personalised
    methods are evaluated on other questions and cannot pair)."""
    groups: dict[str, dict[int, RunRecord]] = {}
    for run in records:
        if run.setup == setup and run.status is Status.FINISHED and run.global_evaluation:
            groups.setdefault(run.label, {})[run.seed] = run
    return dict(sorted(groups.items(), key=lambda item: (item[0] == CENTRALIZED, item[0])))


# The round-delta diagnostics, as the report names them.
GEOMETRY = (
    ("delta_overlap", "delta overlap"),
    ("pairwise_delta_overlap", "pairwise delta overlap"),
    ("delta_cancellation_ratio", "delta cancellation ratio"),
    ("delta_cosine", "delta cosine"),
)
# Round 1 starts every method from the untrained adapter, before any server rule has acted (and
# subspace_reg's anchor is then the zero-initialised B): it shows the partition, not the method.
FIRST_GEOMETRY_ROUND = 2


def mean_over_rounds(run: RunRecord, key: str) -> float | None:
    """The mean of ``key`` over the run's rounds from :data:`FIRST_GEOMETRY_ROUND` on, rounds where it
    is undefined left out; None where it never is defined (a method without one global adapter)."""
    values = [
        float(row[key])
        for row in run.rows
        if row.get("round", 0) >= FIRST_GEOMETRY_ROUND
        and row.get(key) is not None
        and math.isfinite(row[key])
    ]
    return math.fsum(values) / len(values) if values else None


def _mean_sd_cell(values: list[float]) -> str:
    if not values:
        return "–"
    mean = math.fsum(values) / len(values)
    return f"{mean:.4f}" if len(values) < 2 else f"{mean:.4f} ± {float(np.std(values, ddof=1)):.4f}"


@dataclass(frozen=True)
class GeometryDifference:
    label: str
    shared_seeds: int
    intervals: dict[str, Interval | None]  # per GEOMETRY key: the t interval over the shared seeds


def _geometry(
    groups: dict[str, dict[int, RunRecord]], baseline: str
) -> tuple[list[list[str]], list[GeometryDifference]]:
    """The round-delta table (mean ± sd over seeds per method) and the differences to ``baseline``."""
    means: dict[str, dict[str, dict[int, float]]] = {}  # label -> key -> seed -> the run's mean
    for label, runs in groups.items():
        if label == CENTRALIZED:  # a lone client has no one to disagree with
            continue
        run_means = {key: {s: mean_over_rounds(r, key) for s, r in runs.items()} for key, _ in GEOMETRY}
        means[label] = {key: {s: v for s, v in m.items() if v is not None} for key, m in run_means.items()}
    rows, differences = [], []
    for label, per_key in means.items():
        if not any(per_key.values()):
            continue
        cells = [_mean_sd_cell(list(per_key[key].values())) for key, _ in GEOMETRY]
        rows.append([label, str(len(groups[label])), *cells])
        if label == baseline or baseline not in means:
            continue
        intervals = {}
        for key, _ in GEOMETRY:
            mine, theirs = per_key[key], means[baseline][key]
            intervals[key] = t_over_seeds(tuple(mine[s] - theirs[s] for s in sorted(set(mine) & set(theirs))))
        shared = len(set(groups[label]) & set(groups[baseline]))
        differences.append(GeometryDifference(label, shared, intervals))
    return rows, differences


def _fmt(value: float) -> str:
    return f"{value:+.4f}"


def _interval_cell(interval: Interval | None) -> str:
    if interval is None:
        return "–"
    mark = " *" if interval.excludes_zero else ""
    return f"{_fmt(interval.estimate)} [{_fmt(interval.low)}, {_fmt(interval.high)}]{mark}"


@dataclass(frozen=True)
class Difference:
    label: str
    shared_seeds: int
    final: Interval | None
    best: Interval | None


@dataclass
class SetupStatistics:
    setup: str
    protocol: str
    se_rows: list[list[str]]
    differences: list[Difference]  # to the baseline; empty without baseline runs
    verdicts: dict[str, dict[str, str]]  # method -> other -> win / tie / loss / –
    baseline_present: bool
    geometry_rows: list[list[str]]  # round-delta diagnostics, mean ± sd over seeds per method
    geometry_differences: list[GeometryDifference]  # to the baseline


def _se_row(label: str, runs: dict[int, RunRecord]) -> list[str]:
    summaries = [r.summary or {} for r in runs.values()]
    counts = [s.get("eval_examples") for s in summaries]
    known = None not in counts
    cells = [
        label,
        str(len(runs)),
        ", ".join(str(n) for n in sorted({n for n in counts if n is not None})) if known else "–",
    ]
    for _, key in KINDS:
        values = [s[key] for s in summaries]
        cells.append(f"{sum(values) / len(values):.4f} ± {mean_se(values, counts):.4f}" if known else "–")  # type: ignore[arg-type]
    kept = all(read_predictions(r.path, "final") is not None for r in runs.values())
    return [*cells, "yes" if kept else "no"]


def setup_statistics(records: list[RunRecord], setup: str, baseline: str) -> SetupStatistics:
    groups = _by_label(records, setup)
    differences = []
    if baseline in groups:
        differences = [
            Difference(
                label,
                len(set(runs) & set(groups[baseline])),
                compare(runs, groups[baseline], "final"),
                compare(runs, groups[baseline], "best"),
            )
            for label, runs in groups.items()
            if label != baseline
        ]
    verdicts: dict[str, dict[str, str]] = {}
    for label, runs in groups.items():
        verdicts[label] = {}
        for other, other_runs in groups.items():
            if other != label:
                interval = compare(runs, other_runs, "final")
                verdicts[label][other] = "–" if interval is None else interval.verdict
    return SetupStatistics(
        setup,
        _eval_protocol([r for runs in groups.values() for r in runs.values()]),
        [_se_row(label, runs) for label, runs in groups.items()],
        differences,
        verdicts,
        baseline in groups,
        *_geometry(groups, baseline),
    )


def all_statistics(records: list[RunRecord], baseline: str) -> list[SetupStatistics]:
    setups = sorted({r.setup for r in records if r.status is Status.FINISHED})
    return [setup_statistics(records, setup, baseline) for setup in setups]


SE_HEADER = ["method", "seeds", "n (questions)", "final acc. ± SE", "best acc. ± SE", "predictions kept"]
DIFFERENCE_HEADER = [
    "method",
    "shared seeds",
    "Δ final acc. [95% CI]",
    "Δ best acc. [95% CI]",
    "test",
    "Δ final acc. per seed",
    "Δ final acc. over seeds [95% t]",
]
WTL_TITLE = "Win / tie / loss in final accuracy (row against column):"
GEOMETRY_TITLE = (
    "Round-delta geometry (what the clients change in a round; docs/methods.md): per run the mean over "
    f"rounds {FIRST_GEOMETRY_ROUND} on (round 1 starts from the untrained adapter, before any server rule "
    "has acted), mean ± sample standard deviation over seeds:"
)
GEOMETRY_HEADER = ["method", "seeds", *(title for _, title in GEOMETRY)]
GEOMETRY_DIFFERENCE_HEADER = ["method", "shared seeds", *(f"Δ {title} [95% t]" for _, title in GEOMETRY)]
EXPLANATION = (
    "SE: binomial standard error of the accuracy over the evaluation questions (of the mean over seeds: "
    "sqrt(sum a(1-a)/n) / k). Δ: the method minus the baseline, per seed on the same questions, averaged "
    f"over the shared seeds; 95% interval by a paired bootstrap over examples within each seed ({RESAMPLES} "
    "resamples, fixed seed), or, where a run kept no per-example predictions (runs written before they were "
    "kept), by the unpaired normal approximation from accuracies and n (wider: it ignores the pairing). "
    "* marks an interval that excludes 0. Win / tie / loss: the row's method against the column's, by the "
    "final-accuracy interval. Both intervals cover the sampling of evaluation questions; seed-to-seed "
    "training variation enters only through the average over seeds. The last two columns add it: each "
    "seed's own Δ final, and (two or more seeds) the t interval over those per-seed differences, mean ± "
    "t(0.975, k-1) sd / sqrt(k), which treats each training run as one draw (wide with 3 seeds: t = 4.30); "
    "sd is the per-seed differences' sample standard deviation, floored (paired runs) at the questions' "
    "sampling standard deviation of one seed's difference, so that seeds tying exactly do not give a "
    "zero-width interval; – where no spread is left to estimate. "
    "Best accuracy selects a round on the evaluation set itself (optimistic)."
)


def _difference_rows(stats: SetupStatistics) -> list[list[str]]:
    rows = []
    for d in stats.differences:
        tests = sorted({i.test for i in (d.final, d.best) if i is not None})
        rows.append(
            [
                d.label,
                str(d.shared_seeds),
                _interval_cell(d.final),
                _interval_cell(d.best),
                ", ".join(tests) or "–",
                ", ".join(_fmt(v) for v in d.final.per_seed) if d.final is not None else "–",
                _interval_cell(d.final.over_seeds() if d.final is not None else None),
            ]
        )
    return rows


def _wtl(verdicts: dict[str, dict[str, str]]) -> tuple[list[str], list[list[str]]]:
    labels = list(verdicts)
    rows = []
    for label in labels:
        cells = [verdicts[label][other] if other != label else "·" for other in labels]
        counts = [sum(v == kind for v in verdicts[label].values()) for kind in ("win", "tie", "loss")]
        rows.append([label, *cells, " / ".join(map(str, counts))])
    return ["method", *labels, "W / T / L"], rows


def setup_tables(stats: SetupStatistics, baseline: str) -> list[tuple[str, list[str], list[list[str]]]]:
    """The setup's tables as (caption, header, rows), in the report's order."""
    tables = [(f"Evaluation questions: {stats.protocol}.", SE_HEADER, stats.se_rows)]
    if stats.baseline_present:
        tables.append((f"Difference to {baseline}:", DIFFERENCE_HEADER, _difference_rows(stats)))
    else:
        tables.append((f"No {baseline} runs here: no differences to it.", [], []))
    tables.append((WTL_TITLE, *_wtl(stats.verdicts)))
    if stats.geometry_rows:
        tables.append((GEOMETRY_TITLE, GEOMETRY_HEADER, stats.geometry_rows))
    if stats.geometry_differences:
        rows = [
            [d.label, str(d.shared_seeds), *(_interval_cell(d.intervals[key]) for key, _ in GEOMETRY)]
            for d in stats.geometry_differences
        ]
        caption = (
            f"Round-delta geometry, difference to {baseline}: per shared seed the method's mean over "
            "rounds minus the baseline's, and the t interval over those seeds (* excludes 0; – under two "
            "seeds):"
        )
        tables.append((caption, GEOMETRY_DIFFERENCE_HEADER, rows))
    return tables


def markdown_section(statistics: list[SetupStatistics], baseline: str) -> list[str]:
    lines = ["", "## Standard errors and paired differences", "", EXPLANATION]
    for stats in statistics:
        lines += ["", f"### {stats.setup}"]
        for caption, header, rows in setup_tables(stats, baseline):
            lines += ["", caption]
            if header:
                lines += ["", markdown_table(header, rows)]
    return lines


def write_csv(path: Path, statistics: list[SetupStatistics]) -> None:
    """The differences to the baseline (``comparisons.csv``): one row per setup, method and kind (final
    or best accuracy, or a round-delta diagnostic)."""
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(
            [
                "config",
                "method",
                "shared_seeds",
                "kind",
                "estimate",
                "low",
                "high",
                "test",
                "per_seed",
                "seeds_t_low",
                "seeds_t_high",
            ]
        )
        for stats in statistics:
            for d in stats.differences:
                for kind, interval in (("final", d.final), ("best", d.best)):
                    if interval is None:
                        writer.writerow([stats.setup, d.label, d.shared_seeds, kind, *[""] * 7])
                        continue
                    over = interval.over_seeds()
                    writer.writerow(
                        [
                            stats.setup,
                            d.label,
                            d.shared_seeds,
                            kind,
                            interval.estimate,
                            interval.low,
                            interval.high,
                            interval.test,
                            " ".join(repr(v) for v in interval.per_seed),
                            "" if over is None else over.low,
                            "" if over is None else over.high,
                        ]
                    )
            for g in stats.geometry_differences:  # round-delta geometry: the t interval over seeds only
                for key, _ in GEOMETRY:
                    interval = g.intervals[key]
                    if interval is None:
                        writer.writerow([stats.setup, g.label, g.shared_seeds, key, *[""] * 7])
                        continue
                    bounds = [interval.low, interval.high]
                    per_seed = " ".join(repr(v) for v in interval.per_seed)
                    head = [stats.setup, g.label, g.shared_seeds, key, interval.estimate]
                    writer.writerow([*head, *bounds, interval.test, per_seed, *bounds])
