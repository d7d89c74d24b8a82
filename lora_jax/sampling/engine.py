"""Continuous-batching generation over a KV cache: the host loop around the compiled steps.

The cache has `batch` rows; each row holds one answer in progress. `Engine.run` repeats:
  1. admit: waiting requests go into free rows. Their prompts are prefilled (right-padded to a
     length bucket, one compile per bucket; samples of one prompt share one prefill), inserted
     into the rows, and each row's first token is sampled on the spot;
  2. decode: one jitted `while_loop` runs up to `steps` tokens for every row without returning to
     Python, and stops early once a row finishes while requests are waiting, so a finished row is
     refilled at once instead of idling until the batch's longest answer ends;
  3. finished answers (stop token, stop string, or length) are yielded and their rows freed.
The cache's length follows the longest live row in buckets (grown and shrunk between rounds), so
attention reads the live part of the cache, not max_len. Host state per row is a few numbers,
sent with every round; only the cache is carried (donated) from call to call. The compiled steps
are in `steps.py`.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import logging
import time
from collections.abc import Iterable, Iterator, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from lora_jax.model import Decoder
from lora_jax.sampling import steps as compiled
from lora_jax.sampling.forward import layer_params
from lora_jax.sampling.memory import SamplingError, plan_batch
from lora_jax.sampling.stops import StopStrings

log = logging.getLogger(__name__)
CACHE_LENGTH_STEP = 64  # cache lengths are buckets of this size (and at least this)
PROMPT_BUCKET_MIN = 16  # prompts are padded to buckets starting at this length
MIN_PREFILL_CHUNK = 64  # long prompts are prefilled in chunks, never shorter than this
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
  """A finished answer. `text` is set by `generate_text` (the engine works on token ids)."""

  index: int  # prompt index
  sample: int  # 0..n-1
  token_ids: list[int]  # the answer, including the stop token or the token completing a stop string
  finish_reason: str  # "stop" | "length"
  num_prompt_tokens: int
  stop_reason: int | str | None = None  # the stop token id or stop string that ended it
  text: str | None = None  # the answer's text, without the stop token or stop string

  @property
  def num_tokens(self) -> int:
    return len(self.token_ids)


def bucket(n: int, lo: int = PROMPT_BUCKET_MIN) -> int:
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
    self.graphdef, self.model_state = nnx.split(model)
    # the cache never grows past max_len rounded up to a whole step
    self.max_cache_len = -(-self.max_len // CACHE_LENGTH_STEP) * CACHE_LENGTH_STEP
    self.batch, self.layers = self._plan(max_batch, unstack, max_cache_gb, want_batch or 256)
    ids = sorted(set(int(t) for t in stop_token_ids))
    self.stop_ids = np.full((max(1, _pow2(len(ids))),), -1, np.int32)  # padded with -1
    self.stop_ids[: len(ids)] = ids
    self._stop_set = set(ids)
    self.cache = None
    self.stats = collections.Counter()

  def _plan(self, max_batch, unstack, max_cache_gb, want):
    """(cache rows, layer params): unstacked per-layer copies where they fit (and are asked for
    or, by default, on CPU), else the stacked params."""
    plan = functools.partial(
      plan_batch,
      self.cfg,
      max_batch,
      self.max_cache_len,
      self.model.dtype,
      mesh=self.mesh,
      max_cache_gb=max_cache_gb,
      want=want,
    )
    stacked = nnx.to_pure_dict(nnx.state(self.model.layers))
    copies = sum(s.data.nbytes for a in jax.tree.leaves(stacked) for s in a.addressable_shards)
    auto = unstack is None
    unstack = jax.devices()[0].platform == "cpu" if auto else unstack
    try:
      batch = plan(extra_bytes=copies if unstack else 0)
    except SamplingError:
      if not (auto and unstack):
        raise
      log.info(
        "no room for per-layer weight copies (%.2f GiB): decoding from the stacked "
        "weights, more slowly",
        copies / (1 << 30),
      )
      unstack = False
      batch = plan(extra_bytes=0)
    return batch, layer_params(self.model, unstack)

  # ---- public ----------------------------------------------------------------------------------
  def run(self, requests: Iterable[Request]) -> Iterator[Completion]:
    """Yields each answer as it finishes (not in request order)."""
    queue = collections.deque(requests)
    for r in queue:
      self._check(r)
    self._answers: list[_Answer | None] = [None] * self.batch
    self._rows = _RowNumbers(self.batch)
    if self.cache is None:
      self.cache = self._commit(
        compiled.empty_cache(self.graphdef, self.model_state, self.batch, CACHE_LENGTH_STEP)
      )
    start = last_log = time.perf_counter()
    while queue or any(self._answers):
      free = [b for b in range(self.batch) if self._answers[b] is None]
      if queue and free:
        yield from self._admit(free, queue)
      if not any(self._answers):
        continue
      yield from self._decode(exit_on_finish=bool(queue))
      if time.perf_counter() - last_log > _LOG_EVERY_S and jax.process_index() == 0:
        last_log = time.perf_counter()
        log.info(
          "sampling: %d answers done, %d waiting, %d in progress; %.1f tokens/s",
          self.stats["answers"],
          len(queue),
          sum(a is not None for a in self._answers),
          self.stats["decode_tokens"] / max(1e-9, last_log - start),
        )

  def _check(self, r: Request) -> None:
    if len(r.prompt) == 0:
      raise SamplingError(f"prompt {r.index} is empty")
    if len(r.prompt) >= self.max_len:
      raise SamplingError(
        f"prompt {r.index} has {len(r.prompt)} tokens but the cache holds "
        f"{self.max_len} per sequence (max_len); raise max_len or shorten it"
      )
    bad = next((t for t in r.prompt if not 0 <= t < self.cfg.vocab_size), None)
    if bad is not None:
      raise SamplingError(
        f"prompt {r.index} has token id {bad}, outside the vocabulary "
        f"(0..{self.cfg.vocab_size - 1})"
      )

  # ---- admit: prefill, insert, first token -----------------------------------------------------
  def _admit(self, free: list[int], queue) -> Iterator[Completion]:
    """Move waiting requests into free rows, grouped by prompt length bucket."""
    taken = [queue.popleft() for _ in range(min(len(free), len(queue)))]
    by_length: dict[int, list[Request]] = collections.defaultdict(list)
    for r in taken:
      by_length[bucket(len(r.prompt))].append(r)
    rows = iter(free)
    for padded_len, reqs in sorted(by_length.items()):
      yield from self._admit_group(padded_len, reqs, [next(rows) for _ in reqs])

  def _admit_group(self, padded_len: int, reqs: list[Request], rows: list[int]):
    prompt_cache, prompt_logits, sources = self._prefill(padded_len, reqs)
    self._ensure_cache(max(padded_len, self._needed()))
    # padded to a power of two (fewer compilations); padding rows point past the cache: dropped
    slots = _pow2(len(reqs))
    row_arr = np.full((slots,), self.batch, np.int32)
    source_arr = np.zeros((slots,), np.int32)
    row_arr[: len(rows)], source_arr[: len(rows)] = rows, sources
    numbers = self._rows
    for r, b in zip(reqs, rows):
      numbers.assign(b, r, min(r.max_new_tokens, self.max_len - len(r.prompt)))
    self.cache = compiled.insert(
      self.mesh, self.cache, prompt_cache, self._put(row_arr), self._put(source_arr)
    )
    first = compiled.first_tokens(
      self.mesh,
      prompt_logits,
      self._put(source_arr),
      self._put(numbers.key[np.minimum(row_arr, self.batch - 1)]),
      self._put(numbers.sampling(row_arr)),
      greedy=all(r.temperature <= 0 for r in reqs),
    )
    for r, b, tok in zip(reqs, rows, np.asarray(first)):
      self._answers[b] = _Answer(r)
      numbers.tok[b], numbers.pos[b], numbers.gen[b], numbers.active[b] = (
        tok,
        len(r.prompt),
        1,
        True,
      )
      running = not (int(tok) in self._stop_set or numbers.max_new[b] <= 1)
      done = self._accept(b, [int(tok)], still_running=running)
      if done is not None:
        yield done

  def _prefill(self, padded_len: int, reqs: list[Request]):
    """The prompts' own cache and last logits; `sources[i]` is request i's prompt among them."""
    unique: dict[tuple, int] = {}
    sources = [unique.setdefault(tuple(r.prompt), len(unique)) for r in reqs]
    prompts = list(unique)
    num_rows = _pow2(len(prompts))
    ids = np.zeros((num_rows, padded_len), np.int32)
    lengths = np.ones((num_rows,), np.int32)
    for i, p in enumerate(prompts):
      ids[i, : len(p)] = p
      lengths[i] = len(p)
    chunk = padded_len
    scores_bytes = lambda c: num_rows * self.cfg.num_heads * c * padded_len * 4
    while (
      chunk % 2 == 0 and chunk > MIN_PREFILL_CHUNK and scores_bytes(chunk) > _PREFILL_SCORES_BYTES
    ):
      chunk //= 2
    prompt_cache, prompt_logits = compiled.prefill(
      self.graphdef,
      self.model_state,
      self.layers,
      self._put(ids),
      self._put(lengths),
      chunk=chunk,
    )
    self.stats["prefill_tokens"] += int(lengths[: len(prompts)].sum())
    self.stats["prefill_calls"] += 1
    return prompt_cache, prompt_logits, sources

  # ---- decode ----------------------------------------------------------------------------------
  def _decode(self, exit_on_finish: bool) -> list[Completion]:
    """One round of up to `steps` tokens for every live row; returns the answers it finished."""
    numbers = self._rows
    self._ensure_cache(self._needed(), shrink=True)
    greedy = not np.any(numbers.temperature[numbers.active] > 0)
    self.cache, out, steps_run = compiled.decode(
      self.graphdef,
      self.model_state,
      self.layers,
      self.cache,
      self._put(numbers.device_inputs()),
      self._put(self.stop_ids),
      self._put(np.bool_(exit_on_finish)),
      steps=self.steps,
      greedy=bool(greedy),
    )
    out, steps_run = np.asarray(out), int(steps_run)
    finished = []
    for b, answer in enumerate(self._answers):
      if answer is None or not numbers.active[b]:
        continue
      toks = out[b, :steps_run]
      toks = [int(t) for t in toks[toks >= 0]]
      numbers.tok[b] = toks[-1]
      numbers.pos[b] += len(toks)
      numbers.gen[b] += len(toks)
      running = not (toks[-1] in self._stop_set or numbers.gen[b] >= numbers.max_new[b])
      self.stats["decode_tokens"] += len(toks)
      done = self._accept(b, toks, still_running=running)
      if done is not None:
        finished.append(done)
    self.stats["decode_steps"] += steps_run
    self.stats["decode_rounds"] += 1
    return finished

  def _accept(self, b: int, toks: list[int], still_running: bool) -> Completion | None:
    """Append a row's new tokens; finish it on a stop token, stop string or its length.
    still_running: the device keeps decoding the row (no stop token, length not reached)."""
    answer = self._answers[b]
    answer.ids.extend(toks)
    reason, stop = None, None
    if answer.req.stops is not None:
      cut = answer.req.stops.extend(toks)
      if cut is not None:
        del answer.ids[cut:]
        reason, stop = "stop", answer.req.stops.match
    if reason is None and not still_running:
      last = answer.ids[-1]
      reason, stop = ("stop", last) if last in self._stop_set else ("length", None)
    if reason is None:
      return None
    self._answers[b] = None
    self._rows.active[b] = False
    self.stats["answers"] += 1
    r = answer.req
    return Completion(r.index, r.sample, answer.ids, reason, len(r.prompt), stop)

  # ---- cache sizing ----------------------------------------------------------------------------
  def _needed(self) -> int:
    """Slots the next round may write: up to `steps` more tokens for each live row."""
    n = self._rows
    live = [b for b in range(self.batch) if self._answers[b] is not None and n.active[b]]
    last_slot = lambda b: min(n.pos[b] + self.steps, n.prompt_len[b] + n.max_new[b] - 1)
    return max([last_slot(b) + 1 for b in live], default=1)

  def _ensure_cache(self, needed: int, shrink: bool = False) -> None:
    size = min(bucket(needed, CACHE_LENGTH_STEP), self.max_cache_len)
    current = self.cache[0][0].shape[1]
    if size > current or (shrink and size * 2 <= current):
      self.cache = self._commit(compiled.resize(self.mesh, self.cache, size))
      self.stats["resizes"] += 1

  def _commit(self, cache):
    """Without a mesh, place the cache where the params are, so that the compiled functions see
    the same input placement on every call (an uncommitted first cache would compile twice)."""
    if self.mesh is not None:
      return cache
    return jax.device_put(cache, jax.tree.leaves(self.model_state)[0].sharding)

  def _put(self, tree):
    """Host numbers onto the devices, replicated (every process passes the same values)."""
    tree = jax.tree.map(np.asarray, tree)
    if self.mesh is None:
      return jax.device_put(tree)
    return jax.device_put(tree, NamedSharding(self.mesh, P()))


@dataclasses.dataclass
class _Answer:
  """An answer in progress: its request and its tokens so far."""

  req: Request
  ids: list[int] = dataclasses.field(default_factory=list)


class _RowNumbers:
  """Per-row numbers the device needs, kept on the host and sent with each round."""

  def __init__(self, batch: int):
    self.tok = np.zeros(batch, np.int32)  # last sampled token (not yet in the cache)
    self.pos = np.zeros(batch, np.int32)  # its position (= its cache slot)
    self.gen = np.zeros(batch, np.int32)  # tokens generated so far
    self.max_new = np.ones(batch, np.int32)
    self.prompt_len = np.zeros(batch, np.int32)
    self.active = np.zeros(batch, bool)
    self.temperature = np.zeros(batch, np.float32)
    self.top_p = np.ones(batch, np.float32)
    self.top_k = np.zeros(batch, np.int32)
    self.min_p = np.zeros(batch, np.float32)
    self.key = np.zeros((batch,) + compiled.key_shape(), np.uint32)

  def assign(self, b: int, r: Request, max_new: int) -> None:
    """Row b now generates request r (at most `max_new` tokens)."""
    self.max_new[b], self.prompt_len[b] = max_new, len(r.prompt)
    self.temperature[b], self.top_p[b], self.top_k[b], self.min_p[b] = (
      r.temperature,
      r.top_p,
      r.top_k,
      r.min_p,
    )
    self.key[b] = compiled.request_key(r.seed, r.index, r.sample)

  def sampling(self, rows) -> dict:
    rows = np.minimum(rows, len(self.tok) - 1)
    return {name: getattr(self, name)[rows] for name in compiled.SAMPLING_FIELDS}

  def device_inputs(self) -> dict:
    return {
      "tok": self.tok,
      "pos": self.pos,
      "gen": self.gen,
      "max_new": self.max_new,
      "active": self.active,
      "key": self.key,
      **self.sampling(np.arange(len(self.tok))),
    }
