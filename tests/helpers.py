"""Helpers the test modules share: paths and configs, random rounds with their dense oracles, the
in-process Flower harness, crashes and resumes, and results directories written by hand.

Test modules import from here (``from helpers import ...``; pytest puts tests/ on the path); fixtures
live in conftest.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import yaml
from flwr.app import Context, Error, Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity
from safetensors import safe_open
from safetensors.torch import load_file
from torch import Tensor

from fedsubspace import lowrank
from fedsubspace.config import ExperimentConfig
from fedsubspace.configure import load_config
from fedsubspace.flower import client_app, server_app
from fedsubspace.flower.local import LocalFederation
from fedsubspace.methods import METHODS
from fedsubspace.results import RunDirectory, read_metrics
from fedsubspace.state import ClientUpdate, GlobalState

# --- paths and configs --------------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[1]


METRIC_KEYS = {
    "round", "selected_clients", "train_loss", "eval_loss", "eval_accuracy", "basis_overlap",
    "cancellation_ratio", "client_global_cosine", "pairwise_client_cosine", "update_norm",
    "aggregated_update_norm", "aggregation_error", "update_overlap", "bytes_up", "bytes_down",
    "seconds", "train_seconds", "aggregate_seconds", "eval_seconds",
}  # fmt: skip


FIXTURE = ROOT / "tests" / "fixtures" / "hellaswag"
F64 = torch.float64


MIXED_RANK_METHODS = ["glora", "flora", "flexlora", "hetlora", "fedgalore"]


# Smaller than the presets' smoke settings: these runs check plumbing, not learning.
FAST = ["max_eval_samples=16", "max_local_steps=2"]


def tiny_preset(preset: str, method: str, seed: int | None = None) -> ExperimentConfig:
    """A tiny preset as it ships, on the HellaSwag fixture."""
    # configs name the fixture relative to the repository root; tests may run from anywhere
    return load_config(ROOT / "configs" / f"{preset}.yaml", [f"dataset={FIXTURE}"], method=method, seed=seed)


def tiny(preset: str, method: str, *overrides: str) -> ExperimentConfig:
    """A tiny preset smaller still (FAST), with ``overrides`` on top: the multiple-choice presets on the
    HellaSwag fixture, the ``*-sst2`` ones on their own classification fixture."""
    data = [] if preset.endswith("-sst2") else [f"dataset={FIXTURE}"]
    return load_config(ROOT / "configs" / f"{preset}.yaml", [*data, *FAST, *overrides], method=method)


# --- random rounds and their dense oracles -----------------------------------------------------------


def random_factors(m: int, n: int, r: int, gen: torch.Generator, kind: str = "full") -> tuple:
    B = torch.randn(m, r, generator=gen, dtype=torch.float64)
    A = torch.randn(r, n, generator=gen, dtype=torch.float64)
    if kind == "zero":
        B = torch.zeros_like(B)
    elif kind == "deficient":  # rank 1 whatever r is
        B = B[:, :1].repeat(1, r)
    return B, A


def make_round(m: int, n: int, r: int, clients: int, seed: int, kinds: tuple[str, ...] = ("full",)):
    gen = torch.Generator().manual_seed(seed)
    modules = {"layer.0.q": (m, n), "layer.0.v": (n, m)}
    state = GlobalState(
        factors={name: random_factors(a, b, r, gen) for name, (a, b) in modules.items()},
        head={"classifier.weight": torch.randn(1, 5, generator=gen, dtype=torch.float64)},
        scaling=2.0,
    )
    updates = []
    for i in range(clients):
        kind = kinds[i % len(kinds)]
        factors = {name: random_factors(a, b, r, gen, kind) for name, (a, b) in modules.items()}
        head = {"classifier.weight": torch.randn(1, 5, generator=gen, dtype=torch.float64)}
        updates.append(ClientUpdate(i, 10 + 7 * i, factors, head, train_loss=1.0))
    total = sum(u.num_examples for u in updates)
    return state, updates, [u.num_examples / total for u in updates]


def dense_average(updates, weights, module: str, s: float) -> torch.Tensor:
    return sum(p * s * u.factors[module][0] @ u.factors[module][1] for p, u in zip(weights, updates))


def best_rank(T: torch.Tensor, r: int) -> torch.Tensor:
    U, S, Vh = torch.linalg.svd(T, full_matrices=False)
    return U[:, :r] @ torch.diag(S[:r]) @ Vh[:r]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


ALPHA = 16.0


MODULES = {"layer.0.q": (12, 9), "layer.0.v": (7, 10)}


def dense(u: ClientUpdate, module: str, s: float) -> torch.Tensor:
    left, right = u.product(module, s)
    return left @ right


def exact_average(updates, weights, module: str, s: float) -> torch.Tensor:
    return sum(p * dense(u, module, s) for p, u in zip(weights, updates, strict=True))


def mixed_round(ranks: list[int], seed: int, global_rank: int | None = None):
    """A state at the largest rank and one update per client rank, each with scaling alpha / r."""
    gen = torch.Generator().manual_seed(seed)
    R = global_rank or max(ranks)

    def factors(r: int) -> dict:
        return {
            name: (torch.randn(m, r, generator=gen, dtype=F64), torch.randn(r, n, generator=gen, dtype=F64))
            for name, (m, n) in MODULES.items()
        }

    state = GlobalState(factors=factors(R), head={"h": torch.zeros(3, dtype=F64)}, scaling=ALPHA / R)
    updates = [
        ClientUpdate(
            i, 5 + 3 * i, factors(r), {"h": torch.randn(3, generator=gen, dtype=F64)}, 1.0, scaling=ALPHA / r
        )
        for i, r in enumerate(ranks)
    ]
    total = sum(u.num_examples for u in updates)
    return state, updates, [u.num_examples / total for u in updates]


def update_tensors(update: ClientUpdate) -> list[Tensor]:
    """Every tensor a client update holds."""
    return [
        *(t for pair in update.factors.values() for t in pair),
        *update.head.values(),
        *update.extras.values(),
    ]


# --- low-rank oracles (lowrank.py has no use for them) --------------------------------------------------


def frobenius_norm(left: Tensor, right: Tensor) -> Tensor:
    """``||L @ R||_F`` without forming the product."""
    return torch.sqrt(lowrank.frobenius_inner(left, right, left, right).clamp_min(0.0))


def project(basis: Tensor, matrix: Tensor) -> Tensor:
    """``Q Q^T X``: the projection of the columns of X onto span(Q), never forming the m x m projector."""
    return basis @ (basis.mT @ matrix)


# --- Flower: the ServerApp and ClientApps in this process, and real SuperNodes ---------------------------


TIMING = {"seconds", "train_seconds", "aggregate_seconds", "diagnostics_seconds", "eval_seconds"}


EXACT_KEYS = ("round", "selected_clients", "skipped_clients", "eval_accuracy", "bytes_up", "bytes_down")


def assert_same_rows(flower: list[dict], in_process: list[dict], *, diagnostics: bool = True) -> None:
    assert len(flower) == len(in_process)
    for f, p in zip(flower, in_process):
        assert {k: f[k] for k in EXACT_KEYS} == {k: p[k] for k in EXACT_KEYS}
        assert f["missing_clients"] == []
        assert f["eval_loss"] == pytest.approx(p["eval_loss"], rel=1e-6)
        assert f["train_loss"] == pytest.approx(p["train_loss"], rel=1e-6)
        if diagnostics:
            for key in p.keys() - TIMING - set(EXACT_KEYS) - {"eval_loss", "train_loss"}:
                expected = p[key] if p[key] is None else pytest.approx(p[key], rel=1e-5, abs=1e-9)
                assert f[key] == expected, key


def capture_states(monkeypatch, method: str) -> list[GlobalState]:
    """Every global state the method's aggregation returns, in order (both runners call it)."""
    states: list[GlobalState] = []
    cls = METHODS[method]
    real = cls.aggregate

    def recording(self, state, updates, weights):
        new = real(self, state, updates, weights)
        states.append(new)
        return new

    monkeypatch.setattr(cls, "aggregate", recording)
    return states


class InProcessGrid(Grid):
    """A Grid that hands every message to the ClientApp in this process, each node keeping its Flower
    context between messages as a SuperNode does; ``intercept(message, reply)`` may alter or drop
    (None) a reply."""

    def __init__(self, run_config: dict, num_nodes: int, intercept: Callable | None = None) -> None:
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1  # as in a ServerApp process
        self.contexts = {
            100 + k: Context(
                run_id=1,
                node_id=100 + k,
                node_config={"partition-id": k, "num-partitions": num_nodes},
                state=RecordDict(),
                run_config=dict(run_config),
            )
            for k in range(num_nodes)
        }
        self.intercept = intercept

    def set_run(self, run) -> None:
        raise NotImplementedError

    @property
    def run(self):
        raise NotImplementedError

    def create_message(self, *args, **kwargs) -> Message:
        raise NotImplementedError

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def push_messages(self, messages):
        raise NotImplementedError

    def pull_messages(self, message_ids):
        raise NotImplementedError

    def send_and_receive(self, messages, *, timeout=None) -> list[Message]:
        replies = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = message.object_id  # as the real Grid does
            try:
                reply = client_app.app(message, self.contexts[message.metadata.dst_node_id])
            except Exception as exc:  # what the SuperNode reports when a ClientApp raises
                reply = Message(Error(code=0, reason=repr(exc)), reply_to=message)
            if self.intercept is not None:
                reply = self.intercept(message, reply)
            if reply is not None:
                replies.append(reply)
        return replies


def run_flower_in_process(
    config, out: Path, *, intercept: Callable | None = None, node_configs: dict | None = None, **knobs
) -> None:
    """The ServerApp and ClientApps of ``config`` in this process (no SuperLink, no SuperNodes);
    ``node_configs`` adds run config keys as one client's node sees them."""
    out.mkdir(parents=True, exist_ok=True)
    (out.parent / f"{out.name}.yaml").write_text(yaml.safe_dump(config.to_dict()))
    run_config = {"config-file": str(out.parent / f"{out.name}.yaml"), "out-dir": str(out), **knobs}
    grid = InProcessGrid(run_config, config.num_clients, intercept)
    for client, keys in (node_configs or {}).items():
        grid.contexts[100 + client].run_config.update(keys)
    server_app.app(
        grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config)
    )


def kill_node(federation: LocalFederation, node: int, sig: int = signal.SIGKILL) -> None:
    """Kill the SuperNode of partition ``node`` with everything it started (a crash, with SIGKILL)."""
    process = federation.nodes[node]
    federation.family()  # note the node's current processes: once killed, their orphans come back here
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, sig)
    process.wait()
    deadline = time.monotonic() + 2.0  # reap its processes as they die (they are re-parented here)
    while time.monotonic() < deadline:
        for pid in federation.family():
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
        time.sleep(0.2)


# --- crashes and resumes --------------------------------------------------------------------------------


# Another process running the results directory argv[1].
HOLD_RUN = (
    "import sys, time\n"
    "from pathlib import Path\n"
    "from fedsubspace.results import claim\n"
    "with claim(Path(sys.argv[1])):\n"
    "    print('held', flush=True)\n"
    "    time.sleep(600)\n"
)


@contextmanager
def held_by_another_process(path: Path) -> Iterator[None]:
    """``path`` claimed by another process until the block ends (then SIGKILLed: no lock stays)."""
    holder = subprocess.Popen([sys.executable, "-c", HOLD_RUN, str(path)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None
    try:
        assert holder.stdout.readline() == "held\n"
        yield
    finally:
        holder.kill()
        holder.wait()


def strip(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in TIMING} for row in rows]


def metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return f.metadata()


@contextmanager
def crash_after_round(last: int) -> Iterator[None]:
    """A KeyboardInterrupt right after round ``last``'s checkpoint is written."""
    real = RunDirectory.save_resume_point

    def crash(self, state, memories, progress):
        real(self, state, memories, progress)
        if state.round == last:
            raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(RunDirectory, "save_resume_point", crash)
        yield


def assert_same_run(resumed: Path, uninterrupted: Path) -> None:
    assert strip(read_metrics(resumed)) == strip(read_metrics(uninterrupted))
    assert json.loads((resumed / "summary.json").read_text()) == json.loads(
        (uninterrupted / "summary.json").read_text()
    )
    for name in ("last", "best"):
        a, b = (load_file(str(p / "checkpoints" / f"{name}.safetensors")) for p in (resumed, uninterrupted))
        assert a.keys() == b.keys()
        for key in a:
            assert a[key].equal(b[key]), f"{name}.safetensors: {key} differs"
        # the progress (best, initial, ledger) too; safetensors orders metadata at random, so compare dicts
        a_meta, b_meta = (
            metadata(p / "checkpoints" / f"{name}.safetensors") for p in (resumed, uninterrupted)
        )
        assert a_meta == b_meta


# --- results directories written by hand -------------------------------------------------------------------


def metric_row(round_index: int, accuracy: float, **values: float | None) -> dict:
    row = {
        "round": round_index,
        "eval_accuracy": accuracy,
        "eval_loss": 1.0,
        "basis_overlap": 0.5,
        "update_overlap": 0.5,
        "cancellation_ratio": 0.5,
        "aggregation_error": 0.0,
        "bytes_up": 100,
        "bytes_down": 100,
        "seconds": 1.0,
    }
    return {**row, **values}


def write_run(
    path: Path,
    method: str,
    seed: int,
    rows: list[dict],
    *,
    num_rounds: int = 2,
    summary: dict | None = None,
    error: str | None = None,
    config: dict | None = None,
) -> None:
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(
        yaml.safe_dump({"method": method, "seed": seed, "num_rounds": num_rounds, **(config or {})})
    )
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if summary is not None:  # a run's summary holds its last round's diagnostics
        last = rows[-1] if rows else {}
        final = {key: last.get(key) for key in ("basis_overlap", "update_overlap")}
        (path / "summary.json").write_text(json.dumps({"final_diagnostics": final, **summary}))
    if error is not None:
        (path / "error.txt").write_text(error + "\nTraceback (most recent call last): ...\n")
