"""Sample answers to a JSONL file of prompts, appending each answer as it finishes; resumable.

    sample_file(SampleJob(model=..., prompts="in.jsonl", out="out.jsonl", n=8, ...))

Prompt rows: {"prompt": "..."} or {"messages": [{"role", "content"}, ...]}, with an optional
"id" (default: the row number). A rerun skips the (id, sample) answers already in the output
(`lora_jax.jsonl` handles a line torn by a kill), so a killed run loses only the answers in
progress; seeds derive from (seed, row number, sample), so a resumed run gives the answers a
full run would.
"""

from __future__ import annotations

import dataclasses
import logging

from lora_jax import jsonl

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
  mesh: str | None = None  # e.g. "fsdp:4,tensor:2"; None: one device
  dtype: str = "float32"

  def __post_init__(self):
    if self.n < 1 or self.max_new_tokens < 1:
      raise ValueError(f"n={self.n}, max_new_tokens={self.max_new_tokens}: both must be >= 1")
    if self.max_batch != "auto" and not (isinstance(self.max_batch, int) and self.max_batch > 0):
      raise ValueError(f"max_batch={self.max_batch!r}: expected a positive integer or 'auto'")


def read_prompts(path: str) -> tuple[list[str], list]:
  """(ids, prompts) of a prompts file; a bad row is a JsonlError naming file and line."""
  ids, prompts, first = [], [], {}
  for line, row in jsonl.read(path):
    has_prompt, has_messages = "prompt" in row, "messages" in row
    if has_prompt == has_messages:
      raise jsonl.bad_line(path, line, "expected an object with 'prompt' or 'messages'")
    prompt = row["prompt"] if has_prompt else row["messages"]
    if has_prompt and not isinstance(prompt, str):
      raise jsonl.bad_line(path, line, "'prompt' must be a string")
    if has_messages and not (
      isinstance(prompt, list)
      and all(isinstance(m, dict) and {"role", "content"} <= set(m) for m in prompt)
    ):
      raise jsonl.bad_line(path, line, "'messages' must be a list of {role, content}")
    pid = str(row.get("id", len(ids)))
    if pid in first:
      raise jsonl.bad_line(path, line, f"id {pid!r} again (first on line {first[pid]})")
    first[pid] = line
    ids.append(pid)
    prompts.append(prompt)
  if not prompts:
    raise ValueError(f"{path}: no prompts")
  return ids, prompts


def done_answers(path: str) -> set[tuple[str, int]]:
  """(id, sample) of the answers already in `path`."""
  return {(str(r["id"]), int(r["sample"])) for r in jsonl.records(path)}


def _record(r, ids: list[str], job: SampleJob) -> dict:
  return {
    "id": ids[r.index],
    "sample": r.sample,
    "text": r.text,
    "finish_reason": r.finish_reason,
    "stop_reason": r.stop_reason,
    "num_prompt_tokens": r.num_prompt_tokens,
    "num_tokens": r.num_tokens,
    "seed": job.seed,
  }


def sample_file(job: SampleJob) -> int:
  """Generate the answers `job.out` lacks; returns how many were written."""
  import jax

  import lora_jax
  from lora_jax.sampling import generate_text

  ids, prompts = read_prompts(job.prompts)
  done = done_answers(job.out)
  _all_hosts_read()  # before process 0 appends: every host must skip the same answers
  index_of = {pid: i for i, pid in enumerate(ids)}
  skip = {(index_of[pid], s) for pid, s in done if pid in index_of and s < job.n}
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
      prompts,
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
      on_result=(lambda r: writer.write(_record(r, ids, job))) if writer else None,
      max_len=job.max_len,
      max_cache_gb=job.max_cache_gb,
      skip=skip,
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
