"""The report on hand-written results directories: every number checked against a hand computation."""

from __future__ import annotations

import csv
import errno
import math
from pathlib import Path

import pytest
from helpers import metric_row, write_run

from fedsubspace.cli import main
from fedsubspace.errors import UserError
from fedsubspace.experiments.report import write_report


def summary(initial: float, best: float, final: float, loss: float, evaluation: str = "global") -> dict:
    return {
        "initial_eval_accuracy": initial,
        "initial_eval_loss": 1.5,
        "best_eval_accuracy": best,
        "final_eval_accuracy": final,
        "final_eval_loss": loss,
        "evaluation": evaluation,
    }


@pytest.fixture
def matrix_dir(tmp_path: Path) -> Path:
    setup = tmp_path / "toy"
    write_run(
        setup / "fedavg" / "seed1",
        "fedavg",
        1,
        [metric_row(1, 0.4, cancellation_ratio=0.2), metric_row(2, 0.5, basis_overlap=0.9, bytes_up=300)],
        summary=summary(0.25, 0.5, 0.5, 1.2),
    )
    write_run(
        setup / "fedavg" / "seed2",
        "fedavg",
        2,
        [metric_row(1, 0.7, cancellation_ratio=0.6), metric_row(2, 0.6, basis_overlap=0.7, seconds=3.0)],
        summary=summary(0.35, 0.7, 0.6, 1.0),
    )
    # finished with seed 1; seed 2 stopped after round 1 of 2: listed, not averaged
    write_run(
        setup / "svd" / "seed1",
        "svd",
        1,
        [metric_row(1, 0.3), metric_row(2, 0.45)],
        summary=summary(0.25, 0.45, 0.45, 1.1),
    )
    write_run(setup / "svd" / "seed2", "svd", 2, [metric_row(1, 0.9)])
    write_run(setup / "flora" / "seed1", "flora", 1, [], error="UserError: out of | patience")
    # personalised: its initial numbers are on other data and must not become the 'initial' row
    write_run(
        setup / "fedsa" / "seed1",
        "fedsa",
        1,
        [metric_row(1, 0.6, update_overlap=None), metric_row(2, 0.8, update_overlap=None)],
        summary=summary(0.9, 0.8, 0.8, 0.9, evaluation="personalised"),
    )
    write_run(
        setup / "centralized" / "seed1",
        "fedavg",
        1,
        [metric_row(1, 0.5), metric_row(2, 0.55)],
        summary=summary(0.25, 0.55, 0.55, 1.0),
        config={"tags": ["centralized"], "num_clients": 1},  # as the matrix writes it
    )
    return tmp_path


def read_csv(path: Path) -> dict[str, dict[str, str]]:
    with path.open() as f:
        return {row["method"]: row for row in csv.DictReader(f)}


def close(text: str, expected: float) -> bool:
    return math.isclose(float(text), expected, rel_tol=1e-12, abs_tol=1e-12)


def test_the_summary_rows_are_the_hand_computed_means_and_deviations(matrix_dir):
    out = write_report(matrix_dir)
    rows = read_csv(out / "summary.csv")
    assert list(rows) == ["initial", "fedavg", "fedsa", "svd", "centralized"]  # references frame the methods
    fedavg = rows["fedavg"]
    assert fedavg["seeds"] == "2"
    assert close(fedavg["best_accuracy_mean"], 0.6) and close(fedavg["best_accuracy_std"], math.sqrt(0.02))
    assert close(fedavg["final_accuracy_mean"], 0.55) and close(
        fedavg["final_accuracy_std"], math.sqrt(0.005)
    )
    assert close(fedavg["final_eval_loss_mean"], 1.1)
    assert close(fedavg["final_basis_overlap_mean"], 0.8)  # the last rounds' 0.9 and 0.7
    # per run the mean over rounds (0.35 and 0.55), then over seeds
    assert close(fedavg["cancellation_ratio_mean"], 0.45) and close(
        fedavg["cancellation_ratio_std"], math.sqrt(0.02)
    )
    # bytes up + down: run 1 rounds 200 and 400 (mean 300), run 2 200 and 200 (mean 200)
    assert close(fedavg["bytes_per_round_mean"], 250.0)
    assert close(fedavg["seconds_per_round_mean"], 1.5)  # runs: 1.0 and 2.0
    # svd: the finished seed only, so no deviation
    assert rows["svd"]["seeds"] == "1" and close(rows["svd"]["best_accuracy_mean"], 0.45)
    assert rows["svd"]["best_accuracy_std"] == ""
    assert rows["fedsa"]["final_update_overlap_mean"] == ""  # undefined in every round
    # initial: per seed one globally evaluated run's initial model (seed 1: centralized, seed 2: fedavg)
    initial = rows["initial"]
    assert initial["seeds"] == "2" and close(initial["best_accuracy_mean"], 0.3)
    assert close(initial["final_eval_loss_mean"], 1.5) and initial["final_basis_overlap_mean"] == ""
    central = rows["centralized"]
    assert close(central["final_accuracy_mean"], 0.55) and close(central["bytes_per_round_mean"], 200.0)
    assert (
        central["final_basis_overlap_mean"] == central["cancellation_ratio_mean"] == ""
    )  # one client: trivial


def test_seconds_per_round_is_a_runs_median_so_a_paused_round_does_not_move_it(tmp_path):
    rows = [
        metric_row(1, 0.5, seconds=2.0, cancellation_ratio=0.1),
        metric_row(2, 0.5, seconds=600.0, cancellation_ratio=0.2),
        metric_row(3, 0.5, seconds=4.0, cancellation_ratio=0.9),
    ]
    run = tmp_path / "toy" / "fedavg" / "seed1"
    write_run(run, "fedavg", 1, rows, num_rounds=3, summary=summary(0.25, 0.5, 0.5, 1.0))
    fedavg = read_csv(write_report(tmp_path) / "summary.csv")["fedavg"]
    assert close(fedavg["seconds_per_round_mean"], 4.0)
    assert close(fedavg["cancellation_ratio_mean"], 0.4)  # the other per-round numbers stay means


def test_failed_and_incomplete_runs_are_listed_apart(matrix_dir):
    out = write_report(matrix_dir)
    markdown = (out / "summary.md").read_text()
    listed = markdown.split("## Failed or incomplete runs (not averaged)")[1]
    assert "| toy/svd/seed2 | incomplete | 1 of 2 rounds |" in listed
    assert "| toy/flora/seed1 | failed | UserError: out of \\| patience |" in listed
    table = markdown.split("## Failed")[0]
    assert "| toy | svd | 1 | 0.4500 |" in table and "flora" not in table
    assert "| toy | fedavg | 2 | 0.6000 ± 0.1414 |" in table


def test_the_html_page_shows_the_tables_and_every_plot(matrix_dir):
    out = write_report(matrix_dir)
    page = (out / "index.html").read_text()
    images = [part.split("'")[0] for part in page.split("<img src='")[1:]]
    assert images == [
        f"toy-{name}.png" for name in ("accuracy", "basis_overlap", "update_overlap", "cancellation_ratio")
    ]
    for image in images:
        assert (out / image).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "summary.csv" in page and "toy/svd/seed2" in page and "0.6000 ± 0.1414" in page


def test_report_mistakes_are_one_line_errors(tmp_path, capsys):
    with pytest.raises(UserError, match="no results directories"):
        write_report(tmp_path)
    assert main(["report", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert "is not a directory" in err and len(err.strip().splitlines()) == 1


def test_rows_over_different_seeds_are_said_to_be_so(matrix_dir, tmp_path_factory):
    out = write_report(matrix_dir)
    note = "- toy: initial, fedavg: seeds 1, 2; fedsa, svd, centralized: seeds 1"
    assert note in (out / "summary.md").read_text().split("## Failed")[0]
    assert (
        "initial, fedavg: seeds 1, 2; fedsa, svd, centralized: seeds 1." in (out / "index.html").read_text()
    )
    # the same seeds in every row: nothing to say
    uniform = tmp_path_factory.mktemp("uniform")
    for method in ("fedavg", "svd"):
        for seed in (1, 2):
            run = uniform / "toy" / method / f"seed{seed}"
            write_run(
                run,
                method,
                seed,
                [metric_row(1, 0.4), metric_row(2, 0.5)],
                summary=summary(0.25, 0.5, 0.5, 1.0),
            )
    out = write_report(uniform)
    assert "Rows over different seeds" not in (out / "summary.md").read_text()
    assert "Rows over different seeds" not in (out / "index.html").read_text()


def test_runs_are_grouped_by_their_config_never_by_where_they_lie(tmp_path):
    # the README's default --out names put differently configured runs side by side under runs/
    for model, accuracy in (("tiny-encoder", 0.2031), ("tiny-causal", 0.3281)):
        write_run(
            tmp_path / "runs" / f"{model}-svd-seed42",
            "svd",
            42,
            [metric_row(1, 0.1), metric_row(2, accuracy)],
            summary=summary(0.25, accuracy, accuracy, 1.0),
            config={"model": model},
        )
    write_run(  # a second seed of the encoder's config: the one run it is averaged with
        tmp_path / "runs" / "tiny-encoder-svd-seed43",
        "svd",
        43,
        [metric_row(1, 0.1), metric_row(2, 0.3)],
        summary=summary(0.25, 0.3, 0.3, 1.0),
        config={"model": "tiny-encoder"},
    )
    table = (write_report(tmp_path) / "summary.md").read_text()
    assert "| runs (model=tiny-causal) | svd | 1 | 0.3281 |" in table
    assert "| runs (model=tiny-encoder) | svd | 2 | 0.2515 ± 0.0685 |" in table
    assert "| runs | svd |" not in table


def test_matrix_runs_of_another_config_under_one_setup_are_not_averaged(matrix_dir):
    write_run(
        matrix_dir / "toy" / "fedavg" / "seed3",
        "fedavg",
        3,
        [metric_row(1, 0.1), metric_row(2, 0.2)],
        summary=summary(0.25, 0.2, 0.2, 1.0),
        config={"learning_rate": 0.5},
    )
    rows = read_csv(write_report(matrix_dir) / "summary.csv")
    assert rows["fedavg"]["seeds"] == "1" and close(rows["fedavg"]["best_accuracy_mean"], 0.2)
    with (matrix_dir / "report" / "summary.csv").open() as f:
        setups = {(row["config"], row["method"], row["seeds"]) for row in csv.DictReader(f)}
    assert ("toy (learning_rate=0.0001)", "fedavg", "2") in setups
    assert ("toy (learning_rate=0.5)", "fedavg", "1") in setups


def test_a_finished_runs_final_numbers_come_from_its_summary_even_after_a_torn_line(tmp_path):
    run = tmp_path / "toy" / "fedavg" / "seed1"
    rows = [metric_row(1, 0.4, basis_overlap=0.9834), metric_row(2, 0.5, basis_overlap=0.9894)]
    write_run(run, "fedavg", 1, rows, summary=summary(0.25, 0.5, 0.5, 1.0))
    text = (run / "metrics.jsonl").read_text()
    (run / "metrics.jsonl").write_text(text[: len(text) - 40])  # the last line torn by a crash
    fedavg = read_csv(write_report(tmp_path) / "summary.csv")["fedavg"]
    assert close(fedavg["final_basis_overlap_mean"], 0.9894)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda run: (run / "config.yaml").write_text("- a\n- b\n"), "config.yaml holds no mapping"),
        (lambda run: (run / "config.yaml").write_bytes(b"seed: \xff\n"), "config.yaml is not UTF-8"),
        (lambda run: (run / "summary.json").write_text('{"best_eval_'), "summary.json is unreadable"),
        (lambda run: (run.parents[2] / "report").write_text("a file"), "report is a file where"),
    ],
)
def test_report_on_damaged_results_is_one_line_naming_the_file(matrix_dir, capsys, damage, message):
    damage(matrix_dir / "toy" / "fedavg" / "seed1")
    assert main(["report", str(matrix_dir)]) == 2
    err = capsys.readouterr().err
    assert message in err and str(matrix_dir) in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_report_into_a_directory_it_may_not_write_is_one_line(matrix_dir, capsys, monkeypatch):
    # (a read-only directory cannot be made for root, who runs the tests here: the write is refused as
    # the operating system refuses it)
    def refused(path: Path, *args: object, **kwargs: object) -> None:
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(Path, "write_text", refused)
    assert main(["report", str(matrix_dir)]) == 2
    err = capsys.readouterr().err
    assert "summary.md: permission denied" in err and len(err.strip().splitlines()) == 1
