"""Sample answers to a JSONL file of prompts; resumable (see lora_jax/sample_file.py).

    python -m launch.sample --model=SOURCE [--adapter=DIR] --prompts=IN.jsonl --out=OUT.jsonl \\
        --max_new_tokens=2048 --temperature=0.6 --top_p=0.95 --n=8 --seed=0 [--stop=Problem:] \\
        [--nochat_template] [--mesh=fsdp:4,tensor:2] [--dtype=bfloat16] [--max_batch=auto]
"""

from __future__ import annotations

from absl import flags, logging

from launch import common

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
flags.DEFINE_integer(
  "max_model_len",
  None,
  "Prompt + answer at most this many tokens (vLLM's max_model_len; the reference preset's 32768).",
)
flags.DEFINE_bool(
  "add_special_tokens",
  False,
  "Tokenize the rendered prompt with the tokenizer's special tokens too (a second BOS after the "
  "template's: the reference's StrongREJECT quirk, see README).",
)
flags.DEFINE_float("max_cache_gb", None, "Memory budget of the KV cache (default: free memory).")
flags.DEFINE_string("mesh", None, "Device mesh, e.g. fsdp:4,tensor:2 (default: one device).")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Parameter and compute dtype.")
common.define_distributed_flags()
flags.mark_flags_as_required(["model", "prompts", "out"])


def _int(flag: str, value: str) -> int:
  try:
    return int(value)
  except ValueError:
    raise ValueError(f"--{flag}={value}: expected an integer") from None


def main(argv):
  del argv
  common.init_distributed()
  from lora_jax.sample_file import SampleJob, sample_file

  job = SampleJob(
    model=FLAGS.model,
    prompts=FLAGS.prompts,
    out=FLAGS.out,
    adapter=FLAGS.adapter,
    tokenizer=FLAGS.tokenizer,
    max_new_tokens=FLAGS.max_new_tokens,
    temperature=FLAGS.temperature,
    top_p=FLAGS.top_p,
    top_k=FLAGS.top_k,
    min_p=FLAGS.min_p,
    n=FLAGS.n,
    seed=FLAGS.seed,
    stop=tuple(FLAGS.stop),
    stop_token_ids=tuple(_int("stop_token_ids", t) for t in FLAGS.stop_token_ids),
    chat_template=FLAGS.chat_template,
    max_batch="auto" if FLAGS.max_batch == "auto" else _int("max_batch", FLAGS.max_batch),
    max_len=FLAGS.max_len,
    max_cache_gb=FLAGS.max_cache_gb,
    max_model_len=FLAGS.max_model_len,
    add_special_tokens=FLAGS.add_special_tokens,
    mesh=FLAGS.mesh,
    dtype=FLAGS.dtype,
  )
  logging.info("%d answers written", sample_file(job))


if __name__ == "__main__":
  common.run(main)
