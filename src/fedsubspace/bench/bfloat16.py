"""``fedsubspace bench bfloat16``: one training step of a config's model in float32, in bfloat16 autocast
with PyTorch's own kernels, and in bfloat16 autocast emulated with float32 kernels (fedsubspace.autocast).

The three run interleaved on one batch in one process, so machine noise hits them alike; medians over
repeats. Beside the times: each mode's loss, and how many outputs of the first adapted projection (whose
inputs all three modes share) the emulation computes bit for bit as the native kernels do.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from fedsubspace.autocast import emulated_bfloat16_autocast, native_bfloat16
from fedsubspace.config import ExperimentConfig
from fedsubspace.errors import UserError
from fedsubspace.experiment import prepare
from fedsubspace.markdown import markdown_table
from fedsubspace.scoring import choice_scores, collate

NATIVE, EMULATED = "bfloat16 autocast, native kernels", "bfloat16 autocast, emulated"
MODES: dict[str, Callable[[], AbstractContextManager[Any]]] = {
    "float32": nullcontext,
    NATIVE: lambda: torch.autocast("cpu", dtype=torch.bfloat16),
    EMULATED: emulated_bfloat16_autocast,
}


def bench_bfloat16(config: ExperimentConfig, repeats: int = 3, progress: bool = True) -> dict[str, Any]:
    if repeats < 1:
        raise UserError(f"repeats must be at least 1, got {repeats}")
    exp = prepare(config)
    tm = exp.trainable
    batch = collate(exp.train, list(range(config.batch_size)), "cpu")
    first = next(m for name, m in tm.model.named_modules() if name.endswith("base_layer"))
    outputs: dict[str, Tensor] = {}
    hook = first.register_forward_hook(lambda module, args, out: outputs.__setitem__("last", out.detach()))

    def step(mode: str) -> tuple[float, float, Tensor]:
        torch.manual_seed(0)  # the same dropout masks in every mode
        started = time.perf_counter()
        with MODES[mode]():
            scores = choice_scores(tm.model, batch, tm.kind, shared_context=True)
        loss = nn.functional.cross_entropy(scores.float(), batch["labels"])
        loss.backward()
        seconds = time.perf_counter() - started
        tm.model.zero_grad(set_to_none=True)
        return seconds, loss.item(), outputs["last"]

    tm.model.train()
    seconds: dict[str, list[float]] = {mode: [] for mode in MODES}
    losses: dict[str, float] = {}
    first_outputs: dict[str, Tensor] = {}
    for _ in tqdm(range(repeats), desc=f"training steps ({config.model})", disable=not progress):
        for mode in MODES:
            took, losses[mode], first_outputs[mode] = step(mode)
            seconds[mode].append(took)
    hook.remove()
    identical = (first_outputs[NATIVE] == first_outputs[EMULATED]).float().mean().item()
    return {
        "model": config.model,
        "batch_size": config.batch_size,
        "cpu_has_bfloat16_kernels": native_bfloat16(),
        "torch_threads": torch.get_num_threads(),
        "step_seconds": {mode: statistics.median(s) for mode, s in seconds.items()},
        "loss": losses,
        "first_projection_identical": identical,
    }


def format_report(row: dict[str, Any]) -> str:
    base = row["step_seconds"]["float32"]
    table = markdown_table(
        ["mode", "training step (ms)", "x float32", "loss"],
        (
            [mode, f"{1000 * s:.0f}", f"{s / base:.2f}", f"{row['loss'][mode]:.7f}"]
            for mode, s in row["step_seconds"].items()
        ),
    )
    return (
        f"{row['model']}, a batch of {row['batch_size']}, {row['torch_threads']} thread(s); this CPU "
        f"{'has' if row['cpu_has_bfloat16_kernels'] else 'has no'} bfloat16 kernels\n\n{table}\n\n"
        f"first adapted projection: {100 * row['first_projection_identical']:.3f}% of the emulation's "
        "outputs bit-identical to the native kernels'"
    )
