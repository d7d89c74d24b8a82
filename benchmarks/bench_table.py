"""BUILD.md's speed-benchmark table, made from the JSON files under benchmarks/results/.

  python benchmarks/bench_table.py [--results benchmarks/results] [--build_md BUILD.md]

Each row quotes one file: both sides' medians, the ratio, the target and whether it was met, the
load average during the run. A missing file is a row saying so (run the script to fill it).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import QWEN25_05B  # noqa: E402

BEGIN, END = "<!-- bench_table: begin -->", "<!-- bench_table: end -->"
GiB = 1 << 30


def _load(results: str, name: str) -> dict | None:
  path = os.path.join(results, name)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def _load_note(d: dict) -> str:
  m = d["machine"]
  before = m.get("load_average_before", m["load_average"])
  return (
    f"{m['threads']} threads, load {before[0]:.1f} -> {m['load_average'][0]:.1f}, "
    f"commit {m.get('commit')}"
  )


def _mark(v: float, target: float, at_most: bool = False) -> str:
  return "met" if (v <= target if at_most else v >= target) else "**missed**"


def _fpt(model: dict, seq: int, full: bool) -> float:
  from lora_jax.config import ModelConfig
  from lora_jax.metrics_log import flops_per_token

  return flops_per_token(ModelConfig(**model), seq, full)


def train_epoch_row(d: dict) -> list[str]:
  s, parts = d["settings"], []
  tokens = d["data"]["tokens"]
  for mode, r in d["results"].items():
    w = r["wall_s"]
    # Model FLOPs per CPU second: unlike wall-clock MFU, time slicing by other processes does
    # not move it, so it is the roofline figure on a shared machine.
    flops = _fpt(d["model"], tokens // d["data"]["rows"], mode == "full") * tokens
    per_cpu = {k: flops / r["cpu_s"][k]["median"] / 1e9 for k in ("lora_jax", "transformers")}
    parts.append(
      f"{mode}: {r['ratio_of_medians']:.2f}x ({w['transformers']['median']:.0f} s vs "
      f"{w['lora_jax']['median']:.0f} s; CPU "
      f"{r['cpu_s']['transformers']['median'] / r['cpu_s']['lora_jax']['median']:.2f}x) "
      f"{_mark(r['ratio_of_medians'], r['target'])}; our compile "
      f"{r['ours_setup']['compile_s']:.0f} s, padding {100 * r['ours_padding_fraction']:.0f}% "
      f"(theirs {100 * r['theirs_padding_fraction']:.0f}%), model GFLOP per CPU second "
      f"{per_cpu['lora_jax']:.0f} vs {per_cpu['transformers']:.0f}"
    )
  what = (
    f"an epoch of {s['rows']} STAR-1 rows ({d['data']['tokens']} tokens, R1 tokenizer), batch 2, "
    f"{s['layers']}-layer Qwen2.5-0.5B shape; LoRA r1 up_proj and full FT vs Trainer + PEFT "
    f"({next(iter(d['results'].values()))['theirs_setup']['optim']}), dynamic padding"
  )
  return ["`benchmarks/train_epoch.py`", what, "wall >= 1.5x theirs", "; ".join(parts)]


def eval_row(d: dict) -> list[str]:
  w, k = d["workload"], d["wall_s"]
  what = (
    f"{w['requests']} sampled answers (T 0.6, top_p 0.95, {min(w['lengths'])}..."
    f"{max(w['lengths'])} tokens), {d['settings']['layers']}-layer model: continuous batching "
    f"vs `generate` in static batches of 8 ({d['theirs_setup']['setting']} cache)"
  )
  got = (
    f"{d['ratio_of_medians']:.2f}x ({k['transformers']['median']:.0f} s vs "
    f"{k['lora_jax']['median']:.0f} s; CPU {d['cpu_ratio_of_medians']:.2f}x) "
    f"{_mark(d['ratio_of_medians'], d['target'])}"
  )
  return ["`benchmarks/eval_workload.py`", what, "wall >= 3.5x theirs", got]


def _train_ratios(r: dict) -> dict:
  """benchmarks/train.py's ratios, from its results (two files' modes merged)."""
  med = lambda mode, side: r[mode][side]["tokens_per_second"]["median"]
  rss = lambda mode: r[mode]["peak_rss"]["lora_jax"] / r[mode]["peak_rss"]["transformers"]
  out = {}
  if "lora" in r:
    out["lora_vs_theirs"] = med("lora", "lora_jax") / med("lora", "transformers")
  if "full" in r:
    out["full_vs_theirs"] = med("full", "lora_jax") / med("full", "transformers")
    out["full_peak_rss_vs_theirs"] = rss("full")
  if "lora" in r and "full" in r:
    # The modes may come from runs at different load: compare CPU seconds per repeat.
    cpu = lambda mode: r[mode]["lora_jax"]["cpu_s"]["median"]
    out["lora_vs_our_full"] = cpu("full") / cpu("lora")
  return out


def train_row(d: dict) -> list[str]:
  r, s = d["results"], d["settings"]
  ratios = _train_ratios(r)
  parts = []
  cpu = lambda m: r[m]["transformers"]["cpu_s"]["median"] / r[m]["lora_jax"]["cpu_s"]["median"]
  if "lora_vs_theirs" in ratios:
    v = ratios["lora_vs_theirs"]
    parts.append(f"LoRA {v:.2f}x (CPU {cpu('lora'):.2f}x) {_mark(v, 1.0)}")
  if "lora_vs_our_full" in ratios:
    v = ratios["lora_vs_our_full"]
    parts.append(f"LoRA vs our full {v:.2f}x (CPU) {_mark(v, 1.3)}")
  if "full_vs_theirs" in ratios:
    parts.append(f"full {ratios['full_vs_theirs']:.2f}x (CPU {cpu('full'):.2f}x)")
  if "full_peak_rss_vs_theirs" in ratios:
    v = ratios["full_peak_rss_vs_theirs"]
    parts.append(f"full RSS {v:.2f}x {_mark(v, 1.0, at_most=True)}")
  tokens = s["batch"] * s["seq"] * s["steps"]
  model = d.get("model") or dict(QWEN25_05B, num_layers=s["layers"])
  mfu = ", ".join(
    f"{m} model GFLOP per CPU s "
    + " vs ".join(
      f"{_fpt(model, s['seq'], m == 'full') * tokens / x[k]['cpu_s']['median'] / 1e9:.0f}"
      for k in ("lora_jax", "transformers")
    )
    for m, x in r.items()
  )
  what = (
    f"LoRA r8 all-linear and full FT, batch 2 x seq {s['seq']}, {s['layers']}-layer model, vs "
    f"transformers + PEFT ({r[next(iter(r))]['setup']['transformers']['adamw']} AdamW)"
  )
  target = "LoRA >= 1.0x theirs, >= 1.3x our full; full RSS <= 1.0x"
  return ["`benchmarks/train.py`", what, target, "; ".join(parts) + f"; {mfu}"]


def sample_row(d: dict) -> list[str]:
  r = d["ratios"]
  s = d.get("settings", {})
  what = (
    f"greedy decoding, batch 1 and 8, {s.get('new_tokens')} new tokens, "
    f"{s.get('layers')}-layer model, vs `generate` ({d['batch8']['transformers_cache']} cache)"
  )
  got = (
    f"batch 8 {r['batch8_vs_transformers']:.2f}x {_mark(r['batch8_vs_transformers'], 2.0)}; "
    f"batch 1 {r['batch1_vs_transformers']:.2f}x, "
    f"{100 * r['batch1_vs_bandwidth_bound']:.0f}% of the bandwidth bound "
    f"{_mark(r['batch1_vs_bandwidth_bound'], 0.85)}"
  )
  return ["`benchmarks/sample.py`", what, "batch 8 >= 2x; batch 1 >= 85% of bound", got]


def ab_row(d: dict) -> list[str]:
  parts = [
    f"{case} {r['new_over_old_speed']:.2f} (rounds {r['per_round']['min']:.2f}-"
    f"{r['per_round']['max']:.2f}; CPU {r['cpu_s']['old']['median'] / r['cpu_s']['new']['median']:.2f})"
    for case, r in d["results"].items()
  ]
  s = d["settings"]
  what = (
    f"issue 9: the kernel cases on the pre-refactor commit vs this one, "
    f"{s['layers']}-layer model, alternating"
  )
  return ["`benchmarks/ab_refactor.py`", what, "new / old >= 1.0", "; ".join(parts)]


def remat_row(d: dict) -> list[str]:
  r = d["results"]
  parts = [
    f"{mode}: " + ", ".join(f"{p} {r[f'{mode}/{p}']['temp_bytes'] / GiB:.1f}" for p in
                           ("none", "dots", "full"))
    for mode in ("full", "lora")
  ]  # fmt: skip
  what = (
    f"train step temporaries per remat policy (XLA memory analysis), batch {d['batch']} x seq "
    f"{d['seq']}, 24 layers"
  )
  return ["`benchmarks/remat_memory.py`", what, "(figures)", "GiB: " + "; ".join(parts)]


PARTS = {
  "train_epoch.json": ("train_epoch_full.json",),
  "train.json": ("train_full.json",),
  "ab_refactor.json": ("ab_refactor_train.json", "ab_refactor_train_full.json"),
}
ROWS = [
  ("train_epoch.json", train_epoch_row),
  ("eval_workload.json", eval_row),
  ("train.json", train_row),
  ("sample.json", sample_row),
  ("ab_refactor.json", ab_row),
  ("remat_memory.json", remat_row),
]


def table(results: str) -> str:
  lines = [
    "| script | what | target | last measured (ratio = theirs' time / ours) | machine | JSON |",
    "|---|---|---|---|---|---|",
  ]
  for name, row in ROWS:
    d = _load(results, name)
    path = f"`benchmarks/results/{name}`"
    for more in PARTS.get(name, ()):  # cases measured by separate, concurrent runs
      extra = _load(results, more)
      if d is not None and extra is not None:
        d["results"].update(extra["results"])
        path += f", `benchmarks/results/{more}`"
    if d is None:
      lines.append(f"| `{name}` | not measured yet | | | | {path} |")
      continue
    lines.append("| " + " | ".join(row(d) + [_load_note(d), path]) + " |")
  return "\n".join(lines) + "\n"


def update_build_md(path: str, text: str) -> None:
  with open(path, encoding="utf-8") as f:
    doc = f.read()
  if BEGIN not in doc or END not in doc:
    raise ValueError(f"{path}: no '{BEGIN}' ... '{END}' block to replace")
  head, rest = doc.split(BEGIN, 1)
  tail = rest.split(END, 1)[1]
  note = "<!-- made by benchmarks/bench_table.py --build_md; do not edit by hand -->\n"
  with open(path, "w", encoding="utf-8") as f:
    f.write(f"{head}{BEGIN}\n{note}{text}{END}{tail}")


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--results", default="benchmarks/results")
  p.add_argument("--build_md", default=None)
  a = p.parse_args()
  text = table(a.results)
  print(text)
  if a.build_md:
    update_build_md(a.build_md, text)
    print(f"updated {a.build_md}")


if __name__ == "__main__":
  main()
