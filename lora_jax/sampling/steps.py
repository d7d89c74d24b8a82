"""The sampler's compiled steps: prefill, insert, first tokens, decode (and the cache's resizing).

Each is a `jax.jit` function of the split model (`graphdef` static, its state an argument), the
layer params `forward` reads, the cache and a few per-row numbers; the engine (`engine.py`) calls
them from its host loop. The cache is donated from call to call.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from lora_jax.sampling.forward import cache_sharding, forward, logits, new_cache
from lora_jax.sampling.processors import choose

SAMPLING_FIELDS = ("temperature", "top_k", "top_p", "min_p")  # per-row arrays `choose` takes


@functools.cache
def key_shape() -> tuple[int, ...]:
  return jax.random.key_data(jax.random.key(0)).shape


@functools.lru_cache(maxsize=1 << 16)
def request_key(seed: int, index: int, sample: int) -> np.ndarray:
  """The key of answer (index, sample) under `seed`: independent of batching and order."""
  return np.asarray(_request_key(np.uint32(seed), np.int32(index), np.int32(sample)))


@jax.jit
def _request_key(seed, index, sample):
  key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), index), sample)
  return jax.random.key_data(key)


def _token_keys(key_data, token_number):
  """Per-row key for the row's token number `token_number`."""
  fold = lambda k, n: jax.random.fold_in(jax.random.wrap_key_data(k), n)
  return jax.vmap(fold)(key_data, token_number)


def _replicated(x, mesh):
  if mesh is None:
    return x
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P()))


def _constrain_cache(c, mesh):
  return c if mesh is None else jax.lax.with_sharding_constraint(c, cache_sharding(mesh, c.shape))


def _pick(next_logits, keys, sampling, greedy: bool):
  """`choose`, or only its argmax when every row is greedy (much less to compile)."""
  if greedy:
    return jnp.argmax(next_logits, axis=-1).astype(jnp.int32)
  return choose(next_logits, keys, **sampling)


@functools.partial(jax.jit, static_argnames=("graphdef", "batch", "length"))
def empty_cache(graphdef, model_state, batch, length):
  return new_cache(nnx.merge(graphdef, model_state), batch, length)


@functools.partial(jax.jit, static_argnames=("mesh", "length"))
def resize(mesh, cache, length):
  """The cache with `length` slots per row: zero-padded or cut at the end."""

  def one(c):
    current = c.shape[1]
    if length > current:
      c = jnp.pad(c, ((0, 0), (0, length - current), (0, 0), (0, 0)))
    return _constrain_cache(c[:, :length], mesh)

  return jax.tree.map(one, cache)


@functools.partial(jax.jit, static_argnames=("graphdef", "chunk"))
def prefill(graphdef, model_state, layers, ids, lengths, *, chunk):
  """Right-padded prompts ids [n, T] -> their own cache [n, T] and the logits after each prompt's
  last token [n, V]. The prompts run `chunk` tokens at a time (bounding the attention scores)."""
  m = nnx.merge(graphdef, model_state)
  n, T = ids.shape
  prompt_rows = jnp.arange(n)

  def run_chunk(index, carry):
    cache, last = carry
    start = index * chunk
    piece = jax.lax.dynamic_slice_in_dim(ids, start, chunk, axis=1)
    positions = jnp.broadcast_to(start + jnp.arange(chunk, dtype=jnp.int32), (n, chunk))
    hidden, cache = forward(m, layers, piece, positions, cache)
    at = lengths - 1 - start  # where each prompt's last token is in this chunk
    here = (at >= 0) & (at < chunk)
    last = jnp.where(here[:, None], hidden[prompt_rows, jnp.clip(at, 0, chunk - 1)], last)
    return cache, last

  carry = (new_cache(m, n, T), jnp.zeros((n, m.config.hidden_size), m.dtype))
  if T == chunk:
    cache, last = run_chunk(0, carry)
  else:
    cache, last = jax.lax.fori_loop(0, T // chunk, run_chunk, carry)
  return cache, logits(m, last[:, None])[:, 0]


@functools.partial(jax.jit, static_argnames=("mesh",), donate_argnames=("cache",))
def insert(mesh, cache, prompt_cache, rows, sources):
  """Copy prefilled prompts `prompt_cache[sources]` into cache rows `rows` (rows past the cache
  are dropped: that is how padding entries are ignored)."""
  # a prompt bucket may be longer than the cache (max_len); the prompts themselves are not
  T = min(prompt_cache[0][0].shape[1], cache[0][0].shape[1])

  def put(c, prompt):
    c = c.at[rows, :T].set(prompt[sources, :T].astype(c.dtype), mode="drop")
    return _constrain_cache(c, mesh)

  return jax.tree.map(put, cache, prompt_cache)


@functools.partial(jax.jit, static_argnames=("mesh", "greedy"))
def first_tokens(mesh, prompt_logits, sources, keys, sampling, *, greedy):
  """Each new row's first token (token number 0 of its key), from its prompt's logits."""
  keys = _token_keys(keys, jnp.zeros_like(sources))
  return _replicated(_pick(prompt_logits[sources], keys, sampling, greedy), mesh)


@functools.partial(
  jax.jit, static_argnames=("graphdef", "steps", "greedy"), donate_argnames=("cache",)
)
def decode(
  graphdef, model_state, layers, cache, row_state, stop_ids, exit_on_finish, *, steps, greedy
):
  """Up to `steps` tokens for every active row, in one `while_loop`. row_state: per-row arrays
  (`tok` the last token, not yet in the cache; `pos` its position; `gen` tokens generated;
  `max_new`; `active`; `key`; the sampling fields). Stops early when a row finishes and
  `exit_on_finish` (requests are waiting for its row). Returns the cache, the new tokens
  [B, steps] (-1 where a row produced none) and the number of steps run."""
  m = nnx.merge(graphdef, model_state)
  batch = row_state["tok"].shape[0]
  sampling = {k: row_state[k] for k in SAMPLING_FIELDS}

  def go_on(carry):
    step, _, rows, _, any_finished = carry
    return (step < steps) & jnp.any(rows["active"]) & ~(exit_on_finish & any_finished)

  def one_token(carry):
    step, cache, rows, out, any_finished = carry
    hidden, cache = forward(m, layers, rows["tok"][:, None], rows["pos"][:, None], cache)
    keys = _token_keys(rows["key"], rows["gen"])
    tok = _pick(logits(m, hidden)[:, 0], keys, sampling, greedy)
    active = rows["active"]
    out = out.at[:, step].set(jnp.where(active, tok, -1))
    generated = rows["gen"] + active
    stopped = jnp.any(tok[:, None] == stop_ids[None, :], -1) | (generated >= rows["max_new"])
    finished = active & stopped
    rows = {
      **rows,
      "tok": jnp.where(active, tok, rows["tok"]),
      "pos": rows["pos"] + active,
      "gen": generated,
      "active": active & ~finished,
    }
    return step + 1, cache, rows, out, any_finished | jnp.any(finished)

  out = jnp.full((batch, steps), -1, jnp.int32)
  init = (jnp.int32(0), cache, row_state, out, jnp.bool_(False))
  steps_run, cache, _, out, _ = jax.lax.while_loop(go_on, one_token, init)
  return cache, _replicated(out, m.mesh), _replicated(steps_run, m.mesh)
