"""Next-token choice from logits: greedy, temperature, top-k, top-p, min-p (per row, on device).

Filters are applied in Hugging Face's order (temperature, top-k, top-p, min-p) and each keeps the
most probable tokens, so together they are one threshold per row: keep the tokens whose
probability is >= tau. Sorting the vocabulary is what makes top-p slow on CPU (a full sort of
152k floats costs ~50 ms a row), so thresholds come from `lax.top_k` over a few hundred candidates,
and only when the kept set is larger than that (a flat distribution) from a bisection over the
probabilities' bit patterns. Ties at a threshold are all kept (as HF's top-k does).

Sampling is inverse-CDF with one uniform per row, in two levels (blocks of the vocabulary, then
tokens inside the chosen block), so it needs no vocabulary-sized cumsum or Gumbel noise. A row's
randomness comes only from its own key, so a request's tokens do not depend on its neighbours.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

CANDIDATES = 256  # top-k candidates inspected before falling back to bisection
_BLOCK = 1024  # vocabulary block for two-level sampling


def choose(logits, keys, temperature, top_k, top_p, min_p):
  """Next token per row. logits [B, V] f32; keys [B] typed PRNG keys; temperature/top_p/min_p
  [B] f32 and top_k [B] int32 (0 = off). temperature 0 means greedy (argmax, as HF)."""
  greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

  def stochastic(_):
    probs = jax.nn.softmax(logits / jnp.where(temperature > 0, temperature, 1.0)[:, None], -1)
    tau = keep_threshold(probs, top_k, top_p, min_p)
    u = jax.vmap(lambda k: jax.random.uniform(k, (), jnp.float32))(keys)
    sampled = _inverse_cdf(jnp.where(probs >= tau[:, None], probs, 0.0), u)
    return jnp.where(temperature > 0, sampled, greedy)

  return jax.lax.cond(jnp.all(temperature <= 0), lambda _: greedy, stochastic, None)


def keep_threshold(probs, top_k, top_p, min_p):
  """tau [B]: the tokens with probs >= tau survive top-k, then top-p (on the renormalised
  top-k set), then min-p. probs [B, V] sum to 1 per row."""
  filtered = (top_k > 0) | (top_p < 1.0) | (min_p > 0.0)
  return jax.lax.cond(
    jnp.any(filtered), _threshold, lambda *a: jnp.zeros(probs.shape[:1]), probs, top_k, top_p, min_p
  )


def _threshold(probs, top_k, top_p, min_p):
  B, V = probs.shape
  kc = min(CANDIDATES, V)
  cand = jax.lax.top_k(probs, kc)[0]  # [B, kc], descending
  rows = jnp.arange(B)

  # top-k: the k-th largest probability; beyond the candidates, bisect on the count.
  k_in = (top_k > 0) & (top_k <= kc)
  k_far = (top_k > kc) & (top_k < V)
  tau_k = jnp.where(k_in, cand[rows, jnp.clip(top_k - 1, 0, kc - 1)], 0.0)
  tau_k = jax.lax.cond(
    jnp.any(k_far),
    lambda t: jnp.where(k_far, _bisect(probs, jnp.ones_like(probs), top_k.astype(jnp.float32)), t),
    lambda t: t,
    tau_k,
  )

  # top-p on the top-k set: the smallest prefix (by probability) whose mass reaches top_p.
  mass_k = jnp.sum(jnp.where(probs >= tau_k[:, None], probs, 0.0), -1)
  target = top_p * mass_k
  cum = jnp.cumsum(jnp.where(cand >= tau_k[:, None], cand, 0.0), -1)
  first = jnp.sum(cum < target[:, None], -1)  # index of the token that reaches top_p
  use_p = top_p < 1.0
  p_far = use_p & (first >= kc)
  tau_p = jnp.where(use_p & ~p_far, cand[rows, jnp.clip(first, 0, kc - 1)], 0.0)
  tau_p = jax.lax.cond(
    jnp.any(p_far),
    lambda t: jnp.where(
      p_far, _bisect(probs, jnp.where(probs >= tau_k[:, None], probs, 0.0), target), t
    ),
    lambda t: t,
    tau_p,
  )

  # min-p: relative to the most probable token, which every filter above keeps.
  tau_m = min_p * cand[:, 0]
  return jnp.maximum(jnp.maximum(tau_k, tau_p), tau_m)


def _bisect(probs, weight, target):
  """Per row, the largest tau with sum(weight[probs >= tau]) >= target, searched over the bit
  patterns of non-negative floats (which order like the floats); 31 passes over the vocab."""
  bits = jax.lax.bitcast_convert_type

  def body(_, lo_hi):
    lo, hi = lo_hi
    mid = lo + (hi - lo) // 2
    tau = bits(mid, jnp.float32)
    ok = jnp.sum(jnp.where(probs >= tau[:, None], weight, 0.0), -1) >= target
    return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

  B = probs.shape[0]
  lo = jnp.zeros((B,), jnp.int32)  # tau = 0 keeps everything
  hi = bits(jnp.max(probs, -1), jnp.int32) + 1
  lo, _ = jax.lax.fori_loop(0, 31, body, (lo, hi))
  return bits(lo, jnp.float32)


def _inverse_cdf(weights, u):
  """Token index per row drawn with probability proportional to weights [B, V] (>= 0)."""
  B, V = weights.shape
  nb = -(-V // _BLOCK)
  w = jnp.pad(weights, ((0, 0), (0, nb * _BLOCK - V))).reshape(B, nb, _BLOCK)
  block_mass = jnp.sum(w, -1)  # [B, nb]
  block_cum = jnp.cumsum(block_mass, -1)
  target = u * block_cum[:, -1]
  # Never land on an empty block or token, even when rounding puts the target at the very end.
  last_block = nb - 1 - jnp.argmax((block_mass > 0)[:, ::-1], -1)
  block = jnp.minimum(jnp.sum(block_cum <= target[:, None], -1), last_block)
  rows = jnp.arange(B)
  before = jnp.where(block > 0, block_cum[rows, jnp.maximum(block - 1, 0)], 0.0)
  inner = w[rows, block]  # [B, _BLOCK]
  inner_cum = before[:, None] + jnp.cumsum(inner, -1)
  last_tok = _BLOCK - 1 - jnp.argmax((inner > 0)[:, ::-1], -1)
  tok = jnp.minimum(jnp.sum(inner_cum <= target[:, None], -1), last_tok)
  return (block * _BLOCK + tok).astype(jnp.int32)
