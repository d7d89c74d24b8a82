"""Sample answers to a JSONL file of prompts; resumable.

    python -m launch.sample --model=SOURCE [--adapter=DIR] --prompts=IN.jsonl --out=OUT.jsonl \\
        --max_new_tokens=2048 --temperature=0.6 --top_p=0.95 --n=8 --seed=0 [--stop=Problem:] \\
        [--nochat_template] [--mesh=fsdp:4,tensor:2] [--dtype=bfloat16] [--max_batch=auto]

IN.jsonl rows: {"prompt": "..."} or {"messages": [{"role": ..., "content": ...}, ...]}, with an
optional "id" (default: the row number). Each answer is appended to OUT.jsonl as it finishes
({"id", "sample", "text", "finish_reason", "num_prompt_tokens", "num_tokens", ...}); a rerun skips
the (id, sample) pairs already there, so a killed run loses only the answers in progress. Seeds
derive from (--seed, row number, sample), so a resumed run gives the answers a full run would.
"""

from __future__ import annotations

import collections
import json
import os
import sys

from absl import app, flags, logging

from launch.common import define_distributed_flags, init_distributed, one_line_errors

FLAGS = flags.FLAGS
flags.DEFINE_string("model", None, "Model source: HF hub id, HF directory or GGUF file.")
flags.DEFINE_string("adapter", None, "PEFT LoRA adapter directory, applied unmerged.")
flags.DEFINE_string("tokenizer", None, "Tokenizer source (default: --model).")
flags.DEFINE_string("prompts", None, "Input JSONL: rows with 'prompt' or 'messages' (+ 'id').")
flags.DEFINE_string("out", None, "Output JSONL, appended to as answers finish.")
flags.DEFINE_integer("max_new_tokens", 1024, "Token budget of each answer.")
flags.DEFINE_float("temperature", 0.0, "0 = greedy.")
flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass (1 = off).")
flags.DEFINE_integer("top_k", 0, "Keep the k most probable tokens (0 = off).")
flags.DEFINE_float("min_p", 0.0, "Drop tokens below min_p x the top probability (0 = off).")
flags.DEFINE_integer("n", 1, "Answers per prompt.")
flags.DEFINE_integer("seed", 0, "Sampling seed.")
flags.DEFINE_multi_string("stop", [], "Stop string (repeatable); the text is cut before it.")
flags.DEFINE_list("stop_token_ids", [], "Stop token ids, besides the model's eos ids.")
flags.DEFINE_bool(
  "chat_template",
  True,
  "Render 'prompt' rows as a user message with the "
  "tokenizer's chat template (--nochat_template: raw text).",
)
flags.DEFINE_string("max_batch", "8", "Sequences decoded together, or 'auto' (as many as fit).")
flags.DEFINE_integer(
  "max_len", None, "Cache slots per sequence (default: longest prompt + max_new_tokens)."
)
flags.DEFINE_float("max_cache_gb", None, "Memory budget of the KV cache (default: free memory).")
flags.DEFINE_string("mesh", None, "Device mesh, e.g. fsdp:4,tensor:2 (default: one device).")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Parameter and compute dtype.")
define_distributed_flags()


class InputError(ValueError):
  pass


def read_prompts(path: str) -> tuple[list[str], list]:
  """(ids, prompts) of the rows of a JSONL file; one-line errors name the bad row."""
  ids, prompts = [], []
  with open(path) as f:
    for line_no, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise InputError(f"{path}:{line_no}: not JSON ({e.msg})") from None
      if not isinstance(row, dict) or ("prompt" in row) == ("messages" in row):
        raise InputError(f"{path}:{line_no}: expected an object with 'prompt' or 'messages'")
      prompt = row.get("prompt", row.get("messages"))
      if "prompt" in row and not isinstance(prompt, str):
        raise InputError(f"{path}:{line_no}: 'prompt' must be a string")
      if "messages" in row and not (
        isinstance(prompt, list)
        and all(isinstance(m, dict) and {"role", "content"} <= set(m) for m in prompt)
      ):
        raise InputError(f"{path}:{line_no}: 'messages' must be a list of {{role, content}}")
      ids.append(str(row.get("id", len(ids))))
      prompts.append(prompt)
  dup = sorted(i for i, c in collections.Counter(ids).items() if c > 1)
  if dup:
    raise InputError(f"{path}: duplicate ids {dup[:5]}")
  if not prompts:
    raise InputError(f"{path}: no prompts")
  return ids, prompts


def read_done(path: str, repair: bool) -> set[tuple[str, int]]:
  """(id, sample) pairs already in `path`. A torn last line (a run killed mid-write) is ignored,
  and cut from the file when `repair` (the writing process)."""
  if not os.path.exists(path):
    return set()
  with open(path, "rb") as f:
    data = f.read()
  if data and not data.endswith(b"\n"):
    data = data[: data.rfind(b"\n") + 1]
    if repair:
      with open(path, "rb+") as f:
        f.truncate(len(data))
  done = set()
  for line in data.decode().splitlines():
    if line.strip():
      row = json.loads(line)
      done.add((str(row["id"]), int(row["sample"])))
  return done


def parse_mesh(spec: str | None):
  if not spec:
    return None
  import lora_jax

  try:
    shape = {k.strip(): int(v) for k, v in (part.split(":") for part in spec.split(","))}
  except ValueError:
    raise InputError(f"--mesh={spec!r}: expected axis:size pairs, e.g. fsdp:4,tensor:2") from None
  return lora_jax.make_mesh(shape)


def main(argv):
  del argv
  if not (FLAGS.model and FLAGS.prompts and FLAGS.out):
    raise InputError("--model, --prompts and --out are required")
  init_distributed()
  import jax

  import lora_jax
  from lora_jax.sampling import generate_text

  ids, prompts = read_prompts(FLAGS.prompts)
  try:
    stop_ids = tuple(int(t) for t in FLAGS.stop_token_ids)
  except ValueError:
    raise InputError(f"--stop_token_ids={FLAGS.stop_token_ids}: expected integers") from None
  done = read_done(FLAGS.out, repair=jax.process_index() == 0)
  index_of = {pid: i for i, pid in enumerate(ids)}
  skip = {(index_of[pid], s) for pid, s in done if pid in index_of and s < FLAGS.n}
  todo = len(prompts) * FLAGS.n - len(skip)
  logging.info(
    "%d prompts x %d samples: %d already in %s, %d to generate",
    len(prompts),
    FLAGS.n,
    len(skip),
    FLAGS.out,
    todo,
  )
  if todo == 0:
    return
  max_batch = FLAGS.max_batch if FLAGS.max_batch == "auto" else int(FLAGS.max_batch)
  model = lora_jax.load_pretrained(FLAGS.model, dtype=FLAGS.dtype, mesh=parse_mesh(FLAGS.mesh))
  if FLAGS.adapter:
    from lora_jax.io.peft import load_peft_adapter

    model = load_peft_adapter(model, FLAGS.adapter)
  tokenizer = lora_jax.load_tokenizer(FLAGS.tokenizer or FLAGS.model)
  writer = open(FLAGS.out, "a") if jax.process_index() == 0 else None

  def on_result(r):
    if writer is None:
      return
    writer.write(
      json.dumps(
        {
          "id": ids[r.index],
          "sample": r.sample,
          "text": r.text,
          "finish_reason": r.finish_reason,
          "stop_reason": r.stop_reason,
          "num_prompt_tokens": r.num_prompt_tokens,
          "num_tokens": r.num_tokens,
          "seed": FLAGS.seed,
        },
        ensure_ascii=False,
      )
      + "\n"
    )
    writer.flush()

  try:
    generate_text(
      model,
      tokenizer,
      prompts,
      max_new_tokens=FLAGS.max_new_tokens,
      temperature=FLAGS.temperature,
      top_p=FLAGS.top_p,
      top_k=FLAGS.top_k,
      min_p=FLAGS.min_p,
      seed=FLAGS.seed,
      n=FLAGS.n,
      stop=tuple(FLAGS.stop),
      stop_token_ids=stop_ids,
      chat_template=FLAGS.chat_template,
      max_batch=max_batch,
      on_result=on_result,
      max_len=FLAGS.max_len,
      max_cache_gb=FLAGS.max_cache_gb,
      skip=skip,
    )
  finally:
    if writer is not None:
      writer.close()
  logging.info("wrote %d answers to %s", todo, FLAGS.out)


def _main(argv):
  from lora_jax.sampling import SamplingError

  try:
    return one_line_errors(main)(argv)
  except (InputError, SamplingError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  app.run(_main)
