"""Flax NNX decoder for the Qwen2 / Qwen2.5 / R1-Distill-Qwen, Qwen3 and Llama families.

Layer params are stacked on a leading "layers" axis and the forward pass scans over them, so
compile time stays flat from 2 to 64 layers. Linear kernels keep Hugging Face's [out, in] layout
(stacked: [layers, out, in]): loading is then a straight read into the final buffer, with no
transposing copy, and XLA contracts either layout at the same speed. Every param carries logical
axis names (`axes` metadata) that `sharding.RULES` maps onto the mesh.

`decoder_layer` is the one implementation of a layer (attention and MLP). Training scans it over
the stacked params (`Decoder.hidden`); the sampler (`sampling/forward.py`) runs it once per layer
with a KV cache. What differs between the two is passed in: `project` computes a dense layer
(`dense`, with LoRA dropout in training, with the weight-major layout for few rows in decoding)
and `attend` says where keys and values come from and go to (this call's own tokens here, a
per-layer cache in the sampler). `Decoder.attention` names the attention implementation
(`attention.py`: plain XLA, cuDNN or Pallas splash; "auto" picks by backend).

The module knows nothing of files, training or sampling: it takes token ids, a padding mask or
positions and optional segment ids (packing), and returns logits.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lora_jax import attention as attention_lib
from lora_jax.config import ModelConfig
from lora_jax.sharding import constrain

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_REMAT_POLICIES = {
  "none": None,
  "full": jax.checkpoint_policies.nothing_saveable,
  "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}

# project(x, params of one linear module, module name) -> x @ W (+ bias, + LoRA)
Project = Callable[[jax.Array, dict, str], jax.Array]
# attend(q [B, T, K, G, hd], k [B, T, K, hd], v) -> (attention output like q, keys/values kept)
Attend = Callable[[jax.Array, jax.Array, jax.Array], tuple[jax.Array, Any]]


class Linear(nnx.Module):
  """A stacked projection: kernel [layers, out, in] (HF layout), optional bias [layers, out].

  `lora.py` may add `lora_a` [layers, in, r], `lora_b` [layers, r, out] (nnx.LoRAParam) and
  `lora_scale` [layers] (alpha / r on adapted layers, 0 elsewhere).
  """

  def __init__(
    self,
    layers: int,
    din: int,
    dout: int,
    in_axis: str,
    out_axis: str,
    bias: bool,
    *,
    rngs: nnx.Rngs,
    param_dtype,
  ):
    init = nnx.initializers.normal(0.02)
    self.kernel = nnx.Param(
      init(rngs.params(), (layers, dout, din), param_dtype), axes=("layers", out_axis, in_axis)
    )
    self.bias = (
      nnx.Param(jnp.zeros((layers, dout), param_dtype), axes=("layers", out_axis)) if bias else None
    )


class Layers(nnx.Module):
  """All decoder layers' params, stacked."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, param_dtype):
    L, D, F = cfg.num_layers, cfg.hidden_size, cfg.intermediate_size
    lin = lambda din, dout, ia, oa, bias=False: Linear(
      L, din, dout, ia, oa, bias, rngs=rngs, param_dtype=param_dtype
    )
    self.attn_norm = nnx.Param(jnp.ones((L, D), param_dtype), axes=("layers", "norm"))
    self.q_proj = lin(D, cfg.q_dim, "embed", "q_heads", cfg.qkv_bias)
    self.k_proj = lin(D, cfg.kv_dim, "embed", "kv_heads", cfg.qkv_bias)
    self.v_proj = lin(D, cfg.kv_dim, "embed", "kv_heads", cfg.qkv_bias)
    self.o_proj = lin(cfg.q_dim, D, "q_heads", "embed")
    if cfg.qk_norm:
      self.q_norm = nnx.Param(jnp.ones((L, cfg.head_dim), param_dtype), axes=("layers", "norm"))
      self.k_norm = nnx.Param(jnp.ones((L, cfg.head_dim), param_dtype), axes=("layers", "norm"))
    self.mlp_norm = nnx.Param(jnp.ones((L, D), param_dtype), axes=("layers", "norm"))
    self.gate_proj = lin(D, F, "embed", "mlp")
    self.up_proj = lin(D, F, "embed", "mlp")
    self.down_proj = lin(F, D, "mlp", "embed")


class Decoder(nnx.Module):
  """The causal LM. `model(input_ids, attention_mask=mask)` -> logits [batch, seq, vocab]."""

  def __init__(
    self,
    config: ModelConfig,
    *,
    param_dtype: Any = jnp.float32,
    dtype: Any = None,
    rngs: nnx.Rngs | None = None,
    mesh=None,
    remat: str = "none",
    attention: str = "auto",
  ):
    rngs = rngs if rngs is not None else nnx.Rngs(0)
    if remat not in _REMAT_POLICIES:
      raise ValueError(f"remat={remat!r}; expected one of {sorted(_REMAT_POLICIES)}")
    if attention not in attention_lib.IMPLEMENTATIONS:
      raise ValueError(f"attention={attention!r}; expected one of {attention_lib.IMPLEMENTATIONS}")
    self.config = config
    self.mesh = mesh
    self.dtype = jnp.dtype(dtype or param_dtype).name  # compute dtype (static)
    # The residual stream's dtype; float32 under float16 compute reproduces torch's autocast,
    # whose residual adds promote to float32 (lora_jax.precision).
    self.residual_dtype = self.dtype
    self.remat = remat
    self.attention = attention  # attention implementation (`attention.py`), resolved when traced
    self.lora_dropout = 0.0  # set by lora.py; applied only when a dropout rng is passed
    V, D = config.vocab_size, config.hidden_size
    self.embed = nnx.Param(
      nnx.initializers.normal(0.02)(rngs.params(), (V, D), param_dtype), axes=("vocab", "embed")
    )
    self.layers = Layers(config, rngs=rngs, param_dtype=param_dtype)
    self.final_norm = nnx.Param(jnp.ones((D,), param_dtype), axes=("norm",))
    self.lm_head = (
      None
      if config.tie_word_embeddings
      else nnx.Param(
        nnx.initializers.normal(0.02)(rngs.params(), (V, D), param_dtype), axes=("vocab", "embed")
      )
    )

  # ---- public entry points -------------------------------------------------------------------
  def __call__(
    self, input_ids, attention_mask=None, positions=None, segment_ids=None, dropout_rng=None
  ):
    """Logits [B, T, V] (float32)."""
    return self.logits(self.hidden(input_ids, attention_mask, positions, segment_ids, dropout_rng))

  def hidden(
    self, input_ids, attention_mask=None, positions=None, segment_ids=None, dropout_rng=None
  ):
    """Final normed hidden states [B, T, D]. attention_mask [B, T] (1 = real token) defaults to
    all ones, positions to the count of real tokens before each one, segment_ids (packing: a
    token sees earlier tokens of its own segment only) to one segment per row. With
    `dropout_rng`, LoRA dropout is applied."""
    final, _ = self._run_layers(
      input_ids, attention_mask, positions, segment_ids, dropout_rng, collect=False
    )
    return final

  def hidden_states(self, input_ids, attention_mask=None, positions=None, segment_ids=None):
    """Per-layer hidden states like HF's output_hidden_states: L + 1 arrays, the last normed."""
    final, per_layer = self._run_layers(
      input_ids, attention_mask, positions, segment_ids, None, collect=True
    )
    return [per_layer[i] for i in range(per_layer.shape[0])] + [final]

  def logits(self, hidden, *, weight_major: bool = False):
    """float32 logits [B, T, V] of hidden states [B, T, D] (see `dense` for `weight_major`)."""
    head = (self.embed[...] if self.lm_head is None else self.lm_head[...]).astype(self.dtype)
    hidden = hidden.astype(self.dtype)
    if weight_major:
      out = matmul_weight_major(hidden, head, jnp.float32)
    else:
      out = jnp.einsum("btd,vd->btv", hidden, head, preferred_element_type=jnp.float32)
    return constrain(out, self.mesh, ("batch", "seq", "act_vocab"))

  def embed_tokens(self, input_ids):
    """Token embeddings [B, T, D] in the residual stream's dtype."""
    x = jnp.take(self.embed[...], input_ids, axis=0).astype(self.residual_dtype)
    return constrain(x, self.mesh, ("batch", "seq", "act_embed"))

  def final_normed(self, x):
    return rms_norm(x, self.final_norm[...], self.config.rms_norm_eps)

  # ---- the layer scan --------------------------------------------------------------------------
  def _run_layers(self, input_ids, attention_mask, positions, segment_ids, dropout_rng, collect):
    """The final normed hidden states, and (if collect) every layer's input [L, B, T, D]."""
    cfg = self.config
    input_ids = jnp.asarray(input_ids)
    B, T = input_ids.shape
    mask = (
      jnp.ones((B, T), jnp.bool_)
      if attention_mask is None
      else jnp.asarray(attention_mask).astype(jnp.bool_)
    )
    if positions is None:
      positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
    positions = jnp.asarray(positions, jnp.int32)
    if segment_ids is None:
      segment_ids = jnp.ones((B, T), jnp.int32)
    segment_ids = jnp.where(mask, segment_ids, 0)  # pad tokens get segment 0

    rope = rope_tables(cfg, positions)
    attention = attention_lib.self_attend(
      self.attention, self.dtype, positions, segment_ids, self.mesh
    )
    attend = lambda q, k, v: (attention(q, k, v), None)
    dropout = self.lora_dropout

    def step(x, xs):
      p, layer = xs
      rng = None if dropout_rng is None else jax.random.fold_in(dropout_rng, layer)
      project = lambda h, params, name: dense(
        h,
        params,
        self.dtype,
        dropout_rng=None if rng is None else jax.random.fold_in(rng, LINEARS.index(name)),
        dropout=dropout,
      )
      out, _ = decoder_layer(cfg, self.mesh, p, x, rope, project, attend)
      return out, (x if collect else None)

    if self.remat != "none":
      step = jax.checkpoint(step, policy=_REMAT_POLICIES[self.remat], prevent_cse=False)
    layer_params = nnx.to_pure_dict(nnx.state(self.layers))
    x, per_layer = jax.lax.scan(
      step, self.embed_tokens(input_ids), (layer_params, jnp.arange(cfg.num_layers))
    )
    return self.final_normed(x), per_layer


# ---- the decoder layer -------------------------------------------------------------------------
def decoder_layer(cfg: ModelConfig, mesh, p: dict, x, rope, project: Project, attend: Attend):
  """One pre-norm decoder layer: x [B, T, D] -> (x [B, T, D], what `attend` kept). p holds one
  layer's params; rope is (cos, sin) for x's positions (`rope_tables`)."""
  B, T, _ = x.shape
  K, G, hd = cfg.num_kv_heads, cfg.num_heads // cfg.num_kv_heads, cfg.head_dim
  eps = cfg.rms_norm_eps
  proj = lambda h, name: project(h, p[name], name)

  h = rms_norm(x, p["attn_norm"], eps)
  q = proj(h, "q_proj").reshape(B, T, K * G, hd)
  k = proj(h, "k_proj").reshape(B, T, K, hd)
  v = proj(h, "v_proj").reshape(B, T, K, hd)
  if cfg.qk_norm:
    q = rms_norm(q, p["q_norm"], eps)
    k = rms_norm(k, p["k_norm"], eps)
  cos, sin = rope
  q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
  q = constrain(q, mesh, ("batch", "seq", "act_heads", None))
  attn, kept = attend(q.reshape(B, T, K, G, hd), k, v)
  attn = constrain(attn.reshape(B, T, K * G * hd), mesh, ("batch", "seq", "act_heads"))
  x = x + proj(attn, "o_proj")
  x = constrain(x, mesh, ("batch", "seq", "act_embed"))

  h = rms_norm(x, p["mlp_norm"], eps)
  act = jax.nn.silu(proj(h, "gate_proj")) * proj(h, "up_proj")
  act = constrain(act, mesh, ("batch", "seq", "act_mlp"))
  x = x + proj(act, "down_proj")
  return constrain(x, mesh, ("batch", "seq", "act_embed")), kept


# ---- building blocks ---------------------------------------------------------------------------


def rms_norm(x, weight, eps):
  """HF's RMSNorm exactly: normalise in float32, cast back, then scale."""
  xf = x.astype(jnp.float32)
  xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
  return weight.astype(x.dtype) * xf.astype(x.dtype)


def rope_inv_freq(cfg: ModelConfig):
  hd = cfg.head_dim
  inv = 1.0 / (cfg.rope_theta ** (jnp.arange(0, hd, 2, dtype=jnp.float32) / hd))
  if cfg.rope_scaling is None:
    return inv
  s = dict(cfg.rope_scaling)
  if s["rope_type"] == "linear":
    return inv / s["factor"]
  # llama3: long wavelengths scaled by `factor`, short kept, smooth blend between (as HF).
  factor, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
  old_len = s["original_max_position_embeddings"]
  wavelen = 2 * math.pi / inv
  scaled = jnp.where(wavelen > old_len / lo, inv / factor, inv)
  smooth = (old_len / wavelen - lo) / (hi - lo)
  blended = (1 - smooth) * scaled / factor + smooth * scaled
  medium = (wavelen >= old_len / hi) & (wavelen <= old_len / lo)
  return jnp.where(medium, blended, scaled)


def rope_tables(cfg: ModelConfig, positions):
  freqs = positions.astype(jnp.float32)[..., None] * rope_inv_freq(cfg)  # [B, T, hd/2]
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x, cos, sin):
  """Rotate-half RoPE (HF's non-interleaved layout). x: [B, T, H, hd]."""
  half = x.shape[-1] // 2
  rot = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  xf = x.astype(jnp.float32)
  out = xf * cos[:, :, None, :] + rot.astype(jnp.float32) * sin[:, :, None, :]
  return out.astype(x.dtype)


def dense(x, p: dict, dtype, *, weight_major=False, dropout_rng=None, dropout: float = 0.0):
  """x @ kernel.T (+ bias) (+ LoRA: scale * dropout(x) @ A @ B). p: one layer's params of one
  linear module (kernel [out, in], optional bias, lora_a [in, r], lora_b [r, out], lora_scale).

  weight_major: compute the product as W @ x^T. With few rows (decoding) XLA:CPU's gemm is 2-3x
  faster when the weight is the dot's left operand (its rows streamed once) than the other way
  round; an optimization barrier stops XLA from swapping the operands back when the small result
  is transposed. Many rows (training, prefill) use the token-major form, which has the custom
  backward of `linear`."""
  x, w = x.astype(dtype), p["kernel"].astype(dtype)  # the input too, as autocast casts it
  y = matmul_weight_major(x, w) if weight_major else linear(x, w)
  if p.get("bias") is not None:
    y = y + p["bias"].astype(dtype)
  if "lora_a" in p:
    xa = x
    if dropout > 0.0 and dropout_rng is not None:
      keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout, x.shape)
      xa = jnp.where(keep, x / (1.0 - dropout), 0).astype(x.dtype)
    delta = lora_delta(xa, p["lora_a"].astype(dtype), p["lora_b"].astype(dtype))
    y = y + (p["lora_scale"] * delta).astype(y.dtype)
  return y


def matmul_weight_major(x, w, preferred_element_type=None):
  """x [B, T, in] @ w [out, in].T computed as w @ x^T (see `dense`)."""
  y = jnp.einsum("fd,btd->fbt", w, x, preferred_element_type=preferred_element_type)
  return jnp.transpose(jax.lax.optimization_barrier(y), (1, 2, 0))


def lora_weight_delta(a, b, scale):
  """The LoRA update of a kernel, scale * (A @ B) in kernel layout [..., out, in], in float32:
  what merging adds to W (PEFT's `get_delta_weight`). a [..., in, r], b [..., r, out], scale [...]
  (per layer). numpy in, numpy out (the export merges on the host); jax arrays are multiplied at
  full float32 precision (TPU/GPU default precision would round them to bfloat16/tf32)."""
  at, bt = a.astype(np.float32).swapaxes(-1, -2), b.astype(np.float32).swapaxes(-1, -2)
  if isinstance(a, np.ndarray):
    product = np.matmul(bt, at)
  else:
    product = jnp.matmul(bt, at, precision=jax.lax.Precision.HIGHEST)
  return scale.astype(np.float32)[..., None, None] * product


@jax.custom_vjp
def linear(x, w):
  """x [B,T,in] @ w[out,in].T. The backward computes dW only when w is trained (symbolic zeros
  tell) and writes weight-style products as 2-D dots over the flattened tokens: left to autodiff,
  XLA:CPU fused the transpose dW needs into the gradient's multi-input producer, a strided loop
  that was the slowest op of a step (measured: an MLP's forward+backward 1.5s -> 1.1s, a LoRA
  layer's 2.0s -> 1.3s)."""
  return jnp.einsum("btd,fd->btf", x, w)


def _linear_fwd(x, w):
  y = jnp.einsum("btd,fd->btf", x.value, w.value)
  # Keep only what the needed cotangents use: x for dW, w for dx.
  return y, (x.value if w.perturbed else None, w.value if x.perturbed else None)


def _linear_bwd(res, g):
  x, w = res
  dx = None if w is None else jnp.einsum("btf,fd->btd", g, w)
  dw = None if x is None else _tokens(g).T @ _tokens(x)
  return dx, dw


linear.defvjp(_linear_fwd, _linear_bwd, symbolic_zeros=True)


@jax.custom_vjp
def lora_delta(x, a, b):
  """(x @ A) @ B, with a backward written like `linear`'s."""
  return (x @ a) @ b


def _lora_delta_fwd(x, a, b):
  u = x @ a
  return u @ b, (x, a, b, u)


def _lora_delta_bwd(res, g):
  x, a, b, u = res
  gb = g @ b.T
  db = _tokens(u).T @ _tokens(g)
  da = _tokens(x).T @ _tokens(gb)
  return gb @ a.T, da, db


lora_delta.defvjp(_lora_delta_fwd, _lora_delta_bwd)


def _tokens(x):
  """[..., d] -> [tokens, d]."""
  return x.reshape(-1, x.shape[-1])
