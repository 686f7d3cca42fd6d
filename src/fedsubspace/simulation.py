"""The in-process federation, the default runner: every round reads top to bottom.

sample clients -> each receives what it needs and trains from the global state
(:func:`fedsubspace.client.run_round`, shared with the Flower ClientApp) -> the server side
(:class:`fedsubspace.server.RoundServer`, shared with the Flower ServerApp) aggregates and computes the
diagnostics -> evaluate the new global model (or, for personalised methods, every client's own model on
its held-out data) -> one metrics line and a checkpoint. A client whose update holds NaN or Inf is
reported and left out of the round; the run goes on.

Clients keep private tensors between their rounds in ``memories`` (fedsa's B and head, fedgalore's
projector and second moment); the server never reads them. ``bytes_down`` counts, per sampled client,
the method's downlink plus the merged base-weight increments the client missed (a :class:`MergeHistory`).

Resume: every completed round (and round 0, the initial evaluation) is committed as one checkpoint
holding the global state, the clients' memories, the merge history's byte counts and the best and
initial results. Nothing else carries over between rounds: client sampling, data order and dropout are
seeded per (seed, round, client), the model is reloaded from the state before every use, and optimisers
are fresh every round. So a run started again with ``resume`` continues after its last committed round
and writes what an uninterrupted run writes.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from fedsubspace.client import client_context, run_round
from fedsubspace.config import ExperimentConfig
from fedsubspace.configure import build_method
from fedsubspace.errors import UserError
from fedsubspace.evaluate import evaluate_model
from fedsubspace.experiment import local_schedule, prepare, sample_clients
from fedsubspace.predictions import write_predictions
from fedsubspace.privacy.run import RunPrivacy
from fedsubspace.results import PARTITION_STATS, Memories, ResumePoint, RunDirectory, claim
from fedsubspace.server import ClientResults, RoundServer
from fedsubspace.state import GlobalState, MergeHistory, payload_bytes


def commit(
    run_dir: RunDirectory,
    state: GlobalState,
    memories: Memories,
    merges: MergeHistory,
    counters: dict[str, Any],
) -> ResumePoint:
    """Checkpoint a completed round and return it as saved. The run goes on from this copy: the very
    tensors a run resumed from it loads (contiguous copies of what may have been strided views), so an
    interrupted and resumed run computes bit for bit what an uninterrupted one does."""
    run_dir.save_resume_point(state, memories, {**counters, "ledger": merges.state_dict()})
    return run_dir.read_resume_point()


def run(
    config: ExperimentConfig,
    out: Path,
    *,
    overwrite: bool = False,
    resume: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Run ``config`` into the results directory ``out``; with ``resume``, continue the run there from
    its last completed round (a finished one is returned as it is). Returns the summary. A directory
    another process is running is refused (UserError)."""
    if config.secagg:
        raise UserError(
            "secagg is for Flower (fedsubspace flower local): in-process, nothing travels to protect"
        )
    with claim(out):
        return _run(config, out, overwrite=overwrite, resume=resume, progress=progress)


def _run(
    config: ExperimentConfig, out: Path, *, overwrite: bool, resume: bool, progress: bool
) -> dict[str, Any]:
    run_dir = RunDirectory(out, overwrite=overwrite, resume=resume)
    run_dir.write_config(config.to_dict())
    if run_dir.finished:
        return run_dir.read_summary()
    exp = prepare(config)
    privacy = RunPrivacy.of(config, [len(p) for p in exp.partitions])  # refuses what it cannot honour
    run_dir.write_json(PARTITION_STATS, exp.partition_stats)
    method, schedule = build_method(config), local_schedule(config)

    memories: Memories = {client_id: {} for client_id in range(config.num_clients)}
    merges = MergeHistory()
    point = run_dir.resume_point() if resume else None
    if point is None:
        initial = evaluate_model(exp, method, exp.initial_state, memories)
        write_predictions(out, "initial", 0, initial)
        # Round 0 is committed too: a resumed run never evaluates the initial model again.
        point = commit(run_dir, exp.initial_state, memories, merges, RoundServer.start_progress(initial))
    elif progress:
        tqdm.write(f"resuming {out} after round {point.state.round}")
    memories.update(point.memories)
    merges.load_state_dict(point.progress["ledger"])
    server = RoundServer(
        method,
        run_dir,
        point.state,
        config.num_rounds,
        progress=point.progress,
        log=tqdm.write if progress else None,
        privacy=privacy,
    )
    rows = run_dir.read_metrics()
    server.row = rows[-1] if rows else {}
    bar = tqdm(
        range(server.state.round + 1, config.num_rounds + 1),
        total=config.num_rounds,
        initial=server.state.round,
        desc=f"{config.method}",
        unit="round",
        disable=not progress,
    )
    for round_index in bar:
        started = time.perf_counter()
        state = server.state
        selected = sample_clients(config.seed, round_index, config.num_clients, config.client_fraction)
        updates, skipped, bytes_down = [], [], 0
        for client_id in selected:
            ctx = client_context(exp, client_id, round_index, memories[client_id])
            bytes_down += payload_bytes(method.downlink(state, ctx)) + merges.catch_up_bytes(client_id, state)
            result = run_round(exp, method, schedule, state, ctx, dp=None if privacy is None else privacy.dp)
            memories[client_id] = result.memory
            if result.non_finite is not None:
                tqdm.write(
                    f"round {round_index}: client {client_id} sent non-finite values in "
                    f"{result.non_finite}; skipped"
                )
                skipped.append(client_id)
                continue
            updates.append(result.update)

        server.aggregate(
            ClientResults(
                round_index=round_index,
                selected=selected,
                updates=updates,
                bytes_up=sum(payload_bytes(method.uplink(u)) for u in updates),
                bytes_down=bytes_down,
                started=started,
                trained=time.perf_counter(),
                skipped=skipped,
            )
        )
        merges.record(server.state)
        server.record(evaluate_model(exp, method, server.state, memories))
        point = commit(run_dir, server.state, memories, merges, server.progress)
        server.state = point.state
        memories.update(point.memories)

    return server.finish(exp)
