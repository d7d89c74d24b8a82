"""Model config and tokenizer from a GGUF file's metadata."""

from __future__ import annotations

import os

from lora_jax.config import SUPPORTED, ConfigError, ModelConfig
from lora_jax.io.sources import GGUFSource


def config_from_gguf(src: GGUFSource) -> ModelConfig:
  arch = src.arch
  if arch not in SUPPORTED:
    raise ConfigError(f"unsupported GGUF architecture {arch!r}; supported: {sorted(SUPPORTED)}")
  f = lambda key, default=None: src.field(f"{arch}.{key}", default)
  if "rope_freqs.weight" in src.names():
    raise ConfigError(
      "this GGUF carries rope_freqs.weight (Llama-3.1-style rope scaling), which is "
      "not supported from GGUF; load the Hugging Face checkpoint instead"
    )
  scaling_type = f("rope.scaling.type", "none")
  scaling = None
  if scaling_type == "linear":
    scaling = (("factor", float(f("rope.scaling.factor"))), ("rope_type", "linear"))
  elif scaling_type not in ("none", None):
    raise ConfigError(
      f"unsupported rope scaling type {scaling_type!r} in GGUF; supported: none, linear"
    )
  heads = int(f("attention.head_count"))
  hidden = int(f("embedding_length"))
  tokens = src.field("tokenizer.ggml.tokens")
  vocab = int(f("vocab_size", len(tokens) if tokens is not None else 0))
  if not vocab:
    vocab = src.shape("token_embd.weight")[0]
  return ModelConfig(
    family=arch,
    vocab_size=vocab,
    hidden_size=hidden,
    intermediate_size=int(f("feed_forward_length")),
    num_layers=int(f("block_count")),
    num_heads=heads,
    num_kv_heads=int(f("attention.head_count_kv", heads)),
    head_dim=int(f("attention.key_length", hidden // heads)),
    rope_theta=float(f("rope.freq_base", 10000.0)),
    rope_scaling=scaling,
    rms_norm_eps=float(f("attention.layer_norm_rms_epsilon", 1e-6)),
    tie_word_embeddings="output.weight" not in src.names(),
    qkv_bias=arch == "qwen2",
    qk_norm=arch == "qwen3",
    max_position_embeddings=int(f("context_length", 32768)),
    bos_token_id=src.field("tokenizer.ggml.bos_token_id"),
    eos_token_id=src.field("tokenizer.ggml.eos_token_id"),
    pad_token_id=src.field("tokenizer.ggml.padding_token_id"),
    checkpoint_dtype="float32",  # dequantised
  )


def tokenizer_from_gguf(path: str):
  """A transformers fast tokenizer with the GGUF's vocabulary, merges and chat template."""
  from transformers import AutoTokenizer

  return AutoTokenizer.from_pretrained(
    os.path.dirname(os.path.abspath(path)), gguf_file=os.path.basename(path)
  )
