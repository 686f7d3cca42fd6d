"""``fedsubspace matrix``: every (config, method, seed), one results directory each.

Runs execute in worker processes (``jobs`` at once; one by default), each a ``run(..., resume=True)``:
a finished run is skipped, an interrupted one continues after its last completed round. A run that
raises is recorded in its ``error.txt`` and the matrix goes on; a worker process that dies (killed, out
of memory) fails the runs it was executing, which a second invocation resumes. Workers end with the
matrix however it ends, and a run holds its directory (:func:`fedsubspace.results.claim`), so no two
processes ever write one run. Every config is built and validated, and every existing results directory
checked against it, before any run starts.

The centralized reference (``references``): per config and seed, one client holding all the training
data, run as fedavg (with one client every method is plain local training) for the same number of
rounds, each round training ``max_local_steps * k`` forward/backward passes, k the clients a federated
round samples. So it makes exactly the federation's R x k x max_local_steps passes of ``batch_size``
examples (the same examples seen, the same evaluations); its optimiser steps (one every
``gradient_accumulation_steps`` passes) are the same in number whenever the accumulation divides
``max_local_steps``, and otherwise at most k - 1 fewer a round (a federated client's last, shorter
window is not repeated k times). Mixed client ranks become the global (largest) rank.
"""

from __future__ import annotations

import os
import threading
import time
import traceback
from collections import deque
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from fedsubspace.config import ExperimentConfig, client_ranks
from fedsubspace.configure import build_config, load_config
from fedsubspace.errors import UserError
from fedsubspace.experiment import clients_per_round
from fedsubspace.experiments.layout import CENTRALIZED, run_path
from fedsubspace.results import (
    ERROR,
    RunBusy,
    Status,
    check_same_config,
    clear_error,
    read_metrics,
    record_error,
    status,
)
from fedsubspace.simulation import run

POLL_SECONDS = 1.0  # how often the progress bar looks at the running runs' rounds


@dataclass(frozen=True)
class Job:
    setup: str
    label: str  # the method, or CENTRALIZED
    config: ExperimentConfig
    path: Path

    @property
    def name(self) -> str:
        return f"{self.setup}/{self.label}/seed{self.config.seed}"


@dataclass
class MatrixResult:
    ran: list[Job] = field(default_factory=list)
    skipped: list[Job] = field(default_factory=list)  # finished by an earlier invocation
    failed: list[Job] = field(default_factory=list)


def centralized_config(config: ExperimentConfig) -> ExperimentConfig:
    """The centralized reference of ``config`` (see the module docstring)."""
    cohort = clients_per_round(config.num_clients, config.client_fraction)
    return build_config(
        {
            **config.to_dict(),
            "method": "fedavg",
            "num_clients": 1,
            "client_fraction": 1.0,
            "partition": "iid",
            "client_ranks": None,
            "lora_rank": max(client_ranks(config)),
            "max_local_steps": config.max_local_steps * cohort,
            "tags": [*config.tags, CENTRALIZED],
        }
    )


def plan(
    configs: list[Path],
    methods: list[str],
    seeds: list[int],
    out: Path,
    overrides: list[str],
    *,
    references: bool = True,
) -> list[Job]:
    """Every job of the matrix, configs validated and existing directories checked (UserError if not)."""
    if not configs or not methods or not seeds:
        raise UserError("a matrix needs at least one --config, one method and one seed")
    stems = [path.stem for path in configs]
    duplicate = next((stem for stem in stems if stems.count(stem) > 1), None)
    if duplicate is not None:
        raise UserError(f"two configs are named {duplicate!r}: their runs would share {out / duplicate}")
    jobs = []
    for path in configs:
        for seed in seeds:
            for method in methods:
                config = load_config(path, overrides, method=method, seed=seed)
                jobs.append(Job(path.stem, method, config, run_path(out, path.stem, method, seed)))
            if references:  # built for a requested method: the file's own may refuse its settings
                config = centralized_config(load_config(path, overrides, method=methods[0], seed=seed))
                jobs.append(Job(path.stem, CENTRALIZED, config, run_path(out, path.stem, CENTRALIZED, seed)))
    for job in jobs:
        check_same_config(job.path, job.config.to_dict())
    return jobs


class RunFailed(Exception):
    """A run raised; its message is the first line of the run's ``error.txt`` (none for RunBusy)."""


def execute(config: dict[str, Any], path: str) -> str:
    """One run in a worker process; returns a one-line result. A failure is written to ``error.txt``."""
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    try:
        summary = run(build_config(config), out, resume=True, progress=False)
    except Exception as exc:
        first = f"{type(exc).__name__}: {exc}".splitlines()[0]
        if not isinstance(exc, RunBusy):  # a run another process holds is that process's to record
            detail = "" if isinstance(exc, UserError) else "\n" + traceback.format_exc()
            record_error(out, first + "\n" + detail)
        raise RunFailed(first) from None
    return (
        f"best {summary['best_eval_accuracy']:.4f} (round {summary['best_round']}), "
        f"final {summary['final_eval_accuracy']:.4f} ({time.monotonic() - started:.0f}s)"
    )


def _start_worker(threads: int | None) -> None:
    if threads is not None:
        torch.set_num_threads(threads)
    # A matrix stopped by SIGTERM or SIGKILL cannot stop its workers; orphaned, they would go on
    # writing runs that the next invocation resumes. So each worker ends itself with its parent.
    parent = os.getppid()
    threading.Thread(target=_exit_with, args=(parent,), daemon=True).start()


def _exit_with(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(POLL_SECONDS)
    os._exit(1)  # the run's last completed round is committed; the round under way is lost


def _pool(jobs: int) -> ProcessPoolExecutor:
    # Concurrent runs share the cores instead of each taking all of them (unless the user chose).
    threads = None if "OMP_NUM_THREADS" in os.environ else max(1, (os.cpu_count() or 1) // jobs)
    # spawn: a fresh interpreter per worker; forking a process that holds torch's thread pools is unsafe
    return ProcessPoolExecutor(
        jobs, mp_context=get_context("spawn"), initializer=_start_worker, initargs=(threads,)
    )


def _rounds_done(job: Job) -> int:
    return len(read_metrics(job.path))


def run_matrix(jobs: list[Job], *, workers: int = 1, progress: bool = True) -> MatrixResult:
    """Run every job not finished yet, ``workers`` at once; the bar counts runs (ETA per finished run)
    and shows the rounds of the ones under way."""
    if workers < 1:
        raise UserError("--jobs must be at least 1")
    result = MatrixResult()
    todo: deque[Job] = deque()
    for job in jobs:
        (result.skipped if status(job.path) is Status.FINISHED else todo).append(job)
    bar = tqdm(total=len(jobs), initial=len(result.skipped), unit="run", desc="matrix", disable=not progress)
    pool = _pool(workers)
    running: dict[Future[str], Job] = {}

    def settle(future: Future[str]) -> None:
        job = running.pop(future)
        try:
            line = f"{job.name}: {future.result()}"
            result.ran.append(job)
        except RunFailed as exc:
            see = f" (see {job.path / ERROR})" if (job.path / ERROR).exists() else ""
            line = f"{job.name}: FAILED: {exc}{see}"
            result.failed.append(job)
        except BrokenProcessPool:
            message = "its worker process died (killed, or out of memory); run the matrix again to resume it"
            record_error(job.path, message + "\n")
            line = f"{job.name}: FAILED: {message}"
            result.failed.append(job)
        bar.update(1)
        tqdm.write(line)

    try:
        while todo or running:
            while todo and len(running) < workers:
                job = todo.popleft()
                clear_error(job.path)  # this attempt's outcome replaces the last one's
                future = pool.submit(execute, job.config.to_dict(), str(job.path))
                running[future] = job
            done, _ = wait(running, timeout=POLL_SECONDS, return_when=FIRST_COMPLETED)
            for future in done:
                settle(future)
            if any(isinstance(f.exception(), BrokenProcessPool) for f in done):
                for future in wait(running).done:  # every run of a broken pool has failed with it
                    settle(future)
                pool.shutdown(wait=False)
                pool = _pool(workers)
            under_way = [f"{j.name} round {_rounds_done(j)}/{j.config.num_rounds}" for j in running.values()]
            bar.set_postfix_str(", ".join(under_way))
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
        bar.close()
    return result
