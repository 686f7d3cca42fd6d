"""Random-weight models built in memory, with a byte-level tokenizer: the tiny presets (for tests) and the
named shapes of :mod:`fedsubspace.shapes` (a real architecture's size, for timing and memory).

Any text encodes with the byte tokenizer (every UTF-8 byte is a token), so they need no files.
"""

from __future__ import annotations

from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import (
    AutoModelForCausalLM,
    AutoModelForMultipleChoice,
    BertConfig,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedTokenizerFast,
    RobertaConfig,
)

from fedsubspace.errors import UserError
from fedsubspace.models.presets import ENCODER_HEAD, EncoderHead, LoadedModel, ModelPreset
from fedsubspace.shapes import PREFIX, SHAPES

# Larger than the usual 0.02 so random tiny models give scores that differ between choices,
# which makes equality tests between scoring paths meaningful.
TINY_INIT_RANGE = 0.2
# The tiny presets' sizes, shared by the 2-layer BERT and Llama (hidden 32).
_TINY_SIZES: dict[str, Any] = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "max_position_embeddings": 512,
    "initializer_range": TINY_INIT_RANGE,
}


def _byte_tokenizer(specials: list[str], post_processor: processors.PostProcessor) -> Tokenizer:
    """Byte-level tokenizer with no merges: every UTF-8 byte is a token, so any text encodes."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {tok: i for i, tok in enumerate(specials + alphabet)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = post_processor
    return backend  # wrapped by the caller, which knows the special-token roles


def byte_tokenizer(kind: str) -> PreTrainedTokenizerFast:
    """The byte tokenizer of a kind: BERT's special tokens and pairs for encoders, Llama's for causal LMs."""
    if kind == "encoder":
        post = processors.TemplateProcessing(
            single="[CLS] $A [SEP]",
            pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", 1), ("[SEP]", 2)],
        )
        return PreTrainedTokenizerFast(
            tokenizer_object=_byte_tokenizer(["[PAD]", "[CLS]", "[SEP]"], post),
            pad_token="[PAD]",
            cls_token="[CLS]",
            sep_token="[SEP]",
            model_input_names=["input_ids", "token_type_ids", "attention_mask"],
        )
    post = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=_byte_tokenizer(["<pad>", "<s>", "</s>"], post),
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
    )


def build_tiny(preset: ModelPreset, torch_dtype: torch.dtype, encoder_head: EncoderHead) -> LoadedModel:
    """The tiny preset's random 2-layer model (BERT or Llama, hidden 32), from the global RNG."""
    tokenizer = byte_tokenizer(preset.kind)
    config: PretrainedConfig
    if preset.kind == "encoder":
        config = BertConfig(
            **_TINY_SIZES,
            vocab_size=len(tokenizer),
            num_attention_heads=2,
            pad_token_id=tokenizer.pad_token_id,
            **encoder_head.kwargs(),
        )
        model = encoder_head.auto_class.from_config(config, dtype=torch_dtype)
        head_modules = [ENCODER_HEAD]
    else:
        config = LlamaConfig(
            **_TINY_SIZES,
            vocab_size=len(tokenizer),
            num_attention_heads=4,
            num_key_value_heads=2,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
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


def build_shape(name: str, torch_dtype: torch.dtype, load_in_4bit: bool) -> LoadedModel:
    """The random model of shape ``name``, from the global RNG, with the byte tokenizer of its kind
    (token ids stay below the byte vocabulary; the embedding table keeps the real model's size)."""
    if load_in_4bit:
        raise UserError(f"{PREFIX}{name} has random weights: load_in_4bit is for real models")
    shape = SHAPES[name]
    tokenizer = byte_tokenizer(shape.kind)
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
