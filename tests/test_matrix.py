"""The matrix runner end to end on tiny configs: layout, references, failures, skipping and resuming."""

from __future__ import annotations

import csv
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from helpers import FIXTURE, ROOT, crash_after_round, held_by_another_process

from fedsubspace import simulation
from fedsubspace.cli import main
from fedsubspace.configure import load_config
from fedsubspace.experiments.matrix import centralized_config, plan
from fedsubspace.experiments.report import write_report
from fedsubspace.results import read_metrics

TINY = yaml.safe_load((ROOT / "configs" / "tiny-encoder.yaml").read_text())


def write_config(path: Path, **changes) -> Path:
    values = {**TINY, "dataset": str(FIXTURE), "max_local_steps": 2, "max_eval_samples": 16, **changes}
    path.write_text(yaml.safe_dump(values))
    return path


def test_a_matrix_runs_every_combination_records_failures_skips_finished_and_resumes(tmp_path, capsys):
    good = write_config(tmp_path / "good.yaml")
    bad = write_config(tmp_path / "bad.yaml", dataset=str(tmp_path / "no-such-data"))
    out = tmp_path / "matrix"
    argv = ["matrix", "--config", str(good), "--config", str(bad), "--methods", "fedavg,svd",
            "--seeds", "1,2", "--out", str(out), "--quiet"]  # fmt: skip
    assert main([*argv, "--jobs", "2"]) == 1  # failures make the exit status non-zero, after every run
    printed = capsys.readouterr().out
    assert "matrix: 12 runs" in printed and "6 run now, 0 finished before, 6 failed" in printed
    for label in ("fedavg", "svd", "centralized"):
        for seed in (1, 2):
            assert (out / "good" / label / f"seed{seed}" / "summary.json").exists()
            error = (out / "bad" / label / f"seed{seed}" / "error.txt").read_text()
            assert "no-such-data" in error.splitlines()[0]
            assert f"failed: bad/{label}/seed{seed}" in printed
    central = yaml.safe_load((out / "good" / "centralized" / "seed1" / "config.yaml").read_text())
    assert central["method"] == "fedavg" and central["num_clients"] == 1 and central["client_fraction"] == 1
    assert central["max_local_steps"] == 2 * 2  # two clients a round in the federation, 2 steps each

    # the report of the matrix: the good setup's rows from its runs, the bad runs listed apart
    report = write_report(out)
    with (report / "summary.csv").open() as f:
        rows = {(r["config"], r["method"]): r for r in csv.DictReader(f)}
    assert list(rows) == [("good", m) for m in ("initial", "fedavg", "svd", "centralized")]
    runs = [out / "good" / "fedavg" / f"seed{seed}" for seed in (1, 2)]
    best = [json.loads((run / "summary.json").read_text())["best_eval_accuracy"] for run in runs]
    assert float(rows[("good", "fedavg")]["best_accuracy_mean"]) == pytest.approx(sum(best) / 2)
    per_run = [statistics.fmean(r["bytes_up"] + r["bytes_down"] for r in read_metrics(run)) for run in runs]
    assert float(rows[("good", "fedavg")]["bytes_per_round_mean"]) == pytest.approx(sum(per_run) / 2)
    assert (report / "summary.md").read_text().count("| failed |") == 6

    # an interrupted run is resumed, finished ones are skipped, failed ones are tried again
    job = next(j for j in plan([good], ["svd"], [2], out, []) if j.label == "svd")
    interrupted = out / "good" / "svd" / "seed2"
    shutil.rmtree(interrupted)
    with crash_after_round(1), pytest.raises(KeyboardInterrupt):
        simulation.run(job.config, interrupted, progress=False)
    round_one = read_metrics(interrupted)[0]
    finished = (out / "good" / "fedavg" / "seed1" / "summary.json").stat().st_mtime_ns
    assert main(argv) == 1
    assert (
        "12 runs in" in (printed := capsys.readouterr().out)
        and "1 run now, 5 finished before, 6 failed" in printed
    )
    assert [r["round"] for r in read_metrics(interrupted)] == [1, 2]
    assert read_metrics(interrupted)[0] == round_one  # kept, not trained again
    assert (out / "good" / "fedavg" / "seed1" / "summary.json").stat().st_mtime_ns == finished


def test_a_matrix_refuses_to_continue_runs_of_another_config(tmp_path, capsys):
    good = write_config(tmp_path / "good.yaml")
    out = tmp_path / "matrix"
    (job,) = plan([good], ["fedavg"], [1], out, [], references=False)
    job.path.mkdir(parents=True)
    (job.path / "config.yaml").write_text(yaml.safe_dump({**job.config.to_dict(), "num_rounds": 5}))
    code = main(["matrix", "--config", str(good), "--methods", "fedavg", "--seeds", "1", "--out", str(out)])
    err = capsys.readouterr().err
    assert (
        code == 2 and "another config (num_rounds was 5, now 2)" in err and len(err.strip().splitlines()) == 1
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--seeds", "1,x"], "--seeds takes integers, got 'x'"),
        (["--methods", "fedavg,nope"], "unknown method 'nope'"),
        (["--methods", " , "], "--methods needs a comma-separated list"),
        (["--jobs", "0"], "--jobs must be at least 1"),
        (["--config", "SAME"], "two configs are named 'good'"),
    ],
)
def test_matrix_mistakes_are_one_line_errors(tmp_path, capsys, args, message):
    good = write_config(tmp_path / "good.yaml")
    (tmp_path / "other").mkdir()
    same = write_config(tmp_path / "other" / "good.yaml")
    argv = [
        "matrix",
        "--config",
        str(good),
        "--methods",
        "fedavg",
        "--seeds",
        "1",
        "--out",
        str(tmp_path / "m"),
    ]
    argv += [str(same) if a == "SAME" else a for a in args]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "m").exists()  # refused before any work


def test_the_centralized_reference_makes_as_many_local_passes_as_the_federation():
    config = load_config(
        ROOT / "configs" / "tiny-encoder.yaml",
        [
            f"dataset={FIXTURE}",
            "num_clients=6",
            "client_fraction=0.5",
            "client_ranks=cycle(2,8)",
            "max_local_steps=5",
        ],
        method="glora",
    )
    central = centralized_config(config)
    # the federation: 3 clients a round, 5 passes each; the centralized client: 15 a round, same rounds
    assert central.num_rounds == config.num_rounds and central.max_local_steps == 15
    assert (central.num_clients, central.client_fraction, central.method) == (1, 1.0, "fedavg")
    assert central.client_ranks is None and central.lora_rank == 8  # the global rank
    assert (central.batch_size, central.learning_rate) == (config.batch_size, config.learning_rate)
    assert central.tags == ["centralized"]


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has ended; only its parent's wait is due


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads process states from /proc")
def test_the_workers_of_a_killed_matrix_end_instead_of_running_on():
    matrix = (
        "import os, time\n"
        "from fedsubspace.experiments.matrix import _pool\n"
        "pool = _pool(1)\n"
        "print(pool.submit(os.getpid).result(), flush=True)\n"
        "pool.submit(time.sleep, 600)\n"  # a run under way
        "time.sleep(600)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", matrix], stdout=subprocess.PIPE, text=True)
    worker = int(parent.stdout.readline())
    parent.kill()  # SIGKILL: the matrix gets no chance to stop its workers
    parent.wait()
    deadline = time.monotonic() + 60
    while alive(worker):
        assert time.monotonic() < deadline, "the worker outlived its matrix"
        time.sleep(0.1)


def test_a_matrix_leaves_a_run_another_process_holds_alone(tmp_path, capsys):
    config = write_config(tmp_path / "toy.yaml")
    out = tmp_path / "matrix"
    held = out / "toy" / "fedavg" / "seed1"
    with held_by_another_process(held):
        argv = ["matrix", "--config", str(config), "--methods", "fedavg", "--seeds", "1",
                "--no-references", "--out", str(out), "--quiet"]  # fmt: skip
        assert main(argv) == 1
        assert "toy/fedavg/seed1: FAILED: RunBusy: " in capsys.readouterr().out
        assert not (held / "error.txt").exists() and not (held / "metrics.jsonl").exists()
