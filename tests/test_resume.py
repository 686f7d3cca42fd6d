"""Resume: a run killed at any point and started again writes what an uninterrupted run writes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import FIXTURE, ROOT, assert_same_run, crash_after_round, held_by_another_process, metadata
from safetensors.torch import load_file, save_file

from fedsubspace import client as client_module
from fedsubspace import simulation
from fedsubspace.cli import main
from fedsubspace.configure import load_config
from fedsubspace.demo import run_demo
from fedsubspace.errors import UserError
from fedsubspace.results import RunDirectory, read_metrics

CONFIG = ROOT / "configs" / "tiny-encoder.yaml"
# Enough local steps that a round lasts long enough to be killed in its middle.
SLOW = [f"dataset={FIXTURE}", "num_rounds=3", "max_local_steps=30", "max_eval_samples=32"]
FAST = [f"dataset={FIXTURE}", "num_rounds=3", "max_local_steps=2", "max_eval_samples=16"]


def checkpoint_round(path: Path) -> int | None:
    try:
        return json.loads(metadata(path / "checkpoints" / "last.safetensors")["round"])
    except (FileNotFoundError, OSError):
        return None


def kill_mid_round(argv: list[str], out: Path) -> None:
    """Start ``fedsubspace run`` in a subprocess and SIGKILL it in the middle of a round after round 1."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "fedsubspace.cli", *argv], env=env)
    try:
        deadline = time.monotonic() + 600  # a shared machine may starve the run for long
        while (checkpoint_round(out) or 0) < 1:  # round 1 committed: round 2 is under way
            assert process.poll() is None, "the run ended before round 2"
            assert time.monotonic() < deadline, "round 1 never finished"
            time.sleep(0.02)
        time.sleep(0.3 * read_metrics(out)[0]["seconds"])
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    # the kill landed inside a round: the rounds before it are committed, the run is not finished, and
    # the round's line is not written (or, if the kill hit the moment between it and the commit, it is)
    completed = checkpoint_round(out)
    assert completed is not None and 1 <= completed < 3 and not (out / "summary.json").exists()
    written = [r["round"] for r in read_metrics(out)]
    assert written in (list(range(1, completed + 1)), list(range(1, completed + 2)))


@pytest.mark.parametrize("method", ["subspace_reg", "fedsa", "fedex"])
def test_a_run_killed_mid_round_resumes_to_the_uninterrupted_result(tmp_path, method):
    config = load_config(CONFIG, SLOW, method=method)
    simulation.run(config, tmp_path / "uninterrupted", progress=False)
    out = tmp_path / "killed"
    argv = ["run", "--config", str(CONFIG), "--method", method, "--out", str(out), "--quiet"]
    argv += [arg for setting in SLOW for arg in ("--set", setting)]
    kill_mid_round(argv, out)
    if method == "subspace_reg":  # through the command line once; in-process for the others
        assert main([*argv, "--resume"]) == 0
    else:
        simulation.run(config, out, resume=True, progress=False)
    assert_same_run(out, tmp_path / "uninterrupted")


@pytest.mark.parametrize("method", ["fedgalore", "flora", "fedsa"])
def test_a_crash_between_the_metrics_line_and_the_checkpoint_drops_that_line(tmp_path, monkeypatch, method):
    config = load_config(CONFIG, FAST, method=method)
    simulation.run(config, tmp_path / "uninterrupted", progress=False)
    real = RunDirectory.save_resume_point

    def crash_in_round_two(self, state, memories, progress):
        if state.round == 2:
            raise KeyboardInterrupt  # round 2's metrics line is on disk, its checkpoint is not
        real(self, state, memories, progress)

    out = tmp_path / "crashed"
    monkeypatch.setattr(RunDirectory, "save_resume_point", crash_in_round_two)
    with pytest.raises(KeyboardInterrupt):
        simulation.run(config, out, progress=False)
    monkeypatch.undo()
    with (out / "metrics.jsonl").open("a") as f:
        f.write('{"round": 3, "selected_cli')  # and a line torn by a kill mid-append
    assert (out / "metrics.jsonl").read_text().count("\n") == 2 and checkpoint_round(out) == 1
    simulation.run(config, out, resume=True, progress=False)
    assert_same_run(out, tmp_path / "uninterrupted")


def test_resume_refuses_another_config_and_run_points_to_resume(tmp_path, capsys):
    base = ["run", "--config", str(CONFIG), "--out", str(tmp_path), "--quiet", "--method", "fedavg"]
    base += [arg for setting in FAST for arg in ("--set", setting)]
    config = load_config(CONFIG, FAST, method="fedavg")
    with crash_after_round(1), pytest.raises(KeyboardInterrupt):
        simulation.run(config, tmp_path, progress=False)

    def one_line_error(argv: list[str]) -> str:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
        return err

    assert "holds an unfinished run; pass --resume to continue it" in one_line_error(base)
    err = one_line_error([*base, "--resume", "--set", "learning_rate=0.5"])
    assert "another config (learning_rate was 0.001, now 0.5)" in err
    assert "pass one of them" in one_line_error([*base, "--resume", "--overwrite"])
    assert main([*base, "--resume"]) == 0
    assert [r["round"] for r in read_metrics(tmp_path)] == [1, 2, 3]
    capsys.readouterr()
    assert main([*base, "--resume"]) == 0  # a finished run: nothing left to do
    assert "done: fedavg" in capsys.readouterr().out
    assert "already holds a finished run" in one_line_error(base)
    with pytest.raises(UserError, match="another config"):
        simulation.run(load_config(CONFIG, FAST, method="svd"), tmp_path, resume=True, progress=False)


def test_a_run_another_process_holds_is_refused_until_that_process_ends(tmp_path, capsys):
    argv = ["run", "--config", str(CONFIG), "--out", str(tmp_path), "--quiet"]
    argv += [arg for setting in FAST for arg in ("--set", setting)]
    with held_by_another_process(tmp_path):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "is being run by another process" in err and "Traceback" not in err
        assert not (tmp_path / "metrics.jsonl").exists()
    assert main(argv) == 0  # the holder was SIGKILLed: its lock file stays, its lock does not
    assert [r["round"] for r in read_metrics(tmp_path)] == [1, 2, 3]


def test_demo_resumes_its_unfinished_run_and_restarts_one_of_another_config(tmp_path, capsys):
    config = load_config(CONFIG, FAST)
    with crash_after_round(2), pytest.raises(KeyboardInterrupt):
        run_demo(config, ["fedavg"], tmp_path)
    assert checkpoint_round(tmp_path / "fedavg") == 2
    table = run_demo(config, ["fedavg"], tmp_path)
    assert "resuming the unfinished run" in capsys.readouterr().out
    simulation.run(load_config(CONFIG, FAST, method="fedavg"), tmp_path / "uninterrupted", progress=False)
    assert_same_run(tmp_path / "fedavg", tmp_path / "uninterrupted")
    assert len(table.splitlines()) == 1 + 1 + 3  # header, round 0, three rounds

    assert run_demo(config, ["fedavg"], tmp_path) == table
    assert "reusing the finished run" in capsys.readouterr().out
    run_demo(load_config(CONFIG, [*FAST, "num_rounds=2"]), ["fedavg"], tmp_path)
    assert "running into" in capsys.readouterr().out
    assert [r["round"] for r in read_metrics(tmp_path / "fedavg")] == [1, 2]


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def make_infinite(path: Path) -> None:
    """One value of the global adapter patched to +inf, the file otherwise as the run wrote it."""
    tensors, meta = load_file(str(path)), metadata(path)
    key = next(k for k in tensors if k.startswith("lora_B/"))
    tensors[key][0, 0] = float("inf")
    save_file(tensors, str(path), metadata=meta)


@pytest.mark.parametrize(
    ("damage", "message"),
    [(truncate, "is unreadable or truncated"), (make_infinite, "holds NaN or Inf in its global state")],
)
def test_a_damaged_resume_point_is_refused_in_one_line(tmp_path, capsys, damage, message):
    argv = ["run", "--config", str(CONFIG), "--out", str(tmp_path), "--quiet", "--resume"]
    argv += [arg for setting in FAST for arg in ("--set", setting)]
    with crash_after_round(1), pytest.raises(KeyboardInterrupt):
        simulation.run(load_config(CONFIG, FAST), tmp_path, progress=False)
    damage(tmp_path / "checkpoints" / "last.safetensors")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "last.safetensors" in err and message in err and "--overwrite" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert [r["round"] for r in read_metrics(tmp_path)] == [1]  # nothing of the run is lost


def test_a_round_whose_every_client_was_refused_stops_the_run(tmp_path, capsys, monkeypatch):
    real = client_module.train_client

    def diverged(*args, **kwargs):
        update, memory = real(*args, **kwargs)
        *_, ctx = args
        if ctx.round_index == 2:
            B, _ = next(iter(update.factors.values()))
            B[0, 0] = float("nan")
        return update, memory

    monkeypatch.setattr(client_module, "train_client", diverged)
    argv = ["run", "--config", str(CONFIG), "--out", str(tmp_path), "--quiet"]
    argv += [arg for setting in FAST for arg in ("--set", setting)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "round 2: every client's update was refused" in err and "learning_rate" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    # round 1 is kept, round 2 never written, and the run is not "done"
    assert [r["round"] for r in read_metrics(tmp_path)] == [1] and checkpoint_round(tmp_path) == 1
    assert not (tmp_path / "summary.json").exists()


def test_metrics_lines_torn_or_foreign_are_no_rounds(tmp_path):
    rows = [{"round": 1, "eval_accuracy": 0.5}, {"round": 2, "eval_accuracy": 0.6}]
    text = "".join(json.dumps(r) + "\n" for r in rows)
    (tmp_path / "metrics.jsonl").write_text(text + '[1, 2]\n"text"\n{"no round": 1}\n' + text[:15])
    assert read_metrics(tmp_path) == rows
