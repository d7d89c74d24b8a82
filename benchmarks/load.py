"""Load time and peak RSS: lora_jax.load_pretrained vs transformers.from_pretrained.

Both load the same random Qwen2.5-0.5B-shaped float32 checkpoint (sharded safetensors), each in a
fresh process so peak RSS is its own. Targets: load time <= 1.0x transformers', peak RSS <= 1.25x
the checkpoint's bytes.

  python benchmarks/load.py [--ckpt_dir DIR] [--repeats 3] [--out benchmarks/results/load.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (
  checkpoint_bytes,
  peak_rss_bytes,
  print_table,
  run_worker,  # noqa: E402
  write_checkpoint_if_missing,
  write_json,
)


def worker(which: str, path: str) -> None:
  if which == "lora_jax":
    import jax

    import lora_jax

    jax.devices()  # backend start-up is not load time
    base = peak_rss_bytes()
    t = time.perf_counter()
    model = lora_jax.load_pretrained(path, dtype="float32")
    jax.block_until_ready(jax.tree.leaves(model))
  else:
    import torch
    import transformers

    base = peak_rss_bytes()
    t = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
  seconds = time.perf_counter() - t
  print(json.dumps({"seconds": seconds, "peak_rss": peak_rss_bytes(), "rss_before": base}))


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--worker", choices=["lora_jax", "transformers"])
  p.add_argument(
    "--ckpt_dir", default=os.path.join(tempfile.gettempdir(), "lora_jax_bench_qwen05b")
  )
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--out", default="benchmarks/results/load.json")
  a = p.parse_args()
  if a.worker:
    return worker(a.worker, a.ckpt_dir)
  write_checkpoint_if_missing(a.ckpt_dir)
  size = checkpoint_bytes(a.ckpt_dir)
  results = {}
  for which in ("transformers", "lora_jax"):
    runs = [
      run_worker(__file__, "--worker", which, "--ckpt_dir", a.ckpt_dir) for _ in range(a.repeats)
    ]
    results[which] = {
      "seconds": min(r["seconds"] for r in runs),
      "peak_rss": max(r["peak_rss"] for r in runs),
      "rss_before": min(r["rss_before"] for r in runs),
      "runs": runs,
    }
  ours, theirs = results["lora_jax"], results["transformers"]
  rows = [
    [k, f"{v['seconds']:.2f}", f"{v['peak_rss'] / 2**30:.2f}", f"{v['peak_rss'] / size:.2f}"]
    for k, v in results.items()
  ]
  print_table(
    f"load: Qwen2.5-0.5B shape, float32, checkpoint {size / 2**30:.2f} GiB (best of {a.repeats})",
    ["loader", "seconds", "peak RSS GiB", "RSS / ckpt"],
    rows,
  )
  ratios = {
    "time_vs_transformers": ours["seconds"] / theirs["seconds"],
    "peak_rss_vs_checkpoint": ours["peak_rss"] / size,
    "transformers_peak_rss_vs_checkpoint": theirs["peak_rss"] / size,
  }
  print("ratios:", json.dumps({k: round(v, 3) for k, v in ratios.items()}))
  print(
    "targets: time <= 1.0x transformers:",
    ratios["time_vs_transformers"] <= 1.0,
    "| peak RSS <= 1.25x checkpoint:",
    ratios["peak_rss_vs_checkpoint"] <= 1.25,
  )
  write_json(a.out, {"checkpoint_bytes": size, "results": results, "ratios": ratios})


if __name__ == "__main__":
  main()
