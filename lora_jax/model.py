"""Flax NNX decoder for the Qwen2 / Qwen2.5 / R1-Distill-Qwen, Qwen3 and Llama families.

Layer params are stacked on a leading "layers" axis and the forward pass scans over them, so
compile time stays flat from 2 to 64 layers. Linear kernels keep Hugging Face's [out, in] layout
(stacked: [layers, out, in]): loading is then a straight read into the final buffer, with no
transposing copy, and XLA contracts either layout at the same speed. Every param carries logical
axis names (`axes` metadata) that `sharding.RULES` maps onto the mesh.

The module knows nothing of files, training or sampling: it takes token ids, a padding mask or
positions, optional segment ids (packing) and an optional KV cache, and returns logits.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from lora_jax.config import ModelConfig
from lora_jax.sharding import constrain

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_MASK_VALUE = -0.7 * float(
  jnp.finfo(jnp.float32).max
)  # finite: fully-masked (pad) rows stay NaN-free
_REMAT_POLICIES = {
  "none": None,
  "full": jax.checkpoint_policies.nothing_saveable,
  "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


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
  ):
    rngs = rngs if rngs is not None else nnx.Rngs(0)
    if remat not in _REMAT_POLICIES:
      raise ValueError(f"remat={remat!r}; expected one of {sorted(_REMAT_POLICIES)}")
    self.config = config
    self.mesh = mesh
    self.dtype = jnp.dtype(dtype or param_dtype).name  # compute dtype (static)
    self.remat = remat
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
    self,
    input_ids,
    attention_mask=None,
    positions=None,
    segment_ids=None,
    cache=None,
    dropout_rng=None,
  ):
    """Logits [B, T, V] (float32). With `cache`, returns (logits, new_cache)."""
    hidden, new_cache, _ = self.hidden(
      input_ids, attention_mask, positions, segment_ids, cache, dropout_rng
    )
    logits = self.logits(hidden)
    return (logits, new_cache) if cache is not None else logits

  def hidden_states(self, input_ids, attention_mask=None, positions=None, segment_ids=None):
    """Per-layer hidden states like HF's output_hidden_states: L + 1 arrays, the last normed."""
    final, _, per_layer = self.hidden(
      input_ids, attention_mask, positions, segment_ids, collect=True
    )
    return [per_layer[i] for i in range(per_layer.shape[0] - 1)] + [final]

  def logits(self, hidden):
    head = self.embed[...] if self.lm_head is None else self.lm_head[...]
    out = jnp.einsum(
      "btd,vd->btv", hidden, head.astype(self.dtype), preferred_element_type=jnp.float32
    )
    return constrain(out, self.mesh, ("batch", "seq", "act_vocab"))

  def hidden(
    self,
    input_ids,
    attention_mask=None,
    positions=None,
    segment_ids=None,
    cache=None,
    dropout_rng=None,
    collect=False,
  ):
    """Final normed hidden states [B, T, D], the updated cache, and (if collect) every layer's
    input stacked [L + 1, B, T, D] (embeddings first, last layer's output last)."""
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
      if cache is not None:  # continue after what the cache already holds
        positions = positions + _cache_next_position(cache)[:, None]
    positions = jnp.asarray(positions, jnp.int32)
    if segment_ids is None:
      segment_ids = jnp.ones((B, T), jnp.int32)
    segment_ids = jnp.where(mask, segment_ids, 0)  # pad tokens get segment 0

    x = jnp.take(self.embed[...], input_ids, axis=0).astype(self.dtype)
    x = constrain(x, self.mesh, ("batch", "seq", "act_embed"))
    cos, sin = rope_tables(cfg, positions)

    layer_params = nnx.to_pure_dict(nnx.state(self.layers))
    step = _make_layer_step(
      self, mask, positions, segment_ids, cos, sin, cache, dropout_rng, collect
    )
    if self.remat != "none":
      step = jax.checkpoint(step, policy=_REMAT_POLICIES[self.remat], prevent_cse=False)
    carry = (x,) if cache is None else (x, cache["k"], cache["v"])
    carry, per_layer = jax.lax.scan(step, carry, (layer_params, jnp.arange(cfg.num_layers)))
    x = carry[0]
    new_cache = None
    if cache is not None:
      new_cache = _advance_cache(cache, carry[1], carry[2], mask, positions)
    if collect:
      per_layer = jnp.concatenate([per_layer, x[None]], axis=0)
    return rms_norm(x, self.final_norm[...], cfg.rms_norm_eps), new_cache, per_layer


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


def dense(x, p: dict, dtype, scale_rng=None, dropout: float = 0.0):
  """x @ kernel.T (+ bias) (+ LoRA: scale * dropout(x) @ A @ B)."""
  y = linear(x, p["kernel"].astype(dtype))
  if p.get("bias") is not None:
    y = y + p["bias"].astype(dtype)
  if "lora_a" in p:
    xa = x
    if dropout > 0.0 and scale_rng is not None:
      keep = jax.random.bernoulli(scale_rng, 1.0 - dropout, x.shape)
      xa = jnp.where(keep, x / (1.0 - dropout), 0).astype(x.dtype)
    delta = lora_delta(xa, p["lora_a"].astype(dtype), p["lora_b"].astype(dtype))
    y = y + (p["lora_scale"] * delta).astype(y.dtype)
  return y


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


def _make_layer_step(
  model: Decoder, mask, positions, segment_ids, cos, sin, cache, dropout_rng, collect
):
  cfg, mesh, dtype = model.config, model.mesh, model.dtype
  B, T = mask.shape
  K, G, hd = cfg.num_kv_heads, cfg.num_heads // cfg.num_kv_heads, cfg.head_dim
  dropout = model.lora_dropout
  if cache is None:
    key_pos, key_seg = positions, segment_ids
  else:
    # new tokens go to slots end[b] + t; the cache's key positions are updated before the scan.
    slots = cache["end"][:, None] + jnp.arange(T)[None, :]
    batch_idx = jnp.broadcast_to(jnp.arange(B)[:, None], (B, T))
    key_pos = _advance_cache(cache, None, None, mask, positions)["pos"]
    key_seg = (key_pos >= 0).astype(jnp.int32)
  # [B, T, S]: a query sees keys of its own segment at positions <= its own.
  allowed = (
    (key_seg[:, None, :] == segment_ids[:, :, None])
    & (key_seg[:, None, :] > 0)
    & (key_pos[:, None, :] <= positions[:, :, None])
  )

  def step(carry, xs):
    p, layer = xs
    x = carry[0]
    rng = None if dropout_rng is None else jax.random.fold_in(dropout_rng, layer)
    proj = lambda h, name, i: dense(
      h, p[name], dtype, None if rng is None else jax.random.fold_in(rng, i), dropout
    )

    h = rms_norm(x, p["attn_norm"], cfg.rms_norm_eps)
    q = proj(h, "q_proj", 0).reshape(B, T, K * G, hd)
    k = proj(h, "k_proj", 1).reshape(B, T, K, hd)
    v = proj(h, "v_proj", 2).reshape(B, T, K, hd)
    if cfg.qk_norm:
      q = rms_norm(q, p["q_norm"], cfg.rms_norm_eps)
      k = rms_norm(k, p["k_norm"], cfg.rms_norm_eps)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    q = constrain(q, mesh, ("batch", "seq", "act_heads", None))
    if cache is None:
      keys, values = k, v
      new_carry_cache = ()
    else:
      ck = carry[1].at[layer, batch_idx, slots].set(k.astype(carry[1].dtype))
      cv = carry[2].at[layer, batch_idx, slots].set(v.astype(carry[2].dtype))
      keys, values = ck[layer].astype(dtype), cv[layer].astype(dtype)
      new_carry_cache = (ck, cv)
    attn = attention(q.reshape(B, T, K, G, hd), keys, values, allowed)
    attn = constrain(attn.reshape(B, T, K * G * hd), mesh, ("batch", "seq", "act_heads"))
    x = x + proj(attn, "o_proj", 3)
    x = constrain(x, mesh, ("batch", "seq", "act_embed"))

    h = rms_norm(x, p["mlp_norm"], cfg.rms_norm_eps)
    gate = proj(h, "gate_proj", 4)
    up = proj(h, "up_proj", 5)
    act = constrain(jax.nn.silu(gate) * up, mesh, ("batch", "seq", "act_mlp"))
    x = x + proj(act, "down_proj", 6)
    x = constrain(x, mesh, ("batch", "seq", "act_embed"))
    return (x,) + new_carry_cache, (carry[0] if collect else None)

  return step


def attention(q, k, v, allowed):
  """Grouped-query attention. q [B,T,K,G,hd], k/v [B,S,K,hd], allowed [B,T,S] -> [B,T,K,G,hd].

  Heads go to a leading batch axis so both products are plain batched matmuls (the 5-D einsum
  form ran at half the speed on CPU)."""
  B, T, K, G, H = q.shape
  S = k.shape[1]
  qh = q.transpose(0, 2, 3, 1, 4).reshape(B * K, G * T, H)
  kh = k.transpose(0, 2, 1, 3).reshape(B * K, S, H)
  vh = v.transpose(0, 2, 1, 3).reshape(B * K, S, H)
  scores = jnp.einsum("nqh,nsh->nqs", qh, kh, preferred_element_type=jnp.float32)
  scores = scores.reshape(B, K, G, T, S) * (1.0 / math.sqrt(H))
  scores = jnp.where(allowed[:, None, None, :, :], scores, _MASK_VALUE)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype).reshape(B * K, G * T, S)
  out = jnp.einsum("nqs,nsh->nqh", probs, vh).reshape(B, K, G, T, H)
  return out.transpose(0, 3, 1, 2, 4)


# ---- KV cache ----------------------------------------------------------------------------------
def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=jnp.float32) -> dict:
  """An empty cache: k/v [L, B, S, K, hd]; pos [B, S] is each slot's token position (-1 empty);
  end [B] is the next free slot of each row."""
  shape = (cfg.num_layers, batch, max_len, cfg.num_kv_heads, cfg.head_dim)
  return {
    "k": jnp.zeros(shape, dtype),
    "v": jnp.zeros(shape, dtype),
    "pos": jnp.full((batch, max_len), -1, jnp.int32),
    "end": jnp.zeros((batch,), jnp.int32),
  }


def cache_bytes(cfg: ModelConfig, batch: int, max_len: int, dtype=jnp.float32) -> int:
  return 2 * cfg.num_layers * batch * max_len * cfg.kv_dim * jnp.dtype(dtype).itemsize


def _cache_next_position(cache):
  return jnp.max(cache["pos"], axis=1) + 1


def _advance_cache(cache, k, v, mask, positions):
  """The cache after writing T new tokens at slots end..end+T (pad tokens get position -1)."""
  B, T = mask.shape
  slots = cache["end"][:, None] + jnp.arange(T)[None, :]
  batch_idx = jnp.broadcast_to(jnp.arange(B)[:, None], (B, T))
  pos = cache["pos"].at[batch_idx, slots].set(jnp.where(mask, positions, -1))
  return {
    "k": k if k is not None else cache["k"],
    "v": v if v is not None else cache["v"],
    "pos": pos,
    "end": cache["end"] + T,
  }
