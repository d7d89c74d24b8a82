"""Memory plans of the paper's configs on the accelerators people have: the table in BUILD.md.

  python benchmarks/plan_table.py [--out benchmarks/results/plan_table.json] [--build_md BUILD.md]
  python benchmarks/plan_table.py --from_json benchmarks/results/plan_table.json --build_md BUILD.md

R1-Distill-Qwen 1.5B/7B/14B/32B, LoRA r1 on up_proj (the paper's best) and full fine-tuning,
planned by `lora_jax.plan` (the train step compiled ahead of time for fake CPU devices, XLA's
memory analysis per device) on 1 and 8 GPUs of 80 GB, a TPU v5e-8 (8 chips of 16 GB) and a TPU
v5p-8 (4 chips of 95 GB: v5p counts TensorCores, two per chip). One worker process per device
count (JAX's device count is fixed at start-up) compiles every config once; each target then
reads the figure of its device count. The runs' own remat policy (configs/paper/common.py) is
planned, and for the LoRA configs that use none, dots and full as well. Full fine-tuning is also
planned on 16 devices: sharding is right when its per-device figure halves from 8 to 16.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import write_json  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZES = ("1.5b", "7b", "14b", "32b")
MODES = {"lora r1 (up_proj)": "lora.py:{size},lora_up_proj_only_r1", "full": "full.py:{size}"}
GiB = 1 << 30
TARGETS = [  # name, devices, memory per device
  ("1x GPU 80 GB", 1, 80 * GiB),
  ("8x GPU 80 GB", 8, 80 * GiB),
  ("TPU v5e-8 (8x 16 GB)", 8, 16 * GiB),
  ("TPU v5p-8 (4x 95 GB)", 4, 95 * GiB),
]
HEADROOM = 0.9  # lora_jax.plan's default: 10% of each device for the runtime
HALVING = (8, 16)
BEGIN, END = "<!-- plan_table: begin -->", "<!-- plan_table: end -->"


def jobs_for(devices: int) -> list[dict]:
  """Configs to plan with this many devices: every mode on the targets' device counts, full
  fine-tuning on the halving check's."""
  from configs.paper import common

  out = []
  for size in SIZES:
    for mode, pattern in MODES.items():
      if devices not in {t[1] for t in TARGETS} and not (mode == "full" and devices in HALVING):
        continue
      remat = common.paper_config(size).model.remat if mode != "full" else "full"
      remats = ("none", "dots", "full") if remat == "none" else (remat,)
      for r in remats:
        out.append({"size": size, "mode": mode, "config": pattern.format(size=size), "remat": r})
  return out


def worker(devices: int) -> None:
  import jax

  jax.config.update("jax_platforms", "cpu")
  jax.config.update("jax_num_cpu_devices", devices)
  from lora_jax.plan import model_config, plan_train_step
  from lora_jax.plan.fit import plan_mesh
  from lora_jax.plan.planner import with_remat
  from lora_jax.run_config import from_dict

  rows = []
  for job in jobs_for(devices):
    file, variant = job["config"].split(":")
    module = __import__(f"configs.paper.{file[:-3]}", fromlist=["get_config"])
    cfg = with_remat(from_dict(module.get_config(variant)), job["remat"])
    config = model_config(cfg.model.source, os.path.join(REPO, "configs/paper/shapes"))
    step = plan_train_step(cfg, config, plan_mesh(cfg.mesh.axes, devices))
    rows.append({**job, "devices": devices, **step.to_dict()})
    print(f"{job['config']} remat {job['remat']} on {devices}: {step.device_bytes / GiB:.2f} GiB "
          f"({step.compile_seconds:.0f}s)", file=sys.stderr, flush=True)  # fmt: skip
  print(json.dumps({"rows": rows}))


def cell(rows: list[dict], memory: int) -> str:
  parts = []
  for r in rows:
    mark = "fits" if r["device_bytes"] <= HEADROOM * memory else "no"
    parts.append(f"{r['device_bytes'] / GiB:.1f} {mark} ({r['remat']})")
  return "<br>".join(parts)


def markdown(rows: list[dict]) -> str:
  header = "| model | mode | " + " | ".join(t[0] for t in TARGETS) + " |"
  lines = [header, "|" + "---|" * (2 + len(TARGETS))]
  for size in SIZES:
    for mode in MODES:
      cells = []
      for _, devices, memory in TARGETS:
        mine = [r for r in rows if (r["size"], r["mode"], r["devices"]) == (size, mode, devices)]
        cells.append(cell(mine, memory))
      lines.append(f"| R1-Distill-Qwen-{size.upper()} | {mode} | " + " | ".join(cells) + " |")
  lines += [
    "",
    "| full fine-tuning | GiB per device, 8 devices | 16 devices | 16 / 8 |",
    "|---|---|---|---|",
  ]
  for size in SIZES:
    by = {r["devices"]: r["device_bytes"] for r in rows if (r["size"], r["mode"]) == (size, "full")}
    a, b = by[HALVING[0]], by[HALVING[1]]
    lines.append(
      f"| R1-Distill-Qwen-{size.upper()} | {a / GiB:.1f} | {b / GiB:.1f} | {b / a:.2f} |"
    )
  return "\n".join(lines) + "\n"


def update_build_md(path: str, table: str) -> None:
  """Replace the text between the BEGIN and END markers of `path` with `table`."""
  with open(path, encoding="utf-8") as f:
    text = f.read()
  if BEGIN not in text or END not in text:
    raise ValueError(f"{path}: no '{BEGIN}' ... '{END}' block to replace")
  head, rest = text.split(BEGIN, 1)
  tail = rest.split(END, 1)[1]
  note = "<!-- made by benchmarks/plan_table.py --build_md; do not edit by hand -->\n"
  with open(path, "w", encoding="utf-8") as f:
    f.write(f"{head}{BEGIN}\n{note}{table}{END}{tail}")


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--out", default="benchmarks/results/plan_table.json")
  ap.add_argument("--build_md", help="rewrite the generated block of this BUILD.md")
  ap.add_argument("--from_json", help="remake the table from this earlier --out, planning nothing")
  ap.add_argument("--worker", type=int, help=argparse.SUPPRESS)
  args = ap.parse_args()
  if args.worker:
    worker(args.worker)
    return
  if args.from_json:
    with open(args.from_json) as f:
      table = markdown(json.load(f)["rows"])
    print(table)
    if args.build_md:
      update_build_md(args.build_md, table)
    return
  t0 = time.time()
  rows = []
  counts = sorted({t[1] for t in TARGETS} | set(HALVING))
  for devices in counts:  # a fresh process each: progress on stderr, the rows as JSON on stdout
    out = subprocess.run(
      [sys.executable, os.path.abspath(__file__), "--worker", str(devices)],
      check=True,
      stdout=subprocess.PIPE,
      text=True,
    )
    rows += json.loads(out.stdout.strip().splitlines()[-1])["rows"]
  table = markdown(rows)
  print(table)
  write_json(
    args.out,
    {
      "what": "lora_jax.plan train-step memory per device (XLA:CPU compile for fake devices)",
      "targets": [{"name": n, "devices": d, "memory_bytes": m} for n, d, m in TARGETS],
      "headroom": HEADROOM,
      "seconds": time.time() - t0,
      "rows": rows,
    },
  )
  if args.build_md:
    update_build_md(args.build_md, table)


if __name__ == "__main__":
  main()
