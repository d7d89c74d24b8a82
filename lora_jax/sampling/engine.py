"""Continuous-batching generation over a KV cache: jit-compiled prefill and multi-step decode.

The cache has `batch` rows; each row holds one answer in progress. The host loop:
  1. refill: waiting requests are prefilled (right-padded to a length bucket, one compile per
     bucket; samples of one prompt share one prefill) and inserted into free rows, whose first
     token is sampled on the spot;
  2. decode: one jitted `while_loop` runs up to `steps` tokens for every row without returning to
     Python, and stops early once a row finishes while requests are waiting, so a finished row is
     refilled at once instead of idling until the batch's longest answer ends;
  3. finished answers (stop token, stop string, or length) are yielded and their rows freed.
The cache's length follows the longest live row in buckets (grown and shrunk between rounds), so
attention reads the live part of the cache, not max_len. Host state per row is a few numbers,
sent with every round; only the cache is carried (donated) from call to call.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import logging
import time
from collections.abc import Iterable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from lora_jax.model import Decoder
from lora_jax.sampling.forward import cache_sharding, forward, layer_params, logits, new_cache
from lora_jax.sampling.memory import SamplingError, plan_batch
from lora_jax.sampling.processors import choose
from lora_jax.sampling.stops import StopStrings

log = logging.getLogger(__name__)
_PREFILL_SCORES_BYTES = 256 << 20  # prefill attention scores per chunk; longer prompts are chunked
_LOG_EVERY_S = 30.0


@dataclasses.dataclass
class Request:
  """One answer to generate. `index`/`sample` name it in the result and seed its randomness."""

  prompt: Sequence[int]
  max_new_tokens: int
  index: int = 0
  sample: int = 0
  temperature: float = 0.0
  top_p: float = 1.0
  top_k: int = 0
  min_p: float = 0.0
  seed: int = 0
  stops: StopStrings | None = None  # stop strings (needs text; see text.py)


@dataclasses.dataclass
class Completion:
  index: int
  sample: int
  token_ids: list[int]  # the answer, including the stop token or the token completing a stop string
  finish_reason: str  # "stop" | "length"
  num_prompt_tokens: int
  stop_reason: int | str | None = None  # the stop token id or stop string that ended it


def bucket(n: int, lo: int = 16) -> int:
  """Smallest of lo * {1, 1.5, 2, 3, 4, 6, ...} (powers of two and their 1.5x) >= n: few
  compilations, at most 50% padding."""
  size = lo
  while size < n:
    size = size * 3 // 2 if (size & (size - 1)) == 0 else size * 4 // 3
  return size


def _pow2(n: int) -> int:
  return 1 << max(0, (n - 1).bit_length())


class Engine:
  """Generates answers for a stream of requests with continuous batching.

  max_batch: cache rows (int, or "auto": as many as fit the memory budget, up to the number of
  requests). max_len: cache slots per row (prompt + answer); answers stop at it with "length".
  steps: decode steps per host round trip. unstack: give each layer its own weight arrays (a
  copy; default on CPU, where it makes decode ~2.5x faster).
  """

  def __init__(
    self,
    model: Decoder,
    *,
    max_len: int,
    max_batch: int | str = 8,
    stop_token_ids: Iterable[int] = (),
    steps: int = 32,
    unstack: bool | None = None,
    max_cache_gb: float | None = None,
    want_batch: int | None = None,
  ):
    self.model = model
    self.cfg = model.config
    self.mesh = model.mesh
    self.max_len = int(max_len)
    self.steps = int(steps)
    self.graphdef, self.state = nnx.split(model)
    self.cap_max = -(-self.max_len // 64) * 64  # the cache never grows past this
    plan = functools.partial(
      plan_batch,
      self.cfg,
      max_batch,
      self.cap_max,
      model.dtype,
      mesh=self.mesh,
      max_cache_gb=max_cache_gb,
      want=want_batch or 256,
    )
    stacked = nnx.to_pure_dict(nnx.state(model.layers))
    copies = sum(s.data.nbytes for a in jax.tree.leaves(stacked) for s in a.addressable_shards)
    auto = unstack is None
    unstack = jax.devices()[0].platform == "cpu" if auto else unstack
    try:
      self.batch = plan(extra_bytes=copies if unstack else 0)
    except SamplingError:
      if not (auto and unstack):
        raise
      log.info(
        "no room for per-layer weight copies (%.2f GiB): decoding from the stacked "
        "weights, more slowly",
        copies / (1 << 30),
      )
      unstack = False
      self.batch = plan(extra_bytes=0)
    self.layers = layer_params(model, unstack)
    ids = sorted(set(int(t) for t in stop_token_ids))
    self.stop_ids = np.full((max(1, _pow2(len(ids))),), -1, np.int32)
    self.stop_ids[: len(ids)] = ids
    self._stop_set = set(ids)
    self.cache = None
    self.stats = collections.Counter()

  # ---- public ----------------------------------------------------------------------------------
  def run(self, requests: Iterable[Request]) -> Iterator[Completion]:
    """Yields each answer as it finishes (not in request order)."""
    queue = collections.deque(requests)
    for r in queue:
      if len(r.prompt) == 0:
        raise SamplingError(f"prompt {r.index} is empty")
      if len(r.prompt) >= self.max_len:
        raise SamplingError(
          f"prompt {r.index} has {len(r.prompt)} tokens but the cache holds "
          f"{self.max_len} per sequence (max_len); raise max_len or shorten it"
        )
      if not all(0 <= t < self.cfg.vocab_size for t in r.prompt):
        bad = next(t for t in r.prompt if not 0 <= t < self.cfg.vocab_size)
        raise SamplingError(
          f"prompt {r.index} has token id {bad}, outside the vocabulary "
          f"(0..{self.cfg.vocab_size - 1})"
        )
    B = self.batch
    self._rows: list[_Row | None] = [None] * B
    self._host = _HostState(B)
    if self.cache is None:
      self.cache = self._commit(_new_cache(self.graphdef, self.state, B, 64))
    t0 = last_log = time.perf_counter()
    while queue or any(self._rows):
      free = [b for b in range(B) if self._rows[b] is None]
      if queue and free:
        yield from self._refill(free, queue)
      if not any(self._rows):
        continue
      yield from self._decode_round(exit_on_finish=bool(queue))
      if time.perf_counter() - last_log > _LOG_EVERY_S and jax.process_index() == 0:
        last_log = time.perf_counter()
        log.info(
          "sampling: %d answers done, %d waiting, %d in progress; %.1f tokens/s",
          self.stats["answers"],
          len(queue),
          sum(r is not None for r in self._rows),
          self.stats["decode_tokens"] / max(1e-9, last_log - t0),
        )

  # ---- refill ----------------------------------------------------------------------------------
  def _refill(self, free: list[int], queue) -> Iterator[Completion]:
    take = [queue.popleft() for _ in range(min(len(free), len(queue)))]
    groups: dict[int, list[Request]] = collections.defaultdict(list)
    for r in take:
      groups[bucket(len(r.prompt))].append(r)
    rows = iter(free)
    for tb, reqs in sorted(groups.items()):
      yield from self._prefill_group(tb, reqs, [next(rows) for _ in reqs])

  def _prefill_group(self, tb: int, reqs: list[Request], rows: list[int]):
    unique: dict[tuple, int] = {}
    src = [unique.setdefault(tuple(r.prompt), len(unique)) for r in reqs]
    prompts = list(unique)
    nu = _pow2(len(prompts))
    ids = np.zeros((nu, tb), np.int32)
    lens = np.ones((nu,), np.int32)
    for i, p in enumerate(prompts):
      ids[i, : len(p)] = p
      lens[i] = len(p)
    heads = self.cfg.num_heads
    chunk = tb
    while chunk % 2 == 0 and chunk > 64 and nu * heads * chunk * tb * 4 > _PREFILL_SCORES_BYTES:
      chunk //= 2
    tmp, logits = _prefill(
      self.graphdef, self.state, self.layers, self._put(ids), self._put(lens), chunk=chunk
    )
    self.stats["prefill_tokens"] += int(lens[: len(prompts)].sum())
    self.stats["prefill_calls"] += 1

    self._ensure_cache(max(tb, self._needed()))
    m = _pow2(len(reqs))
    row_arr = np.full((m,), self.batch, np.int32)  # padding rows point past the cache: dropped
    src_arr = np.zeros((m,), np.int32)
    row_arr[: len(rows)], src_arr[: len(rows)] = rows, src
    h = self._host
    for r, b in zip(reqs, rows):
      h.admit(b, r, min(r.max_new_tokens, self.max_len - len(r.prompt)))
    self.cache = _insert(self.mesh, self.cache, tmp, self._put(row_arr), self._put(src_arr))
    first = np.asarray(
      _first_tokens(
        self.mesh,
        logits,
        self._put(src_arr),
        self._put(h.key[np.minimum(row_arr, self.batch - 1)]),
        self._put(h.sampling(row_arr)),
        greedy=all(r.temperature <= 0 for r in reqs),
      )
    )
    for r, b, tok in zip(reqs, rows, first):
      self._rows[b] = _Row(r)
      h.tok[b], h.pos[b], h.gen[b], h.active[b] = tok, len(r.prompt), 1, True
      done = self._accept(
        b, [int(tok)], device_active=not (int(tok) in self._stop_set or h.max_new[b] <= 1)
      )
      if done is not None:
        yield done

  # ---- decode ----------------------------------------------------------------------------------
  def _decode_round(self, exit_on_finish: bool) -> list[Completion]:
    h = self._host
    self._ensure_cache(self._needed(), shrink=True)
    state = self._put(h.device_state())
    greedy = not np.any(h.temperature[h.active] > 0)
    self.cache, out, n = _decode(
      self.graphdef,
      self.state,
      self.layers,
      self.cache,
      state,
      self._put(self.stop_ids),
      self._put(np.bool_(exit_on_finish)),
      steps=self.steps,
      greedy=bool(greedy),
    )
    out, n = np.asarray(out), int(n)
    done = []
    for b, row in enumerate(self._rows):
      if row is None or not h.active[b]:
        continue
      toks = out[b, :n]
      toks = [int(t) for t in toks[toks >= 0]]
      h.tok[b], h.pos[b], h.gen[b] = toks[-1], h.pos[b] + len(toks), h.gen[b] + len(toks)
      finished = toks[-1] in self._stop_set or h.gen[b] >= h.max_new[b]
      self.stats["decode_tokens"] += len(toks)
      c = self._accept(b, toks, device_active=not finished)
      if c is not None:
        done.append(c)
    self.stats["decode_steps"] += n
    self.stats["decode_rounds"] += 1
    return done

  def _accept(self, b: int, toks: list[int], device_active: bool) -> Completion | None:
    """Append a row's new tokens; finish it on a stop token, stop string or its length."""
    row, h = self._rows[b], self._host
    row.ids.extend(toks)
    reason, stop = None, None
    if row.req.stops is not None:
      cut = row.req.stops.extend(toks)
      if cut is not None:
        del row.ids[cut:]
        reason, stop = "stop", row.req.stops.match
    if reason is None and not device_active:
      last = row.ids[-1]
      reason, stop = ("stop", last) if last in self._stop_set else ("length", None)
    if reason is None:
      return None
    self._rows[b] = None
    h.active[b] = False
    self.stats["answers"] += 1
    r = row.req
    return Completion(r.index, r.sample, row.ids, reason, len(r.prompt), stop)

  # ---- cache sizing ----------------------------------------------------------------------------
  def _needed(self) -> int:
    """Slots the next round may write: up to `steps` more tokens for each live row."""
    h = self._host
    live = [b for b in range(self.batch) if self._rows[b] is not None and h.active[b]]
    return max(
      [min(h.pos[b] + self.steps, h.prompt_len[b] + h.max_new[b] - 1) + 1 for b in live], default=1
    )

  def _ensure_cache(self, needed: int, shrink: bool = False) -> None:
    size = min(bucket(needed, 64), self.cap_max)
    current = self.cache[0][0].shape[1]
    if size > current or (shrink and size * 2 <= current):
      self.cache = self._commit(_resize(self.mesh, self.cache, size))
      self.stats["resizes"] += 1

  def _commit(self, cache):
    """Without a mesh, place the cache where the params are, so that the compiled functions see
    the same input placement on every call (an uncommitted first cache would compile twice)."""
    if self.mesh is not None:
      return cache
    return jax.device_put(cache, jax.tree.leaves(self.state)[0].sharding)

  def _put(self, tree):
    """Host numbers onto the devices, replicated (every process passes the same values)."""
    tree = jax.tree.map(np.asarray, tree)
    if self.mesh is None:
      return jax.device_put(tree)
    return jax.device_put(tree, NamedSharding(self.mesh, P()))


@dataclasses.dataclass
class _Row:
  req: Request
  ids: list[int] = dataclasses.field(default_factory=list)


class _HostState:
  """Per-row numbers the device needs, kept on the host and sent with each round."""

  def __init__(self, B: int):
    self.tok = np.zeros(B, np.int32)  # last sampled token (not yet in the cache)
    self.pos = np.zeros(B, np.int32)  # its position (= its cache slot)
    self.gen = np.zeros(B, np.int32)  # tokens generated so far
    self.max_new = np.ones(B, np.int32)
    self.prompt_len = np.zeros(B, np.int32)
    self.active = np.zeros(B, bool)
    self.temperature = np.zeros(B, np.float32)
    self.top_k = np.zeros(B, np.int32)
    self.top_p = np.ones(B, np.float32)
    self.min_p = np.zeros(B, np.float32)
    self.key = np.zeros((B,) + _key_shape(), np.uint32)

  def admit(self, b: int, r: Request, max_new: int) -> None:
    self.max_new[b], self.prompt_len[b] = max_new, len(r.prompt)
    self.temperature[b], self.top_k[b], self.top_p[b], self.min_p[b] = (
      r.temperature,
      r.top_k,
      r.top_p,
      r.min_p,
    )
    self.key[b] = request_key(r.seed, r.index, r.sample)

  def sampling(self, rows) -> dict:
    rows = np.minimum(rows, len(self.tok) - 1)
    return {
      "temperature": self.temperature[rows],
      "top_k": self.top_k[rows],
      "top_p": self.top_p[rows],
      "min_p": self.min_p[rows],
    }

  def device_state(self) -> dict:
    return {
      "tok": self.tok,
      "pos": self.pos,
      "gen": self.gen,
      "max_new": self.max_new,
      "active": self.active,
      "key": self.key,
      **self.sampling(np.arange(len(self.tok))),
    }


@functools.cache
def _key_shape() -> tuple[int, ...]:
  return jax.random.key_data(jax.random.key(0)).shape


@functools.lru_cache(maxsize=1 << 16)
def request_key(seed: int, index: int, sample: int) -> np.ndarray:
  """The key of answer (index, sample) under `seed`: independent of batching and order."""
  return np.asarray(_request_key(np.uint32(seed), np.int32(index), np.int32(sample)))


@jax.jit
def _request_key(seed, index, sample):
  key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), index), sample)
  return jax.random.key_data(key)


def _token_keys(key_data, gen):
  """Per-row key for the row's token number `gen`."""
  return jax.vmap(lambda k, g: jax.random.fold_in(jax.random.wrap_key_data(k), g))(key_data, gen)


def _replicated(x, mesh):
  if mesh is None:
    return x
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P()))


# ---- compiled functions --------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnames=("graphdef", "batch", "length"))
def _new_cache(graphdef, state, batch, length):
  return new_cache(nnx.merge(graphdef, state), batch, length)


@functools.partial(jax.jit, static_argnames=("mesh", "length"))
def _resize(mesh, cache, length):
  def one(c):
    cur = c.shape[1]
    c = jnp.pad(c, ((0, 0), (0, length - cur), (0, 0), (0, 0))) if length > cur else c[:, :length]
    return c if mesh is None else jax.lax.with_sharding_constraint(c, cache_sharding(mesh, c.shape))

  return jax.tree.map(one, cache)


@functools.partial(jax.jit, static_argnames=("graphdef", "chunk"))
def _prefill(graphdef, state, layers, ids, lens, *, chunk):
  """Right-padded prompts [n, T] -> their own cache [n, T] and the logits after each prompt."""
  m = nnx.merge(graphdef, state)
  n, T = ids.shape
  cache = new_cache(m, n, T)
  rows = jnp.arange(n)

  def run(c, carry):
    cache, last = carry
    start = c * chunk
    piece = jax.lax.dynamic_slice_in_dim(ids, start, chunk, axis=1)
    positions = jnp.broadcast_to(start + jnp.arange(chunk, dtype=jnp.int32), (n, chunk))
    hidden, cache = forward(m, layers, piece, positions, cache)
    at = lens - 1 - start  # where each prompt's last token is in this chunk
    here = (at >= 0) & (at < chunk)
    last = jnp.where(here[:, None], hidden[rows, jnp.clip(at, 0, chunk - 1)], last)
    return cache, last

  last = jnp.zeros((n, m.config.hidden_size), m.dtype)
  if T == chunk:
    cache, last = run(0, (cache, last))
  else:
    cache, last = jax.lax.fori_loop(0, T // chunk, run, (cache, last))
  return cache, logits(m, last[:, None])[:, 0]


@functools.partial(jax.jit, static_argnames=("mesh",), donate_argnames=("cache",))
def _insert(mesh, cache, tmp, rows, src):
  """Copy prefilled prompts `tmp[src]` into cache rows `rows` (rows past the cache are dropped)."""
  T = min(tmp[0][0].shape[1], cache[0][0].shape[1])  # a bucket may pass max_len; prompts do not

  def put(c, t):
    c = c.at[rows, :T].set(t[src, :T].astype(c.dtype), mode="drop")
    return c if mesh is None else jax.lax.with_sharding_constraint(c, cache_sharding(mesh, c.shape))

  return jax.tree.map(put, cache, tmp)


def _pick(logits, keys, sampling, greedy: bool):
  """`choose`, or only its argmax when every row is greedy (much less to compile)."""
  if greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  return choose(logits, keys, **sampling)


@functools.partial(jax.jit, static_argnames=("mesh", "greedy"))
def _first_tokens(mesh, logits, src, keys, sampling, *, greedy):
  """Each new row's first token (token number 0 of its key), from its prompt's logits."""
  keys = _token_keys(keys, jnp.zeros_like(src))
  return _replicated(_pick(logits[src], keys, sampling, greedy), mesh)


@functools.partial(
  jax.jit, static_argnames=("graphdef", "steps", "greedy"), donate_argnames=("cache",)
)
def _decode(graphdef, state, layers, cache, st, stop_ids, exit_on_finish, *, steps, greedy):
  """Up to `steps` tokens for every active row. Returns the cache, the new tokens [B, steps]
  (-1 where a row produced none) and the number of steps run."""
  m = nnx.merge(graphdef, state)
  B = st["tok"].shape[0]
  sampling = {k: st[k] for k in ("temperature", "top_k", "top_p", "min_p")}

  def cond(c):
    i, _, s, _, any_done = c
    return (i < steps) & jnp.any(s["active"]) & ~(exit_on_finish & any_done)

  def body(c):
    i, cache, s, out, any_done = c
    hidden, cache = forward(m, layers, s["tok"][:, None], s["pos"][:, None], cache)
    tok = _pick(logits(m, hidden)[:, 0], _token_keys(s["key"], s["gen"]), sampling, greedy)
    act = s["active"]
    out = out.at[:, i].set(jnp.where(act, tok, -1))
    gen = s["gen"] + act
    done = act & (jnp.any(tok[:, None] == stop_ids[None, :], -1) | (gen >= s["max_new"]))
    s = {
      **s,
      "tok": jnp.where(act, tok, s["tok"]),
      "pos": s["pos"] + act,
      "gen": gen,
      "active": act & ~done,
    }
    return i + 1, cache, s, out, any_done | jnp.any(done)

  init = (jnp.int32(0), cache, st, jnp.full((B, steps), -1, jnp.int32), jnp.bool_(False))
  n, cache, _, out, _ = jax.lax.while_loop(cond, body, init)
  return cache, _replicated(out, m.mesh), _replicated(n, m.mesh)
