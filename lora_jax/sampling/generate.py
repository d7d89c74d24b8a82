"""Token-level generation: prompts of token ids in, answers of token ids out."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

from lora_jax.model import Decoder
from lora_jax.sampling.engine import Completion, Engine, Request
from lora_jax.sampling.memory import SamplingError


def requests_for(
  prompt_ids: Sequence[Sequence[int]],
  max_new_tokens: int,
  *,
  temperature: float = 0.0,
  top_p: float = 1.0,
  top_k: int = 0,
  min_p: float = 0.0,
  seed: int = 0,
  n: int = 1,
  skip=frozenset(),
  stops_for=None,
  max_total_tokens: int | None = None,
) -> list[Request]:
  """n requests per prompt, prompt-major; (index, sample) pairs in `skip` are left out.
  stops_for(): a fresh StopStrings tracker per request (or None). max_total_tokens: prompt +
  answer at most this long (each answer's budget shrinks by its prompt's length)."""
  sampling = dict(temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p, seed=seed)
  check_sampling(max_new_tokens=max_new_tokens, **sampling, n=n)
  budgets = [max_new_tokens] * len(prompt_ids)
  if max_total_tokens is not None:
    budgets = [min(max_new_tokens, max_total_tokens - len(p)) for p in prompt_ids]
    for i, budget in enumerate(budgets):
      if budget < 1:
        raise SamplingError(
          f"prompt {i} has {len(prompt_ids[i])} tokens: no room for an answer within "
          f"max_total_tokens={max_total_tokens}"
        )
  return [
    Request(
      list(map(int, p)),
      budgets[i],
      index=i,
      sample=s,
      **sampling,
      stops=stops_for() if stops_for else None,
    )
    for i, p in enumerate(prompt_ids)
    for s in range(n)
    if (i, s) not in skip
  ]


def check_sampling(*, max_new_tokens, temperature, top_p, top_k, min_p, seed, n) -> None:
  bad = [
    (max_new_tokens >= 1, f"max_new_tokens={max_new_tokens}; expected >= 1"),
    (n >= 1, f"n={n}; expected >= 1"),
    (temperature >= 0, f"temperature={temperature}; expected >= 0 (0 = greedy)"),
    (0 < top_p <= 1, f"top_p={top_p}; expected 0 < top_p <= 1"),
    (top_k >= 0, f"top_k={top_k}; expected >= 0 (0 = off)"),
    (0 <= min_p <= 1, f"min_p={min_p}; expected 0 <= min_p <= 1"),
    (seed >= 0, f"seed={seed}; expected >= 0"),
  ]
  for ok, msg in bad:
    if not ok:
      raise SamplingError(msg)


def run(
  model: Decoder,
  requests: list[Request],
  *,
  stop_token_ids: Iterable[int] = (),
  max_batch: int | str = 8,
  max_len: int | None = None,
  max_cache_gb: float | None = None,
  steps: int = 32,
) -> Iterator[Completion]:
  """Answers for `requests` as they finish. stop_token_ids are added to the model's eos ids.
  max_len (cache slots per sequence) defaults to the longest prompt plus its max_new_tokens."""
  if not requests:
    return iter(())
  if max_len is None:
    max_len = max(len(r.prompt) + r.max_new_tokens for r in requests)
  stops = set(model.config.eos_token_ids) | {int(t) for t in stop_token_ids}
  if max_batch != "auto":
    max_batch = min(int(max_batch), len(requests))  # no idle rows for a handful of prompts
  engine = Engine(
    model,
    max_len=max_len,
    max_batch=max_batch,
    stop_token_ids=stops,
    steps=steps,
    max_cache_gb=max_cache_gb,
    want_batch=len(requests),
  )
  return engine.run(requests)


def generate(
  model: Decoder,
  prompt_ids: Sequence[Sequence[int]],
  max_new_tokens: int,
  *,
  temperature: float = 0.0,
  top_p: float = 1.0,
  top_k: int = 0,
  min_p: float = 0.0,
  seed: int = 0,
  n: int = 1,
  stop_token_ids: Iterable[int] = (),
  max_batch: int | str = 8,
  max_len: int | None = None,
  max_cache_gb: float | None = None,
) -> list[list[int]]:
  """The new token ids of each answer (ending with the stop token when one ended it), prompt-major
  for n > 1: [p0 s0, p0 s1, ..., p1 s0, ...]. Stops at the model's eos ids and `stop_token_ids`.
  Sampling: temperature (0 = greedy), then top_p, top_k (0 = off) and min_p filters; seed and
  the answer's (prompt index, sample) fix its randomness, whatever the batch."""
  reqs = requests_for(
    prompt_ids,
    max_new_tokens,
    temperature=temperature,
    top_p=top_p,
    top_k=top_k,
    min_p=min_p,
    seed=seed,
    n=n,
  )
  out = {
    (c.index, c.sample): c.token_ids
    for c in run(
      model,
      reqs,
      stop_token_ids=stop_token_ids,
      max_batch=max_batch,
      max_len=max_len,
      max_cache_gb=max_cache_gb,
    )
  }
  return [out[(r.index, r.sample)] for r in reqs]
