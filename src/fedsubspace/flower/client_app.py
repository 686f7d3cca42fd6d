"""The Flower ClientApp: one node holds one client, trains it exactly as the in-process runner does.

A node's client is its ``partition-id`` (``--node-config "partition-id=K num-partitions=N"``; N must be
the run's ``num_clients``). The node computes that partition itself with the same loader and seeded
partitioner as the in-process runner, so the data never travels. A TRAIN message carries the method's
downlink, from which the client rebuilds its view of the global state (:meth:`Method.client_view`), and
the merged-weight catch-up; the client trains with :func:`fedsubspace.client.run_round` and replies
with the method's uplink (``arrays``), its example count and loss (``metrics``) and what it trained with
(``config``). What the client keeps between its rounds lives in the node's Flower context: its memory
(fedsa's B and head, fedgalore's projector and second moment; not updated by a round whose update is not
finite, as in-process) and its merged base weights with the round they are current with.

Flower 1.41 starts a new ClientApp process for every message, so the experiment (model, tokenizer,
dataset, encodings) cached per process below serves all the messages one process handles (a runtime that
keeps processes, a test calling the app directly) and is otherwise built once per message.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict, UserConfig
from flwr.clientapp import ClientApp

from fedsubspace.errors import UserError
from fedsubspace.flower.secagg import as_fitres, from_fitins, is_fitins, secagg_when_asked
from fedsubspace.flower.settings import FlowerSettings, config_digest

# Every message starts a new ClientApp process: the query that maps nodes to clients must not pay for
# importing torch and transformers, so the training stack is imported by the handlers that use it.
if TYPE_CHECKING:
    from fedsubspace.config import ExperimentConfig
    from fedsubspace.experiment import Experiment
    from fedsubspace.methods import ClientContext, LocalSchedule, Method
    from fedsubspace.privacy.dpsgd import ExampleLevelDP
    from fedsubspace.state import GlobalState

MEMORY = "fedsubspace.memory"  # node state: the client's private tensors
RESIDUAL = "fedsubspace.residual"  # node state: the merged base-weight residual, per module
SYNC = "fedsubspace.sync"  # node state: {"residual-round": the round the residual is current with}


@dataclass
class Session:
    config: ExperimentConfig
    exp: Experiment
    method: Method
    schedule: LocalSchedule
    dp: ExampleLevelDP | None  # DP-SGD's settings, calibrated as the server calibrates them


_sessions: dict[str, Session] = {}


def session(run_config: UserConfig) -> Session:
    """The experiment of a run config, built once per process."""
    from fedsubspace.configure import build_method
    from fedsubspace.experiment import local_schedule, prepare
    from fedsubspace.privacy.run import RunPrivacy

    config = FlowerSettings.from_run_config(run_config).config
    key = json.dumps(config.to_dict(), sort_keys=True)
    if key not in _sessions:
        _sessions.clear()  # one run at a time: a new config releases the old model
        exp = prepare(config)
        privacy = RunPrivacy.of(config, [len(p) for p in exp.partitions])
        _sessions[key] = Session(
            config,
            exp,
            build_method(config),
            local_schedule(config),
            None if privacy is None else privacy.dp,
        )
    return _sessions[key]


def partition(node_config: UserConfig) -> tuple[int, int]:
    """``(partition-id, num-partitions)`` from the node config."""
    try:
        client, count = node_config["partition-id"], node_config["num-partitions"]
    except KeyError as exc:
        raise UserError(
            f"node config has no {exc}; start the SuperNode with "
            '--node-config "partition-id=K num-partitions=N"'
        ) from None
    if not (isinstance(client, int) and isinstance(count, int) and 0 <= client < count):
        raise UserError(f"node config partition-id={client!r} num-partitions={count!r} is not a partition")
    return client, count


def residual_round(context: Context) -> int:
    sync = context.state.config_records.get(SYNC)
    return int(sync["residual-round"]) if sync is not None else 0  # type: ignore[arg-type]


app = ClientApp(mods=[secagg_when_asked])


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Who this node is: its client, and how far its merged base weights are."""
    client, count = partition(context.node_config)
    answer = ConfigRecord(
        {"partition-id": client, "num-partitions": count, "residual-round": residual_round(context)}
    )
    return Message(RecordDict({"node": answer}), reply_to=msg)


def start_round(msg: Message, context: Context, s: Session) -> tuple[ClientContext, GlobalState]:
    """The client's context and its view of the global state, merged base weights brought up to date."""
    from fedsubspace.client import client_context
    from fedsubspace.flower.payload import apply_catch_up, from_record, to_record

    content = from_fitins(msg.content) if is_fitins(msg.content) else msg.content  # SecAgg+ carries FitIns
    config = content["config"]
    client, count = partition(context.node_config)
    if count != s.config.num_clients or client != config["partition-id"]:
        raise UserError(
            f"this node holds partition {client} of {count}; the server asked for client "
            f"{config['partition-id']!r} of {s.config.num_clients}"
        )
    if config["config-digest"] != config_digest(s.config):
        raise UserError(
            "this node's experiment config differs from the server's: check config-file and the paths "
            "it names on this machine"
        )
    memory = from_record(context.state.array_records.get(MEMORY, ArrayRecord()))
    ctx = client_context(s.exp, client, int(config["server-round"]), memory)  # type: ignore[arg-type]
    view = s.method.client_view(from_record(content.array_records["arrays"]), s.exp.initial_state, ctx)
    if "residual" in content:
        since = residual_round(context)
        # a catch-up from an earlier round is fine (the server missed this node's last reply): the
        # rounds the node has already are skipped; one from a later round cannot be applied
        if config["residual-from"] > since:  # type: ignore[operator]
            raise RuntimeError(
                f"merged weights current with round {since}, catch-up from {config['residual-from']!r}"
            )
        held = from_record(context.state.array_records.get(RESIDUAL, ArrayRecord()))
        residual = apply_catch_up(held, from_record(content.array_records["residual"]), since)
        context.state[RESIDUAL] = to_record(residual)
        context.state[SYNC] = ConfigRecord({"residual-round": view.round})
        view.residual = residual
    return ctx, view


@app.train()
def train(msg: Message, context: Context) -> Message:
    from fedsubspace.client import run_round
    from fedsubspace.flower.payload import to_record

    s = session(context.run_config)
    ctx, view = start_round(msg, context, s)
    result = run_round(s.exp, s.method, s.schedule, view, ctx, dp=s.dp)
    context.state[MEMORY] = to_record(result.memory)
    update = result.update
    content = RecordDict(
        {
            "arrays": to_record(s.method.uplink(update)),
            "metrics": MetricRecord({"num-examples": update.num_examples, "train-loss": update.train_loss}),
            "config": ConfigRecord(
                {
                    "partition-id": ctx.client_id,
                    "trained": sorted(update.trained if update.trained is not None else s.method.trains),
                    "scaling": float(update.scaling if update.scaling is not None else ctx.scaling),
                }
            ),
        }
    )
    return Message(as_fitres(content) if is_fitins(msg.content) else content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """A personalised method's evaluation: this client's own model on its held-out examples."""
    from fedsubspace.evaluate import evaluate_personal

    s = session(context.run_config)
    ctx, view = start_round(msg, context, s)
    result = evaluate_personal(s.exp, s.method, view, ctx)
    metrics = MetricRecord(
        {"loss": result.loss, "accuracy": result.accuracy, "num-examples": result.num_examples}
    )
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)
