"""Decode speed against the KV cache's length: attention over the whole cache vs in blocks.

The sampler's compiled decode step (`lora_jax.sampling.steps.decode`) on a random
Qwen2.5-0.5B-shaped float32 checkpoint, from a cache of S slots filled with random keys and values
(no prefill), every row at position S - steps - 1 (a live row fills the cache, as the engine's
cache-length buckets keep it). Per cache length and batch, alternating:
  whole    attention over the whole cache in one piece (the path before blocked decoding);
  blocked  `attention.decode_attention`, `DECODE_BLOCK` slots at a time, forced on at every
           length (the sampler uses it for caches longer than `DECODE_WHOLE_UP_TO`, a threshold
           these figures chose).
Reports the median seconds per decode step of --repeats runs of --steps steps each and the
ratio whole / blocked (> 1: blocked is faster).

  python benchmarks/decode_attention.py [--lengths 1536,4096] [--batches 1,8] [--out FILE]
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

_DECODERS = {}


def _decoder(whole: bool):
  """One jitted copy of the sampler's decode step per mode: `DECODE_WHOLE_UP_TO` is read when
  tracing, and a jit function's cache keys on shapes only."""
  import jax

  from lora_jax.sampling import steps as compiled

  if whole not in _DECODERS:
    _DECODERS[whole] = jax.jit(
      compiled.decode.__wrapped__,
      static_argnames=("graphdef", "steps", "greedy"),
      donate_argnames=("cache",),
    )
  return _DECODERS[whole]


def decode_seconds(model, layers, batch: int, length: int, steps: int, whole: bool) -> float:
  """Seconds of one `decode` call of `steps` greedy steps from a random cache of `length`."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from lora_jax import attention
  from lora_jax.sampling import steps as compiled

  limit = 1 << 30 if whole else 0
  saved = attention.DECODE_WHOLE_UP_TO
  attention.DECODE_WHOLE_UP_TO = limit
  try:
    graphdef, state = nnx.split(model)
    cfg = model.config
    shape = (batch, length, cfg.num_kv_heads, cfg.head_dim)
    keys = jax.random.split(jax.random.key(length), 2 * cfg.num_layers)
    cache = [
      (jax.random.normal(keys[2 * i], shape), jax.random.normal(keys[2 * i + 1], shape))
      for i in range(cfg.num_layers)
    ]
    rows = {
      "tok": jnp.ones((batch,), jnp.int32),
      "pos": jnp.full((batch,), length - steps - 1, jnp.int32),
      "gen": jnp.zeros((batch,), jnp.int32),
      "max_new": jnp.full((batch,), 1 << 20, jnp.int32),
      "active": jnp.ones((batch,), bool),
      "key": jnp.zeros((batch,) + compiled.key_shape(), jnp.uint32),
      "temperature": jnp.zeros((batch,), jnp.float32),
      "top_k": jnp.zeros((batch,), jnp.int32),
      "top_p": jnp.ones((batch,), jnp.float32),
      "min_p": jnp.zeros((batch,), jnp.float32),
    }
    stop = jnp.full((1,), -1, jnp.int32)
    decode = _decoder(whole)
    run = lambda c: decode(
      graphdef, state, layers, c, rows, stop, jnp.bool_(False), steps=steps, greedy=True
    )
    cache, out, _ = run(cache)  # compile (first call of these shapes)
    out.block_until_ready()
    start = time.perf_counter()
    cache, out, n = run(cache)
    out.block_until_ready()
    assert int(n) == steps
    return (time.perf_counter() - start) / steps
  finally:
    attention.DECODE_WHOLE_UP_TO = saved


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument(
    "--ckpt_dir", default=os.path.join(tempfile.gettempdir(), "lora_jax_bench_qwen05b")
  )
  p.add_argument("--lengths", default="1536,4096")
  p.add_argument("--batches", default="1,8")
  p.add_argument("--steps", type=int, default=16)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--out", default="benchmarks/results/decode_attention.json")
  a = p.parse_args()

  import jax

  import lora_jax
  from lora_jax import attention
  from lora_jax.sampling.forward import layer_params

  write_checkpoint_if_missing(a.ckpt_dir)
  model = lora_jax.load_pretrained(a.ckpt_dir, dtype="float32")
  layers = layer_params(model, unstack=jax.devices()[0].platform == "cpu")
  results = {
    "load_average_before": os.getloadavg(),
    "decode_block": attention.DECODE_BLOCK,
    "decode_whole_up_to": attention.DECODE_WHOLE_UP_TO,
    "steps": a.steps,
    "cases": [],
  }
  table = []
  for batch in map(int, a.batches.split(",")):
    for length in map(int, a.lengths.split(",")):
      runs = {"whole": [], "blocked": []}
      for _ in range(a.repeats):
        for mode in runs:
          runs[mode].append(decode_seconds(model, layers, batch, length, a.steps, mode == "whole"))
      whole, blocked = (float(np.median(runs[m])) for m in ("whole", "blocked"))
      spread = lambda m, r=runs: f"{min(r[m]) * 1e3:.0f}-{max(r[m]) * 1e3:.0f}"
      results["cases"].append(
        {"batch": batch, "cache": length, "whole_s": whole, "blocked_s": blocked, "runs": runs}
      )
      table.append(
        [
          batch,
          length,
          f"{whole * 1e3:.1f} ({spread('whole')})",
          f"{blocked * 1e3:.1f} ({spread('blocked')})",
          f"{whole / blocked:.2f}",
        ]
      )
      print(table[-1], flush=True)
      write_json(a.out, results)  # after every case: a killed run keeps what it measured
  results["load_average_after"] = os.getloadavg()
  print_table(
    "decode step (ms): median (min-max)",
    ["batch", "cache", "whole", "blocked", "whole/blocked"],
    table,
  )
  write_json(a.out, results)


if __name__ == "__main__":
  main()
