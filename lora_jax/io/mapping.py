"""The one table from our param paths to Hugging Face, GGUF and PEFT tensor names (Tunix-style).

`{i}` is the layer index; stacked params ("layers.*") have one source tensor per layer. Every
tensor keeps its HF layout ([out, in] for linear weights), so nothing is transposed. A PEFT
adapter names its tensors after the HF module they adapt (`peft_key`, `parse_peft_key`).
"""

from __future__ import annotations

import dataclasses
import re

from lora_jax.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class Entry:
  path: str  # dotted path in the nnx module, e.g. "layers.q_proj.kernel"
  hf: str  # HF safetensors name
  gguf: str  # llama.cpp name

  @property
  def stacked(self) -> bool:
    return self.path.startswith("layers.")


# Our linear modules -> (HF module, llama.cpp tensor stem); ".weight" / ".bias" follow.
LINEAR_MODULES = {
  "q_proj": ("model.layers.{i}.self_attn.q_proj", "blk.{i}.attn_q"),
  "k_proj": ("model.layers.{i}.self_attn.k_proj", "blk.{i}.attn_k"),
  "v_proj": ("model.layers.{i}.self_attn.v_proj", "blk.{i}.attn_v"),
  "o_proj": ("model.layers.{i}.self_attn.o_proj", "blk.{i}.attn_output"),
  "gate_proj": ("model.layers.{i}.mlp.gate_proj", "blk.{i}.ffn_gate"),
  "up_proj": ("model.layers.{i}.mlp.up_proj", "blk.{i}.ffn_up"),
  "down_proj": ("model.layers.{i}.mlp.down_proj", "blk.{i}.ffn_down"),
}
_ATTN, _MLP = ("q_proj", "k_proj", "v_proj", "o_proj"), ("gate_proj", "up_proj", "down_proj")
PEFT_PREFIX = "base_model.model."  # PeftModel wraps the HF model: its names gain this prefix


def _linear(name: str, part: str) -> Entry:
  """The entry of a linear module's "kernel" or "bias"."""
  hf, gguf = LINEAR_MODULES[name]
  suffix = "weight" if part == "kernel" else "bias"
  return Entry(f"layers.{name}.{part}", f"{hf}.{suffix}", f"{gguf}.{suffix}")


def entries(cfg: ModelConfig) -> list[Entry]:
  """The tensors a model of this config has, in a stable order."""
  out = [
    Entry("embed", "model.embed_tokens.weight", "token_embd.weight"),
    Entry(
      "layers.attn_norm", "model.layers.{i}.input_layernorm.weight", "blk.{i}.attn_norm.weight"
    ),
  ]
  for name in _ATTN:
    out.append(_linear(name, "kernel"))
    if cfg.qkv_bias and name != "o_proj":
      out.append(_linear(name, "bias"))
  if cfg.qk_norm:
    out += [
      Entry(
        "layers.q_norm", "model.layers.{i}.self_attn.q_norm.weight", "blk.{i}.attn_q_norm.weight"
      ),
      Entry(
        "layers.k_norm", "model.layers.{i}.self_attn.k_norm.weight", "blk.{i}.attn_k_norm.weight"
      ),
    ]
  out.append(
    Entry(
      "layers.mlp_norm",
      "model.layers.{i}.post_attention_layernorm.weight",
      "blk.{i}.ffn_norm.weight",
    )
  )
  out += [_linear(name, "kernel") for name in _MLP]
  out.append(Entry("final_norm", "model.norm.weight", "output_norm.weight"))
  if not cfg.tie_word_embeddings:
    out.append(Entry("lm_head", "lm_head.weight", "output.weight"))
  return out


def peft_key(module: str, layer: int, part: str) -> str:
  """PEFT's name of lora_A or lora_B (`part` "A" / "B") of one of our linear modules."""
  return f"{PEFT_PREFIX}{LINEAR_MODULES[module][0].format(i=layer)}.lora_{part}.weight"


_PEFT_KEYS = {
  module: re.compile(
    re.escape(PEFT_PREFIX + hf).replace(re.escape("{i}"), r"(\d+)")
    + r"\.lora_([AB])(?:\.\w+)?\.weight$"  # PEFT may name the adapter: lora_A.default.weight
  )
  for module, (hf, _) in LINEAR_MODULES.items()
}


def parse_peft_key(key: str) -> tuple[str, int, str] | None:
  """(module, layer, "A" | "B") of a PEFT adapter tensor name, or None if it is not one."""
  for module, pattern in _PEFT_KEYS.items():
    m = pattern.match(key)
    if m:
      return module, int(m.group(1)), m.group(2)
  return None


# Tensors a checkpoint may carry that we deliberately do not load.
IGNORED_HF = (r"\.rotary_emb\.inv_freq$",)
