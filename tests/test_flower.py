"""Flower: every method through the Message API with the in-process runner's numbers, what travels and
how it is counted, faults, and real SuperLink + SuperNode processes on 127.0.0.1."""

from __future__ import annotations

import math
import re
import signal
import tempfile
import threading
import time
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import tomli_w
import torch
import yaml
from flwr.app import Array, Message, RecordDict
from helpers import (
    FIXTURE,
    ROOT,
    assert_same_rows,
    capture_states,
    crash_after_round,
    held_by_another_process,
    kill_node,
    run_flower_in_process,
)

from fedsubspace import simulation
from fedsubspace.cli import main
from fedsubspace.configure import load_config
from fedsubspace.errors import UserError
from fedsubspace.experiment import sample_clients
from fedsubspace.flower.local import LocalFederation
from fedsubspace.flower.payload import (
    apply_catch_up,
    check_upload,
    content_bytes,
    from_record,
    record_bytes,
    to_record,
)
from fedsubspace.flower.settings import FlowerSettings, app_definition, run_config_defaults
from fedsubspace.methods import METHODS, get_method
from fedsubspace.methods.base import ClientStart
from fedsubspace.methods.common import merged_residual
from fedsubspace.results import RunBusy, read_metrics
from fedsubspace.state import GlobalState, MergeHistory, flatten, load_state, payload_bytes

CONFIG = ROOT / "configs" / "tiny-encoder.yaml"
FAST = [f"dataset={FIXTURE}", "max_eval_samples=16", "max_local_steps=2"]
MIXED_RANKS = "client_ranks=[2, 4, 4, 4]"  # rounds 1 and 2 (seed 42) train clients 0 (rank 2) and 3 (rank 4)


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def assert_states_close(a: GlobalState, b: GlobalState, tol: float = 1e-5) -> None:
    """Every tensor of the two global states within ``tol`` relative Frobenius error."""
    flat_a = {**flatten(a.factors, a.head, a.extras), **{f"res/{k}": t for k, t in a.residual.items()}}
    flat_b = {**flatten(b.factors, b.head, b.extras), **{f"res/{k}": t for k, t in b.residual.items()}}
    assert flat_a.keys() == flat_b.keys() and a.round == b.round
    for key in flat_a:
        assert rel_error(flat_a[key], flat_b[key]) <= tol, f"{key} differs after round {a.round}"


def tiny(method: str, *overrides: str):
    return load_config(CONFIG, [*FAST, *overrides], method=method)


# --- every method, the same numbers -------------------------------------------------------------


@pytest.mark.timeout(300)
@pytest.mark.usefixtures("one_experiment_per_config")
@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_gives_the_in_process_numbers_through_the_message_api(tmp_path, monkeypatch, method):
    config = tiny(method, *([MIXED_RANKS] if METHODS[method].heterogeneous_ranks else []))
    states = capture_states(monkeypatch, method)
    simulation.run(config, tmp_path / "in-process", progress=False)
    in_process_states = list(states)
    states.clear()
    run_flower_in_process(config, tmp_path / "flower")
    flower_states = list(states)

    # fedsa's B never leaves its client: the Flower server cannot compute the diagnostics that need it
    personal = METHODS[method].personalised
    assert_same_rows(
        read_metrics(tmp_path / "flower"), read_metrics(tmp_path / "in-process"), diagnostics=not personal
    )
    assert [s.round for s in flower_states] == [1, 2]
    for flower, in_process in zip(flower_states, in_process_states, strict=True):
        assert_states_close(flower, in_process)
    assert_states_close(
        load_state(tmp_path / "flower" / "checkpoints" / "last.safetensors"),
        load_state(tmp_path / "in-process" / "checkpoints" / "last.safetensors"),
    )
    for name in ("config.yaml", "partition_stats.json", "summary.json", "checkpoints/best.safetensors"):
        assert (tmp_path / "flower" / name).exists()
    assert yaml.safe_load((tmp_path / "flower" / "config.yaml").read_text()) == config.to_dict()


# --- faults ---------------------------------------------------------------------------------------


def victim_of(config, round_index: int = 1) -> int:
    return sample_clients(config.seed, round_index, config.num_clients, config.client_fraction)[0]


def in_round_one(message: Message, client: int) -> bool:
    """Whether ``message`` is the round 1 TRAIN message to ``client``."""
    config = message.content.config_records.get("config")
    if message.metadata.message_type != "train" or config is None:
        return False
    return config["server-round"] == 1 and config["partition-id"] == client


def poison(victim: int, how: Callable[[RecordDict], None]) -> Callable:
    """Damage the victim's round 1 reply with ``how``."""

    def intercept(message: Message, reply: Message) -> Message:
        if in_round_one(message, victim):
            how(reply.content)
        return reply

    return intercept


def set_nan(content: RecordDict) -> None:
    arrays = content.array_records["arrays"]
    key = next(k for k in arrays if k.startswith("lora_B/"))
    tensor = from_record(arrays)[key]
    tensor[0, 0] = float("nan")
    arrays[key] = Array(tensor.numpy())


def widen(content: RecordDict) -> None:
    arrays = content.array_records["arrays"]
    key = next(k for k in arrays if k.startswith("lora_A/"))
    tensor = from_record(arrays)[key]
    arrays[key] = Array(torch.cat([tensor, tensor], dim=1).numpy())


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("damage", "message"), [(set_nan, "holds NaN or Inf"), (widen, r"is \(4, \d+\) torch.float32, expected")]
)
def test_a_reply_with_nan_or_wrong_shapes_is_rejected_with_its_node_named(tmp_path, caplog, damage, message):
    config = tiny("svd")
    victim = victim_of(config)
    run_flower_in_process(config, tmp_path / "flower", intercept=poison(victim, damage))
    rows = read_metrics(tmp_path / "flower")
    assert rows[0]["skipped_clients"] == [victim] and rows[0]["missing_clients"] == []
    assert rows[0]["update_norm"] is not None and all(math.isfinite(r["eval_loss"]) for r in rows)
    node = 100 + victim
    assert re.search(rf"reply of client {victim} \(node {node}\) rejected: .*{message}", caplog.text)


@pytest.mark.timeout(120)
def test_a_client_that_never_replies_misses_the_round_and_the_run_goes_on(tmp_path, caplog):
    config = tiny("fedex")  # merges into the base: the node that missed rounds must catch up exactly
    victim = victim_of(config)

    def drop(message: Message, reply: Message) -> Message | None:
        return None if in_round_one(message, victim) else reply

    run_flower_in_process(config, tmp_path / "flower", intercept=drop, **{"round-timeout": 5.0})
    rows = read_metrics(tmp_path / "flower")
    assert rows[0]["missing_clients"] == [victim] and rows[0]["skipped_clients"] == []
    assert rows[1]["missing_clients"] == [] and len(rows) == config.num_rounds
    assert f"client {victim} (node {100 + victim}) sent no train reply" in caplog.text


@pytest.mark.timeout(120)
def test_fewer_usable_replies_than_min_replies_leave_the_global_model_unchanged(
    tmp_path, monkeypatch, caplog
):
    config = tiny("svd")
    victim = victim_of(config)
    states = capture_states(monkeypatch, "svd")
    run_flower_in_process(
        config, tmp_path / "flower", intercept=poison(victim, set_nan), **{"min-replies": 2}
    )
    rows = read_metrics(tmp_path / "flower")
    assert sorted(rows[0]["skipped_clients"]) == rows[0]["selected_clients"]  # the good one is refused too
    assert rows[0]["train_loss"] is None and rows[0]["update_norm"] is None
    assert [s.round for s in states] == [2]  # only round 2 aggregated
    assert "fewer than min-replies=2" in caplog.text


@pytest.mark.timeout(120)
def test_a_node_whose_config_differs_from_the_servers_refuses_to_train(tmp_path, caplog):
    config = tiny("svd")
    victim = victim_of(config)
    run_flower_in_process(config, tmp_path / "flower", node_configs={victim: {"learning_rate": 0.5}})
    rows = read_metrics(tmp_path / "flower")
    assert rows[0]["missing_clients"] == [victim] and len(rows) == config.num_rounds
    assert "experiment config differs from the server's" in caplog.text


# --- payloads -------------------------------------------------------------------------------------


def test_tensors_survive_the_arrayrecord_round_trip_bit_for_bit_and_are_counted():
    gen = torch.Generator().manual_seed(0)
    tensors = {
        "lora_B/q": torch.randn(6, 3, generator=gen),
        "lora_A/q": torch.randn(5, 3, generator=gen).T,  # not contiguous
        "head/w": torch.randn(4, generator=gen, dtype=torch.float64),
        "extra/half": torch.randn(2, 2, generator=gen).half(),
        "extra/bf16": torch.randn(3, 2, generator=gen).bfloat16(),
        "extra/round": torch.tensor(7),
    }
    record = to_record(tensors)
    back = from_record(record)
    assert back.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert back[name].dtype == tensor.dtype and torch.equal(back[name], tensor), name
    assert record_bytes(record) == payload_bytes(tensors) == 4 * 18 + 4 * 15 + 8 * 4 + 2 * 4 + 2 * 6 + 8
    content = RecordDict({"arrays": record, "residual": to_record({"x": torch.zeros(10)})})
    assert content_bytes(content) == payload_bytes(tensors) + 40


def upload_case():
    gen = torch.Generator().manual_seed(1)
    start = ClientStart(
        factors={"q": (torch.randn(8, 4, generator=gen), torch.randn(4, 6, generator=gen))},
        head={"w": torch.randn(3, generator=gen)},
    )
    upload = {"lora_B/q": torch.randn(8, 4, generator=gen), "lora_A/q": torch.randn(4, 6, generator=gen)}
    return start, {**upload, "head/w": torch.randn(3, generator=gen)}


@pytest.mark.parametrize(
    ("method", "change", "problem"),
    [
        ("svd", {}, None),
        ("svd", {"lora_B/q": torch.zeros(8, 3)}, "inner ranks 3 and 4"),
        ("svd", {"lora_A/q": torch.zeros(4, 7)}, "lora_A/q is (4, 7) torch.float32, expected (r, 6)"),
        ("svd", {"head/w": torch.zeros(4)}, "head/w is (4,)"),
        ("svd", {"lora_B/q": torch.zeros(8, 4, dtype=torch.float64)}, "torch.float64"),
        ("svd", {"head/w": torch.tensor([0.0, float("inf"), 0.0])}, "head/w holds NaN or Inf"),
        ("svd", {"extra/x": torch.tensor([float("nan")])}, "extra/x holds NaN or Inf"),
        ("svd", {"lora_C/q": torch.zeros(1)}, "unexpected ['lora_C/q']"),
        ("fedsvd", {}, "unexpected ['lora_A/q']"),  # fedsvd uploads B only
    ],
)
def test_uploads_are_checked_against_what_the_client_started_from(method, change, problem):
    start, upload = upload_case()
    trained = METHODS[method].trains
    found = check_upload(get_method(method), {**upload, **change}, start, trained, rank=4)
    assert found == problem if problem is None else problem in found


def test_a_node_catches_up_with_the_merged_weights_exactly_whichever_form_travels():
    gen = torch.Generator().manual_seed(2)
    state = GlobalState(factors={}, head={}, scaling=1.0)
    history = MergeHistory()
    server: list[dict] = [{}]
    for _ in range(4):
        # module "wide" (64 x 64) is cheaper as factors, "thin" (64 x 2) as the dense residual
        merges = {
            "wide": (torch.randn(64, 2, generator=gen), torch.randn(2, 64, generator=gen)),
            "thin": (torch.randn(64, 2, generator=gen), torch.randn(2, 2, generator=gen)),
        }
        state = state.next(residual=merged_residual(state, merges), merged=merges)
        history.record(state)
        server.append(state.residual)
    for since in range(5):
        payload = history.catch_up(since, state)
        history.synced[0] = since  # the in-process runner counts what the Flower server ships
        assert history.catch_up_bytes(0, state) == payload_bytes(payload) and history.synced[0] == 4
        assert {k.split("/")[0] for k in payload if k.endswith("thin")} <= {"dense"}
        if since < 4:
            assert any(k.startswith("merge/") and k.endswith("wide") for k in payload)
        node = apply_catch_up(server[since], payload, since)
        for module in ("wide", "thin"):
            assert torch.equal(node[module], state.residual[module]), (since, module)
        if since < 4:  # a node further on than the server believes skips the merges it has already
            ahead = apply_catch_up(server[since + 1], payload, since + 1)
            assert all(torch.equal(ahead[m], state.residual[m]) for m in ("wide", "thin"))


# --- the app definition and its run config --------------------------------------------------------


def test_pyproject_declares_the_app_the_code_defines_with_every_config_key():
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]
    defined = app_definition()["tool"]["flwr"]["app"]
    assert declared["components"] == defined["components"] and declared["publisher"] == defined["publisher"]
    assert declared["config"] == defined["config"] == run_config_defaults()


def test_run_config_builds_the_experiment_config_like_the_yaml_and_set(tmp_path):
    run_config = {
        "config-file": str(CONFIG),
        "method": "glora",
        "client_ranks": "[2, 4, 4, 4]",
        "max_train_samples": "null",
        "learning_rate": 0.002,
        "num_rounds": 3,
        "preserve_norm": False,
        "out-dir": str(tmp_path / "out"),
        "min-replies": 2,
    }
    settings = FlowerSettings.from_run_config(run_config)
    sets = ["method=glora", "client_ranks=[2, 4, 4, 4]", "max_train_samples=null", "learning_rate=0.002"]
    expected = load_config(CONFIG, [*sets, "num_rounds=3", "preserve_norm=false"])
    assert settings.config == expected
    assert settings.out == tmp_path / "out" and settings.min_replies == 2 and settings.round_timeout == 3600.0
    for bad, message in [
        ({"num_round": 3}, "unknown run config key 'num_round'"),
        ({"min-replies": 0}, "min-replies must be at least 1"),
        ({"round-timeout": "soon"}, "'round-timeout' must be float"),
        ({"client_fraction": 2.0}, "client_fraction must be in (0, 1]"),
    ]:
        with pytest.raises(UserError, match=re.escape(message)):
            FlowerSettings.from_run_config(bad)


@pytest.fixture
def no_federation(monkeypatch) -> None:
    """A mistake must be refused before any SuperLink or SuperNode starts."""

    def start(self) -> None:
        raise AssertionError("a federation was started")

    monkeypatch.setattr(LocalFederation, "start", start)


@pytest.mark.usefixtures("no_federation")
def test_flower_local_mistakes_are_refused_before_anything_starts(tmp_path, capsys):
    local = ["flower", "local", "--config", str(CONFIG), "--out", str(tmp_path / "x")]
    local += [arg for setting in FAST for arg in ("--set", setting)]
    assert main([*local, "--min-replies", "0"]) == 2
    err = capsys.readouterr().err
    assert "min-replies must be at least 1" in err and len(err.strip().splitlines()) == 1
    # an interrupted run: flower local cannot resume it, so it must not tell the user to
    with crash_after_round(1), pytest.raises(KeyboardInterrupt):
        simulation.run(tiny("svd"), tmp_path / "x", progress=False)
    assert main(local) == 2
    err = capsys.readouterr().err
    assert "holds an unfinished run; pass --overwrite to start it over" in err and "--resume" not in err


@pytest.mark.timeout(120)
def test_resuming_a_flower_run_in_process_says_why_it_cannot(tmp_path, capsys):
    config = tiny("svd")
    run_flower_in_process(config, tmp_path / "flower")
    (tmp_path / "flower" / "summary.json").unlink()  # as if the ServerApp had died after its last round
    argv = ["run", "--config", str(CONFIG), "--out", str(tmp_path / "flower"), "--method", "svd", "--resume"]
    assert main([*argv, *(arg for setting in FAST for arg in ("--set", setting))]) == 2
    err = capsys.readouterr().err
    assert "written by a Flower run, which cannot resume" in err and "older" not in err
    assert "--overwrite" in err and len(err.strip().splitlines()) == 1


@pytest.mark.timeout(120)
def test_a_flower_run_in_which_no_round_trained_fails(tmp_path):
    config = tiny("svd")

    def drop(message: Message, reply: Message) -> Message | None:
        return None if message.metadata.message_type == "train" else reply  # no client ever trains

    with pytest.raises(UserError, match=r"no round of the run .* trained a client"):
        run_flower_in_process(config, tmp_path / "flower", intercept=drop, **{"round-timeout": 2.0})
    assert not (tmp_path / "flower" / "summary.json").exists()
    assert [r["train_loss"] for r in read_metrics(tmp_path / "flower")] == [None, None]


def test_flower_local_refuses_a_node_count_that_is_not_one_per_client(tmp_path, capsys):
    code = main(["flower", "local", "--nodes", "3", "--config", str(CONFIG), "--set", f"dataset={FIXTURE}",
                 "--out", str(tmp_path / "x")])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "--nodes 3 but num_clients is 4" in err and len(err.strip().splitlines()) == 1


def test_a_run_another_process_holds_is_refused_by_the_serverapp_and_by_flower_local(tmp_path, capsys):
    out = tmp_path / "run"
    with held_by_another_process(out):
        with pytest.raises(RunBusy, match="is being run by another process"):
            run_flower_in_process(tiny("fedavg"), out)
        assert not (out / "config.yaml").exists()
        argv = ["flower", "local", "--nodes", "4", "--config", str(CONFIG), "--set", f"dataset={FIXTURE}"]
        code = main([*argv, "--out", str(out)])
        err = capsys.readouterr().err
        assert code == 2 and "is being run by another process" in err and "Traceback" not in err
        assert not (out / "config.yaml").exists()


# --- real processes -------------------------------------------------------------------------------


def federation_processes(home_root: Path) -> list[int]:
    """Live processes whose FLWR_HOME lies under ``home_root`` (zombies excluded)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        homes = [v.split(b"=", 1)[1].decode() for v in environ if v.startswith(b"FLWR_HOME=")]
        if state != "Z" and any(h.startswith(str(home_root)) for h in homes):
            found.append(int(entry.name))
    return found


def watch_checkpoints(out: Path, done: threading.Event) -> dict[int, GlobalState]:
    """Every round's ``last.safetensors`` of a run in progress, by round (rounds last seconds)."""
    seen: dict[int, GlobalState] = {}
    path = out / "checkpoints" / "last.safetensors"
    while True:
        finished = done.is_set()
        if path.exists():
            try:
                state = load_state(path)
                seen.setdefault(state.round, state)
            except Exception:  # the file was being replaced under the reader: read it again next time
                pass
        if finished:
            return seen
        time.sleep(0.1)


REAL = [f"dataset={FIXTURE}", "num_clients=3", "max_eval_samples=32"]


def reproduces_in_process(
    out: Path, in_process_dir: Path, states: dict[int, GlobalState], in_process
) -> None:
    assert_same_rows(read_metrics(out), read_metrics(in_process_dir))
    assert sorted(states) == [1, 2]
    for state in in_process:
        assert_states_close(states[state.round], state)


@pytest.mark.timeout(400)
def test_flower_local_on_three_supernodes_reproduces_the_in_process_run(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the federation's FLWR_HOME goes here
    config = load_config(CONFIG, REAL, method="svd")
    in_process = capture_states(monkeypatch, "svd")
    simulation.run(config, tmp_path / "in-process", progress=False)

    out, done, states = tmp_path / "flower", threading.Event(), {}
    watcher = threading.Thread(target=lambda: states.update(watch_checkpoints(out, done)))
    watcher.start()
    sets = [arg for key in REAL for arg in ("--set", key)]
    try:
        code = main(["flower", "local", "--config", str(CONFIG), "--method", "svd", *sets, "--out", str(out)])
    finally:
        done.set()
        watcher.join()
    assert code == 0 and "done: svd" in capsys.readouterr().out
    assert federation_processes(tmp_path) == []
    reproduces_in_process(out, tmp_path / "in-process", states, in_process)


class Log(list):
    """What ``flwr run --stream`` prints, line by line, readable while it runs."""

    def write(self, text: str) -> None:
        self.append(text)

    def flush(self) -> None:
        pass


@pytest.fixture(scope="module")
def federation(tmp_path_factory) -> Iterator[LocalFederation]:
    """One SuperLink and three SuperNodes on 127.0.0.1 for the tests below."""
    home = tmp_path_factory.mktemp("federation")
    (home / "app").mkdir()
    (home / "app" / "pyproject.toml").write_text(tomli_w.dumps(app_definition()))
    with LocalFederation(3, home) as started:
        yield started
    assert federation_processes(home) == []


def start_run(federation: LocalFederation, config, out: Path, log: Log) -> threading.Thread:
    """``flwr run`` of ``config`` into ``out`` on the federation, in a thread."""
    home = federation.home
    (home / f"{out.name}.yaml").write_text(yaml.safe_dump(config.to_dict()))
    run_config = {"config-file": str(home / f"{out.name}.yaml"), "out-dir": str(out), "round-timeout": 300.0}
    (home / f"{out.name}.toml").write_text(tomli_w.dumps(run_config))
    thread = threading.Thread(target=federation.run, args=(home / "app", home / f"{out.name}.toml", log))
    thread.start()
    return thread


@pytest.mark.timeout(400)
def test_glora_with_mixed_ranks_on_supernodes_reproduces_the_in_process_run(
    tmp_path, monkeypatch, federation
):
    config = load_config(CONFIG, [*REAL, "client_ranks=[2, 4, 4]"], method="glora")
    in_process = capture_states(monkeypatch, "glora")
    simulation.run(config, tmp_path / "in-process", progress=False)
    out, done = tmp_path / "flower", threading.Event()
    thread = start_run(federation, config, out, Log())
    states = {}
    watcher = threading.Thread(target=lambda: states.update(watch_checkpoints(out, done)))
    watcher.start()
    thread.join()
    done.set()
    watcher.join()
    reproduces_in_process(out, tmp_path / "in-process", states, in_process)
    rows = read_metrics(out)
    assert {config.client_ranks[c] for c in rows[1]["selected_clients"]} == {2, 4}


@pytest.mark.timeout(400)
def test_a_supernode_killed_mid_round_is_missed_and_its_restart_rejoins(tmp_path, federation):
    config = load_config(CONFIG, REAL, method="svd")
    rounds = [sample_clients(config.seed, t, 3, config.client_fraction) for t in (1, 2)]
    victim = next(c for c in rounds[0] if c in rounds[1])  # trains in both rounds
    out, log = tmp_path / "flower", Log()
    thread = start_run(federation, config, out, log)
    deadline = time.monotonic() + 300
    while not any("round 1: clients" in line for line in log):
        assert thread.is_alive() and time.monotonic() < deadline, "".join(log)
        time.sleep(0.2)
    kill_node(federation, victim, signal.SIGKILL)  # a crash: the node, its SuperExec and ClientApp
    federation.start_node(victim)  # ... and it comes back
    thread.join()
    text = "".join(log)
    rows = read_metrics(out)
    assert [r["selected_clients"] for r in rows] == rounds
    assert rows[0]["missing_clients"] == [victim] and rows[0]["update_norm"] is not None  # the other one
    assert rows[1]["missing_clients"] == [] and rows[1]["skipped_clients"] == []  # the restart trained
    assert re.search(rf"client {victim} \(node \d+\) failed: .*Node Unavailable", text)
    assert len(re.findall(rf"node \d+ holds client {victim}\b", text)) == 2  # the first node, the restart
    assert (out / "summary.json").exists()
