"""Sample answers to a JSONL file of prompts, appending each answer as it finishes; resumable.

    sample_file(SampleJob(model=..., prompts="in.jsonl", out="out.jsonl", n=8, ...))

Prompt rows: {"prompt": "..."} or {"messages": [{"role", "content"}, ...]}, with an optional
"id" (default: the row number) and "seed" (the benchmark seed the prompt was rendered with, as
`launch.eval --write_prompts` writes it; default 0). Answers are `lora_jax.answers` records
(id, seed, sample, completion, ...), which `launch.eval --generations` grades. A rerun skips the
answers already in the output (`lora_jax.jsonl` handles a line torn by a kill), so a killed run
loses only the answers in progress; sampling seeds derive from (seed, row number, sample), so a
resumed run gives the answers a full run would.
"""

from __future__ import annotations

import dataclasses
import logging

from lora_jax import answers, jsonl

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class SampleJob:
  model: str  # HF hub id, HF directory or GGUF file
  prompts: str  # input JSONL
  out: str  # output JSONL (appended to)
  adapter: str | None = None  # PEFT LoRA adapter directory, applied unmerged
  tokenizer: str | None = None  # default: model
  max_new_tokens: int = 1024
  temperature: float = 0.0
  top_p: float = 1.0
  top_k: int = 0
  min_p: float = 0.0
  n: int = 1
  seed: int = 0
  stop: tuple[str, ...] = ()
  stop_token_ids: tuple[int, ...] = ()
  chat_template: bool = True
  max_batch: int | str = 8  # or "auto"
  max_len: int | None = None
  max_cache_gb: float | None = None
  max_model_len: int | None = None  # prompt + answer at most this (vLLM's max_model_len)
  add_special_tokens: bool = False  # the tokenizer's BOS after the template's (a reference quirk)
  mesh: str | None = None  # e.g. "fsdp:4,tensor:2"; None: one device
  dtype: str = "float32"

  def __post_init__(self):
    if self.n < 1 or self.max_new_tokens < 1:
      raise ValueError(f"n={self.n}, max_new_tokens={self.max_new_tokens}: both must be >= 1")
    if self.max_model_len is not None and self.max_model_len < 2:
      raise ValueError(f"max_model_len={self.max_model_len}: expected at least 2 (prompt + answer)")
    if self.max_batch != "auto" and not (isinstance(self.max_batch, int) and self.max_batch > 0):
      raise ValueError(f"max_batch={self.max_batch!r}: expected a positive integer or 'auto'")


@dataclasses.dataclass(frozen=True)
class Prompt:
  id: str
  seed: int  # the benchmark seed it was rendered with (carried into its answers)
  content: str | list  # text, or chat messages


def read_prompts(path: str) -> list[Prompt]:
  """The rows of a prompts file; a bad row is a JsonlError naming file and line."""
  out, first = [], {}
  for line, row in jsonl.read(path):
    bad = lambda reason, line=line: jsonl.bad_line(path, line, reason)
    has_prompt, has_messages = "prompt" in row, "messages" in row
    if has_prompt == has_messages:
      raise bad("expected an object with 'prompt' or 'messages'")
    content = row["prompt"] if has_prompt else row["messages"]
    if has_prompt and not isinstance(content, str):
      raise bad("'prompt' must be a string")
    if has_messages and not (
      isinstance(content, list)
      and all(isinstance(m, dict) and {"role", "content"} <= set(m) for m in content)
    ):
      raise bad("'messages' must be a list of {role, content}")
    seed = row.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
      raise bad(f"'seed' must be an integer >= 0, got {seed!r}")
    key = (str(row.get("id", len(out))), seed)
    if key in first:
      raise bad(f"id {key[0]!r} seed {seed} again (first on line {first[key]})")
    first[key] = line
    out.append(Prompt(key[0], seed, content))
  if not out:
    raise ValueError(f"{path}: no prompts")
  return out


def _record(r, prompt: Prompt, job: SampleJob) -> dict:
  return answers.record(
    prompt.id,
    r.text,
    seed=prompt.seed,
    sample=r.sample,
    finish_reason=r.finish_reason,
    stop_reason=r.stop_reason,
    num_prompt_tokens=r.num_prompt_tokens,
    num_tokens=r.num_tokens,
    sampling_seed=job.seed,
  )


def sample_file(job: SampleJob) -> int:
  """Generate the answers `job.out` lacks; returns how many were written."""
  import jax

  import lora_jax
  from lora_jax.sampling import generate_text

  prompts = read_prompts(job.prompts)
  done = {(a.id, a.seed, a.sample) for a in answers.read_answers(job.out, missing_ok=True)}
  _all_hosts_read()  # before process 0 appends: every host must skip the same answers
  skip = {(i, s) for i, p in enumerate(prompts) for s in range(job.n) if (p.id, p.seed, s) in done}
  todo = len(prompts) * job.n - len(skip)
  log.info(
    "%d prompts x %d samples: %d already in %s, %d to generate",
    len(prompts),
    job.n,
    len(skip),
    job.out,
    todo,
  )
  if todo == 0:
    return 0
  model = lora_jax.load_pretrained(job.model, dtype=job.dtype, mesh=_mesh(job.mesh))
  if job.adapter:
    from lora_jax.io.peft import load_peft_adapter

    model = load_peft_adapter(model, job.adapter)
  tokenizer = lora_jax.load_tokenizer(job.tokenizer or job.model)
  writer = jsonl.Appender(job.out) if jax.process_index() == 0 else None
  try:
    generate_text(
      model,
      tokenizer,
      [p.content for p in prompts],
      max_new_tokens=job.max_new_tokens,
      temperature=job.temperature,
      top_p=job.top_p,
      top_k=job.top_k,
      min_p=job.min_p,
      seed=job.seed,
      n=job.n,
      stop=job.stop,
      stop_token_ids=job.stop_token_ids,
      chat_template=job.chat_template,
      max_batch=job.max_batch,
      on_result=(lambda r: writer.write(_record(r, prompts[r.index], job))) if writer else None,
      max_len=job.max_len,
      max_cache_gb=job.max_cache_gb,
      skip=skip,
      max_total_tokens=job.max_model_len,
      add_special_tokens=job.add_special_tokens,
    )
  finally:
    if writer is not None:
      writer.close()
  log.info("wrote %d answers to %s", todo, job.out)
  return todo


def _mesh(spec: str | None):
  if not spec:
    return None
  from lora_jax.sharding import make_mesh

  return make_mesh(spec)


def _all_hosts_read() -> None:
  import jax

  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices("lora_jax.sample_file: answers read")
