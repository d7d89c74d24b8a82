"""Model configuration: one frozen dataclass for the Qwen2 / Qwen3 / Llama families.

`ModelConfig.from_hf` reads a Hugging Face config.json (transformers 4.x or 5.x form) and refuses
anything that would change the math in a way this model does not implement: a silently ignored
field means wrong logits, which is worse than an error.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

# HF model_type (our `family`) -> the architecture class name written back on export.
SUPPORTED = {
  "qwen2": "Qwen2ForCausalLM",
  "qwen3": "Qwen3ForCausalLM",
  "llama": "LlamaForCausalLM",
}
_ROPE_TYPES = ("default", "linear", "llama3")


class ConfigError(ValueError):
  """A config.json this library cannot run faithfully."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  family: str  # "qwen2" | "qwen3" | "llama"
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rope_theta: float = 10000.0
  # Hashable form of the rope scaling dict, e.g. (("factor", 8.0), ("rope_type", "llama3"), ...).
  rope_scaling: tuple[tuple[str, Any], ...] | None = None
  rms_norm_eps: float = 1e-6
  tie_word_embeddings: bool = False
  qkv_bias: bool = False  # Qwen2 family
  qk_norm: bool = False  # Qwen3 family
  max_position_embeddings: int = 32768
  bos_token_id: int | None = None
  eos_token_id: int | tuple[int, ...] | None = None
  pad_token_id: int | None = None
  checkpoint_dtype: str = "float32"  # dtype the checkpoint was stored in (written back on export)

  def __post_init__(self):
    if self.family not in SUPPORTED:
      raise ConfigError(f"unsupported model family {self.family!r}; supported: {sorted(SUPPORTED)}")
    if self.num_heads % self.num_kv_heads:
      raise ConfigError(
        f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}"
      )
    if self.head_dim % 2:
      raise ConfigError(f"head_dim={self.head_dim} must be even for rotary embeddings")

  # ---- derived sizes -------------------------------------------------------------------------
  @property
  def q_dim(self) -> int:
    return self.num_heads * self.head_dim

  @property
  def kv_dim(self) -> int:
    return self.num_kv_heads * self.head_dim

  @property
  def eos_token_ids(self) -> tuple[int, ...]:
    if self.eos_token_id is None:
      return ()
    if isinstance(self.eos_token_id, int):
      return (self.eos_token_id,)
    return tuple(self.eos_token_id)

  def num_params(self) -> int:
    d, f, l = self.hidden_size, self.intermediate_size, self.num_layers
    attn = d * (self.q_dim + 2 * self.kv_dim) + self.q_dim * d
    if self.qkv_bias:
      attn += self.q_dim + 2 * self.kv_dim
    if self.qk_norm:
      attn += 2 * self.head_dim
    per_layer = attn + 3 * d * f + 2 * d
    head = 0 if self.tie_word_embeddings else d * self.vocab_size
    return self.vocab_size * d + l * per_layer + d + head

  def replace(self, **kw) -> ModelConfig:
    return dataclasses.replace(self, **kw)

  # ---- Hugging Face config.json --------------------------------------------------------------
  @classmethod
  def from_hf(cls, hf: dict[str, Any]) -> ModelConfig:
    model_type = hf.get("model_type")
    archs = hf.get("architectures") or []
    if model_type not in SUPPORTED:
      raise ConfigError(
        f"unsupported architecture model_type={model_type!r} {archs}; supported: "
        + ", ".join(f"{t} ({a})" for t, a in SUPPORTED.items())
      )
    if archs and archs[0] != SUPPORTED[model_type]:
      raise ConfigError(
        f"unsupported architecture {archs[0]!r} for model_type={model_type!r}; "
        f"expected {SUPPORTED[model_type]}"
      )
    _refuse_math_changes(hf, model_type)
    heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
    theta, scaling = _rope(hf)
    return cls(
      family=model_type,
      vocab_size=hf["vocab_size"],
      hidden_size=hf["hidden_size"],
      intermediate_size=hf["intermediate_size"],
      num_layers=hf["num_hidden_layers"],
      num_heads=heads,
      num_kv_heads=hf.get("num_key_value_heads") or heads,
      head_dim=head_dim,
      rope_theta=float(theta),
      rope_scaling=scaling,
      rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
      tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
      qkv_bias=model_type == "qwen2",
      qk_norm=model_type == "qwen3",
      max_position_embeddings=int(hf.get("max_position_embeddings", 32768)),
      bos_token_id=hf.get("bos_token_id"),
      eos_token_id=tuple(hf["eos_token_id"])
      if isinstance(hf.get("eos_token_id"), list)
      else hf.get("eos_token_id"),
      pad_token_id=hf.get("pad_token_id"),
      checkpoint_dtype=str(hf.get("dtype") or hf.get("torch_dtype") or "float32"),
    )

  @classmethod
  def from_file(cls, path: str) -> ModelConfig:
    if not os.path.exists(path):
      raise FileNotFoundError(f"no config.json at {path}")
    with open(path) as f:
      return cls.from_hf(json.load(f))

  def to_hf(self, dtype: str | None = None) -> dict[str, Any]:
    """A config.json that transformers 4.x and 5.x both load (both rope key styles are written)."""
    dtype = dtype or self.checkpoint_dtype
    rope_params = dict(self.rope_scaling or (("rope_type", "default"),))
    out = {
      "architectures": [SUPPORTED[self.family]],
      "model_type": self.family,
      "vocab_size": self.vocab_size,
      "hidden_size": self.hidden_size,
      "intermediate_size": self.intermediate_size,
      "num_hidden_layers": self.num_layers,
      "num_attention_heads": self.num_heads,
      "num_key_value_heads": self.num_kv_heads,
      "head_dim": self.head_dim,
      "hidden_act": "silu",
      "max_position_embeddings": self.max_position_embeddings,
      "rms_norm_eps": self.rms_norm_eps,
      "rope_theta": self.rope_theta,
      "rope_scaling": dict(self.rope_scaling) if self.rope_scaling else None,
      "rope_parameters": {**rope_params, "rope_theta": self.rope_theta},
      "tie_word_embeddings": self.tie_word_embeddings,
      "attention_dropout": 0.0,
      "use_cache": True,
      "torch_dtype": dtype,
      "dtype": dtype,
      "bos_token_id": self.bos_token_id,
      "eos_token_id": list(self.eos_token_id)
      if isinstance(self.eos_token_id, tuple)
      else self.eos_token_id,
      "pad_token_id": self.pad_token_id,
    }
    if self.family in ("qwen2", "qwen3"):
      out["use_sliding_window"] = False
    if self.family in ("llama", "qwen3"):
      out["attention_bias"] = False
    if self.family == "llama":
      out["mlp_bias"] = False
    return out


def _rope(hf: dict[str, Any]) -> tuple[float, tuple | None]:
  """rope theta and scaling from either `rope_theta`+`rope_scaling` (4.x) or `rope_parameters` (5.x)."""
  params = dict(hf.get("rope_parameters") or {})
  legacy = dict(hf.get("rope_scaling") or {})
  theta = params.pop("rope_theta", None) or hf.get("rope_theta") or 10000.0
  scaling = params or legacy
  rope_type = scaling.get("rope_type", scaling.get("type", "default"))
  if rope_type not in _ROPE_TYPES:
    raise ConfigError(
      f"unsupported rope scaling type {rope_type!r}; supported: {list(_ROPE_TYPES)}"
    )
  if rope_type == "default":
    return theta, None
  scaling = {k: v for k, v in scaling.items() if k != "type"}
  scaling["rope_type"] = rope_type
  needed = {
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
  }[rope_type]
  missing = [k for k in needed if k not in scaling]
  if missing:
    raise ConfigError(f"rope scaling {rope_type!r} is missing {missing}")
  return theta, tuple(sorted(scaling.items()))


def _refuse_math_changes(hf: dict[str, Any], model_type: str) -> None:
  """Fields that change the forward pass in ways we do not implement."""
  act = hf.get("hidden_act", "silu")
  if act != "silu":
    raise ConfigError(f"unsupported hidden_act={act!r}; only 'silu' is implemented")
  if hf.get("use_sliding_window"):
    raise ConfigError(
      "use_sliding_window=true is not supported (all Qwen2.5/Qwen3/R1-Distill "
      "checkpoints ship with it off)"
    )
  layer_types = hf.get("layer_types")
  if layer_types and any(t != "full_attention" for t in layer_types):
    raise ConfigError(f"unsupported layer_types {sorted(set(layer_types))}; only full_attention")
  if model_type in ("llama", "qwen3") and hf.get("attention_bias"):
    raise ConfigError(f"attention_bias=true is not supported for {model_type}")
  if hf.get("mlp_bias"):
    raise ConfigError("mlp_bias=true is not supported")
  prf = hf.get("partial_rotary_factor", 1.0)
  if prf not in (None, 1, 1.0):
    raise ConfigError(f"partial_rotary_factor={prf} is not supported")
  if hf.get("quantization_config"):
    raise ConfigError(
      "quantized checkpoints (quantization_config) are not supported; "
      "load an unquantized checkpoint or a GGUF file"
    )
