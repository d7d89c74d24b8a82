"""Attention implementations, chosen by the `model.attention` config field.

  xla     today's plain grouped-query attention (`plain`): two batched matmuls and a softmax;
  cudnn   `jax.nn.dot_product_attention(implementation="cudnn")`: cuDNN flash attention (GPU,
          bfloat16/float16 only);
  splash  Pallas splash attention (`jax.experimental.pallas.ops.tpu.splash_attention`), a TPU
          flash-attention kernel with causal block skipping and segment ids (packing). It runs
          in Pallas interpret mode off TPU (slowly: the CPU tests use it to check parity);
  auto    cudnn on GPU with a 16-bit compute dtype, splash on TPU, xla otherwise (CPU).

`self_attend` makes `decoder_layer`'s attend function for training (keys are the queries' own
tokens) and `cache_attend` the sampler's (queries attend to a KV cache whose slot is the
position). Decoding one token per row over a long cache uses `decode_attention`, which visits the
cache `DECODE_BLOCK` slots at a time with an online softmax: it never holds more than one block
of scores and stops at the block of the longest row's last slot, on every backend.

Masks. `allowed [B, T, S]` says which keys a query sees. A query that sees no key (a pad token)
gets a finite output on every path, so no NaN reaches the gradients: the plain path's mask value
is finite, the cuDNN adapter opens such a row to every key, splash gives pad tokens a segment of
their own. The value differs between paths; pad rows' outputs are never read.
"""

from __future__ import annotations

import functools
import logging
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from lora_jax.sharding import logical_to_spec

log = logging.getLogger(__name__)

IMPLEMENTATIONS = ("auto", "xla", "cudnn", "splash")
DECODE_BLOCK = 512  # cache slots per block of `decode_attention`
# Caches up to this many slots are attended in one piece when decoding: blocks were no faster on
# CPU there (benchmarks/decode_attention.py, 0.5B, batch 1 and 8), and their scores are small.
DECODE_WHOLE_UP_TO = 2048
# Finite, so that a query with no key to attend to (a pad row) stays NaN-free.
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)
_SPLASH_BLOCKS = (512, 256, 128)  # splash tile sizes tried, largest first; sequences pad to 128
_CUDNN_DTYPES = ("bfloat16", "float16")


class AttentionError(ValueError):
  """An attention implementation that cannot run this model or backend."""


def resolve(name: str, dtype, platform: str | None = None) -> str:
  """The implementation `name` stands for on `platform` (default: JAX's backend): "auto" picks
  cudnn on GPU (16-bit compute), splash on TPU, xla elsewhere."""
  if name not in IMPLEMENTATIONS:
    raise AttentionError(f"attention={name!r}; expected one of {', '.join(IMPLEMENTATIONS)}")
  platform = platform or jax.default_backend()
  if name == "auto":
    if platform == "gpu" and jnp.dtype(dtype).name in _CUDNN_DTYPES:
      return "cudnn"
    return "splash" if platform == "tpu" else "xla"
  if name == "cudnn" and jnp.dtype(dtype).name not in _CUDNN_DTYPES:
    raise AttentionError(
      f"attention='cudnn' needs a bfloat16 or float16 compute dtype, not {jnp.dtype(dtype).name}"
    )
  return name


def allowed_mask(positions, segment_ids):
  """[B, T, T]: a query sees keys of its own (non-pad, > 0) segment at positions <= its own."""
  same = segment_ids[:, None, :] == segment_ids[:, :, None]
  return same & (segment_ids[:, None, :] > 0) & (positions[:, None, :] <= positions[:, :, None])


# ---- the entry points ---------------------------------------------------------------------------
def self_attend(name: str, dtype, positions, segment_ids, mesh=None):
  """Training's attention as `decoder_layer`'s attend function (q [B,T,K,G,hd], k/v [B,T,K,hd]
  of the same tokens -> [B,T,K,G,hd]): a token sees earlier-or-equal positions of its own segment
  (segment 0 = padding). The mask is built once here, outside the layer scan.

  splash masks by index (causal) and segment, which equals the positions' mask when positions
  increase along each segment (default positions, packing, left or right padding)."""
  impl = resolve(name, dtype, _platform(mesh))
  if impl == "splash":
    return lambda q, k, v: splash(q, k, v, segment_ids, mesh)
  allowed = allowed_mask(positions, segment_ids)
  if impl == "cudnn":
    return lambda q, k, v: dot_product(q, k, v, allowed, "cudnn", causal=True)
  return lambda q, k, v: plain(q, k, v, allowed)


def cache_attend(name: str, dtype, positions, cache_len: int, mesh=None):
  """The sampler's attention over a KV cache k/v [B,S,K,hd] whose slot is the position, as a
  function (q, k, v) -> out: a query at `positions` p sees slots <= p. Decoding (one query per
  row, memory-bound) takes `decode_attention` over a cache longer than `DECODE_WHOLE_UP_TO` and
  the plain path over a shorter one, on every backend. Prefill chunks use the configured
  implementation with the slot mask (splash, whose masks are static, falls back to xla there)."""
  decoding = positions.shape[1] == 1
  if decoding and cache_len > DECODE_WHOLE_UP_TO:
    return lambda q, k, v: decode_attention(q, k, v, positions)
  allowed = jnp.arange(cache_len)[None, None, :] <= positions[:, :, None]
  if not decoding and resolve(name, dtype, _platform(mesh)) == "cudnn":
    return lambda q, k, v: dot_product(q, k, v, allowed, "cudnn")
  return lambda q, k, v: plain(q, k, v, allowed)


def _platform(mesh) -> str:
  return mesh.devices.flat[0].platform if mesh is not None else jax.default_backend()


# ---- xla ----------------------------------------------------------------------------------------
def plain(q, k, v, allowed):
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
  scores = jnp.where(allowed[:, None, None, :, :], scores, MASK_VALUE)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype).reshape(B * K, G * T, S)
  out = jnp.einsum("nqs,nsh->nqh", probs, vh).reshape(B, K, G, T, H)
  return out.transpose(0, 3, 1, 2, 4)


# ---- cudnn (and its xla twin, the CPU cross-check) ----------------------------------------------
def dot_product(q, k, v, allowed, implementation: str, causal: bool = False):
  """`jax.nn.dot_product_attention` in our layout: q [B,T,K,G,hd] is its [B,T,N,hd] with N = K*G
  kv-head-major (its GQA grouping), the mask [B,1,T,S]. `causal` (keys are the queries' tokens)
  lets cuDNN skip the blocks above the diagonal. A query row with no allowed key is opened to
  every key: a finite output, where cuDNN's large negative bias would be its only input."""
  B, T, K, G, H = q.shape
  mask = allowed | ~jnp.any(allowed, axis=-1, keepdims=True)
  out = jax.nn.dot_product_attention(
    q.reshape(B, T, K * G, H),
    k.astype(q.dtype),
    v.astype(q.dtype),
    mask=mask[:, None],
    is_causal=causal,
    implementation=implementation,
  )
  return out.reshape(B, T, K, G, H)


# ---- splash (TPU; Pallas interpret mode elsewhere) ----------------------------------------------
def splash(q, k, v, segment_ids, mesh=None):
  """Causal self-attention by Pallas splash attention: q [B,T,K,G,hd], k/v [B,T,K,hd],
  segment_ids [B,T] (a token sees earlier tokens of its own segment; 0 = padding, which then
  sees only padding). T is padded to a multiple of 128 (the padding gets segment -1). With a
  mesh the kernel runs per shard (`shard_map`: batch over data/fsdp, heads over tensor)."""
  B, T, K, G, H = q.shape
  Tp = -(-T // 128) * 128
  qh = (q * jnp.asarray(1.0 / math.sqrt(H), q.dtype)).reshape(B, T, K * G, H)
  qh, kh, vh = (jnp.pad(x, ((0, 0), (0, Tp - T), (0, 0), (0, 0))) for x in (qh, k, v))
  qh, kh, vh = (x.transpose(0, 2, 1, 3) for x in (qh, kh, vh))  # [B, heads, Tp, H]
  seg = jnp.pad(segment_ids.astype(jnp.int32), ((0, 0), (0, Tp - T)), constant_values=-1)
  interpret = _platform(mesh) != "tpu"
  run = lambda q_, k_, v_, s_: _splash_local(q_, k_, v_, s_, interpret)
  if mesh is not None and mesh.size > 1:
    run = _shard_per_device(run, mesh, B, K * G, K)
  out = run(qh, kh, vh.astype(qh.dtype), seg)  # [B, N, Tp, H]
  return out.transpose(0, 2, 1, 3)[:, :T].reshape(B, T, K, G, H)


def _splash_local(q, k, v, seg, interpret: bool):
  """The kernel over one device's rows and heads: q [b, n, Tp, H], k/v [b, kv, Tp, H]."""
  from jax.experimental.pallas.ops.tpu import splash_attention as sa

  kernel = _splash_kernel(q.shape[1], q.shape[2], interpret)
  return jax.vmap(kernel)(q, k.astype(q.dtype), v, sa.SegmentIds(q=seg, kv=seg))


@functools.lru_cache(maxsize=32)
def _splash_kernel(heads: int, length: int, interpret: bool):
  from jax.experimental.pallas.ops.tpu import splash_attention as sa

  block = next(b for b in _SPLASH_BLOCKS if length % b == 0)
  sizes = sa.BlockSizes(
    block_q=block,
    block_kv=block,
    block_kv_compute=block,
    block_q_dkv=block,
    block_kv_dkv=block,
    block_kv_dkv_compute=block,
    block_q_dq=block,
    block_kv_dq=block,
  )
  mask = sa.MultiHeadMask([sa.CausalMask((length, length))] * heads)
  return sa.make_splash_mha(
    mask, head_shards=1, q_seq_shards=1, block_sizes=sizes, interpret=interpret
  )


def _shard_per_device(run, mesh, batch: int, heads: int, kv_heads: int):
  """`run` under shard_map: rows split like the activations' batch axis, heads over tensor when
  both the query and the kv heads divide (else every device runs all heads of its rows)."""
  rows = logical_to_spec(("batch",), (batch,), mesh)[0]
  tensor = mesh.shape.get("tensor", 1)
  head = "tensor" if tensor > 1 and heads % tensor == 0 and kv_heads % tensor == 0 else None
  spec = P(rows, head, None, None)
  return jax.shard_map(
    run, mesh=mesh, in_specs=(spec, spec, spec, P(rows, None)), out_specs=spec, check_vma=False
  )


# ---- blocked decode -----------------------------------------------------------------------------
def decode_attention(q, k, v, positions, block: int | None = None):
  """Attention of a few queries per row over a KV cache, `block` slots at a time (flash-decoding's
  online softmax): q [B,T,K,G,hd] at `positions` [B,T], k/v [B,S,K,hd]; a query at position p
  sees slots <= p. Holds one block of scores [B,K,G*T,block] (`block`: DECODE_BLOCK unless
  given); blocks past the longest row's position are not visited. A cache length that is not a
  multiple of `block` ends with a block shifted back to end at S, its already-visited slots
  masked. Equals `plain` with the slot mask (up to float rounding) for every query that sees a
  slot."""
  B, T, K, G, H = q.shape
  S = k.shape[1]
  block = min(block or DECODE_BLOCK, S)
  qh = q.transpose(0, 2, 3, 1, 4).reshape(B, K, G * T, H)
  scale = 1.0 / math.sqrt(H)
  query_pos = jnp.broadcast_to(positions[:, None, :], (B, G, T)).reshape(B, 1, G * T, 1)

  def visit(i, carry):
    top, total, acc = carry
    start = jnp.minimum(i * block, S - block)
    kb = jax.lax.dynamic_slice_in_dim(k, start, block, axis=1).astype(q.dtype)
    vb = jax.lax.dynamic_slice_in_dim(v, start, block, axis=1).astype(q.dtype)
    scores = jnp.einsum("bkqh,bskh->bkqs", qh, kb, preferred_element_type=jnp.float32) * scale
    slots = start + jnp.arange(block)
    seen = (slots >= i * block) & (slots <= query_pos)  # [B, 1, G*T, block]
    scores = jnp.where(seen, scores, MASK_VALUE)
    new_top = jnp.maximum(top, scores.max(axis=-1))
    fix = jnp.exp(top - new_top)
    probs = jnp.where(seen, jnp.exp(scores - new_top[..., None]), 0.0)
    total = total * fix + probs.sum(axis=-1)
    part = jnp.einsum(
      "bkqs,bskh->bkqh", probs.astype(q.dtype), vb, preferred_element_type=jnp.float32
    )
    return new_top, total, acc * fix[..., None] + part

  init = (
    jnp.full((B, K, G * T), MASK_VALUE, jnp.float32),
    jnp.zeros((B, K, G * T), jnp.float32),
    jnp.zeros((B, K, G * T, H), jnp.float32),
  )
  blocks = (jnp.clip(jnp.max(positions), 0, S - 1) + block) // block
  _, total, acc = jax.lax.fori_loop(0, blocks, visit, init)
  out = (acc / jnp.where(total > 0, total, 1.0)[..., None]).astype(q.dtype)
  return out.reshape(B, K, G, T, H).transpose(0, 3, 1, 2, 4)
