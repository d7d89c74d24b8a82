"""One table from our param paths to Hugging Face and GGUF tensor names (Tunix-style).

`{i}` is the layer index; stacked params ("layers.*") have one source tensor per layer. Every
tensor keeps its HF layout ([out, in] for linear weights), so nothing is transposed.
"""

from __future__ import annotations

import dataclasses

from lora_jax.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class Entry:
  path: str  # dotted path in the nnx module, e.g. "layers.q_proj.kernel"
  hf: str  # HF safetensors name
  gguf: str  # llama.cpp name

  @property
  def stacked(self) -> bool:
    return self.path.startswith("layers.")


_ATTN = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output"}
_MLP = {"gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}


def entries(cfg: ModelConfig) -> list[Entry]:
  """The tensors a model of this config has, in a stable order."""
  out = [Entry("embed", "model.embed_tokens.weight", "token_embd.weight")]
  out.append(
    Entry("layers.attn_norm", "model.layers.{i}.input_layernorm.weight", "blk.{i}.attn_norm.weight")
  )
  for ours, gg in _ATTN.items():
    out.append(
      Entry(
        f"layers.{ours}.kernel",
        f"model.layers.{{i}}.self_attn.{ours}.weight",
        f"blk.{{i}}.{gg}.weight",
      )
    )
    if cfg.qkv_bias and ours != "o_proj":
      out.append(
        Entry(
          f"layers.{ours}.bias", f"model.layers.{{i}}.self_attn.{ours}.bias", f"blk.{{i}}.{gg}.bias"
        )
      )
  if cfg.qk_norm:
    out.append(
      Entry(
        "layers.q_norm", "model.layers.{i}.self_attn.q_norm.weight", "blk.{i}.attn_q_norm.weight"
      )
    )
    out.append(
      Entry(
        "layers.k_norm", "model.layers.{i}.self_attn.k_norm.weight", "blk.{i}.attn_k_norm.weight"
      )
    )
  out.append(
    Entry(
      "layers.mlp_norm",
      "model.layers.{i}.post_attention_layernorm.weight",
      "blk.{i}.ffn_norm.weight",
    )
  )
  for ours, gg in _MLP.items():
    out.append(
      Entry(
        f"layers.{ours}.kernel", f"model.layers.{{i}}.mlp.{ours}.weight", f"blk.{{i}}.{gg}.weight"
      )
    )
  out.append(Entry("final_norm", "model.norm.weight", "output_norm.weight"))
  if not cfg.tie_word_embeddings:
    out.append(Entry("lm_head", "lm_head.weight", "output.weight"))
  return out


# Tensors a checkpoint may carry that we deliberately do not load.
IGNORED_HF = (r"\.rotary_emb\.inv_freq$",)
