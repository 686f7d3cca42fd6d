"""TensorBoard events: every round once, as the metrics lines hold it, also across an interrupted run."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from fedsubspace import simulation
from fedsubspace.cli import main
from fedsubspace.configure import load_config
from fedsubspace.results import RunDirectory, read_metrics, written_config_difference
from fedsubspace.tracking import TENSORBOARD_DIR, scalars

CONFIG = Path(__file__).parent.parent / "configs" / "tiny-encoder.yaml"
FAST = ["num_rounds=3", "max_local_steps=2", "max_eval_samples=16"]
# Run in a child process, so that its events come from another process than the test's own.
CRASH_IN_ROUND = (
    "import sys\n"
    "from pathlib import Path\n"
    "from fedsubspace import simulation\n"
    "from fedsubspace.configure import load_config\n"
    "from fedsubspace.results import RunDirectory\n"
    "real = RunDirectory.save_resume_point\n"
    "def crash(self, state, memories, progress):\n"
    "    if state.round == int(sys.argv[3]):\n"
    "        raise SystemExit(3)  # this round's metrics line and events are written, its checkpoint not\n"
    "    real(self, state, memories, progress)\n"
    "RunDirectory.save_resume_point = crash\n"
    "config = load_config(Path(sys.argv[1]), sys.argv[4:], method='fedavg')\n"
    "simulation.run(config, Path(sys.argv[2]), progress=False)\n"
)


def events(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series of the run's event files, read with TensorBoard's own reader."""
    accumulator = EventAccumulator(str(run_dir / TENSORBOARD_DIR), size_guidance={"scalars": 0})
    accumulator.Reload()
    return {
        tag: [(event.step, event.value) for event in accumulator.Scalars(tag)]
        for tag in accumulator.Tags()["scalars"]
    }


def expected(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    series: dict[str, list[tuple[int, float]]] = {}
    for row in read_metrics(run_dir):
        for key, value in scalars(row).items():
            series.setdefault(key, []).append((row["round"], value))
    return series


def assert_events_mirror_metrics(run_dir: Path) -> None:
    written, wanted = events(run_dir), expected(run_dir)
    assert written.keys() == wanted.keys()
    for tag, series in wanted.items():
        assert [step for step, _ in written[tag]] == [step for step, _ in series], tag
        assert [value for _, value in written[tag]] == pytest.approx([value for _, value in series]), tag


def test_a_run_writes_every_round_and_every_numeric_metric(tmp_path):
    simulation.run(load_config(CONFIG, FAST, method="svd"), tmp_path, progress=False)
    assert_events_mirror_metrics(tmp_path)
    tags = events(tmp_path).keys()
    for key in ("eval_accuracy", "eval_loss", "train_loss", "basis_overlap", "aggregation_error"):
        assert key in tags
    for key in ("bytes_up", "bytes_down", "seconds", "train_seconds", "eval_seconds"):
        assert key in tags
    assert [step for step, _ in events(tmp_path)["eval_accuracy"]] == [1, 2, 3]


def test_an_interrupted_and_resumed_run_holds_every_round_once(tmp_path):
    out = tmp_path / "run"
    crashed = subprocess.run(
        [sys.executable, "-c", CRASH_IN_ROUND, str(CONFIG), str(out), "2", *FAST],
        capture_output=True,
        text=True,
    )
    assert crashed.returncode == 3, crashed.stderr
    assert [step for step, _ in events(out)["eval_loss"]] == [1, 2]  # round 2 is in the events, not committed
    simulation.run(load_config(CONFIG, FAST, method="fedavg"), out, resume=True, progress=False)
    assert [step for step, _ in events(out)["eval_loss"]] == [1, 2, 3]
    assert_events_mirror_metrics(out)


def test_tracker_none_writes_no_events_and_a_bad_tracker_is_one_line(tmp_path, capsys):
    simulation.run(load_config(CONFIG, [*FAST, "tracker=none"], method="fedavg"), tmp_path, progress=False)
    assert not (tmp_path / TENSORBOARD_DIR).exists()
    assert main(["run", "--config", str(CONFIG), "--set", "tracker=wandb", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "tracker must be tensorboard or none" in err


def test_a_run_written_before_the_tracker_key_resumes(tmp_path):
    config = load_config(CONFIG, FAST, method="fedavg").to_dict()
    old = {key: value for key, value in config.items() if key != "tracker"}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(old, sort_keys=False))
    assert written_config_difference(tmp_path, config) is None
    changed = {**config, "tracker": "none"}
    assert written_config_difference(tmp_path, changed) == "tracker was 'tensorboard', now 'none'"


def test_overwrite_removes_the_old_events(tmp_path):
    run = RunDirectory(tmp_path)
    run.write_config(load_config(CONFIG).to_dict())
    run.write_json("summary.json", {})
    (tmp_path / TENSORBOARD_DIR).mkdir()  # the tracker's folder, listed in the manifest by write_config
    (tmp_path / TENSORBOARD_DIR / "events.out.tfevents.0.old").write_bytes(b"")
    RunDirectory(tmp_path, overwrite=True)
    assert not (tmp_path / TENSORBOARD_DIR).exists()


def test_tensorboard_missing_is_refused_before_any_work(tmp_path, monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a)
    )
    assert main(["run", "--config", str(CONFIG), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "tracker: none" in err
    assert not (tmp_path / "x").exists()
    load_config(CONFIG, ["tracker=none"])  # the way out works
