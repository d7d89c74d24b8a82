"""Sampling speed: lora_jax's sampler vs transformers' generate, and continuous vs static batching.

One run, one random Qwen2.5-0.5B-shaped float32 checkpoint loaded by both libraries:
  1. greedy, 128-token prompts, --new_tokens new tokens (no early stop), batch 1 and batch 8,
     lora_jax vs transformers (torch float32); end-to-end time (prefill + decode) after a warm-up,
     best of --repeats, the two libraries alternating so machine noise hits both alike;
  2. the batch-1 bound: weight bytes read per token / the read bandwidth measured in this run;
  3. a mixed-length workload (answers of 16 to 512 tokens, log-uniform, set per request) through
     the same engine with continuous batching, and with static batching (groups of `batch` run to
     completion).
Targets: >= 3x transformers' tokens/s at batch 8, >= 2x at batch 1, >= 60% of the bandwidth bound
at batch 1, continuous >= 1.5x static.

  python benchmarks/sample.py [--quick] [--out benchmarks/results/sample.json]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import print_table, write_checkpoint_if_missing, write_json  # noqa: E402

PROMPT_LEN = 128


def read_bandwidth(nbytes: int = 1 << 30, repeats: int = 5) -> float:
  """Bytes/s of the fastest of numpy, torch and XLA summing a 1 GiB float32 array."""
  import jax
  import jax.numpy as jnp
  import torch

  a = np.ones(nbytes // 4, np.float32)
  t, j = torch.from_numpy(a), jnp.asarray(a)
  jsum = jax.jit(jnp.sum)
  readers = {"numpy": a.sum, "torch": t.sum, "xla": lambda: jsum(j).block_until_ready()}
  best = {}
  for name, f in readers.items():
    f()
    times = []
    for _ in range(repeats):
      s = time.perf_counter()
      f()
      times.append(time.perf_counter() - s)
    best[name] = nbytes / min(times)
  return max(best.values())


def ours_generate(engine, prompts, new_tokens):
  from lora_jax.sampling import Request

  t = time.perf_counter()
  out = list(engine.run([Request(p, new_tokens, index=i) for i, p in enumerate(prompts)]))
  dt = time.perf_counter() - t
  assert all(len(c.token_ids) == new_tokens for c in out)
  return dt


def hf_generate(hf, prompts, new_tokens):
  import torch

  ids = torch.tensor(prompts)
  t = time.perf_counter()
  with torch.no_grad():
    out = hf.generate(
      ids,
      attention_mask=torch.ones_like(ids),
      do_sample=False,
      max_new_tokens=new_tokens,
      min_new_tokens=new_tokens,
      pad_token_id=0,
    )
  dt = time.perf_counter() - t
  assert out.shape[1] == PROMPT_LEN + new_tokens
  return dt


def head_to_head(model, hf, batch, new_tokens, repeats, rng):
  from lora_jax.sampling import Engine

  prompts = rng.randint(0, model.config.vocab_size, (batch, PROMPT_LEN)).tolist()
  engine = Engine(model, max_len=PROMPT_LEN + new_tokens, max_batch=batch, stop_token_ids=())
  ours_generate(engine, prompts, new_tokens)  # compile
  hf_generate(hf, prompts, 4)  # warm up torch
  ours, theirs = [], []
  tokens = batch * new_tokens
  for _ in range(repeats):
    ours.append(ours_generate(engine, prompts, new_tokens))
    theirs.append(hf_generate(hf, prompts, new_tokens))
    print(
      f"batch {batch}: lora_jax {tokens / ours[-1]:.2f} tokens/s, transformers "
      f"{tokens / theirs[-1]:.2f}",
      flush=True,
    )
  return {
    "batch": batch,
    "new_tokens": new_tokens,
    "lora_jax_s": min(ours),
    "transformers_s": min(theirs),
    "lora_jax_tok_s": tokens / min(ours),
    "transformers_tok_s": tokens / min(theirs),
    "runs": {"lora_jax": ours, "transformers": theirs},
  }


def mixed_workload(model, batch, n_requests, lengths, rng):
  """Continuous vs static batching over requests whose answers are 16..512 tokens long,
  log-uniform (many short answers, a few long ones, as reasoning traces are)."""
  from lora_jax.sampling import Engine, Request

  lo, hi = np.log(lengths[0]), np.log(lengths[1] + 1)
  budgets = np.exp(rng.uniform(lo, hi, n_requests)).astype(int).tolist()
  prompts = rng.randint(0, model.config.vocab_size, (n_requests, PROMPT_LEN)).tolist()
  reqs = lambda: [Request(p, n, index=i) for i, (p, n) in enumerate(zip(prompts, budgets))]
  engine = Engine(model, max_len=PROMPT_LEN + lengths[1], max_batch=batch, stop_token_ids=())
  list(engine.run(reqs()[: 2 * batch]))  # compile: prefill/insert sizes, cache lengths
  t = time.perf_counter()
  all_reqs = reqs()
  for i in range(0, n_requests, batch):  # static: a group runs until its longest answer ends
    list(engine.run(all_reqs[i : i + batch]))
  static = time.perf_counter() - t
  print(f"mixed: static {static:.1f}s", flush=True)
  t = time.perf_counter()
  list(engine.run(reqs()))
  continuous = time.perf_counter() - t
  print(f"mixed: continuous {continuous:.1f}s", flush=True)
  tokens = sum(budgets)
  return {
    "batch": batch,
    "requests": n_requests,
    "answer_tokens": tokens,
    "min_len": min(budgets),
    "max_len": max(budgets),
    "continuous_s": continuous,
    "static_s": static,
    "continuous_tok_s": tokens / continuous,
    "static_tok_s": tokens / static,
  }


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument(
    "--ckpt_dir", default=os.path.join(tempfile.gettempdir(), "lora_jax_bench_qwen05b")
  )
  p.add_argument("--new_tokens", type=int, default=256)
  p.add_argument("--repeats", type=int, default=2)
  p.add_argument("--mixed_requests", type=int, default=48)
  p.add_argument(
    "--quick",
    action="store_true",
    help="64 new tokens, 24 mixed requests of 16..128 tokens, one repeat: a smoke run",
  )
  p.add_argument("--skip_mixed", action="store_true")
  p.add_argument("--out", default="benchmarks/results/sample.json")
  a = p.parse_args()
  lengths = (16, 512)
  if a.quick:
    a.new_tokens, a.repeats, a.mixed_requests, lengths = 64, 1, 24, (16, 128)

  import torch
  import transformers

  import lora_jax

  write_checkpoint_if_missing(a.ckpt_dir)
  model = lora_jax.load_pretrained(a.ckpt_dir, dtype="float32")
  hf = transformers.AutoModelForCausalLM.from_pretrained(a.ckpt_dir, dtype=torch.float32).eval()
  rng = np.random.RandomState(0)

  # Other processes on a shared machine slow everything down: the bandwidth is measured before
  # and after each phase and the best kept (a conservative bound), and the load is recorded.
  bandwidths = [read_bandwidth()]
  results = {"load_average_before": os.getloadavg(), "torch_threads": torch.get_num_threads()}
  for batch in (1, 8):
    results[f"batch{batch}"] = head_to_head(model, hf, batch, a.new_tokens, a.repeats, rng)
    bandwidths.append(read_bandwidth())
  del hf
  if not a.skip_mixed:
    results["mixed"] = mixed_workload(model, 8, a.mixed_requests, lengths, rng)
  results["load_average_after"] = os.getloadavg()
  bandwidth = max(bandwidths)
  weight_bytes = model.config.num_params() * 4  # every weight is read once per decode step
  bound = bandwidth / weight_bytes
  results.update(
    bandwidth_GBps=bandwidth / 1e9,
    bandwidth_runs_GBps=[b / 1e9 for b in bandwidths],
    weight_bytes_per_token=weight_bytes,
    batch1_bound_tok_s=bound,
  )

  rows = []
  for batch in (1, 8):
    r = results[f"batch{batch}"]
    rows.append(
      [
        f"batch {batch}",
        f"{r['lora_jax_tok_s']:.2f}",
        f"{r['transformers_tok_s']:.2f}",
        f"{r['lora_jax_tok_s'] / r['transformers_tok_s']:.2f}x",
      ]
    )
  print_table(
    f"greedy, {PROMPT_LEN}-token prompts, {a.new_tokens} new tokens, float32 "
    f"(tokens/s, best of {a.repeats})",
    ["", "lora_jax", "transformers", "speed-up"],
    rows,
  )
  b1 = results["batch1"]["lora_jax_tok_s"]
  print(
    f"\nbatch-1 bound: {weight_bytes / 1e9:.2f} GB of weights per token / "
    f"{bandwidth / 1e9:.1f} GB/s read = {bound:.2f} tokens/s; lora_jax reaches "
    f"{b1:.2f} ({b1 / bound:.0%})"
  )
  ratios = {
    "batch8_vs_transformers": results["batch8"]["lora_jax_tok_s"]
    / results["batch8"]["transformers_tok_s"],
    "batch1_vs_transformers": b1 / results["batch1"]["transformers_tok_s"],
    "batch1_vs_bandwidth_bound": b1 / bound,
  }
  if "mixed" in results:
    m = results["mixed"]
    print_table(
      f"mixed lengths: {m['requests']} requests, answers {m['min_len']}..{m['max_len']} "
      f"tokens, log-uniform ({m['answer_tokens']} in all), batch {m['batch']}",
      ["batching", "seconds", "tokens/s"],
      [
        ["continuous", f"{m['continuous_s']:.1f}", f"{m['continuous_tok_s']:.2f}"],
        ["static", f"{m['static_s']:.1f}", f"{m['static_tok_s']:.2f}"],
      ],
    )
    ratios["continuous_vs_static"] = m["static_s"] / m["continuous_s"]
  targets = {
    "batch8_vs_transformers": 3.0,
    "batch1_vs_transformers": 2.0,
    "batch1_vs_bandwidth_bound": 0.6,
    "continuous_vs_static": 1.5,
  }
  print(
    f"\nload average before / after: {results['load_average_before']} / "
    f"{results['load_average_after']} (2 cores)"
  )
  print("ratios (target):")
  for k, v in ratios.items():
    print(f"  {k}: {v:.2f} (>= {targets[k]}) {'ok' if v >= targets[k] else 'MISSED'}")
  results["ratios"], results["targets"] = ratios, targets
  write_json(a.out, results)


if __name__ == "__main__":
  main()
