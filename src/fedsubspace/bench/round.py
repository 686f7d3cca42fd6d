"""``fedsubspace bench round``: what a round of a config costs on this machine, phase by phase.

Runs ``rounds`` rounds of the config's method as the in-process runner does (the seeded client sample,
each client's local round, the server's aggregation and diagnostics) and times each phase, with the
peak memory of each: ``torch.cuda.max_memory_allocated`` on a GPU (reset before each phase), the
process's resident-set high-water mark on a CPU (``VmHWM``, reset before each phase through
``/proc/self/clear_refs`` where Linux allows it; otherwise the process's peak so far, and the table says
so). The new global model is evaluated twice, on the same questions: with the adapters beside the
weights and merged into them (``merged_eval``); in float32 the two results must agree (accuracy exactly,
loss to float rounding), so a faster evaluation that changed the scores would not count; in bfloat16 both
are reported. Nothing is written to
disk. Round 1 includes first-use costs (allocator, kernels); later rounds are the steady state.
"""

from __future__ import annotations

import math
import resource
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from fedsubspace.client import client_context, run_round
from fedsubspace.config import ExperimentConfig
from fedsubspace.configure import build_method
from fedsubspace.diagnostics import round_diagnostics
from fedsubspace.errors import UserError
from fedsubspace.evaluate import evaluate_loaded
from fedsubspace.experiment import Experiment, local_schedule, prepare, sample_clients
from fedsubspace.markdown import markdown_table
from fedsubspace.methods import Method
from fedsubspace.scoring import EvalResult
from fedsubspace.state import ClientUpdate, GlobalState

MiB = 2**20
CLEAR_REFS = Path("/proc/self/clear_refs")
STATUS = Path("/proc/self/status")


class PeakMemory:
    """Peak memory of a phase on ``device``: CUDA's allocator peak, or the CPU process's RSS peak."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.per_phase = self.cuda or self._reset_rss()
        if self.cuda:
            self.what = "cuda max_memory_allocated"
        else:
            self.what = "RSS peak (VmHWM)" if self.per_phase else "process RSS peak so far (ru_maxrss)"

    @staticmethod
    def _reset_rss() -> bool:
        try:
            CLEAR_REFS.write_text("5")  # resets VmHWM to the current RSS
        except OSError:
            return False
        return True

    def reset(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        elif self.per_phase:
            self._reset_rss()

    def read_mib(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() / MiB
        if self.per_phase:
            for line in STATUS.read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def timed(memory: PeakMemory, work: Callable[[], Any]) -> tuple[Any, float, float]:
    """``work()``, its wall-clock seconds (device work included) and its peak memory in MiB."""
    memory.reset()
    started = time.perf_counter()
    result = work()
    if memory.cuda:
        torch.cuda.synchronize()
    return result, time.perf_counter() - started, memory.read_mib()


def bench_round(config: ExperimentConfig, rounds: int = 2, progress: bool = True) -> dict[str, Any]:
    if rounds < 1:
        raise UserError(f"rounds must be at least 1, got {rounds}")
    if config.load_in_4bit:
        raise UserError(
            "bench round also evaluates with merged adapters, which 4-bit weights cannot take: "
            "set load_in_4bit=false"
        )
    exp = prepare(config)
    tm = exp.trainable
    method = build_method(config)
    memory = PeakMemory(tm.device)
    memories: dict[int, dict[str, torch.Tensor]] = {}
    state, rows = exp.initial_state, []
    for round_index in tqdm(range(1, rounds + 1), desc=f"bench round ({config.model})", disable=not progress):
        state, row = time_round(exp, method, state, memories, memory, round_index)
        rows.append(row)
    return {
        "model": config.model,
        "method": config.method,
        "device": str(tm.device),
        "dtype": config.dtype,
        "autocast": config.autocast,
        "parameters_millions": sum(p.numel() for p in tm.model.parameters()) / 1e6,
        "adapted_modules": len(tm.factors),
        "local_steps": config.max_local_steps,
        "eval_questions": len(exp.eval),
        "memory": memory.what,
        "rounds": rows,
    }


def time_round(
    exp: Experiment,
    method: Method,
    state: GlobalState,
    memories: dict[int, dict[str, torch.Tensor]],
    memory: PeakMemory,
    round_index: int,
) -> tuple[GlobalState, dict[str, Any]]:
    """One round as the runner does it, each phase timed; the next state and the round's row."""
    config, tm = exp.config, exp.trainable
    schedule = local_schedule(config)
    selected = sample_clients(config.seed, round_index, config.num_clients, config.client_fraction)

    def train() -> list[ClientUpdate]:
        updates = []
        for client_id in selected:
            ctx = client_context(exp, client_id, round_index, memories.get(client_id))
            result = run_round(exp, method, schedule, state, ctx)
            memories[client_id] = result.memory
            updates.append(result.update)
        return updates

    updates, train_s, train_mib = timed(memory, train)
    total = sum(u.num_examples for u in updates)
    weights = [u.num_examples / total for u in updates]
    new_state, aggregate_s, aggregate_mib = timed(memory, lambda: method.aggregate(state, updates, weights))
    _, diagnostics_s, diagnostics_mib = timed(memory, lambda: round_diagnostics(updates, weights, new_state))
    tm.load(new_state)

    unmerged, unmerged_s, unmerged_mib = timed(memory, lambda: evaluate_loaded(exp, exp.eval, merged=False))
    merged, merged_s, merged_mib = timed(memory, lambda: evaluate_loaded(exp, exp.eval, merged=True))
    if config.dtype == "float32" and config.autocast is None:
        check_same_scores(unmerged, merged)
    return new_state, {
        "round": round_index,
        "clients": len(selected),
        "train_seconds": train_s,
        "aggregate_seconds": aggregate_s,
        "diagnostics_seconds": diagnostics_s,
        "eval_seconds_unmerged": unmerged_s,
        "eval_seconds_merged": merged_s,
        "train_peak_mib": train_mib,
        "aggregate_peak_mib": aggregate_mib,
        "diagnostics_peak_mib": diagnostics_mib,
        "eval_peak_mib_unmerged": unmerged_mib,
        "eval_peak_mib_merged": merged_mib,
        "eval_accuracy_unmerged": unmerged.accuracy,
        "eval_accuracy_merged": merged.accuracy,
        "eval_loss_unmerged": unmerged.loss,
        "eval_loss_merged": merged.loss,
    }


def check_same_scores(unmerged: EvalResult, merged: EvalResult) -> None:
    if merged.accuracy != unmerged.accuracy or not math.isclose(merged.loss, unmerged.loss, rel_tol=1e-4):
        raise RuntimeError(f"merged evaluation disagrees with unmerged: {merged} vs {unmerged}")


def format_report(report: dict[str, Any]) -> str:
    head = (
        f"{report['model']} ({report['parameters_millions']:.1f}M parameters, {report['adapted_modules']} "
        f"adapted modules), {report['method']}, {report['local_steps']} local steps a client, "
        f"{report['eval_questions']} evaluation questions, on {report['device']} in {report['dtype']}"
        f"{' (autocast ' + report['autocast'] + ')' if report['autocast'] else ''}; "
        f"peak memory: {report['memory']}"
    )
    titles = [
        "round",
        "train s",
        "aggregate s",
        "diagnostics s",
        "eval s (unmerged)",
        "eval s (merged)",
        "train MiB",
        "aggregate MiB",
        "diagnostics MiB",
        "eval MiB (unmerged)",
        "eval MiB (merged)",
        "accuracy (unmerged)",
        "accuracy (merged)",
    ]
    keys = [
        "train_seconds",
        "aggregate_seconds",
        "diagnostics_seconds",
        "eval_seconds_unmerged",
        "eval_seconds_merged",
    ]
    mib = ["train_peak_mib", "aggregate_peak_mib", "diagnostics_peak_mib", "eval_peak_mib_unmerged"]
    cells = (
        [
            str(r["round"]),
            *(f"{r[k]:.3f}" for k in keys),
            *(f"{r[k]:.0f}" for k in [*mib, "eval_peak_mib_merged"]),
            f"{r['eval_accuracy_unmerged']:.4f}",
            f"{r['eval_accuracy_merged']:.4f}",
        ]
        for r in report["rounds"]
    )
    return head + "\n\n" + markdown_table(titles, cells)
