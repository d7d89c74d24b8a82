"""The decoder's forward pass as the sampler runs it: layers unrolled, one KV cache per layer.

`Decoder.hidden` scans over stacked layer params; inside XLA:CPU's while loop each layer's weight
slice is copied before its matmul, which triples the memory traffic of a decode step (weight reads
are what a decode step costs). The sampler therefore unrolls the layers and, on CPU, hands each
layer its own arrays (`layer_params(unstack=True)`, a one-off copy). The math is the model's own
building blocks (`rms_norm`, `dense`, `apply_rope`, `attention`, `Decoder.logits`), so LoRA
adapters (merged or not), dtypes and sharding constraints behave exactly as in the model.

One CPU-specific change: with few rows (decode), XLA:CPU's gemm is 2-3x faster when the weight is
the dot's left operand (out^T = W x^T, the weight's rows streamed once) than the other way round,
so `_dense`/`logits` compute that form; an optimization barrier stops XLA from swapping the
operands back when the small result is transposed. Prefill (many rows) uses the model's form.

Cache layout: a token's cache slot is its position, so a row holds its sequence in slots
0..length-1 and a query at position p attends to slots <= p. Slots past a row's length hold stale
or padding values that no query can reach.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from lora_jax.model import Decoder, apply_rope, attention, dense, rms_norm, rope_tables
from lora_jax.sharding import constrain, named_sharding

CACHE_AXES = ("batch", "cache_seq", "kv_heads", "head_dim")


def layer_params(model: Decoder, unstack: bool):
  """Layer params for `forward`: a list with one dict per layer (copies) when `unstack`, else
  the stacked dict (sliced inside the compiled function)."""
  stacked = nnx.to_pure_dict(nnx.state(model.layers))
  if not unstack:
    return stacked
  return [jax.tree.map(lambda a, i=i: a[i], stacked) for i in range(model.config.num_layers)]


def new_cache(model: Decoder, batch: int, length: int):
  """Per-layer (k, v) [batch, length, kv_heads, head_dim], zeros, in the compute dtype."""
  cfg = model.config
  shape = (batch, length, cfg.num_kv_heads, cfg.head_dim)
  zeros = jnp.zeros(shape, model.dtype)
  if model.mesh is not None:
    zeros = jax.lax.with_sharding_constraint(zeros, cache_sharding(model.mesh, shape))
  return [(zeros, zeros) for _ in range(cfg.num_layers)]


def cache_sharding(mesh, shape):
  return named_sharding(mesh, CACHE_AXES, shape)


_WEIGHT_MAJOR_ROWS = 64  # up to this many rows (batch x tokens), use the weight-major gemm


def _weight_major(rows: int) -> bool:
  return rows <= _WEIGHT_MAJOR_ROWS and jax.devices()[0].platform == "cpu"


def _dense(x, p: dict, dtype):
  """`model.dense` (kernel [out, in], bias, unmerged LoRA) in the faster form for few rows."""
  B, T, _ = x.shape
  if not _weight_major(B * T):
    return dense(x, p, dtype)
  y = jnp.einsum("fd,btd->fbt", p["kernel"].astype(dtype), x)
  y = jnp.transpose(jax.lax.optimization_barrier(y), (1, 2, 0))
  if p.get("bias") is not None:
    y = y + p["bias"].astype(dtype)
  if "lora_a" in p:
    delta = (x @ p["lora_a"].astype(dtype)) @ p["lora_b"].astype(dtype)
    y = y + (p["lora_scale"] * delta).astype(y.dtype)
  return y


def logits(m: Decoder, hidden):
  """`Decoder.logits` (float32 [B, T, V]) in the faster form for few rows."""
  B, T, _ = hidden.shape
  if not _weight_major(B * T):
    return m.logits(hidden)
  head = m.embed[...] if m.lm_head is None else m.lm_head[...]
  out = jnp.einsum("vd,btd->vbt", head.astype(m.dtype), hidden, preferred_element_type=jnp.float32)
  out = jnp.transpose(jax.lax.optimization_barrier(out), (1, 2, 0))
  return constrain(out, m.mesh, ("batch", "seq", "act_vocab"))


def forward(m: Decoder, layers, ids, positions, cache):
  """ids, positions [B, T] -> final normed hidden [B, T, D] and the cache with these tokens'
  keys and values written at slots `positions` (each query attends to slots <= its position)."""
  cfg, mesh, dtype = m.config, m.mesh, m.dtype
  B, T = ids.shape
  S = cache[0][0].shape[1]
  x = jnp.take(m.embed[...], ids, axis=0).astype(dtype)
  x = constrain(x, mesh, ("batch", "seq", "act_embed"))
  cos, sin = rope_tables(cfg, positions)
  allowed = jnp.arange(S)[None, None, :] <= positions[:, :, None]  # [B, T, S]
  rows = jnp.broadcast_to(jnp.arange(B)[:, None], (B, T))
  new_cache = []
  for i in range(cfg.num_layers):
    p = layers[i] if isinstance(layers, list) else jax.tree.map(lambda a, i=i: a[i], layers)
    x, kv = _layer(m, p, x, cos, sin, allowed, cache[i], rows, positions)
    new_cache.append(kv)
  return rms_norm(x, m.final_norm[...], cfg.rms_norm_eps), new_cache


def _layer(m: Decoder, p, x, cos, sin, allowed, kv, rows, slots):
  """One decoder layer (the model's `_make_layer_step` with a per-layer cache)."""
  cfg, mesh, dtype = m.config, m.mesh, m.dtype
  B, T, _ = x.shape
  K, G, hd = cfg.num_kv_heads, cfg.num_heads // cfg.num_kv_heads, cfg.head_dim
  h = rms_norm(x, p["attn_norm"], cfg.rms_norm_eps)
  q = _dense(h, p["q_proj"], dtype).reshape(B, T, K * G, hd)
  k = _dense(h, p["k_proj"], dtype).reshape(B, T, K, hd)
  v = _dense(h, p["v_proj"], dtype).reshape(B, T, K, hd)
  if cfg.qk_norm:
    q = rms_norm(q, p["q_norm"], cfg.rms_norm_eps)
    k = rms_norm(k, p["k_norm"], cfg.rms_norm_eps)
  q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
  q = constrain(q, mesh, ("batch", "seq", "act_heads", None))
  ck, cv = kv
  ck = constrain(ck.at[rows, slots].set(k.astype(ck.dtype)), mesh, CACHE_AXES)
  cv = constrain(cv.at[rows, slots].set(v.astype(cv.dtype)), mesh, CACHE_AXES)
  attn = attention(q.reshape(B, T, K, G, hd), ck.astype(dtype), cv.astype(dtype), allowed)
  attn = constrain(attn.reshape(B, T, K * G * hd), mesh, ("batch", "seq", "act_heads"))
  x = x + _dense(attn, p["o_proj"], dtype)
  x = constrain(x, mesh, ("batch", "seq", "act_embed"))

  h = rms_norm(x, p["mlp_norm"], cfg.rms_norm_eps)
  act = jax.nn.silu(_dense(h, p["gate_proj"], dtype)) * _dense(h, p["up_proj"], dtype)
  act = constrain(act, mesh, ("batch", "seq", "act_mlp"))
  x = x + _dense(act, p["down_proj"], dtype)
  return constrain(x, mesh, ("batch", "seq", "act_embed")), (ck, cv)
