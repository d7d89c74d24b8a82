"""Checkpoint import and export: HF safetensors (local or hub) and GGUF in, HF safetensors out."""

from lora_jax.io.load import load_config, load_pretrained, load_tokenizer, resolve
from lora_jax.io.save import save_pretrained
from lora_jax.io.sources import CheckpointError

__all__ = [
  "CheckpointError",
  "load_config",
  "load_pretrained",
  "load_tokenizer",
  "resolve",
  "save_pretrained",
]
