"""Random-weight models of a named architecture's size, built offline: what a round costs at that size.

``random-roberta-large`` has RoBERTa-large's layers, widths and vocabulary (355M parameters) and
``random-smollm-360m`` SmolLM-360M's, with random weights and the project's byte tokenizer (token ids stay
below the byte vocabulary; the embedding table keeps the real model's size). They learn nothing: they are
for timing and memory (``fedsubspace bench round --shape NAME``) where the real weights are not at hand.
The shapes are those of the models' published configs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForMultipleChoice,
    LlamaConfig,
    PretrainedConfig,
    RobertaConfig,
)

from fedsubspace.errors import UserError
from fedsubspace.models import ENCODER_HEAD, LoadedModel, load_model

PREFIX = "random-"


@dataclass(frozen=True)
class Shape:
    kind: str
    target_modules: tuple[str, ...]  # PEFT's default for the architecture
    sizes: dict[str, Any]


# type_vocab_size 2 (RoBERTa has 1): the byte tokenizer marks the ending of a pair as segment 1.
_ROBERTA = {"vocab_size": 50265, "max_position_embeddings": 514, "type_vocab_size": 2}
_SMOLLM = {
    "vocab_size": 49152,
    "max_position_embeddings": 2048,
    "rope_theta": 10000.0,
    "tie_word_embeddings": True,
}

SHAPES: dict[str, Shape] = {
    "roberta-large": Shape(
        "encoder",
        ("query", "value"),
        {
            **_ROBERTA,
            "hidden_size": 1024,
            "num_hidden_layers": 24,
            "num_attention_heads": 16,
            "intermediate_size": 4096,
        },
    ),
    "roberta-base": Shape(
        "encoder",
        ("query", "value"),
        {
            **_ROBERTA,
            "hidden_size": 768,
            "num_hidden_layers": 12,
            "num_attention_heads": 12,
            "intermediate_size": 3072,
        },
    ),
    "smollm-360m": Shape(
        "causal",
        ("q_proj", "v_proj"),
        {
            **_SMOLLM,
            "hidden_size": 960,
            "num_hidden_layers": 32,
            "num_attention_heads": 15,
            "num_key_value_heads": 5,
            "intermediate_size": 2560,
        },
    ),
    "smollm-135m": Shape(
        "causal",
        ("q_proj", "v_proj"),
        {
            **_SMOLLM,
            "hidden_size": 576,
            "num_hidden_layers": 30,
            "num_attention_heads": 9,
            "num_key_value_heads": 3,
            "intermediate_size": 1536,
        },
    ),
}


def shape_name(model: str) -> str | None:
    """The shape a model name asks for (``random-roberta-large`` -> ``roberta-large``), or None."""
    name = model.removeprefix(PREFIX)
    return name if model.startswith(PREFIX) and name in SHAPES else None


def shape_models() -> list[str]:
    return [PREFIX + name for name in SHAPES]


def build_shape(name: str, torch_dtype: torch.dtype, load_in_4bit: bool) -> LoadedModel:
    """The random model of shape ``name`` with the byte tokenizer of the tiny preset of its kind."""
    if load_in_4bit:
        raise UserError(f"{PREFIX}{name} has random weights: load_in_4bit is for real models")
    shape = SHAPES[name]
    tokenizer = load_model(f"tiny-{shape.kind}", shape.kind, device="cpu").tokenizer
    config: PretrainedConfig
    if shape.kind == "encoder":
        config = RobertaConfig(**shape.sizes, pad_token_id=tokenizer.pad_token_id)
        model = AutoModelForMultipleChoice.from_config(config, dtype=torch_dtype)
        head_modules = [ENCODER_HEAD]
    else:
        ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
        config = LlamaConfig(**shape.sizes, pad_token_id=tokenizer.pad_token_id, **ids)
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
        head_modules = []
    return LoadedModel(model, tokenizer, shape.kind, list(shape.target_modules), head_modules)
