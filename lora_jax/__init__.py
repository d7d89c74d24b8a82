"""lora_jax: safety-align reasoning LLMs with LoRA in JAX and measure the reasoning cost."""

from lora_jax.config import ConfigError, ModelConfig
from lora_jax.io import (
  CheckpointError,
  load_config,
  load_pretrained,
  load_tokenizer,
  save_pretrained,
)
from lora_jax.model import Decoder
from lora_jax.sampling import SamplingError, chat, generate, generate_text
from lora_jax.sharding import MeshError, make_mesh

__all__ = [
  "CheckpointError",
  "ConfigError",
  "Decoder",
  "MeshError",
  "ModelConfig",
  "SamplingError",
  "chat",
  "generate",
  "generate_text",
  "load_config",
  "load_pretrained",
  "load_tokenizer",
  "make_mesh",
  "save_pretrained",
]
