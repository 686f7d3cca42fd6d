"""Privacy: the compatibility declarations, DP-SGD, client-level DP, SecAgg+ and their refusals."""

from __future__ import annotations

import dataclasses
import json
import math
import warnings
from collections.abc import Iterator

import pytest
import torch
from flwr.common import bytes_to_ndarray
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.common.serde import message_from_proto, message_to_proto
from helpers import (
    FIXTURE,
    ROOT,
    assert_same_rows,
    assert_same_run,
    capture_states,
    crash_after_round,
    make_round,
    run_flower_in_process,
    tiny,
)
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

from fedsubspace import simulation
from fedsubspace.cli import main
from fedsubspace.configure import load_config
from fedsubspace.errors import UserError
from fedsubspace.experiment import prepare
from fedsubspace.flower import client_app, secagg, secagg_server
from fedsubspace.flower.payload import from_record
from fedsubspace.methods import METHODS, get_method
from fedsubspace.privacy.accounting import (
    PrivacyAccounts,
    calibrated_noise_multiplier,
    example_level_dp,
    rounds_taken_part,
)
from fedsubspace.privacy.client_dp import ClientLevelDP, clipped_change, noisy_mean_update
from fedsubspace.privacy.dpsgd import ExampleLevelDP, PrivateGradients
from fedsubspace.privacy.table import compatibility_table
from fedsubspace.results import read_metrics
from fedsubspace.scoring import choice_scores, collate
from fedsubspace.state import ClientUpdate, GlobalState, flatten

FAST = [f"dataset={FIXTURE}", "max_eval_samples=16", "max_local_steps=2"]
DPSGD = ["dp_max_grad_norm=1.0", "dp_epsilon=6"]


def test_readme_holds_the_table_the_declarations_render():
    assert compatibility_table() in (ROOT / "README.md").read_text()


def test_every_method_declares_all_three_mechanisms_with_a_reason():
    for name, cls in METHODS.items():
        for support in dataclasses.astuple(cls.privacy):
            assert isinstance(support[0], bool) and support[1], name


def mean_update(updates: list[ClientUpdate], weights: list[float]) -> ClientUpdate:
    """One update holding the weighted mean of every uploaded tensor."""
    first = updates[0]

    def mean(tensors: Iterator[torch.Tensor]) -> torch.Tensor:
        return sum((p * t for p, t in zip(weights, tensors)), torch.tensor(0.0))

    factors = {
        module: (mean(u.factors[module][0] for u in updates), mean(u.factors[module][1] for u in updates))
        for module in first.factors
    }
    head = {name: mean(u.head[name] for u in updates) for name in first.head}
    return dataclasses.replace(first, factors=factors, head=head)


def at_round(state: GlobalState, round_index: int) -> GlobalState:
    return dataclasses.replace(state, round=round_index)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("round_index", [0, 1, 3])
def test_methods_declared_summable_aggregate_the_mean_upload_as_they_aggregate_the_uploads(seed, round_index):
    """What client-level DP and SecAgg+ rely on: for every method that says its rule reads only the sum
    of the uploads, aggregating the clients equals aggregating their (weighted) mean as one upload."""
    state, updates, weights = make_round(9, 7, 3, 3, seed)
    state = at_round(state, round_index)
    summable = [name for name, cls in METHODS.items() if cls.privacy.secagg.ok]
    assert summable and all(METHODS[n].privacy.client_dp.ok for n in summable)
    for name in summable:
        method = get_method(name)
        plain = method.aggregate(state, updates, weights)
        pooled = method.aggregate(state, [mean_update(updates, weights)], [1.0])
        for module in state.factors:
            for k in (0, 1):
                torch.testing.assert_close(pooled.factors[module][k], plain.factors[module][k], msg=name)
        for key in plain.head:
            torch.testing.assert_close(pooled.head[key], plain.head[key], msg=name)


@pytest.mark.parametrize("name", ["svd", "subspace_reg", "flexlora", "fedex", "flora", "glora", "fedrot"])
def test_methods_declared_individual_do_not_aggregate_the_mean_upload_as_the_uploads(name):
    """The declarations that say no are not arbitrary: these rules differ on the mean upload."""
    assert not METHODS[name].privacy.secagg.ok and not METHODS[name].privacy.client_dp.ok
    state, updates, weights = make_round(9, 7, 3, 3, seed=5)
    state = at_round(state, 1)  # fedrot aligns from its second round on
    method = get_method(name)
    plain = method.aggregate(state, updates, weights)
    pooled = method.aggregate(state, [mean_update(updates, weights)], [1.0])
    differs = [
        not torch.allclose(plain.factors[m][k], pooled.factors[m][k]) for m in state.factors for k in (0, 1)
    ] + [not torch.allclose(plain.residual[m], pooled.residual[m]) for m in plain.residual]
    assert any(differs)


# --- accounting ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("sigma", "q", "steps"), [(1.0, 0.01, 1000), (0.6, 0.25, 12), (2.5, 1.0, 40)])
def test_a_clients_epsilon_is_opacus_own_for_its_noise_rate_and_steps(sigma, q, steps):
    """Two rounds of 3 windows each, then the rest: the client's epsilon is what Opacus' RDP analysis
    gives for (sigma, q, all the steps) taken at once."""
    windows = steps // 4  # optimiser steps a round: max_local_steps / gradient_accumulation_steps (8)
    settings = ["dp_max_grad_norm=1.0", f"dp_noise_multiplier={sigma}", f"max_local_steps={8 * windows}"]
    config = load_config(None, [*settings, "num_clients=2", "batch_size=1", "gradient_accumulation_steps=8"])
    size = round(8 / q)  # a client of this many questions is sampled at rate q
    accounts = PrivacyAccounts(config, ExampleLevelDP(1.0, (sigma, sigma)), None, [size, size])
    assert accounts.rates == [pytest.approx(q)] * 2
    for _ in range(4):
        accounts.record([1])
    spent = accounts.metrics()["dp_epsilon"]
    alphas = RDPAccountant.DEFAULT_ALPHAS
    rdp = compute_rdp(q=accounts.rates[1], noise_multiplier=sigma, steps=4 * windows, orders=alphas)
    expected, _ = get_privacy_spent(orders=alphas, rdp=rdp, delta=config.dp_delta)
    assert set(spent) == {"1"}
    assert spent["1"] == pytest.approx(expected, rel=1e-12)
    assert accounts.metrics()["dp_epsilon_max"] == spent["1"]


def test_a_target_epsilon_sets_the_noise_so_that_no_client_exceeds_it():
    config = tiny("tiny-encoder", "fedavg", *DPSGD, "num_rounds=5")
    sizes = [len(p) for p in prepare(config).partitions]
    dp = example_level_dp(config, sizes)
    accounts = PrivacyAccounts(config, dp, None, sizes)
    for client, rounds in enumerate(rounds_taken_part(config)):
        for _ in range(rounds):
            accounts.record([client])
    spent = accounts.metrics()["dp_epsilon"]
    assert max(spent.values()) <= 6.0
    assert max(spent.values()) > 5.9  # calibrated, not merely safe: the worst client spends the budget
    assert len(set(dp.noise_multipliers)) == 1  # one noise level for all by default


def test_calibration_warns_about_a_loose_result_only():
    """Opacus warns when an epsilon's best RDP order is the largest it tries (the bound is loose). Its
    search for sigma passes such a trial value on nearly every call; only a loose result may warn."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sigma = calibrated_noise_multiplier(
            "dp_epsilon", 6.0, 1e-5, 32 / 188, 80
        )  # SST-2 DP's smallest client
    assert sigma == pytest.approx(1.5344, abs=1e-4)
    assert not [w for w in caught if "Optimal order" in str(w.message)]
    with pytest.warns(UserWarning, match="Optimal order is the largest alpha"):
        calibrated_noise_multiplier("dp_epsilon", 0.2, 1e-5, 0.5, 3)  # near the accountant's floor


def test_a_target_at_the_accountants_floor_is_refused_and_a_hair_above_it_too():
    """The floor: epsilon as sigma -> inf (every RDP value 0). Below it no search is run; a hair above it
    Opacus' search gives up at sigma 1e6 with a ValueError, refused the same way."""
    alphas = RDPAccountant.DEFAULT_ALPHAS
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the floor's best order is the largest, as it must be
        floor, _ = get_privacy_spent(orders=alphas, rdp=[0.0] * len(alphas), delta=1e-5)
    assert floor == pytest.approx(0.1029, abs=1e-4)
    for target in (floor / 2, floor, floor * (1 + 1e-11)):
        with pytest.raises(UserError, match=r"^dp_epsilon=\S+ is out of reach at dp_delta=1e-05"):
            calibrated_noise_multiplier("dp_epsilon", target, 1e-5, 0.0625, 64)


def test_per_client_calibration_spends_each_clients_budget_with_its_own_noise(tmp_path):
    """dp_noise_per_client: every client that trains spends (just under) the target with its own
    multiplier, none more than the shared calibration's, the smallest-rate client as much."""
    config = tiny("tiny-encoder", "fedavg", *DPSGD, "num_rounds=5", "dp_noise_per_client=true")
    sizes = [len(p) for p in prepare(config).partitions]
    shared = example_level_dp(tiny("tiny-encoder", "fedavg", *DPSGD, "num_rounds=5"), sizes)
    dp = example_level_dp(config, sizes)
    assert dp is not None and shared is not None
    assert len(set(dp.noise_multipliers)) > 1  # the partitions differ in size: so do their noise levels
    assert dp.largest_noise_multiplier == pytest.approx(shared.largest_noise_multiplier)
    accounts = PrivacyAccounts(config, dp, None, sizes)
    rounds = rounds_taken_part(config)
    for client, taken in enumerate(rounds):
        for _ in range(taken):
            accounts.record([client])
    spent = accounts.metrics()["dp_epsilon"]
    assert set(spent) == {str(c) for c, taken in enumerate(rounds) if taken}
    assert all(5.9 < eps <= 6.0 for eps in spent.values())
    summary = simulation.run(config, tmp_path / "run", progress=False)
    assert summary["dp_noise_multipliers"] == pytest.approx(list(dp.noise_multipliers))
    assert summary["dp_noise_multiplier"] == pytest.approx(dp.largest_noise_multiplier)
    assert summary["dp_epsilon_max"] <= 6.0


# --- DP-SGD ------------------------------------------------------------------------------------------


def question_gradients(tm, encoded, questions: list[int], params) -> list[torch.Tensor]:
    """Each question's gradient alone, flattened over ``params``: the oracle."""
    grads = []
    for q in questions:
        batch = collate(encoded, [q], tm.device)
        scores = choice_scores(tm.model, batch, tm.kind, shared_context=False)
        loss = torch.nn.functional.cross_entropy(scores.float(), batch["labels"])
        grads.append(torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)]))
    return grads


@pytest.mark.parametrize("preset", ["tiny-encoder", "tiny-causal", "tiny-encoder-sst2", "tiny-causal-sst2"])
@pytest.mark.parametrize("clip", [1e-3, 0.05, 100.0])
def test_per_question_clipping_bounds_every_questions_gradient(preset, clip):
    """No noise: what a window releases is the mean of each question's gradient clipped to ``clip``
    (against gradients taken one question at a time), whether the clip bites or not."""
    config = tiny(preset, "fedavg", "lora_dropout=0")
    exp = prepare(config)
    tm = exp.trainable
    tm.model.train()
    for module in tm.model.modules():  # the model's own dropout too: both passes must see one function
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    params = []
    with torch.no_grad():
        for B, A in tm.factors.values():
            B.normal_(0, 0.2)
            B.requires_grad_(True)
            A.requires_grad_(True)
            params += [B, A]
    params += list(tm.head.values())
    for p in tm.head.values():
        p.requires_grad_(True)
    questions = [[0, 1], [2, 3]]  # two micro-batches of two questions: one window
    truth = question_gradients(tm, exp.train, [q for batch in questions for q in batch], params)
    private = PrivateGradients(
        ExampleLevelDP(clip, (0.0,)), 0, tm.model, params, 2, exp.train.rows_per_example, 0
    )
    for batch_questions in questions:
        batch = collate(exp.train, batch_questions, tm.device)
        loss = torch.nn.functional.cross_entropy(
            choice_scores(tm.model, batch, tm.kind, shared_context=False).float(), batch["labels"]
        )
        private.backward(loss)
    private.release()
    private.detach()
    released = torch.cat([p.grad.flatten() for p in params])
    clipped = [g * min(1.0, clip / (float(g.norm()) + 1e-6)) for g in truth]
    assert all(float(g.norm()) <= clip * (1 + 1e-5) for g in clipped)
    torch.testing.assert_close(released, sum(clipped) / len(clipped), rtol=1e-4, atol=1e-7)
    assert not any(hasattr(p, "grad_sample") for p in params)  # the hooks left nothing behind


def test_dp_sgd_noise_has_the_configured_scale():
    """Zero gradients, noise multiplier 2, clip 0.5, one window of 4 questions: the released gradient is
    noise of standard deviation 2 * 0.5 / 4 in every coordinate."""
    model = torch.nn.Linear(1, 20000, bias=False)
    model.weight = torch.nn.Parameter(torch.zeros(20000, 1))
    # client 1's multiplier (2), not client 0's
    private = PrivateGradients(ExampleLevelDP(0.5, (9.0, 2.0)), 1, model, [model.weight], 4, 1, 7)
    loss = model(torch.zeros(4, 1)).sum() / 4
    private.backward(loss)
    private.release()
    private.detach()
    assert float(model.weight.grad.std()) == pytest.approx(2 * 0.5 / 4, rel=0.03)


@pytest.mark.parametrize(
    ("preset", "method"),
    [("tiny-encoder", "fedavg"), ("tiny-encoder", "subspace_reg"), ("tiny-causal", "fedsvd"),
     ("tiny-encoder", "fedgalore"), ("tiny-encoder-sst2", "fedsvd"), ("tiny-causal-sst2", "ffa")],
)  # fmt: skip
def test_a_dp_sgd_run_records_each_clients_epsilon_and_the_largest(tmp_path, preset, method):
    config = tiny(preset, method, *DPSGD)
    summary = simulation.run(config, tmp_path / "run", progress=False)
    rows = read_metrics(tmp_path / "run")
    trained: set[str] = set()
    for row in rows:
        trained |= {str(c) for c in row["selected_clients"]}
        assert set(row["dp_epsilon"]) == trained
        assert row["dp_epsilon_max"] == max(row["dp_epsilon"].values()) <= 6.0
        assert math.isfinite(row["eval_loss"])
    assert summary["dp_epsilon_max"] == rows[-1]["dp_epsilon_max"]
    assert summary["dp_noise_multiplier"] > 0 and summary["dp_delta"] == 1e-5


def test_dp_sgd_training_differs_from_plain_training(tmp_path):
    """The privacy asked for is applied: the same run with DP-SGD ends with another adapter."""
    plain = simulation.run(tiny("tiny-encoder", "fedavg"), tmp_path / "plain", progress=False)
    private = simulation.run(tiny("tiny-encoder", "fedavg", *DPSGD), tmp_path / "dp", progress=False)
    a, b = (read_metrics(tmp_path / name)[-1] for name in ("plain", "dp"))
    assert a["update_norm"] != b["update_norm"]
    assert "dp_epsilon_max" not in plain and "dp_epsilon_max" in private


def test_privacy_accounting_survives_resume(tmp_path):
    config = tiny("tiny-encoder", "fedavg", *DPSGD, "dp_client_clip=0.5", "dp_client_noise_multiplier=1.0",
                  "num_rounds=3")  # fmt: skip
    simulation.run(config, tmp_path / "uninterrupted", progress=False)
    with crash_after_round(2), pytest.raises(KeyboardInterrupt):
        simulation.run(config, tmp_path / "resumed", progress=False)
    simulation.run(config, tmp_path / "resumed", resume=True, progress=False)
    assert_same_run(tmp_path / "resumed", tmp_path / "uninterrupted")
    assert json.loads((tmp_path / "resumed" / "summary.json").read_text())["dp_client_epsilon"] > 0


# --- client-level DP -----------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("clip", [1e-3, 0.7, 1e3])
def test_client_level_clipping_bounds_every_upload_change(seed, clip):
    state, updates, _ = make_round(9, 7, 3, 4, seed)
    start = flatten(state.factors, state.head)
    method = get_method("fedavg")
    for u in updates:
        upload = method.uplink(u)
        change = clipped_change(upload, start, clip)
        norm = math.sqrt(sum(float(t.square().sum()) for t in change.values()))
        raw = math.sqrt(sum(float((upload[k] - start[k]).square().sum()) for k in upload))
        assert norm == pytest.approx(min(raw, clip), rel=1e-9)


@pytest.mark.parametrize("name", ["fedavg", "ffa", "fedsvd", "rolora", "fedsa"])
def test_client_level_dp_without_noise_aggregates_the_mean_of_clipped_changes(name):
    state, updates, _ = make_round(9, 7, 3, 3, seed=3)
    state = dataclasses.replace(state, round=1)
    method = get_method(name)
    settings = ClientLevelDP(clip=0.5, noise_multiplier=0.0, clients_per_round=4)
    pooled = noisy_mean_update(method, state, updates, settings, torch.Generator().manual_seed(0))
    start = flatten(state.factors, state.head)
    for key, value in method.uplink(pooled).items():
        changes = [clipped_change(method.uplink(u), start, 0.5)[key] for u in updates]
        torch.testing.assert_close(value.double(), start[key] + sum(changes) / 4)


# --- refusals ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["dp_epsilon=6"], "dp_epsilon needs dp_max_grad_norm"),
        (["dp_max_grad_norm=1"], "needs exactly one of dp_noise_multiplier or dp_epsilon"),
        (["dp_max_grad_norm=1", "dp_epsilon=6", "dp_noise_multiplier=1"], "needs exactly one"),
        (["dp_client_noise_multiplier=1"], "dp_client_noise_multiplier needs dp_client_clip"),
        (["dp_client_clip=1", "dp_client_epsilon=3", "method=svd"], "'svd' cannot run under client-level DP"),
        (["secagg=true", "method=subspace_reg"], "'subspace_reg' cannot run under SecAgg+"),
        (["secagg=true", "method=glora"], "orth(B_i)"),
        (["dp_delta=0"], "dp_delta must be in (0, 1)"),
        (["dp_max_grad_norm=1", "dp_noise_multiplier=1", "dp_noise_per_client=true"], "set dp_epsilon"),
        (["dp_max_grad_norm=-1", "dp_epsilon=6"], "dp_max_grad_norm must be positive"),
    ],
)
def test_a_privacy_option_a_method_cannot_honour_is_refused_in_one_line(tmp_path, capsys, overrides, message):
    argv = ["run", "--config", str(ROOT / "configs" / "tiny-encoder.yaml"), "--out", str(tmp_path / "r")]
    assert main([*argv, *(a for o in [*FAST, *overrides] for a in ("--set", o))]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    "overrides",
    [
        ["dp_max_grad_norm=1", "dp_epsilon=0.1"],
        ["dp_client_clip=1", "dp_client_epsilon=0.05", "method=fedavg"],
    ],
)
def test_a_target_epsilon_below_the_accountants_floor_is_refused_in_one_line_before_training(
    tmp_path, capsys, overrides
):
    """Opacus' accountant certifies no epsilon below 0.103 at delta 1e-5 (its RDP orders end at 63):
    a target under it is refused when the noise is calibrated, before round 0."""
    argv = ["run", "--config", str(ROOT / "configs" / "tiny-encoder.yaml"), "--out", str(tmp_path / "r")]
    assert main([*argv, *(a for o in [*FAST, *overrides] for a in ("--set", o))]) == 2
    err = capsys.readouterr().err.strip()
    assert f"{overrides[1]} is out of reach at dp_delta=1e-05" in err and "no epsilon below 0.103" in err
    assert "\n" not in err
    assert not (tmp_path / "r" / "metrics.jsonl").exists()


def test_secagg_in_process_is_refused_before_any_work(tmp_path):
    with pytest.raises(UserError, match="secagg is for Flower"):
        simulation.run(tiny("tiny-encoder", "fedavg", "secagg=true"), tmp_path / "r", progress=False)
    assert not (tmp_path / "r").exists()


def test_dp_sgd_with_a_client_smaller_than_one_step_is_refused_before_training(tmp_path):
    config = tiny("tiny-encoder", "fedavg", *DPSGD, "batch_size=64", "gradient_accumulation_steps=64")
    with pytest.raises(
        UserError, match=r"DP-SGD: client \d+ holds \d+ training questions, fewer than one optimiser step"
    ):
        simulation.run(config, tmp_path / "r", progress=False)
    assert not (tmp_path / "r" / "metrics.jsonl").exists()


# --- Flower -------------------------------------------------------------------------------------------


@pytest.mark.timeout(300)
@pytest.mark.usefixtures("one_experiment_per_config")
@pytest.mark.parametrize(
    ("method", "overrides"),
    [("subspace_reg", DPSGD), ("fedsvd", [*DPSGD, "dp_client_clip=0.3", "dp_client_epsilon=20"])],
)
def test_dp_through_the_message_api_gives_the_in_process_numbers(tmp_path, method, overrides):
    """The same seeded noise on the same clients: the Flower run is the in-process run, epsilons included."""
    config = tiny("tiny-encoder", method, *overrides)
    simulation.run(config, tmp_path / "in-process", progress=False)
    run_flower_in_process(config, tmp_path / "flower")
    flower, in_process = (read_metrics(tmp_path / name) for name in ("flower", "in-process"))
    assert_same_rows(flower, in_process)
    for f, p in zip(flower, in_process, strict=True):
        assert f["dp_epsilon"] == p["dp_epsilon"] and f["dp_epsilon_max"] <= 6.0
        assert f.get("dp_client_epsilon") == p.get("dp_client_epsilon")


# --- SecAgg+ -------------------------------------------------------------------------------------------


@pytest.mark.timeout(300)
@pytest.mark.usefixtures("one_experiment_per_config")
@pytest.mark.parametrize("method", ["fedavg", "fedsvd", "rolora", "fedsa"])
def test_secagg_on_flower_gives_the_plain_aggregate_and_hides_each_upload(tmp_path, monkeypatch, method):
    """Loopback (ServerApp and ClientApps in this process, every message through Flower's wire format,
    Flower's SecAgg+ workflow and mod between them): the sum the server unmasks is the example-weighted
    average of the clients' plain uploads within SecAgg+'s quantisation error every round, round 1's new
    global model is the plain in-process run's within it, and what the server receives from one client
    holds no array and a masked vector that is not that client's upload."""
    plain_config, config = tiny("tiny-encoder", method), tiny("tiny-encoder", method, "secagg=true")
    states = capture_states(monkeypatch, method)
    simulation.run(plain_config, tmp_path / "plain", progress=False)
    plain_round_one = states[0]
    states.clear()

    uploads: list[tuple[int, int, dict]] = []  # (round, examples, plain upload), as the clients made them
    pooled: list[dict] = []  # what the server unmasked, each round
    received = []  # each client's reply to the masked-vector stage, as the server received it
    real_as_fitres, real_pooled = secagg.as_fitres, secagg_server.pooled_upload

    def plain_upload(content):
        examples = int(content["metrics"]["num-examples"])
        uploads.append((len(pooled) + 1, examples, from_record(content["arrays"])))
        return real_as_fitres(content)

    def unmasked(keys, fitres):
        pooled.append(real_pooled(keys, fitres))
        return pooled[-1]

    def intercept(message, reply):
        stage = message.content.config_records.get(RECORD_KEY_CONFIGS, {}).get(Key.STAGE)
        if stage == Stage.COLLECT_MASKED_VECTORS:
            received.append(reply.content)
        return reply

    real_app = client_app.app  # a node gets its own copy of every message, as over the network

    def over_the_wire(message, context):
        return real_app(message_from_proto(message_to_proto(message)), context)

    monkeypatch.setattr(client_app, "as_fitres", plain_upload)
    monkeypatch.setattr(secagg_server, "pooled_upload", unmasked)
    monkeypatch.setattr(client_app, "app", over_the_wire)
    run_flower_in_process(config, tmp_path / "secagg", intercept=intercept)

    level = 2 * secagg.CLIPPING_RANGE / secagg.QUANTIZATION_RANGE  # one quantisation step
    max_weight = max(len(p) for p in prepare(config).partitions)  # what the server sets
    assert [s.round for s in states] == [1, 2] and len(pooled) == 2 and len(uploads) == len(received) == 4
    for round_index, unmasked_sum in enumerate(pooled, start=1):
        mine = [(n, u) for r, n, u in uploads if r == round_index]
        total = sum(n for n, _ in mine)
        bound = len(mine) * level * max_weight / total  # secagg.py: one level per client, rescaled
        for key, value in unmasked_sum.items():
            exact = sum(n * u[key].double() for n, u in mine) / total
            assert float((value.double() - exact).abs().max()) <= bound, (round_index, key)
    # round 1 starts from the same state as the plain run: the new global updates B A agree within what
    # the per-value bound on the uploaded factors allows (fedsvd's B A is its averaged B times A_g)
    first = [n for r, n, _ in uploads if r == 1]
    bound = len(first) * level * max_weight / sum(first)
    for module, (B, A) in plain_round_one.factors.items():
        ours = states[0].factors[module][0] @ states[0].factors[module][1]
        spectral = torch.linalg.matrix_norm
        allowed = bound * (
            B.numel() ** 0.5 * spectral(A, 2) + A.numel() ** 0.5 * spectral(B, 2) + bound * B.numel()
        )
        assert float((ours - B @ A).norm()) <= 1.01 * float(allowed), module
    for (_, _, upload), content in zip(uploads, received, strict=True):
        assert all(len(record) == 0 for record in content.array_records.values())
        vectors = content.config_records[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS]
        masked = [bytes_to_ndarray(b) for b in vectors][1:]  # the first holds the weight
        values = torch.cat([upload[k].flatten() for k in sorted(upload)]).double()
        seen = torch.cat([torch.from_numpy(a.astype("float64")).flatten() for a in masked])
        seen = seen * level - secagg.CLIPPING_RANGE  # what it would dequantise to, were it not masked
        assert seen.shape == values.shape
        assert float((seen - values).abs().mean()) > 1.0  # uniform masks: far from the upload (|values| < 1)
    rows = read_metrics(tmp_path / "secagg")
    assert all(row["basis_overlap"] is None for row in rows)  # no per-client diagnostics: none seen


def test_secagg_refuses_what_it_cannot_honour_in_one_line(tmp_path, capsys):
    argv = ["run", "--config", str(ROOT / "configs" / "tiny-encoder.yaml"), "--out", str(tmp_path / "r")]
    for overrides, message in [
        (["secagg=true", "method=fedavg", "dp_client_clip=1", "dp_client_epsilon=5"], "dp_client_clip with"),
        (["secagg=true", "method=fedavg", "client_fraction=0.25"], "secagg needs at least 2 clients a round"),
        (["secagg=true", "method=hetlora"], "'hetlora' cannot run under SecAgg+"),
    ]:
        assert main([*argv, *(a for o in [*FAST, *overrides] for a in ("--set", o))]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err
