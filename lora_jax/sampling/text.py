"""Text in, text out: prompts through the tokenizer (and its chat template), answers decoded.

Chat prompts are rendered with `apply_chat_template(..., add_generation_prompt=True,
tokenize=False)` and encoded without adding special tokens again: templates already write the BOS
where the model wants one (DeepSeek-R1's does, SmolLM2's has none), so adding it would double it.
Raw-text prompts (chat_template=False) are encoded as the tokenizer does by default.
`add_special_tokens=True` adds the tokenizer's BOS to a rendered chat prompt as well: two BOS, as
vLLM's `generate(prompt_string)` gave them (the reference evaluation did so on purpose or not).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence

from lora_jax.model import Decoder
from lora_jax.sampling.engine import Completion
from lora_jax.sampling.generate import requests_for, run
from lora_jax.sampling.memory import SamplingError
from lora_jax.sampling.stops import StopStrings, truncate_at_stop


def encode_prompts(
  tokenizer, prompts: Sequence, chat_template: bool = True, add_special_tokens: bool = False
) -> list[list[int]]:
  """Token ids of each prompt: a string, or a list of {"role", "content"} messages."""
  out = []
  for i, p in enumerate(prompts):
    if isinstance(p, str):
      if not chat_template:
        out.append(tokenizer(p)["input_ids"])
        continue
      p = [{"role": "user", "content": p}]
    if not isinstance(p, (list, tuple)) or not all(
      isinstance(m, dict) and "role" in m and "content" in m for m in p
    ):
      raise SamplingError(
        f"prompt {i} is a {type(p).__name__}; expected a string or a list of "
        "{'role', 'content'} messages"
      )
    if getattr(tokenizer, "chat_template", None) is None:
      raise SamplingError(
        f"prompt {i} needs a chat template but the tokenizer has none; "
        "pass raw-text prompts with chat_template=False"
      )
    text = tokenizer.apply_chat_template(list(p), add_generation_prompt=True, tokenize=False)
    out.append(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])
  return out


def generate_text(
  model: Decoder,
  tokenizer,
  prompts: Sequence,
  max_new_tokens: int = 1024,
  *,
  temperature: float = 0.0,
  top_p: float = 1.0,
  top_k: int = 0,
  min_p: float = 0.0,
  seed: int = 0,
  n: int = 1,
  stop: Iterable[str] = (),
  stop_token_ids: Iterable[int] = (),
  chat_template: bool = True,
  max_batch: int | str = 8,
  on_result: Callable[[Completion], None] | None = None,
  max_len: int | None = None,
  max_cache_gb: float | None = None,
  skip: Iterable[tuple[int, int]] = (),
  skip_special_tokens: bool = True,
  max_total_tokens: int | None = None,
  add_special_tokens: bool = False,
) -> list[Completion]:
  """Answers to `prompts` (n per prompt), sorted by (index, sample); `on_result` is called with
  each as it finishes. Generation stops at the model's and tokenizer's eos ids, `stop_token_ids`,
  any string in `stop` (across token boundaries; the text is cut before it) or max_new_tokens.
  `skip`: (index, sample) pairs not to generate (already done by an earlier, interrupted run).
  `max_total_tokens` caps prompt + answer (vLLM's max_model_len): an answer gets at most
  max_total_tokens - its prompt's length new tokens. `add_special_tokens`: see the module doc."""
  if isinstance(stop, str):
    stop = (stop,)
  stop = tuple(s for s in stop if s)
  decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
  ids = encode_prompts(tokenizer, prompts, chat_template, add_special_tokens)
  reqs = requests_for(
    ids,
    max_new_tokens,
    temperature=temperature,
    top_p=top_p,
    top_k=top_k,
    min_p=min_p,
    seed=seed,
    n=n,
    skip=frozenset(map(tuple, skip)),
    stops_for=(lambda: StopStrings(stop, decode)) if stop else None,
    max_total_tokens=max_total_tokens,
  )
  eos = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
  results = []
  for c in run(
    model,
    reqs,
    stop_token_ids=eos | {int(t) for t in stop_token_ids},
    max_batch=max_batch,
    max_len=max_len,
    max_cache_gb=max_cache_gb,
  ):
    if isinstance(c.stop_reason, str):
      text = truncate_at_stop(decode(c.token_ids), stop)[0]
    elif c.stop_reason is not None:
      text = decode(c.token_ids[:-1])
    else:
      text = decode(c.token_ids)
    r = dataclasses.replace(c, text=text)
    if on_result is not None:
      on_result(r)
    results.append(r)
  return sorted(results, key=lambda r: (r.index, r.sample))


def chat(
  model: Decoder, tokenizer, message: str | Sequence[dict], max_new_tokens: int = 256, **kwargs
) -> str:
  """One greedy answer to `message` (a user message, or a whole conversation)."""
  prompt = [{"role": "user", "content": message}] if isinstance(message, str) else list(message)
  kwargs.setdefault("max_batch", 1)
  return generate_text(model, tokenizer, [prompt], max_new_tokens=max_new_tokens, **kwargs)[0].text
