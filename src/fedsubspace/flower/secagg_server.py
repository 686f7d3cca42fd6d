"""A Flower run under SecAgg+: each round's training through Flower's SecAgg+ workflow (see secagg.py).

:func:`serve_secagg` is the round loop :meth:`SubspaceStrategy.start` would run, with the training step
replaced by :class:`flwr.server.workflow.SecAggPlusWorkflow`: round 0's evaluation, then per round the
workflow (whose legacy Strategy is :class:`SecAggRound`), the personalised evaluation where the method
has one, and the central evaluation that writes the metrics line and checkpoints.
"""

from __future__ import annotations

import time
from logging import WARNING

from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict
from flwr.common import FitIns, FitRes, Parameters, log
from flwr.server import ServerConfig
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.serverapp import Grid

from fedsubspace.client import client_context
from fedsubspace.flower.payload import check_upload, update_from_upload
from fedsubspace.flower.secagg import CLIPPING_RANGE, QUANTIZATION_RANGE, as_fitins, pooled_upload
from fedsubspace.flower.strategy import SubspaceStrategy
from fedsubspace.server import ClientResults
from fedsubspace.state import ClientUpdate, payload_bytes


class SecAggRound:
    """The legacy Strategy SecAggPlusWorkflow asks for a round's FitIns and hands the summed uploads."""

    def __init__(self, strategy: SubspaceStrategy, grid: Grid) -> None:
        self.strategy, self.grid = strategy, grid

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        messages = self.strategy.configure_train(server_round, ArrayRecord(), ConfigRecord(), self.grid)
        return [
            (GridClientProxy(m.metadata.dst_node_id, self.grid, m.metadata.run_id), as_fitins(m.content))
            for m in messages
        ]

    def aggregate_fit(
        self, server_round: int, results: list[tuple[ClientProxy, FitRes]], failures: list
    ) -> tuple[None, dict]:
        s = self.strategy
        trained = time.perf_counter()
        by_node = {sent.node: sent.client for sent in s.sent}
        clients = sorted(by_node[int(proxy.node_id)] for proxy, _ in results)
        s.missing += sorted(set(by_node.values()) - set(clients))
        if failures:
            log(WARNING, "round %s: %s client(s) failed under SecAgg+", server_round, len(failures))
        updates: list[ClientUpdate] = []
        if clients:
            ctx = client_context(s.exp, clients[0], server_round)
            start = s.method.client_start(s.server.state, ctx)
            trained_factors = s.method.trains_in(server_round)
            probe = ClientUpdate(-1, 1, start.factors, start.head, 0.0, trained=trained_factors)
            upload = pooled_upload(sorted(s.method.uplink(probe)), results[0][1])
            problem = check_upload(s.method, upload, start, trained_factors, ctx.rank)
            if problem is not None:
                raise RuntimeError(f"round {server_round}: the SecAgg+ sum is unusable: {problem}")
            counts = [int(res.num_examples) for _, res in results]
            losses = [float(res.metrics["train-loss"]) for _, res in results]
            updates.append(
                update_from_upload(
                    upload,
                    start,
                    client_id=-1,
                    num_examples=sum(counts),
                    train_loss=sum(n * loss for n, loss in zip(counts, losses, strict=True)) / sum(counts),
                    scaling=ctx.scaling,
                    trained=trained_factors,
                )
            )
        s.server.aggregate(
            ClientResults(
                round_index=server_round,
                selected=sorted(by_node.values()),
                updates=updates,
                # what the clients uploaded, before SecAgg+'s masking (the masked vectors are larger)
                bytes_up=len(clients) * sum(payload_bytes(s.method.uplink(u)) for u in updates),
                bytes_down=s.bytes_down,
                started=s.started,
                trained=trained,
                missing=sorted(s.missing),
                pooled=clients,
            )
        )
        return None, {}


def serve_secagg(grid: Grid, strategy: SubspaceStrategy) -> None:
    """Every round of ``strategy``'s run with SecAgg+ training (see the module docstring)."""
    strategy.evaluate(0, ArrayRecord())
    workflow = SecAggPlusWorkflow(
        num_shares=1.0,  # every sampled client shares its keys with all the others
        reconstruction_threshold=0.67,  # of them, as many as needed to unmask a dropped client
        max_weight=float(max(len(p) for p in strategy.exp.partitions)),  # every weight n_i / max <= 1
        clipping_range=CLIPPING_RANGE,
        quantization_range=QUANTIZATION_RANGE,
        timeout=strategy.settings.round_timeout,
    )
    for server_round in range(1, strategy.config.num_rounds + 1):
        context = LegacyContext(
            Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={}),
            config=ServerConfig(num_rounds=strategy.config.num_rounds),
            strategy=SecAggRound(strategy, grid),  # type: ignore[arg-type]
        )
        context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord(
            {WorkflowKey.CURRENT_ROUND: server_round}
        )
        context.state.array_records[MAIN_PARAMS_RECORD] = ArrayRecord()
        workflow(grid, context)
        if strategy.server.state.round != server_round:  # the workflow halted before aggregating
            raise RuntimeError(f"round {server_round}: SecAgg+ halted; see the log above")
        strategy.merges.record(strategy.server.state)
        evaluations = list(strategy.configure_evaluate(server_round, ArrayRecord(), ConfigRecord(), grid))
        if evaluations:
            strategy.aggregate_evaluate(server_round, grid.send_and_receive(evaluations))
        strategy.evaluate(server_round, ArrayRecord())
