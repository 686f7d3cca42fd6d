"""``fedsubspace export``: a finished run's model as a PEFT adapter directory or a merged model directory.

The adapter directory is what PEFT itself writes (``save_pretrained`` of the rebuilt PeftModel):
``adapter_config.json`` and ``adapter_model.safetensors``, the encoder's multiple-choice head as
``modules_to_save``, so ``PeftModel.from_pretrained(base_model, DIR)`` loads it. A merged directory is
the base model with the adapter, the head and any merged residual folded in (``merge_and_unload`` then
``save_pretrained``). Beside either: the tokenizer, the run's config (``fedsubspace-config.yaml``, which
``fedsubspace eval`` reads to rebuild the base model) and what was exported (``fedsubspace-export.json``).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedsubspace.errors import UserError
from fedsubspace.models import PRESETS
from fedsubspace.trained import factors_at_rank, open_run, rebuild

RUN_CONFIG = "fedsubspace-config.yaml"
EXPORT_INFO = "fedsubspace-export.json"


def export_run(
    run_path: Path,
    out: Path,
    *,
    which: str = "best",
    merged: bool = False,
    rank: int | None = None,
    overwrite: bool = False,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Write the model of ``run_path``'s ``which`` round into ``out``; returns what was exported."""
    run = open_run(run_path)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} is a file; --out names the directory to write")
    if out.exists() and any(out.iterdir()) and not (overwrite and (out / EXPORT_INFO).is_file()):
        raise UserError(
            f"{out} is not empty; choose another --out"
            + ("" if overwrite else " or pass --overwrite to replace an earlier export there")
        )
    state = run.checkpoint(which)
    factors = factors_at_rank(run.config, state, rank)
    if state.residual and not merged:
        raise UserError(
            f"{run.config.method} merged updates into the base weights, which a LoRA adapter cannot carry; "
            "export it with --merged"
        )
    preset = PRESETS.get(run.config.model)
    if merged and preset is not None and preset.gguf_file is not None:
        log(
            f"{run.config.model} comes as a GGUF file, which transformers cannot write; "
            f"the merged model is written as {run.config.dtype} safetensors"
        )
    log(f"loading {run.config.model} with round {state.round} of {run_path} ({which} checkpoint)")
    trained = rebuild(run.config, state, factors, device="cpu")
    info = {
        "run": str(run_path),
        "method": run.config.method,
        "round": state.round,
        "checkpoint": which,
        "rank": next(iter(factors.values()))[0].shape[-1],
        "merged": merged,
        "format": "merged model" if merged else "peft adapter",
    }
    # Written next to ``out`` and renamed into place: an interrupted export leaves no half directory.
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}-") as tmp:
        staging = Path(tmp) / "export"
        if merged:
            trained.peft_model.merge_and_unload().save_pretrained(staging)
        else:
            trained.peft_model.save_pretrained(str(staging))
        trained.loaded.tokenizer.save_pretrained(staging)
        shutil.copyfile(run_path / "config.yaml", staging / RUN_CONFIG)
        (staging / EXPORT_INFO).write_text(json.dumps(info, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    return info


def export_line(info: dict[str, Any], out: Path) -> str:
    return (
        f"exported {info['method']} round {info['round']} ({info['checkpoint']}) at rank {info['rank']} "
        f"as a {info['format']} in {out}"
    )
