"""The report's statistics (experiments/stats.py): the paired interval's coverage on synthetic
predictions, the unpaired fallback by hand, and the report's tables on hand-written runs."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers import metric_row, write_run

from fedsubspace.cli import main
from fedsubspace.experiments import stats
from fedsubspace.experiments.layout import collect
from fedsubspace.predictions import write_predictions
from fedsubspace.scoring import result_from_scores


def synthetic_pair(rng: np.random.Generator, n: int, gain: float) -> tuple[np.ndarray, np.ndarray]:
    """A baseline right on half the questions and a method that additionally gets right a fraction
    ``gain`` of the questions (the population difference is gain / 2), with per-question noise shared
    between the two (the pairing the bootstrap exploits)."""
    baseline = rng.random(n) < 0.5
    method = baseline | (rng.random(n) < gain)
    return method.astype(np.int8), baseline.astype(np.int8)


def test_the_paired_interval_covers_a_known_difference_and_excludes_zero():
    rng = np.random.default_rng(7)
    covered = 0
    for _ in range(20):
        interval = stats.paired_bootstrap([synthetic_pair(rng, 400, 0.2) for _ in range(3)], resamples=1000)
        assert interval.test == "paired bootstrap" and interval.excludes_zero and interval.verdict == "win"
        covered += interval.low <= 0.1 <= interval.high
    assert covered >= 16  # a 95% interval: about 19 of 20; 16 or fewer has probability < 2%


def test_without_a_difference_the_interval_rarely_excludes_zero():
    rng = np.random.default_rng(11)
    excluded = 0
    draws = 200
    for _ in range(draws):
        pairs = []
        for _ in range(3):  # two methods with the same accuracy, correlated through the questions
            easy = rng.random(200) < 0.4
            pairs.append(
                (
                    (easy | (rng.random(200) < 0.2)).astype(np.int8),
                    (easy | (rng.random(200) < 0.2)).astype(np.int8),
                )
            )
        excluded += stats.paired_bootstrap(
            pairs, resamples=500, seed=int(rng.integers(1 << 30))
        ).excludes_zero
    # expected about 5% of 200 = 10 (a little more: percentile intervals run slightly narrow);
    # more than 25 has probability below 1e-4 under a true 5% rate
    assert excluded <= 25


def test_the_paired_interval_is_a_function_of_its_inputs_and_seed():
    rng = np.random.default_rng(3)
    pairs = [synthetic_pair(rng, 100, 0.1) for _ in range(2)]
    assert stats.paired_bootstrap(pairs) == stats.paired_bootstrap(pairs)
    estimate = np.mean([np.mean(a - b) for a, b in pairs])
    assert stats.paired_bootstrap(pairs).estimate == pytest.approx(estimate)


def test_unpaired_normal_and_standard_errors_by_hand():
    interval = stats.unpaired_normal([(0.6, 100, 0.5, 100), (0.55, 200, 0.5, 200)])
    se = math.sqrt(0.24 / 100 + 0.25 / 100 + 0.2475 / 200 + 0.25 / 200) / 2
    assert interval.estimate == pytest.approx(0.075)
    assert interval.low == pytest.approx(0.075 - 1.959963984540054 * se)
    assert interval.high == pytest.approx(0.075 + 1.959963984540054 * se)
    assert stats.accuracy_se(0.5, 100) == pytest.approx(0.05)
    assert stats.mean_se([0.5, 0.5], [100, 100]) == pytest.approx(0.05 / math.sqrt(2))


def write_predicted_run(path: Path, method: str, seed: int, correct: list[bool]) -> None:
    """A finished run whose best and final predictions get ``correct`` right (4 choices, label 0)."""
    n = len(correct)
    accuracy = sum(correct) / n
    summary = {
        "initial_eval_accuracy": 0.25,
        "initial_eval_loss": 1.4,
        "best_eval_accuracy": accuracy,
        "final_eval_accuracy": accuracy,
        "final_eval_loss": 1.2,
        "eval_examples": n,
    }
    write_run(path, method, seed, [metric_row(1, accuracy), metric_row(2, accuracy)], summary=summary)
    scores = torch.tensor([[1.0, 0.0, 0.0, 0.0] if right else [0.0, 1.0, 0.0, 0.0] for right in correct])
    result = result_from_scores(scores, torch.zeros(n, dtype=torch.long))
    for name in ("initial", "best", "final"):
        write_predictions(path, name, 2, result)


def test_the_report_pairs_runs_with_predictions_and_falls_back_without(tmp_path: Path, capsys):
    rng = np.random.default_rng(5)
    for seed in (1, 2):
        method, baseline = synthetic_pair(rng, 300, 0.4)
        write_predicted_run(tmp_path / "toy" / "fedavg" / f"seed{seed}", "fedavg", seed, list(baseline == 1))
        write_predicted_run(tmp_path / "toy" / "svd" / f"seed{seed}", "svd", seed, list(method == 1))
    # an older run without predictions: unpaired
    write_run(
        tmp_path / "toy" / "ffa" / "seed1",
        "ffa",
        1,
        [metric_row(1, 0.5)],
        summary={
            "initial_eval_accuracy": 0.25,
            "initial_eval_loss": 1.4,
            "best_eval_accuracy": 0.5,
            "final_eval_accuracy": 0.5,
            "final_eval_loss": 1.2,
            "eval_examples": 300,
        },
    )
    computed = stats.all_statistics(collect(tmp_path), "fedavg")
    (toy,) = computed
    by_label = {d.label: d for d in toy.differences}
    assert by_label["svd"].final is not None and by_label["svd"].final.test == "paired bootstrap"
    assert by_label["svd"].final.excludes_zero and by_label["svd"].final.estimate > 0.1
    assert by_label["ffa"].final is not None and by_label["ffa"].final.test == "unpaired normal"
    assert toy.verdicts["svd"]["fedavg"] == "win" and toy.verdicts["fedavg"]["svd"] == "loss"
    assert toy.protocol == "drawn per seed (eval_seed null)"
    for run in (tmp_path / "toy").glob("*/seed*"):  # the whole split: no draw, whatever eval_seed says
        config = yaml.safe_load((run / "config.yaml").read_text())
        (run / "config.yaml").write_text(yaml.safe_dump({**config, "max_eval_samples": None}))
    (again,) = stats.all_statistics(collect(tmp_path), "fedavg")
    assert again.protocol == "the whole evaluation split, the same for every seed"

    assert main(["report", str(tmp_path), "--baseline", "svd"]) == 0
    summary_md = (tmp_path / "report" / "summary.md").read_text()
    assert "Difference to svd:" in summary_md and "paired bootstrap" in summary_md
    assert "| fedavg | 2 | " in summary_md and " *" in summary_md
    assert "Δ final acc. per seed" in summary_md and "Δ final acc. over seeds [95% t]" in summary_md
    html = (tmp_path / "report" / "index.html").read_text()
    assert "Win / tie / loss" in html
    csv_text = (tmp_path / "report" / "comparisons.csv").read_text().splitlines()
    assert csv_text[0] == (
        "config,method,shared_seeds,kind,estimate,low,high,test,per_seed,seeds_t_low,seeds_t_high"
    )
    assert any(line.startswith("toy,fedavg,2,final,-") for line in csv_text)
    first = summary_md
    assert main(["report", str(tmp_path), "--baseline", "svd"]) == 0
    assert (tmp_path / "report" / "summary.md").read_text() == first  # byte for byte

    assert main(["report", str(tmp_path), "--baseline", "fedsvd"]) == 0
    assert "No fedsvd runs here" in (tmp_path / "report" / "summary.md").read_text()


def test_the_interval_over_seeds_by_hand():
    rng = np.random.default_rng(13)
    pairs = [synthetic_pair(rng, 150, gain) for gain in (0.0, 0.1, 0.3)]
    interval = stats.paired_bootstrap(pairs, resamples=200)
    per_seed = [float(np.mean(a.astype(float) - b)) for a, b in pairs]
    assert interval.per_seed == pytest.approx(per_seed)
    over = interval.over_seeds()
    assert over is not None and over.test == "t over seeds"
    half = 4.302652729911275 * float(np.std(per_seed, ddof=1)) / math.sqrt(3)  # t(0.975, 2)
    assert over.estimate == pytest.approx(interval.estimate)
    assert (over.low, over.high) == pytest.approx((interval.estimate - half, interval.estimate + half))
    # the questions alone are not the training runs: this spread of seeds is wider than the bootstrap
    assert over.high - over.low > interval.high - interval.low
    assert stats.paired_bootstrap(pairs[:1], resamples=50).over_seeds() is None  # one seed: no spread
    unpaired = stats.unpaired_normal([(0.6, 100, 0.5, 100), (0.55, 200, 0.5, 200)])
    assert unpaired.per_seed == pytest.approx((0.1, 0.05))
    assert unpaired.per_seed_se == ()  # its standard error ignores the pairing: no floor from it
    tied = stats.unpaired_normal([(0.6, 100, 0.5, 100), (0.6, 100, 0.5, 100)])
    assert tied.over_seeds() is None  # no spread over seeds and no floor: no interval


def test_seeds_that_tie_exactly_do_not_give_a_zero_width_interval():
    """Two seeds whose differences are both one question: the sample sd is 0, and the interval is
    floored at the questions' sampling spread instead of collapsing onto the estimate."""
    rng = np.random.default_rng(5)
    pairs = []
    for _ in range(2):
        baseline = (rng.random(872) < 0.7).astype(np.int8)
        method = baseline.copy()
        flips = rng.choice(872, size=21, replace=False)  # 11 questions gained, 10 lost: net +1
        method[flips[:11]], baseline[flips[:11]] = 1, 0
        method[flips[11:]], baseline[flips[11:]] = 0, 1
        pairs.append((method, baseline))
    interval = stats.paired_bootstrap(pairs, resamples=200)
    assert interval.per_seed == pytest.approx((1 / 872, 1 / 872))
    over = interval.over_seeds()
    assert over is not None
    differences = [a.astype(float) - b for a, b in pairs]
    floor = math.sqrt(np.mean([d.var() / len(d) for d in differences]))
    half = 12.706204736174707 * floor / math.sqrt(2)  # t(0.975, 1)
    assert (over.low, over.high) == pytest.approx((1 / 872 - half, 1 / 872 + half))
    assert not over.excludes_zero
    same = (pairs[0][1], pairs[0][1])  # identical predictions: no spread at all, no interval
    assert stats.paired_bootstrap([same, same], resamples=50).over_seeds() is None


GEOMETRY_SUMMARY = {
    "initial_eval_accuracy": 0.25,
    "initial_eval_loss": 1.4,
    "best_eval_accuracy": 0.5,
    "final_eval_accuracy": 0.5,
    "final_eval_loss": 1.2,
    "eval_examples": 100,
}


def geometry_rows(rng: np.random.Generator, rounds: int, level: float) -> list[dict]:
    """Metrics lines whose round-delta diagnostics are drawn around ``level`` (round 1 far off: it must
    not count), one of them undefined and one NaN (left out of the mean)."""
    rows = [metric_row(1, 0.5, **{key: 5.0 for key, _ in stats.GEOMETRY})]
    for r in range(2, rounds + 1):
        rows.append(metric_row(r, 0.5, **{key: level + 0.05 * rng.random() for key, _ in stats.GEOMETRY}))
    rows[2]["delta_cosine"] = None
    rows[3]["delta_overlap"] = float("nan")
    return rows


def by_hand(rows: list[dict], key: str) -> float:
    values = [row[key] for row in rows[1:] if row[key] is not None and math.isfinite(row[key])]
    return sum(values) / len(values)


def test_round_delta_geometry_means_and_differences_by_hand(tmp_path: Path):
    rng = np.random.default_rng(17)
    runs: dict[str, dict[int, list[dict]]] = {}
    for method, level in (("fedavg", 0.6), ("subspace_reg", 0.9)):
        for seed in (1, 2, 3):
            rows = geometry_rows(rng, 5, level)
            runs.setdefault(method, {})[seed] = rows
            write_run(
                tmp_path / "toy" / method / f"seed{seed}",
                method,
                seed,
                rows,
                num_rounds=5,
                summary=GEOMETRY_SUMMARY,
            )
    # a personalised method logs none of them; the centralized reference's lone client is trivial
    write_run(
        tmp_path / "toy" / "fedsa" / "seed1",
        "fedsa",
        1,
        [metric_row(r, 0.9) for r in range(1, 6)],
        num_rounds=5,
        summary={**GEOMETRY_SUMMARY, "evaluation": "personalised"},
    )
    write_run(
        tmp_path / "toy" / "centralized" / "seed1",
        "fedavg",
        1,
        geometry_rows(rng, 5, 1.0),
        num_rounds=5,
        summary=GEOMETRY_SUMMARY,
        config={"tags": ["centralized"], "num_clients": 1},
    )

    (toy,) = stats.all_statistics(collect(tmp_path), "fedavg")
    assert [row[0] for row in toy.geometry_rows] == ["fedavg", "subspace_reg"]
    for row, method in zip(toy.geometry_rows, ("fedavg", "subspace_reg"), strict=True):
        for cell, (key, _) in zip(row[2:], stats.GEOMETRY, strict=True):
            means = [by_hand(runs[method][seed], key) for seed in (1, 2, 3)]
            assert cell == f"{np.mean(means):.4f} ± {np.std(means, ddof=1):.4f}"
    (difference,) = toy.geometry_differences
    assert difference.label == "subspace_reg" and difference.shared_seeds == 3
    for key, _ in stats.GEOMETRY:
        per_seed = [
            by_hand(runs["subspace_reg"][s], key) - by_hand(runs["fedavg"][s], key) for s in (1, 2, 3)
        ]
        interval = difference.intervals[key]
        assert interval is not None and interval.per_seed == pytest.approx(per_seed)
        half = 4.302652729911275 * float(np.std(per_seed, ddof=1)) / math.sqrt(3)  # t(0.975, 2)
        mean = float(np.mean(per_seed))
        assert (interval.low, interval.high) == pytest.approx((mean - half, mean + half))
        assert interval.excludes_zero  # 0.3 apart, spread 0.05: far outside

    assert main(["report", str(tmp_path)]) == 0
    summary_md = (tmp_path / "report" / "summary.md").read_text()
    assert "Round-delta geometry, difference to fedavg" in summary_md
    assert "| subspace_reg | 3 | +0.3" in summary_md
    assert "Round-delta geometry" in (tmp_path / "report" / "index.html").read_text()
    csv_lines = (tmp_path / "report" / "comparisons.csv").read_text().splitlines()
    assert sum(line.startswith("toy,subspace_reg,3,delta_") for line in csv_lines) == 3
    (pairwise,) = [line.split(",") for line in csv_lines if ",pairwise_delta_overlap," in line]
    expected = difference.intervals["pairwise_delta_overlap"]
    assert expected is not None and float(pairwise[4]) == expected.estimate and pairwise[7] == "t over seeds"


def test_the_t_interval_needs_two_seeds_and_some_spread():
    assert stats.t_over_seeds((0.1,)) is None
    assert stats.t_over_seeds((0.1, 0.1)) is None  # no spread, no floor
    floored = stats.t_over_seeds((0.1, 0.1), floor=0.01)
    assert floored is not None
    assert (floored.low, floored.high) == pytest.approx(
        (0.1 - 12.706204736174707 * 0.01 / math.sqrt(2), 0.1 + 12.706204736174707 * 0.01 / math.sqrt(2))
    )
