"""Sampling speed: lora_jax's sampler vs transformers' generate (kernel level).

One run, one random Qwen2.5-0.5B-shaped float32 checkpoint (`--layers` decoder layers; 24 is the
real model) loaded by both libraries in one process:
  1. greedy, 128-token prompts, --new_tokens new tokens (no early stop), batch 1 and batch 8,
     lora_jax vs transformers (torch float32, the faster of its dynamic and static KV cache on a
     warm-up); end-to-end time (prefill + decode) after a warm-up, `--repeats` alternating
     repeats (ours, theirs, theirs, ours, ...), medians;
  2. the batch-1 bound: weight bytes read per token / the read bandwidth measured in this run
     (best of numpy, torch and XLA);
  3. with --mixed: a mixed-length workload through the same engine with continuous and with
     static batching (benchmarks/eval_workload.py is the user-level version of this).
Targets: batch-1 decode >= 85% of the bandwidth bound; batch 8 >= 2x transformers' tokens/s.

  python benchmarks/sample.py [--quick] [--out benchmarks/results/sample.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.environ.get("BENCH_LIB", os.path.dirname(HERE)))
import common  # noqa: E402  (pins thread counts before jax/torch load)
import numpy as np  # noqa: E402
from common import print_table, write_json  # noqa: E402

PROMPT_LEN = 128


def read_bandwidth(nbytes: int = 1 << 28, repeats: int = 5) -> float:
  """Bytes/s of the fastest of numpy, torch and XLA summing a 256 MiB float32 array (far past
  the caches; small enough not to push a shared machine into swapping or the OOM killer)."""
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


def hf_generate(hf, prompts, new_tokens, cache="dynamic"):
  import torch

  ids = torch.tensor(prompts)
  extra = {"cache_implementation": "static"} if cache == "static" else {}
  t = time.perf_counter()
  with torch.inference_mode():
    out = hf.generate(
      ids,
      attention_mask=torch.ones_like(ids),
      do_sample=False,
      max_new_tokens=new_tokens,
      min_new_tokens=new_tokens,
      pad_token_id=0,
      **extra,
    )
  dt = time.perf_counter() - t
  assert out.shape[1] == PROMPT_LEN + new_tokens
  return dt


def head_to_head(model, hf, batch, new_tokens, repeats, rng):
  from lora_jax.sampling import Engine

  prompts = rng.randint(0, model.config.vocab_size, (batch, PROMPT_LEN)).tolist()
  engine = Engine(model, max_len=PROMPT_LEN + new_tokens, max_batch=batch, stop_token_ids=())
  ours_generate(engine, prompts, new_tokens)  # compile
  caches = {}
  for cache in ("dynamic", "static"):  # torch's faster cache on this CPU, after a warm-up
    try:
      hf_generate(hf, prompts, 8, cache)
      caches[cache] = hf_generate(hf, prompts, 32, cache)
    except Exception as e:  # noqa: BLE001  (a setting that fails here is reported, not used)
      caches[cache] = f"{type(e).__name__}: {str(e)[:200]}"
  cache = min((k for k, v in caches.items() if isinstance(v, float)), key=caches.get)
  ours, theirs = [], []
  tokens = batch * new_tokens
  for r in range(repeats):
    pair = [
      lambda: ours.append(ours_generate(engine, prompts, new_tokens)),
      lambda: theirs.append(hf_generate(hf, prompts, new_tokens, cache)),
    ]
    for f in pair if r % 2 == 0 else pair[::-1]:
      f()
    print(
      f"batch {batch}: lora_jax {tokens / ours[-1]:.2f} tokens/s, transformers "
      f"{tokens / theirs[-1]:.2f}",
      flush=True,
    )
  o, t = np.median(ours), np.median(theirs)
  return {
    "batch": batch,
    "new_tokens": new_tokens,
    "transformers_cache": cache,
    "transformers_caches_tried_s": caches,
    "lora_jax_s": common.summary(ours),
    "transformers_s": common.summary(theirs),
    "lora_jax_tok_s": tokens / o,
    "transformers_tok_s": tokens / t,
    "ratio_per_round": common.summary([y / x for x, y in zip(ours, theirs)]),
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
  p.add_argument("--ckpt_dir", default=None)
  p.add_argument("--layers", type=int, default=24, help="decoder layers (24 in Qwen2.5-0.5B)")
  p.add_argument("--new_tokens", type=int, default=128)
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--mixed_requests", type=int, default=48)
  p.add_argument(
    "--quick",
    action="store_true",
    help="64 new tokens, 24 mixed requests of 16..128 tokens, one repeat: a smoke run",
  )
  p.add_argument("--mixed", action="store_true", help="also continuous vs static batching")
  p.add_argument("--out", default="benchmarks/results/sample.json")
  a = p.parse_args()
  lengths = (16, 512)
  if a.quick:
    a.new_tokens, a.repeats, a.mixed_requests, lengths = 64, 1, 24, (16, 128)

  import torch
  import transformers

  import lora_jax

  before = common.machine()
  common.torch_threads()
  a.ckpt_dir = common.layers_checkpoint(a.ckpt_dir, a.layers)
  model = lora_jax.load_pretrained(a.ckpt_dir, dtype="float32")
  hf = transformers.AutoModelForCausalLM.from_pretrained(a.ckpt_dir, dtype=torch.float32).eval()
  rng = np.random.RandomState(0)

  # Other processes on a shared machine slow everything down: the bandwidth is measured before
  # and after each phase and the best kept (a conservative bound), and the load is recorded.
  bandwidths = [read_bandwidth()]
  results = {"load_average_before": os.getloadavg(), "torch_threads": torch.get_num_threads()}
  for batch in (1, 8):
    results[f"batch{batch}"] = head_to_head(model, hf, batch, a.new_tokens, a.repeats, rng)
    with open(os.path.join(tempfile.gettempdir(), f"bench_sample.{os.getpid()}.json"), "w") as f:
      json.dump(results, f)  # a run killed later (OOM on a shared machine) keeps its figures
    bandwidths.append(read_bandwidth())
  del hf
  if a.mixed:
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
    f"(tokens/s from the median of {a.repeats} alternating repeats)",
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
  targets = {"batch8_vs_transformers": 2.0, "batch1_vs_bandwidth_bound": 0.85}
  print(
    f"\nload average before / after: {results['load_average_before']} / "
    f"{results['load_average_after']} (2 cores)"
  )
  print("ratios (target):")
  verdicts = {k: common.verdict(ratios[k], v) for k, v in targets.items()}
  for k, v in ratios.items():
    print(f"  {k}: {v:.2f}" + (f" (>= {targets[k]}) {verdicts[k]}" if k in targets else ""))
  results["ratios"], results["targets"], results["verdicts"] = ratios, targets, verdicts
  results["settings"] = vars(a)
  write_json(a.out, {"benchmark": "sample", **results}, before)


if __name__ == "__main__":
  main()
