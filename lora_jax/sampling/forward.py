"""The decoder's forward pass as the sampler runs it: layers unrolled, one KV cache per layer.

`Decoder.hidden` scans over stacked layer params; inside XLA:CPU's while loop each layer's weight
slice is copied before its matmul, which triples the memory traffic of a decode step (weight reads
are what a decode step costs). The sampler therefore unrolls the layers and, on CPU, hands each
layer its own arrays (`layer_params(unstack=True)`, a one-off copy). Each layer is the model's own
`decoder_layer`; what the sampler passes in is where keys and values go (`_attend_with_cache`)
and, for few rows on CPU, the weight-major layout of `dense` and `Decoder.logits`.

Cache layout: a token's cache slot is its position, so a row holds its sequence in slots
0..length-1 and a query at position p attends to slots <= p. Slots past a row's length hold stale
or padding values that no query can reach.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from lora_jax.attention import cache_attend
from lora_jax.model import Decoder, decoder_layer, dense, rope_tables
from lora_jax.sharding import constrain, named_sharding

CACHE_AXES = ("batch", "cache_seq", "kv_heads", "head_dim")
WEIGHT_MAJOR_ROWS = 64  # up to this many rows (batch x tokens), use the weight-major gemm


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


def weight_major(rows: int) -> bool:
  """Whether `rows` tokens at once are few enough for the weight-major gemm (CPU only)."""
  return rows <= WEIGHT_MAJOR_ROWS and jax.devices()[0].platform == "cpu"


def logits(m: Decoder, hidden):
  """`Decoder.logits` in the layout `weight_major` picks for these rows."""
  B, T, _ = hidden.shape
  return m.logits(hidden, weight_major=weight_major(B * T))


def forward(m: Decoder, layers, ids, positions, cache):
  """ids, positions [B, T] -> final normed hidden [B, T, D] and the cache with these tokens'
  keys and values written at slots `positions` (each query attends to slots <= its position)."""
  B, T = ids.shape
  S = cache[0][0].shape[1]
  layout = weight_major(B * T)
  project = lambda x, p, name: dense(x, p, m.dtype, weight_major=layout)
  rope = rope_tables(m.config, positions)
  attention = cache_attend(m.attention, m.dtype, positions, S, m.mesh)
  rows = jnp.broadcast_to(jnp.arange(B)[:, None], (B, T))
  x = m.embed_tokens(ids)
  new = []
  for i in range(m.config.num_layers):
    p = layers[i] if isinstance(layers, list) else jax.tree.map(lambda a, i=i: a[i], layers)
    attend = lambda q, k, v, kv=cache[i]: _attend_with_cache(
      m, kv, rows, positions, attention, q, k, v
    )
    x, kv = decoder_layer(m.config, m.mesh, p, x, rope, project, attend)
    new.append(kv)
  return m.final_normed(x), new


def _attend_with_cache(m: Decoder, kv, rows, slots, attention, q, k, v):
  """Write k, v [B, T, K, hd] into one layer's cache at (rows, slots), then attend over it
  (`attention.cache_attend`: blocked over the cache when decoding one token per row)."""
  ck, cv = kv
  ck = constrain(ck.at[rows, slots].set(k.astype(ck.dtype)), m.mesh, CACHE_AXES)
  cv = constrain(cv.at[rows, slots].set(v.astype(cv.dtype)), m.mesh, CACHE_AXES)
  return attention(q, ck.astype(m.dtype), cv.astype(m.dtype)), (ck, cv)
