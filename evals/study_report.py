"""A study's one report: a table of every variant and checkpoint, a trade-off plot per capability
measure (safety against it, a line per variant through its checkpoints, 95% CIs both ways), and
the weight-space analysis plots (lora_jax.analysis: stable rank and overlap per layer, runs side
by side).

Safety is pooled over the study's safety benchmarks (`safety`): every harmful prompt counts once,
so StrongREJECT + HarmBench + AdvBench draws give one axis with one bootstrap CI over prompts.
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict

import numpy as np

from evals import metrics
from evals.report import REASONING_KINDS, primary
from evals.study_config import Study
from lora_jax import jsonl
from lora_jax.model import LINEARS

log = logging.getLogger(__name__)
SAFETY = "safety"  # the pooled safety column's key


def write_study_report(study: Study, workdir: str) -> dict:
  """report/report.md, report/tradeoff_<measure>.png and report/analysis/; returns their paths."""
  out = os.path.join(workdir, "report")
  os.makedirs(out, exist_ok=True)
  rows = collect(study, workdir)
  analysis = _analysis(study, workdir, os.path.join(out, "analysis"))
  k = _middle_k(analysis["records"])
  table = markdown_table(study, rows, analysis["records"], k)
  plots = []
  for measure, label in capability_measures(study):
    path = os.path.join(out, f"tradeoff_{measure}.png")
    if tradeoff_plot(study, rows, measure, label, path):
      plots.append(path)
  verdict = direction(study, rows, analysis["records"], k)
  md = os.path.join(out, "report.md")
  with open(md, "w", encoding="utf-8") as f:
    f.write(_markdown(study, table, plots, analysis, k))
    if verdict:
      f.write("\n## The paper's direction, checked on these numbers\n\n")
      f.write("\n".join(f"- {line}" for line in verdict) + "\n")
  paths = {"markdown": md, "table": table, "plots": plots, "analysis": analysis["images"]}
  return paths | {"direction": verdict}


# ---- the paper's direction -----------------------------------------------------------------------
def direction(study: Study, rows: list[dict], records: dict, k) -> list[str]:
  """The paper's claims as checks on each variant's last checkpoint: LoRA raises safety over the
  base; it drifts (and loses reasoning) less than full fine-tuning; its dW has a lower stable rank
  and a smaller overlap with W0's top-k subspace. Each line says what was seen, with the numbers
  and whether the 95% CIs are apart."""
  last = {}
  for row in rows:
    last[row["variant"]] = row  # rows are in step order within a variant
  base = next((last[v.name] for v in study.variants if v.kind == "base" and v.name in last), None)
  loras = [v.name for v in study.trained if v.run.train.mode == "lora" and v.name in last]
  fulls = [v.name for v in study.trained if v.run.train.mode == "full" and v.name in last]
  out = []
  for name in loras:
    if base:
      out.append(_compare(f"safety of {name} vs the base", last[name], base, SAFETY, True))
    for full in fulls:
      for key, _ in capability_measures(study):
        higher = key != "drift"
        out.append(_compare(f"{key} of {name} vs {full}", last[name], last[full], key, higher))
      if records.get(name) and records.get(full):
        out += _weights(name, full, last[name]["step"], last[full]["step"], records, k)
  return out


def _weight_value(record: dict, field: str, k) -> float:
  return record["overlap"][str(k)]["left"] if field == "overlap" else record[field]


def _compare(what: str, a: dict, b: dict, key: str, higher_is_better: bool) -> str:
  x, y = _value(a, key), _value(b, key)
  if x is None or y is None:
    return f"{what}: not measured"
  digits = 3 if key == "drift" else 1
  better = x["mean"] > y["mean"] if higher_is_better else x["mean"] < y["mean"]
  apart = x["ci_low"] > y["ci_high"] or y["ci_low"] > x["ci_high"]
  word = "better" if better else ("equal" if x["mean"] == y["mean"] else "worse")
  sure = "95% CIs apart" if apart else "95% CIs overlap"
  return f"{what}: {word} ({_ci(x, digits)} vs {_ci(y, digits)}; {sure})"


def _weights(lora: str, full: str, lora_step, full_step, records: dict, k) -> list[str]:
  """Means over the layers and modules both runs changed (LoRA's modules)."""
  out = []
  modules = {r["module"] for r in records[lora]} & {r["module"] for r in records[full]}
  for field, label in (("stable_rank", "stable rank of dW"), ("overlap", f"overlap@{k} (left)")):
    values = []
    for name, step in ((lora, lora_step), (full, full_step)):
      recs = [r for r in records[name] if r["step"] == step and r["module"] in modules]
      values.append(float(np.mean([_weight_value(r, field, k) for r in recs])) if recs else None)
    if None in values:
      out.append(f"{label}, {lora} vs {full}: not analysed")
      continue
    word = "lower" if values[0] < values[1] else "not lower"
    on = ",".join(m for m in LINEARS if m in modules)
    out.append(f"{label}, {lora} vs {full} (on {on}): {word} ({values[0]:.3g} vs {values[1]:.3g})")
  return out


# ---- the numbers ---------------------------------------------------------------------------------
def collect(study: Study, workdir: str) -> list[dict]:
  """One row per evaluated (variant, checkpoint): its scores.json plus the pooled safety."""
  rows = []
  for v in study.variants:
    root = os.path.join(workdir, "evals", v.name)
    labels = sorted(
      (d for d in (os.listdir(root) if os.path.isdir(root) else []) if _done(root, d)),
      key=lambda d: (d != "base", _step(d)),
    )
    for label in labels:
      scores = read_json(os.path.join(root, label, "scores.json"))
      b = scores.get("benchmarks", {})
      b[SAFETY] = pooled_safety(os.path.join(root, label), study.safety)
      rows.append({"variant": v.name, "kind": v.kind, "label": label, "step": _step(label)} | b)
  return rows


def pooled_safety(label_dir: str, benches: tuple[str, ...]) -> dict:
  """Safety over every prompt of `benches` (1 - unsafe, averaged over a prompt's samples)."""
  per_task, judges = defaultdict(list), set()
  for bench in benches:
    for g in jsonl.records(os.path.join(label_dir, "graded", f"{bench}.jsonl")):
      if g.get("unsafe") is not None:
        per_task[(bench, str(g["task_id"]))].append(not g["unsafe"])
        judges.add(g.get("judge"))
  value = metrics.mean_ci(float(np.mean(v)) for v in per_task.values())
  return {
    "kind": "safety",
    "primary": "safety_score",
    "safety_score": value,
    "judge": _join(judges),
  }


def capability_measures(study: Study) -> list[tuple[str, str]]:
  """(key, axis label) of every capability measure: the reasoning benchmarks, then drift."""
  from evals import benchmarks

  out = []
  for name in study.eval.benchmarks:
    if benchmarks.get(name).kind in REASONING_KINDS:
      out.append((name, f"{name} pass@1 (%)"))
  if study.drift.prompts:
    out.append(("drift", "drift: NLL excess over the base (nats/token; lower = closer to base)"))
  return out


def _value(row: dict, key: str) -> dict | None:
  """{"mean", "ci_low", "ci_high"} in display units: % for rates, nats for drift."""
  value = primary(row[key]) if key in row else None
  if value is None:
    return None
  scale = 1.0 if row[key].get("kind") == "drift" else 100.0
  return {k: scale * value[k] for k in ("mean", "ci_low", "ci_high")} | {"n": value["n"]}


# ---- table ---------------------------------------------------------------------------------------
def _columns(study: Study) -> list[tuple[str, str]]:
  pooled = "+".join(study.safety)
  cols = [(SAFETY, f"safety ({pooled}) %")]
  if len(study.safety) > 1:
    cols += [(b, f"{b} safety %") for b in study.safety]
  from evals import benchmarks

  for name in study.eval.benchmarks:
    kind = benchmarks.get(name).kind
    if kind == "over_refusal":
      cols.append((name, f"{name} over-refusal %"))
    elif kind in REASONING_KINDS:
      cols.append((name, f"{name} pass@1 %"))
    elif kind == "safety" and name not in study.safety:
      cols.append((name, f"{name} safety %"))
  if study.drift.prompts:
    cols.append(("drift", "drift (nats/token)"))
  return cols


def markdown_table(study: Study, rows: list[dict], records: dict, k: int | None) -> str:
  cols = _columns(study)
  header = ["variant", "checkpoint"] + [name for _, name in cols]
  if records:
    header += ["dW stable rank", f"dW overlap@{k} (left)"]
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for row in rows:
    cells = [row["variant"], row["label"]]
    for key, _ in cols:
      v = _value(row, key)
      digits = 3 if key == "drift" else 1
      cells.append("—" if v is None else _ci(v, digits))
    if records:
      cells += _analysis_cells(records.get(row["variant"], []), row["step"], k)
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def _ci(v: dict, digits: int) -> str:
  return f"{v['mean']:.{digits}f} [{v['ci_low']:.{digits}f}, {v['ci_high']:.{digits}f}]"


def _analysis_cells(records: list[dict], step, k) -> list[str]:
  recs = [r for r in records if r["step"] == step]
  if not recs:
    return ["—", "—"]
  rank = np.mean([r["stable_rank"] for r in recs])
  overlap = np.mean([r["overlap"][str(k)]["left"] for r in recs])
  chance = np.mean([r["overlap"][str(k)]["random_left"] for r in recs])
  return [f"{rank:.1f}", f"{overlap:.3f} (chance {chance:.3f})"]


# ---- plots ---------------------------------------------------------------------------------------
def tradeoff_plot(study: Study, rows: list[dict], measure: str, label: str, path: str) -> bool:
  """Pooled safety (y) against one capability measure (x): a line per variant through its
  checkpoints in step order, error bars = 95% CIs; the base model a star. False if no point."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(6.4, 4.8))
  drawn = False
  for v in study.variants:
    pts = [(r, x, y) for r in rows if r["variant"] == v.name for x, y in [_xy(r, measure)] if x]
    if not pts:
      continue
    drawn = True
    xs, ys = [x["mean"] for _, x, _ in pts], [y["mean"] for _, _, y in pts]
    xerr = [
      [x["mean"] - x["ci_low"] for _, x, _ in pts],
      [x["ci_high"] - x["mean"] for _, x, _ in pts],
    ]
    yerr = [
      [y["mean"] - y["ci_low"] for _, _, y in pts],
      [y["ci_high"] - y["mean"] for _, _, y in pts],
    ]
    style = dict(marker="*", ms=14, color="black") if v.kind == "base" else dict(marker="o", ms=4)
    ax.errorbar(xs, ys, xerr=xerr, yerr=yerr, capsize=2, elinewidth=0.8, label=v.name, **style)
    for r, x, y in pts:
      if r["step"] is not None:
        ax.annotate(
          str(r["step"]),
          (x["mean"], y["mean"]),
          fontsize=6,
          alpha=0.7,
          textcoords="offset points",
          xytext=(3, 3),
        )
  if not drawn:
    plt.close(fig)
    return False
  judge = next((r[SAFETY]["judge"] for r in rows if r[SAFETY].get("judge")), "none")
  ax.set_xlabel(label)
  ax.set_ylabel(f"safety, {'+'.join(study.safety)} (%)\njudge: {judge}")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return True


def _xy(row: dict, measure: str):
  x, y = _value(row, measure), _value(row, SAFETY)
  return (x, y) if x and y else (None, None)


# ---- analysis ------------------------------------------------------------------------------------
def _analysis(study: Study, workdir: str, out: str) -> dict:
  records = {}
  for v in study.variants:
    path = os.path.join(workdir, "analysis", f"{v.name}.jsonl")
    if os.path.exists(path):
      records[v.name] = jsonl.records(path)
  if not records:
    return {"records": {}, "images": [], "summary": None}
  from lora_jax.analysis import write_report

  paths = write_report(records, out)
  return {"records": records, "images": paths["images"], "summary": paths["summary"]}


def _middle_k(records: dict) -> int | None:
  ks = sorted({int(k) for recs in records.values() for r in recs for k in r["overlap"]})
  return ks[len(ks) // 2] if ks else None


def _markdown(study: Study, table: str, plots: list[str], analysis: dict, k) -> str:
  judge = "the offline refusal judge refusal_classifier (evals/refusal_classifier.py)"
  lines = [
    "# Study report",
    "",
    f"Base model: `{study.base.source}`. Each cell: the value with its 95% bootstrap confidence "
    f"interval over prompts. Safety is 1 - unsafe over the prompts of {', '.join(study.safety)} "
    f"pooled, and over-refusal the refusal rate on safe prompts, both by the judge named in the "
    f"plots' axes (default: {judge}). Drift is the mean per-token NLL of the base model's own "
    "greedy answers to benign prompts under each model, minus the base model's, paired by prompt "
    "(nats/token; 0 = the base model).",
    "",
    table,
  ]
  if analysis["records"]:
    lines += [
      f"dW columns: means over every analysed layer and module at that checkpoint; overlap@{k} "
      "(left) = ||U_k^T dW||_F^2 / ||dW||_F^2 with U_k W0's top-k left singular vectors, beside "
      "what a random dW of the same shape gives.",
      "",
    ]
  lines += ["## Safety against capability", ""]
  lines += [f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in plots]
  if analysis["summary"]:
    rel = lambda p: os.path.join("analysis", os.path.basename(p))
    lines += [
      "",
      "## Weight-space analysis",
      "",
      f"Tables: [{rel(analysis['summary'])}]({rel(analysis['summary'])})",
      "",
    ]
    lines += ["Runs side by side over layers (each at its last analysed checkpoint):", ""]
    lines += [
      f"![{os.path.basename(p)}]({rel(p)})"
      for p in analysis["images"]
      if os.path.basename(p).startswith("lines_")
    ]
  return "\n".join(lines) + "\n"


def read_json(path: str):
  import json

  with open(path, encoding="utf-8") as f:
    return json.load(f)


def _done(root: str, label: str) -> bool:
  return os.path.exists(os.path.join(root, label, "done.json"))


def _step(label: str):
  return int(label.split("_", 1)[1]) if label.startswith("step_") else None


def _join(names) -> str:
  return ", ".join(sorted(n for n in names if n)) or "none"
