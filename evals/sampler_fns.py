"""The lora_jax sampler as the runner's `generate_fn`, and as the judges (Llama-Guard-3, the math
re-check LLM).

A model loads on the first call (a rerun with nothing left to generate loads nothing) and is
freed with its function. A judge's weights are looked for when the judges are made, before any
answer is generated: a judge that cannot be found is one line naming the flag to set.
"""

from __future__ import annotations

import logging
import os

from evals.benchmarks import Sampling
from evals.math_grader import JUDGE_MAX_NEW_TOKENS
from evals.refusal_judge import DEFAULT_REFUSAL_JUDGE
from evals.runner import Judges
from evals.safety import LLAMA_GUARD_MAX_NEW_TOKENS

log = logging.getLogger(__name__)


def model_generate_fn(model, tokenizer, max_batch: int = 8):
  """A `generate_fn` over the lora_jax sampler for a model already in memory. The sampling's
  `max_model_len` caps prompt + answer; `add_special_tokens` adds the tokenizer's BOS to the
  rendered chat prompt (the reference's two BOS)."""

  def generate_fn(prompts, *, seed, sampling, chat_template, on_result):
    from lora_jax.sampling import generate_text

    generate_text(
      model,
      tokenizer,
      prompts,
      max_new_tokens=sampling.max_new_tokens,
      temperature=sampling.temperature,
      top_p=sampling.top_p,
      top_k=0,
      min_p=0.0,
      seed=seed,
      n=sampling.n,
      stop=sampling.stop,
      stop_token_ids=(),
      chat_template=chat_template,
      max_batch=max_batch,
      on_result=on_result,
      max_total_tokens=sampling.max_model_len,
      add_special_tokens=sampling.add_special_tokens,
    )

  return generate_fn


def merge_adapter(model, dtype: str):
  """Merge the model's LoRA adapter into its weights (W + scale * A B, summed in float32, as
  PEFT's merge_and_unload) and round the merged weights to `dtype`, as the reference's vLLM runs
  saw them (a bfloat16 base merged in place); in place, returns the model."""
  import jax.numpy as jnp

  from lora_jax import lora

  names = lora.adapted(model)
  lora.merge(model)
  for name in names:
    kernel = getattr(model.layers, name).kernel
    w = kernel[...]
    kernel.set_value(w.astype(jnp.dtype(dtype)).astype(w.dtype))
  log.info("adapter merged into %s and rounded to %s", ", ".join(names), dtype)
  return model


def load_model(source: str, adapter: str | None, dtype: str, merge_dtype: str = "none"):
  import lora_jax

  model = lora_jax.load_pretrained(source, dtype=dtype, mesh=None)
  if adapter:
    from lora_jax.io.peft import load_peft_adapter

    model = load_peft_adapter(model, adapter)
    if merge_dtype != "none":
      merge_adapter(model, merge_dtype)
  return model


def sampler_generate_fn(
  source: str,
  adapter: str | None = None,
  dtype: str = "float32",
  max_batch: int = 8,
  merge_dtype: str = "none",
):
  """A `generate_fn` over the lora_jax sampler, loading `source` (+ `adapter`) on first use."""
  state = {}

  def generate_fn(prompts, **kwargs):
    if not state:
      import lora_jax

      model = load_model(source, adapter, dtype, merge_dtype)
      state["fn"] = model_generate_fn(model, lora_jax.load_tokenizer(source), max_batch)
    state["fn"](prompts, **kwargs)

  return generate_fn


def texts_fn(generate_fn, max_new_tokens: int, chat_template: bool):
  """Adapt a `generate_fn` to a judge: greedy, one text per prompt, in order."""
  greedy = Sampling(temperature=0.0, top_p=1.0, max_new_tokens=max_new_tokens)

  def run(prompts):
    texts = [None] * len(prompts)
    generate_fn(
      prompts,
      seed=0,
      sampling=greedy,
      chat_template=chat_template,
      on_result=lambda r: texts.__setitem__(r.index, r.text),
    )
    missing = sum(t is None for t in texts)
    if missing:
      raise RuntimeError(f"judge returned no text for {missing} of {len(prompts)} prompts")
    return texts

  return run


def _find_weights(source: str) -> None:
  if os.path.isdir(source):
    if not os.path.isfile(os.path.join(source, "config.json")):
      raise FileNotFoundError(f"no config.json in {source}")
  elif os.path.isfile(source) and source.endswith(".gguf"):
    return
  elif source.startswith((".", "/", "~")):
    raise FileNotFoundError("no such directory")
  else:
    from huggingface_hub import hf_hub_download

    hf_hub_download(source, "config.json")  # the weights follow when the judge first runs


def require_weights(source: str, *, what: str, flag: str, example: str, instead: str) -> None:
  """Raise one line naming `flag` unless `source`'s weights can be found (locally, or on the hub
  when it is reachable: offline, gated and missing repos all end here)."""
  try:
    _find_weights(source)
  except Exception as e:  # noqa: BLE001 - every reason means the same to the user
    reason = (str(e).strip().splitlines() or [""])[0][:120]
    raise ValueError(
      f"{what} {source} cannot be loaded ({type(e).__name__}: {reason}); give its weights with "
      f"{flag}={example}, {instead}"
    ) from None


def sampler_judges(settings, max_batch: int = 8) -> Judges:
  """The judges of `settings` (`evals.presets.Settings`) on our sampler, greedy: Llama-Guard-3
  on its rendered prompts as raw text (512 tokens; its tokenizer adds the BOS in front of the
  template's, as vLLM did for the reference) and the math judge on the reference's literal
  ChatML text (20 tokens). Their weights are looked for now, before any answer is generated."""
  guard = math = None
  if settings.llama_guard:
    require_weights(
      settings.llama_guard,
      what="the safety judge",
      flag="--judge_model",
      example="/path/to/Llama-Guard-3-8B",
      instead="or judge offline with --safety_judge=refusal_classifier",
    )
    judge = sampler_generate_fn(settings.llama_guard, None, settings.judge_dtype, max_batch)
    guard = texts_fn(judge, LLAMA_GUARD_MAX_NEW_TOKENS, chat_template=False)
  if settings.math_judge:
    require_weights(
      settings.math_judge,
      what="the math re-check judge",
      flag="--math_judge_model",
      example="/path/to/Qwen2.5-32B-Instruct",
      instead="or grade by the rules alone with --math_judge_model=none",
    )
    judge = sampler_generate_fn(settings.math_judge, None, settings.math_judge_dtype, max_batch)
    math = texts_fn(judge, JUDGE_MAX_NEW_TOKENS, chat_template=False)
  refusal = settings.safety_judge if settings.safety_judge != "llama_guard" else None
  return Judges(
    llama_guard=guard,
    refusal=refusal or DEFAULT_REFUSAL_JUDGE,
    math=math,
    llama_guard_model=settings.llama_guard,
    math_model=settings.math_judge,
  )
