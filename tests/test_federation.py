"""The newer methods and baselines through the in-process runner: every method on both tiny presets,
mixed client ranks, merged base weights under partial participation, and config validation."""

from __future__ import annotations

import math

import pytest
import torch
from test_simulation import FIXTURE, METRIC_KEYS, ROOT

from fedsubspace import client as client_module
from fedsubspace import simulation
from fedsubspace.cli import main
from fedsubspace.config import client_ranks
from fedsubspace.configure import build_config, load_config
from fedsubspace.errors import UserError
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
MIXED_RANK_METHODS = ["glora", "flora", "flexlora", "hetlora", "fedgalore"]
EXACT = {"ffa", "fedex", "flora", "rolora", "fedgalore"}  # new global update == exact average
# Smaller than the presets' smoke settings: these runs check plumbing, not learning.
FAST = ["max_eval_samples=16", "max_local_steps=2"]
# Clients 0 and 3 train in rounds 1 and 2 (seed 42, 2 of 4): ranks 8 and 4; the global rank is 8.
MIXED = "client_ranks=[8, 2, 2, 4]"


def tiny(preset: str, method: str, *overrides: str):
    return load_config(
        ROOT / "configs" / f"{preset}.yaml", [f"dataset={FIXTURE}", *FAST, *overrides], method=method
    )


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


def test_methods_that_cannot_serve_mixed_ranks_refuse_them_at_validation(tmp_path, capsys):
    base = {"dataset": str(FIXTURE), "num_clients": 4}
    for method in ("fedavg", "svd", "fedsvd", "subspace_reg", "fedrot", "ffa", "fedex", "fedsa", "rolora"):
        with pytest.raises(UserError, match="cannot serve mixed client_ranks") as err:
            build_config({**base, "method": method, "client_ranks": "cycle(4,8)"})
        assert "flexlora" in str(err.value) and "glora" in str(err.value) and "\n" not in str(err.value)
    # equal ranks are no mix: every method accepts them
    build_config({**base, "method": "fedavg", "client_ranks": [4, 4, 4, 4]})
    code = main(["run", "--config", str(ROOT / "configs/tiny-encoder.yaml"), "--out", str(tmp_path / "x"),
                 "--set", f"dataset={FIXTURE}", "--set", "client_ranks=cycle(2,4)", "--method", "fedavg",
                 "--quiet"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "method 'fedavg' cannot serve mixed client_ranks; methods that can: fedgalore, flexlora" in err


def test_client_ranks_rules_and_mistakes():
    base = {"dataset": str(FIXTURE), "num_clients": 5, "method": "hetlora"}
    assert client_ranks(build_config({**base, "client_ranks": "cycle(4, 8,16)"})) == [4, 8, 16, 4, 8]
    assert client_ranks(build_config({**base, "client_ranks": [1, 2, 3, 4, 5]})) == [1, 2, 3, 4, 5]
    assert client_ranks(build_config({**base, "lora_rank": 6})) == [6] * 5
    for value, message in [
        ("cycle()", "client_ranks must list one rank per client or be cycle(r1,r2,...)"),
        ("4,8", "client_ranks must list one rank per client"),
        ([4, 8], "client_ranks lists 2 ranks but num_clients is 5"),
        ([4, 8, 0, 1, 2], "client_ranks must all be at least 1"),
        ([4, 8, 1.5, 1, 2], "config key 'client_ranks' must be"),
    ]:
        with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
            build_config({**base, "client_ranks": value})


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("fedrot_lam", 1.5, "fedrot_lam must be in [0, 1]"),
        ("fedrot_align", "C", "fedrot_align must be alternate, A or B"),
        ("glora_server_rank", "all", "glora_server_rank must be a positive integer, union"),
        ("glora_server_rank", 0, "glora_server_rank must be a positive integer, union"),
        ("fedgalore_angle_threshold", 0, "fedgalore_angle_threshold must be in (0, 90]"),
        ("holdout_fraction", 1.0, "holdout_fraction must be in (0, 1)"),
    ],
)
def test_new_method_options_are_validated(key, value, message):
    with pytest.raises(UserError) as err:
        build_config({"dataset": str(FIXTURE), key: value})
    assert message in str(err.value)


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
