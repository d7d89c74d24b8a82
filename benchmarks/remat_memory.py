"""The train step's memory under each remat policy, from XLA's memory analysis (BUILD.md quotes it).

The step benchmarks/train.py times (Qwen2.5-0.5B shape, float32, batch 2 x seq 512, AdamW),
compiled ahead of time on abstract inputs by `lora_jax.plan` (nothing allocated) for one CPU
device, with model.remat none, dots and full, in full fine-tuning and LoRA r8 on all linear
layers: argument bytes (params, Adam moments, batch) and XLA's temporary allocation.

  python benchmarks/remat_memory.py [--out benchmarks/results/remat_memory.json]
"""

from __future__ import annotations

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.environ.get("BENCH_LIB", os.path.dirname(HERE)))
import common  # noqa: E402

GiB = 1 << 30
ALL_LINEAR = "qkvo_mlp"


def run_config(mode: str, remat: str, batch: int, seq: int):
  from configs import base
  from lora_jax.run_config import from_dict

  c = base.get_config()
  c.train.mode, c.train.batch_size, c.data.max_length = mode, batch, seq
  c.model.remat, c.model.dtype = remat, "float32"
  if mode == "lora":
    c.lora.rank, c.lora.alpha, c.lora.targets = 8, 16.0, ALL_LINEAR
  return from_dict(c)


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--batch", type=int, default=2)
  p.add_argument("--seq", type=int, default=512)
  p.add_argument("--out", default="benchmarks/results/remat_memory.json")
  a = p.parse_args()

  from lora_jax.config import ModelConfig
  from lora_jax.plan import plan_train_step
  from lora_jax.plan.fit import plan_mesh

  before = common.machine()
  config = ModelConfig(**common.QWEN25_05B)
  rows, results = [], {}
  for mode in ("full", "lora"):
    for remat in ("none", "dots", "full"):
      cfg = run_config(mode, remat, a.batch, a.seq)
      step = plan_train_step(cfg, config, plan_mesh(cfg.mesh.axes, 1))
      results[f"{mode}/{remat}"] = step.to_dict()
      rows.append(
        [
          mode,
          remat,
          f"{(step.inputs['trainable params'] + step.inputs['frozen params']) / GiB:.2f}",
          f"{step.inputs['optimizer state'] / GiB:.2f}",
          f"{step.temp_bytes / GiB:.2f}",
          f"{step.device_bytes / GiB:.2f}",
          f"{step.compile_seconds:.0f}",
        ]
      )
      print(rows[-1], flush=True)
  common.print_table(
    f"train step memory (XLA memory analysis, CPU): Qwen2.5-0.5B shape, float32, batch "
    f"{a.batch} x seq {a.seq}",
    ["mode", "remat", "params GiB", "Adam GiB", "temporaries GiB", "total GiB", "compile s"],
    rows,
  )
  common.write_json(
    a.out,
    {"benchmark": "remat_memory", "batch": a.batch, "seq": a.seq, "results": results},
    before,
  )


if __name__ == "__main__":
  main()
