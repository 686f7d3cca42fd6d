"""The Flower strategy: the in-process runner's server side, with clients reached through Flower messages.

One round, as :meth:`flwr.serverapp.strategy.Strategy.start` drives it:

1. ``configure_train``: learn which node holds which client: every node not seen before gets a QUERY
   message and answers with the ``partition-id`` and ``num-partitions`` of its node config (and how far
   its merged base weights are); the newest node wins when two claim one client, so a node that comes
   back replaces its dead predecessor. The round's clients are drawn exactly as in-process
   (``sample_clients(seed, round, ...)``) and each one's node gets a TRAIN message: the method's
   downlink for that client (``arrays``), the merged-weight catch-up (``residual``), and a ``config``
   naming the client, its rank and the round.
2. ``aggregate_train``: the replies that came back within ``round-timeout`` (the SuperLink answers for
   nodes that stopped sending heartbeats) are checked (names, shapes, finiteness: a bad one is rejected
   with its node named), rebuilt into client updates in the order of the selection, and handed to the
   same :class:`~fedsubspace.server.RoundServer` the in-process runner uses, if at least ``min-replies``
   of them are usable.
3. Personalised methods only (fedsa): ``configure_evaluate`` asks every node to evaluate its client's
   own model, which lives in the node's memory, and the results are pooled in client order.
4. ``evaluate``: the new global model is evaluated centrally on the server, as in-process, and the
   round's metrics line and checkpoints are written.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from logging import ERROR, INFO, WARNING

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedsubspace.client import client_context
from fedsubspace.evaluate import evaluate_model, pool
from fedsubspace.experiment import Experiment, sample_clients
from fedsubspace.flower.payload import check_upload, content_bytes, from_record, to_record, update_from_upload
from fedsubspace.flower.settings import FlowerSettings, config_digest
from fedsubspace.methods import ClientContext, Method
from fedsubspace.predictions import write_predictions
from fedsubspace.privacy.run import RunPrivacy
from fedsubspace.results import RunDirectory
from fedsubspace.scoring import EvalResult
from fedsubspace.server import ClientResults, RoundServer
from fedsubspace.state import ClientUpdate, MergeHistory, flatten

QUERY_TIMEOUT = 120.0  # seconds a node has to answer who it is (it starts a ClientApp process to do so)


@dataclass
class Sent:
    """A message on its way to the node holding ``client``."""

    message: Message
    client: int
    node: int


def info(text: str) -> None:
    log(INFO, "%s", text)


class SubspaceStrategy(Strategy):
    """Flower's round structure (:meth:`Strategy.start`) with fedsubspace's method deciding who trains,
    what travels and how it is aggregated: the five steps Flower's abstract Strategy leaves open."""

    def __init__(
        self, settings: FlowerSettings, exp: Experiment, method: Method, run_dir: RunDirectory
    ) -> None:
        self.settings, self.exp, self.method, self.config = settings, exp, method, exp.config
        self.server = RoundServer(
            method,
            run_dir,
            exp.initial_state,
            self.config.num_rounds,
            progress={},
            log=info,
            privacy=RunPrivacy.of(self.config, [len(p) for p in exp.partitions]),
        )
        self.merges = MergeHistory()
        self.nodes: dict[int, int] = {}  # node id -> client, in the order nodes were learnt (newest last)
        self.synced: dict[int, int] = {}  # node id -> the round its merged base weights are current with
        self.ignored: set[int] = set()  # nodes whose node config names no client of this run
        self.sent: list[Sent] = []
        self.started = 0.0
        self.bytes_down = 0
        self.missing: list[int] = []
        self.personal: EvalResult | None = None

    def summary(self) -> None:
        c = self.config
        info(
            f"fedsubspace: {c.method} on {c.model}, {c.num_clients} clients, {c.client_fraction:.0%} "
            f"a round, {c.num_rounds} rounds, seed {c.seed}; results in {self.settings.out}"
        )

    # --- which node holds which client ------------------------------------------------------------

    def holders(self) -> dict[int, int]:
        """client -> node; the node learnt last wins (a restarted node replaces its dead predecessor)."""
        return {client: node for node, client in self.nodes.items()}

    def discover(self, grid: Grid, *, wait: bool) -> None:
        """Learn the clients of nodes not seen before; with ``wait``, until every client has a node or
        ``node-timeout`` has passed."""
        deadline = time.monotonic() + (self.settings.node_timeout if wait else 0.0)
        while True:
            online = set(grid.get_node_ids())
            for node in [n for n in self.nodes if n not in online]:
                info(f"node {node} (client {self.nodes.pop(node)}) left the federation")
            new = sorted(online - set(self.nodes) - self.ignored)
            if new:
                self.query(grid, new)
            missing = set(range(self.config.num_clients)) - set(self.holders())
            if not missing or time.monotonic() >= deadline:
                if wait and missing:
                    log(
                        WARNING,
                        "no node holds client(s) %s after %.0fs",
                        sorted(missing),
                        self.settings.node_timeout,
                    )
                return
            time.sleep(1.0)

    def query(self, grid: Grid, nodes: list[int]) -> None:
        messages = [Message(RecordDict(), node, MessageType.QUERY, ttl=QUERY_TIMEOUT) for node in nodes]
        replies = grid.send_and_receive(messages, timeout=QUERY_TIMEOUT)
        asked = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}
        for reply in replies:  # a node that does not answer in time is asked again before the next round
            node = asked[reply.metadata.reply_to_message_id]
            if reply.has_error():
                log(ERROR, "node %s cannot say which client it holds, ignored: %s", node, reply.error.reason)
                self.ignored.add(node)
                continue
            answer = reply.content["node"]
            client, partitions = int(answer["partition-id"]), int(answer["num-partitions"])  # type: ignore[arg-type]
            if partitions != self.config.num_clients:
                log(
                    ERROR,
                    "node %s holds partition %s of %s, but this run has num_clients=%s: ignored",
                    node,
                    client,
                    partitions,
                    self.config.num_clients,
                )
                self.ignored.add(node)
                continue
            previous = self.holders().get(client)
            replacing = "" if previous is None else f" (replacing node {previous})"
            info(f"node {node} holds client {client}{replacing}")
            self.nodes[node] = client
            self.synced[node] = int(answer["residual-round"])  # type: ignore[arg-type]

    # --- messages ---------------------------------------------------------------------------------

    def content_for(self, ctx: ClientContext, node: int) -> RecordDict:
        """What a client needs to start from the current global state: the method's downlink, the
        merged-weight catch-up (methods that merge), and who it is."""
        state = self.server.state
        since = self.synced.get(node, 0)
        content = RecordDict(
            {
                "arrays": to_record(self.method.downlink(state, ctx)),
                "config": ConfigRecord(
                    {
                        "server-round": ctx.round_index,
                        "partition-id": ctx.client_id,
                        "config-digest": config_digest(self.config),
                        "residual-from": since,
                    }
                ),
            }
        )
        if self.method.merges_into_base:
            content["residual"] = to_record(self.merges.catch_up(since, state))
        return content

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.started = time.perf_counter()
        self.discover(grid, wait=server_round == 1)
        selected = sample_clients(
            self.config.seed, server_round, self.config.num_clients, self.config.client_fraction
        )
        holders = self.holders()
        self.sent, self.missing, self.bytes_down = [], [], 0
        for client in selected:
            node = holders.get(client)
            if node is None:
                log(WARNING, "round %s: no node holds client %s; it misses the round", server_round, client)
                self.missing.append(client)
                continue
            # the server never holds a client's memory: an empty one stands in for it
            content = self.content_for(client_context(self.exp, client, server_round), node)
            message = Message(
                content, node, MessageType.TRAIN, ttl=self.settings.round_timeout, group_id=str(server_round)
            )
            self.sent.append(Sent(message, client, node))
            self.bytes_down += content_bytes(content)
        info(f"round {server_round}: clients {selected} on nodes {[s.node for s in self.sent]}")
        return [s.message for s in self.sent]

    def replies_by_client(
        self, replies: Iterable[Message], kind: str, server_round: int
    ) -> dict[int, Message]:
        """The usable replies to this round's messages by client; the others are logged and their
        clients reported missing (a node that failed is asked who it is again before its next round)."""
        by_id = {s.message.metadata.message_id: s for s in self.sent}
        received: dict[int, Message] = {}
        for message in replies:
            sent = by_id.get(message.metadata.reply_to_message_id)
            if sent is not None:
                received[sent.client] = message
        usable = {}
        for sent in self.sent:
            reply = received.get(sent.client)
            if reply is None:
                why = f"sent no {kind} reply within {self.settings.round_timeout:.0f}s"
            elif reply.has_error():
                why = f"failed: {reply.error.reason}"
                self.nodes.pop(sent.node, None)
            else:
                usable[sent.client] = reply
                continue
            log(WARNING, "round %s: client %s (node %s) %s", server_round, sent.client, sent.node, why)
            self.missing.append(sent.client)
        return usable

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        trained = time.perf_counter()
        usable = self.replies_by_client(replies, "train", server_round)
        updates: list[ClientUpdate] = []
        skipped: list[int] = []
        withheld: list[int] = []
        bytes_up = 0
        nodes = {s.client: s.node for s in self.sent}
        for client, reply in usable.items():  # in the order of the selection, as in-process
            bytes_up += content_bytes(reply.content)
            if self.method.merges_into_base:
                self.synced[nodes[client]] = server_round - 1  # it applied the catch-up
            update, problem = self.read_update(client, reply, server_round)
            if update is None:
                log(
                    WARNING,
                    "round %s: reply of client %s (node %s) rejected: %s",
                    server_round,
                    client,
                    nodes[client],
                    problem,
                )
                skipped.append(client)
            else:
                updates.append(update)
        if len(updates) < self.settings.min_replies:
            if updates:
                log(
                    WARNING,
                    "round %s: %s usable replies, fewer than min-replies=%s",
                    server_round,
                    len(updates),
                    self.settings.min_replies,
                )
            withheld, updates = [u.client_id for u in updates], []
        selected = sample_clients(
            self.config.seed, server_round, self.config.num_clients, self.config.client_fraction
        )
        state = self.server.aggregate(
            ClientResults(
                round_index=server_round,
                selected=selected,
                updates=updates,
                bytes_up=bytes_up,
                bytes_down=self.bytes_down,
                started=self.started,
                trained=trained,
                skipped=skipped,
                withheld=withheld,
                missing=sorted(self.missing),
            )
        )
        self.merges.record(state)
        metrics = MetricRecord({"num-updates": len(updates)})
        return to_record(flatten(state.factors, state.head, state.extras)), metrics

    def read_update(self, client: int, reply: Message, server_round: int) -> tuple[ClientUpdate | None, str]:
        """The update a reply carries, or None and why it cannot be used."""
        try:
            config, metrics = reply.content.config_records["config"], reply.content.metric_records["metrics"]
            upload = from_record(reply.content.array_records["arrays"])
            claimed, num_examples = int(config["partition-id"]), metrics["num-examples"]  # type: ignore[arg-type]
            trained = frozenset(str(f) for f in config["trained"])  # type: ignore[union-attr]
            scaling, train_loss = float(config["scaling"]), float(metrics["train-loss"])  # type: ignore[arg-type]
        except (KeyError, TypeError, ValueError) as exc:
            return None, f"malformed reply ({exc})"
        if claimed != client:
            return None, f"it answers for client {claimed}"
        if not isinstance(num_examples, int) or num_examples < 1:
            return None, f"num-examples is {num_examples!r}"
        ctx = client_context(self.exp, client, server_round)
        start = self.method.client_start(self.server.state, ctx)
        problem = check_upload(self.method, upload, start, trained, ctx.rank)
        if problem is not None:
            return None, problem
        update = update_from_upload(
            upload,
            start,
            client_id=client,
            num_examples=num_examples,
            train_loss=train_loss,
            scaling=scaling,
            trained=trained,
        )
        return update, ""

    # --- evaluation -------------------------------------------------------------------------------

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Personalised methods: every client's own model, on the node holding its memory."""
        self.personal = None
        if not self.method.personalised:
            return []
        self.sent = []
        for client, node in sorted(self.holders().items()):
            content = self.content_for(client_context(self.exp, client, server_round + 1), node)
            message = Message(
                content,
                node,
                MessageType.EVALUATE,
                ttl=self.settings.round_timeout,
                group_id=str(server_round),
            )
            self.sent.append(Sent(message, client, node))
        return [s.message for s in self.sent]

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        if not self.method.personalised:
            return None
        self.missing = []
        usable = self.replies_by_client(replies, "evaluate", server_round)
        results = []
        for client in sorted(usable):
            metrics = usable[client].content["metrics"]
            if self.method.merges_into_base:
                self.synced[next(s.node for s in self.sent if s.client == client)] = server_round
            results.append(
                EvalResult(
                    loss=float(metrics["loss"]),  # type: ignore[arg-type]
                    accuracy=float(metrics["accuracy"]),  # type: ignore[arg-type]
                    num_examples=int(metrics["num-examples"]),  # type: ignore[arg-type]
                )
            )
        if self.missing:
            log(WARNING, "round %s: personalised evaluation without client(s) %s", server_round, self.missing)
        self.personal = pool(results)
        return MetricRecord({"num-examples": self.personal.num_examples})

    def evaluate(self, server_round: int, arrays: ArrayRecord) -> MetricRecord:
        """Round 0: the initial model (memories are all empty then, so the server evaluates even a
        personalised method itself); later rounds: the new model, then the metrics line and checkpoints."""
        if server_round == 0:
            result = evaluate_model(self.exp, self.method, self.server.state, {})
            write_predictions(self.server.run_dir.path, "initial", 0, result)
            self.server.progress = RoundServer.start_progress(result)
        else:
            if self.method.personalised:
                assert self.personal is not None
                result = self.personal
            else:
                result = evaluate_model(self.exp, self.method, self.server.state, {})
            self.server.record(result)
            self.server.run_dir.save_checkpoint("last", self.server.state)
        return MetricRecord({"eval-loss": result.loss, "eval-accuracy": result.accuracy})
