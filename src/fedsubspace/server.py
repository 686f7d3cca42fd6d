"""The server side of a round, shared by the in-process runner and the Flower ServerApp.

A runner gathers a round's client updates its own way (training them in-process, or collecting Flower
replies) and hands them over as :class:`ClientResults`. :meth:`RoundServer.aggregate` folds them into
the next global state with the method (a round without usable updates leaves the model unchanged) and
computes the diagnostics; the runner evaluates the new model (the in-process runner itself, Flower
centrally or, for personalised methods, on the nodes that hold the clients' memories), and
:meth:`RoundServer.record` writes the round's metrics line and the best checkpoint. So both runners
write the same results directory, line for line.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedsubspace.autocast import emulates_bfloat16
from fedsubspace.diagnostics import DELTA_KEYS, round_delta_diagnostics, round_diagnostics
from fedsubspace.errors import UserError
from fedsubspace.experiment import Experiment
from fedsubspace.methods import Method
from fedsubspace.predictions import copy_predictions, write_predictions
from fedsubspace.privacy.run import RunPrivacy
from fedsubspace.results import SUMMARY, RunDirectory
from fedsubspace.scoring import EvalResult
from fedsubspace.state import ClientUpdate, Factors, GlobalState

DIAGNOSTIC_KEYS = (
    "basis_overlap",
    "update_overlap",
    "cancellation_ratio",
    "client_global_cosine",
    "pairwise_client_cosine",
    "update_norm",
    "aggregated_update_norm",
    "aggregation_error",
    "principal_angles",
    "client_average_norm",
    *DELTA_KEYS,
)


def round_line(row: dict[str, Any], num_rounds: int) -> str:
    def fmt(key: str) -> str:
        value = row.get(key)
        return "n/a" if value is None or value != value else f"{value:.4f}"

    return (
        f"round {row['round']:>3}/{num_rounds}  acc {fmt('eval_accuracy')}  loss {fmt('eval_loss')}  "
        f"train {fmt('train_loss')}  overlap {fmt('basis_overlap')}  update_overlap {fmt('update_overlap')}  "
        f"delta_overlap {fmt('delta_overlap')}  "
        f"{row['seconds']:.1f}s"
    )


def done_line(summary: dict[str, Any], out: Path) -> str:
    return (
        f"done: {summary['method']} on {summary['model']}, seed {summary['seed']}: accuracy "
        f"{summary['initial_eval_accuracy']:.4f} before training, best {summary['best_eval_accuracy']:.4f} "
        f"(round {summary['best_round']}), final {summary['final_eval_accuracy']:.4f}; results in {out}"
    )


def round_start(method: Method, state: GlobalState, update: ClientUpdate) -> Factors:
    """The adapter the client of ``update`` started its round from: the global state read out at its rank
    and scaling (every method but a personalised one starts a client there)."""
    rank = next(iter(update.factors.values()))[0].shape[-1]
    return method.readout(state, rank, update.scaling if update.scaling is not None else state.scaling)


class NothingTrained(UserError):
    """A round whose every client was refused, or a run in which no round trained: the numbers it would
    write are the initial model's, so it stops instead of finishing "done"."""


@dataclass
class ClientResults:
    """The clients' side of one round, as a runner collected it.

    ``skipped``: clients whose update the server refused (NaN or Inf, wrong shapes); ``withheld``: clients
    whose usable update was left out (Flower: fewer than min-replies), recorded as skipped after them;
    ``missing``: clients that were selected but sent nothing (Flower: no node holds them, the node died
    or timed out).
    ``started`` and ``trained`` are ``time.perf_counter()`` stamps: the round's start, the last update.
    ``pooled``: under SecAgg+, the clients whose weighted average ``updates`` holds as its one update (the
    server never sees theirs, so no per-client diagnostics); None otherwise.
    """

    round_index: int
    selected: list[int]
    updates: list[ClientUpdate]
    bytes_up: int
    bytes_down: int
    started: float
    trained: float
    skipped: list[int] = field(default_factory=list)
    withheld: list[int] = field(default_factory=list)
    missing: list[int] = field(default_factory=list)
    pooled: list[int] | None = None


@dataclass
class _Aggregated:
    clients: ClientResults
    diagnostics: dict[str, float]
    aggregated: float
    diagnosed: float


class RoundServer:
    """The global state and the results directory of one run, advanced one round at a time.

    ``progress`` is what a resumed run needs to carry on (initial, best accuracy and round), JSON-ready.
    ``log`` receives the round lines and notices (None: silent). ``privacy``: the run's client-level DP
    (applied to the updates before the method aggregates them) and its accountants (their state travels
    in ``progress``, so a resumed run goes on counting), or None.
    """

    def __init__(
        self,
        method: Method,
        run_dir: RunDirectory,
        state: GlobalState,
        num_rounds: int,
        *,
        progress: dict[str, Any],
        log: Callable[[str], None] | None = None,
        privacy: RunPrivacy | None = None,
    ) -> None:
        self.method, self.run_dir, self.state, self.num_rounds = method, run_dir, state, num_rounds
        self.progress = progress
        self.privacy = privacy
        if privacy is not None and "privacy" in progress:
            privacy.accounts.load_state_dict(progress["privacy"])
        self.log = log or (lambda _: None)
        self.row: dict[str, Any] = {}
        self._pending: _Aggregated | None = None

    @staticmethod
    def start_progress(initial: EvalResult) -> dict[str, Any]:
        """The progress of a run that has only evaluated its initial model."""
        return {"initial": initial.totals(), "best_accuracy": initial.accuracy, "best_round": 0}

    @property
    def initial(self) -> EvalResult:
        return EvalResult(**self.progress["initial"])

    def aggregate(self, clients: ClientResults) -> GlobalState:
        """The next global state from the round's usable updates, weighted by their example counts."""
        updates = clients.updates
        if clients.selected and len(clients.skipped) == len(clients.selected):
            raise NothingTrained(
                f"round {clients.round_index}: every client's update was refused (clients {clients.skipped}; "
                "NaN or Inf means training diverged): lower learning_rate or use dtype float32"
            )
        diagnostics: dict[str, float] = {}
        if updates:
            total = sum(u.num_examples for u in updates)
            weights = [u.num_examples / total for u in updates]
            previous = self.state
            released = (updates, weights)
            if self.privacy is not None:
                released = self.privacy.to_aggregate(
                    self.method, previous, updates, weights, clients.round_index
                )
            self.state = self.method.aggregate(previous, *released)
            aggregated = time.perf_counter()
            if clients.pooled is None:  # under SecAgg+ the server holds no single client's update
                diagnostics = round_diagnostics(updates, weights, self.state)
                if not self.method.personalised:  # a personalised client starts from its private B
                    starts = [round_start(self.method, previous, u) for u in updates]
                    diagnostics.update(
                        round_delta_diagnostics(updates, starts, weights, previous, self.state)
                    )
        else:
            self.log(f"round {clients.round_index}: no usable client update; the global model is unchanged")
            self.state = self.state.next()
            aggregated = time.perf_counter()
        if self.privacy is not None:  # a client whose update was refused has trained all the same
            pooled = clients.pooled if clients.pooled is not None else [u.client_id for u in updates]
            self.privacy.record(pooled + clients.skipped)
            self.progress["privacy"] = self.privacy.accounts.state_dict()
        self._pending = _Aggregated(clients, diagnostics, aggregated, time.perf_counter())
        return self.state

    def record(self, result: EvalResult) -> dict[str, Any]:
        """Write the aggregated round's metrics line (``result``: the new model's evaluation, just done)
        and, when it is the best so far, the best checkpoint. Returns the line."""
        assert self._pending is not None, "record() follows aggregate()"
        pending, self._pending = self._pending, None
        finished = time.perf_counter()
        clients, updates = pending.clients, pending.clients.updates
        total = sum(u.num_examples for u in updates)
        self.row = {
            "round": clients.round_index,
            "selected_clients": clients.selected,
            "skipped_clients": clients.skipped + clients.withheld,
            "missing_clients": clients.missing,
            "train_loss": (sum(u.train_loss * u.num_examples for u in updates) / total) if updates else None,
            "eval_loss": result.loss,
            "eval_accuracy": result.accuracy,
            **{key: pending.diagnostics.get(key) for key in DIAGNOSTIC_KEYS},
            "bytes_up": clients.bytes_up,
            "bytes_down": clients.bytes_down,
            "seconds": finished - clients.started,
            "train_seconds": clients.trained - clients.started,
            "aggregate_seconds": pending.aggregated - clients.trained,
            "diagnostics_seconds": pending.diagnosed - pending.aggregated,
            "eval_seconds": finished - pending.diagnosed,
            **(self.privacy.metrics() if self.privacy is not None else {}),
        }
        self.run_dir.append_metrics(self.row)
        write_predictions(self.run_dir.path, "final", clients.round_index, result)
        if result.accuracy > self.progress["best_accuracy"]:
            self.progress.update(best_accuracy=result.accuracy, best_round=clients.round_index)
            self.run_dir.save_checkpoint("best", self.state)
            write_predictions(self.run_dir.path, "best", clients.round_index, result)
        self.log(round_line(self.row, self.num_rounds))
        return self.row

    def finish(self, exp: Experiment) -> dict[str, Any]:
        """Write summary.json (and the initial model as the best one if no round beat it); a run in
        which no round trained a client is refused (:class:`NothingTrained`)."""
        config, initial = exp.config, self.initial
        if not any(row.get("train_loss") is not None for row in self.run_dir.read_metrics()):
            raise NothingTrained(
                f"no round of the run in {self.run_dir.path} trained a client (every round's clients were "
                "missing or refused); its model is the initial one: see the round lines above"
            )
        summary = {
            "method": config.method,
            "model": config.model,
            "seed": config.seed,
            "num_rounds": config.num_rounds,
            "initial_eval_accuracy": initial.accuracy,
            "initial_eval_loss": initial.loss,
            "best_eval_accuracy": self.progress["best_accuracy"],
            "best_round": self.progress["best_round"],
            "final_eval_accuracy": self.row.get("eval_accuracy"),
            "final_eval_loss": self.row.get("eval_loss"),
            "final_diagnostics": {key: self.row.get(key) for key in DIAGNOSTIC_KEYS},
            "eval_examples": initial.num_examples,
            "evaluation": "personalised" if self.method.personalised else "global",
            "client_ranks": exp.client_ranks,
            **(self.privacy.summary() if self.privacy is not None else {}),
        }
        if emulates_bfloat16(exp.trainable.device, config.autocast):  # this process's arithmetic
            summary["bfloat16_autocast"] = "emulated: float32 kernels on bfloat16-rounded operands"
        if self.progress["best_round"] == 0:
            self.run_dir.save_checkpoint("best", exp.initial_state)
            copy_predictions(self.run_dir.path, "initial", "best")
        self.run_dir.write_json(SUMMARY, summary)
        return summary
