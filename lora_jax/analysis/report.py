"""What the analysis writes: JSONL records, heatmaps, line plots across runs, a markdown summary.

    paths = write_report(records_by_run, out_dir)   # records.jsonl, *.png, summary.md

Heatmaps are layer x module per (run, step): the stable rank of dW, and its overlap with W0's
top-k subspaces (one panel per side and k, chance level in the title). Line plots put runs side
by side over layers (each run at its last analysed step), e.g. LoRA against full fine-tuning.
"""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict

import numpy as np

from lora_jax.model import LINEARS

SIDES = ("left", "right", "both")


def write_records(records_by_run: dict[str, list[dict]], path: str) -> str:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    for records in records_by_run.values():
      for r in records:
        f.write(json.dumps(r) + "\n")
  return path


def read_records(path: str) -> dict[str, list[dict]]:
  out: dict[str, list[dict]] = defaultdict(list)
  with open(path) as f:
    for line in f:
      if line.strip():
        r = json.loads(line)
        out[r["run"]].append(r)
  return dict(out)


def write_report(records_by_run: dict[str, list[dict]], out_dir: str) -> dict:
  """records.jsonl, the plots and summary.md in `out_dir`; returns their paths."""
  os.makedirs(out_dir, exist_ok=True)
  records = write_records(records_by_run, os.path.join(out_dir, "records.jsonl"))
  images = plot_runs(records_by_run, out_dir)
  summary = write_summary(records_by_run, out_dir, images)
  return {"records": records, "images": images, "summary": summary}


def plot_runs(records_by_run: dict[str, list[dict]], out_dir: str) -> list[str]:
  """Heatmaps per (run, step) and line plots over layers with one line per run."""
  import matplotlib

  matplotlib.use("Agg")
  os.makedirs(out_dir, exist_ok=True)
  paths = []
  for run, records in records_by_run.items():
    for step, recs in _by_step(records).items():
      tag = f"{_safe(run)}_{_step_tag(step)}"
      paths.append(_heatmap_stable_rank(recs, f"{run} {_step_label(step)}", out_dir, tag))
      paths.append(_heatmap_overlap(recs, f"{run} {_step_label(step)}", out_dir, tag))
  last = {run: _by_step(recs)[_last_step(recs)] for run, recs in records_by_run.items() if recs}
  if last:
    paths.append(_lines(last, "stable_rank", "stable rank of dW", out_dir, log=True))
    paths.append(_lines(last, "rel_fro", "||dW||_F / ||W0||_F", out_dir, log=True))
    for k in _ks(last):
      paths.append(_overlap_lines(last, k, out_dir))
  return paths


def write_summary(records_by_run, out_dir: str, images: list[str]) -> str:
  lines = ["# Weight-space analysis", ""]
  bases = sorted({r["base"] for recs in records_by_run.values() for r in recs})
  if bases:
    lines += [f"Base model: {', '.join(f'`{b}`' for b in bases)}.", ""]
  lines += [
    "dW is scale * B A for LoRA (from the adapter) and checkpoint - base for full fine-tuning. "
    "Overlap left = ||U_k^T dW||^2 / ||dW||^2 with U_k W0's top-k left (output-side) singular "
    "vectors, right = ||dW V_k||^2 / ||dW||^2 (input side), both = ||U_k^T dW V_k||^2 / "
    "||dW||^2; chance is what a random dW of the same shape gives (k/m, k/n, k^2/(mn)). Values "
    "are means over layers.",
    "",
    "| run | kind | steps | modules | layers |",
    "|---|---|---|---|---|",
  ]
  for run, recs in records_by_run.items():
    steps = sorted({_step_label(r["step"]) for r in recs})
    mods = [m for m in LINEARS if any(r["module"] == m for r in recs)]
    layers = sorted({r["layer"] for r in recs})
    kind = recs[0]["kind"] if recs else "-"
    span = f"{layers[0]}..{layers[-1]}" if layers else "-"
    lines.append(f"| {run} | {kind} | {', '.join(steps)} | {', '.join(mods)} | {span} |")
  lines += [""] + _comparison(records_by_run)
  for run, recs in records_by_run.items():
    for step, srecs in _by_step(recs).items():
      lines += _step_tables(run, step, srecs)
  lines += ["## Plots", ""]
  lines += [f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in images]
  path = os.path.join(out_dir, "summary.md")
  with open(path, "w") as f:
    f.write("\n".join(lines) + "\n")
  return path


# ---- tables --------------------------------------------------------------------------------------
def _comparison(records_by_run) -> list[str]:
  """Runs side by side at their last step: stable rank and left overlap per module."""
  last = {run: _by_step(recs)[_last_step(recs)] for run, recs in records_by_run.items() if recs}
  if len(last) < 2:
    return []
  ks = _ks(last)
  k = ks[len(ks) // 2]
  runs = list(last)
  out = [
    f"## Runs side by side (last step; stable rank / left overlap at k={k})",
    "",
    "| module | " + " | ".join(runs) + " | chance |",
    "|---|" + "---|" * (len(runs) + 1),
  ]
  for module in LINEARS:
    cells, chance = [], ""
    for run in runs:
      recs = [r for r in last[run] if r["module"] == module]
      if not recs:
        cells.append("-")
        continue
      sr = _mean(r["stable_rank"] for r in recs)
      ov = _mean(r["overlap"][str(k)]["left"] for r in recs)
      cells.append(f"{_fmt(sr)} / {_fmt(ov)}")
      chance = _fmt(recs[0]["overlap"][str(k)]["random_left"])
    if any(c != "-" for c in cells):
      out.append(f"| {module} | " + " | ".join(cells) + f" | {chance} |")
  return out + [""]


def _step_tables(run: str, step, recs: list[dict]) -> list[str]:
  ks = sorted({int(k) for r in recs for k in r["overlap"]})
  out = [
    f"## {run}, {_step_label(step)}",
    "",
    "| module | layers | ‖dW‖/‖W0‖ | stable rank (rank ≤) | "
    + " | ".join(f"k={k}: left / right / both (chance)" for k in ks)
    + " |",
    "|---|---|---|---|" + "---|" * len(ks),
  ]
  for module in LINEARS:
    mrecs = [r for r in recs if r["module"] == module]
    if not mrecs:
      continue
    row = [
      module,
      str(len(mrecs)),
      _fmt(_mean(r["rel_fro"] for r in mrecs)),
      f"{_fmt(_mean(r['stable_rank'] for r in mrecs))} ({mrecs[0]['rank_bound']})",
    ]
    for k in ks:
      o = [r["overlap"][str(k)] for r in mrecs]
      vals = " / ".join(_fmt(_mean(x[s] for x in o)) for s in SIDES)
      chance = " / ".join(_fmt(o[0]["random_" + s]) for s in SIDES)
      row.append(f"{vals} ({chance})")
    out.append("| " + " | ".join(row) + " |")
  penalty_ks = ks[:1] + ks[-1:] if len(ks) > 1 else ks
  how = recs[0]["penalty_settings"]
  how = (
    f"{'weighted' if how['weighted'] else 'uniform'}{', normalised' if how['normalize'] else ''}"
  )
  out += [
    "",
    f"The regulariser's penalty ({how}, as the run's ortho config; mean over layers):",
    "",
  ]
  for module in LINEARS:
    mrecs = [r for r in recs if r["module"] == module]
    if mrecs:
      parts = [
        f"k={k} column {_fmt(_mean(r['penalty'][str(k)]['column'] for r in mrecs))}, "
        f"row {_fmt(_mean(r['penalty'][str(k)]['row'] for r in mrecs))}, "
        f"both {_fmt(_mean(r['penalty'][str(k)]['both'] for r in mrecs))}"
        for k in penalty_ks
      ]
      out.append(f"- {module}: " + "; ".join(parts))
  return out + [""]


# ---- plots ---------------------------------------------------------------------------------------
def _grid(recs: list[dict], value) -> tuple[np.ndarray, list[str], int]:
  modules = [m for m in LINEARS if any(r["module"] == m for r in recs)]
  layers = max(r["layer"] for r in recs) + 1
  grid = np.full((layers, len(modules)), np.nan)
  for r in recs:
    v = value(r)
    grid[r["layer"], modules.index(r["module"])] = np.nan if v is None else v
  return grid, modules, layers


def _heatmap_stable_rank(recs, title, out_dir, tag) -> str:
  import matplotlib.pyplot as plt

  grid, modules, layers = _grid(recs, lambda r: r["stable_rank"])
  fig, ax = plt.subplots(figsize=(1.2 * len(modules) + 2.5, 0.28 * layers + 2))
  _draw(ax, grid, modules, f"{title}: stable rank of dW", fig, annotate=True)
  path = os.path.join(out_dir, f"heatmap_stable_rank_{tag}.png")
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)
  return path


def _heatmap_overlap(recs, title, out_dir, tag) -> str:
  import matplotlib.pyplot as plt

  ks = sorted({int(k) for r in recs for k in r["overlap"]})
  layers = max(r["layer"] for r in recs) + 1
  modules = [m for m in LINEARS if any(r["module"] == m for r in recs)]
  fig, axes = plt.subplots(
    len(SIDES),
    len(ks),
    figsize=(len(ks) * (0.6 * len(modules) + 1.8), len(SIDES) * (0.2 * layers + 1.8)),
    squeeze=False,
  )
  for i, side in enumerate(SIDES):
    for j, k in enumerate(ks):
      grid, _, _ = _grid(recs, lambda r, k=k, side=side: r["overlap"][str(k)][side])
      chance = _chance_text(recs, k, side)
      _draw(axes[i][j], grid, modules, f"{side}, k={k} (chance {chance})", fig)
  fig.suptitle(f"{title}: overlap of dW with W0's top-k subspaces")
  fig.tight_layout()
  path = os.path.join(out_dir, f"heatmap_overlap_{tag}.png")
  fig.savefig(path, dpi=80)
  plt.close(fig)
  return path


def _draw(ax, grid, modules, title, fig, annotate=False):
  finite = grid[np.isfinite(grid)]
  vmax = float(finite.max()) if finite.size else 1.0
  im = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0, vmax=vmax or 1.0)
  ax.set_xticks(range(len(modules)), [m.replace("_proj", "") for m in modules], fontsize=7)
  ax.set_ylabel("layer", fontsize=8)
  ax.tick_params(axis="y", labelsize=7)
  ax.set_title(title, fontsize=8)
  fig.colorbar(im, ax=ax, fraction=0.05)
  if annotate and grid.size <= 400:
    for (i, j), v in np.ndenumerate(grid):
      if np.isfinite(v):
        ax.text(j, i, f"{v:.3g}", ha="center", va="center", fontsize=5, color="w")


def _lines(last: dict, field: str, label: str, out_dir: str, log: bool) -> str:
  import matplotlib.pyplot as plt

  modules = [m for m in LINEARS if any(r["module"] == m for recs in last.values() for r in recs)]
  fig, axes = plt.subplots(1, len(modules), figsize=(3.2 * len(modules), 3), squeeze=False)
  for ax, module in zip(axes[0], modules):
    for run, recs in last.items():
      pts = sorted((r["layer"], r[field]) for r in recs if r["module"] == module and r[field])
      if pts:
        ax.plot(*zip(*pts), marker=".", label=_run_label(run, recs))
    ax.set_title(module, fontsize=9)
    ax.set_xlabel("layer", fontsize=8)
    if log:
      ax.set_yscale("log")
  axes[0][0].set_ylabel(label, fontsize=8)
  axes[0][-1].legend(fontsize=7)
  fig.tight_layout()
  path = os.path.join(out_dir, f"lines_{field}.png")
  fig.savefig(path, dpi=80)
  plt.close(fig)
  return path


def _overlap_lines(last: dict, k: int, out_dir: str) -> str:
  import matplotlib.pyplot as plt

  modules = [m for m in LINEARS if any(r["module"] == m for recs in last.values() for r in recs)]
  fig, axes = plt.subplots(
    len(SIDES), len(modules), figsize=(3.2 * len(modules), 2.6 * len(SIDES)), squeeze=False
  )
  for i, side in enumerate(SIDES):
    for ax, module in zip(axes[i], modules):
      chance = None
      for run, recs in last.items():
        mrecs = [r for r in recs if r["module"] == module and str(k) in r["overlap"]]
        pts = sorted((r["layer"], r["overlap"][str(k)][side]) for r in mrecs)
        pts = [(x, y) for x, y in pts if y is not None]
        if pts:
          ax.plot(*zip(*pts), marker=".", label=_run_label(run, recs))
          chance = mrecs[0]["overlap"][str(k)]["random_" + side]
      if chance is not None:
        ax.axhline(chance, color="gray", linestyle="--", linewidth=1, label="chance")
      ax.set_title(f"{module}: {side}", fontsize=9)
      ax.set_xlabel("layer", fontsize=8)
  axes[0][0].set_ylabel(f"overlap, k={k}", fontsize=8)
  axes[0][-1].legend(fontsize=7)
  fig.tight_layout()
  path = os.path.join(out_dir, f"lines_overlap_k{k}.png")
  fig.savefig(path, dpi=80)
  plt.close(fig)
  return path


# ---- small helpers -------------------------------------------------------------------------------
def _by_step(records: list[dict]) -> dict:
  out: dict = defaultdict(list)
  for r in records:
    out[r["step"]].append(r)
  return dict(sorted(out.items(), key=lambda kv: -1 if kv[0] is None else kv[0]))


def _last_step(records: list[dict]):
  return list(_by_step(records))[-1]


def _ks(last: dict) -> list[int]:
  return sorted({int(k) for recs in last.values() for r in recs for k in r["overlap"]})


def _chance_text(recs, k, side) -> str:
  vals = sorted({r["overlap"][str(k)]["random_" + side] for r in recs})
  return _fmt(vals[0]) if len(vals) == 1 else f"{_fmt(vals[0])}-{_fmt(vals[-1])}"


def _run_label(run: str, recs: list[dict]) -> str:
  return f"{run} ({_step_label(recs[0]['step'])})" if recs else run


def _step_label(step) -> str:
  return "model" if step is None else f"step {step}"


def _step_tag(step) -> str:
  return "model" if step is None else f"step{step}"


def _safe(name: str) -> str:
  return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def _mean(values) -> float | None:
  vals = [v for v in values if v is not None and math.isfinite(v)]
  return sum(vals) / len(vals) if vals else None


def _fmt(v) -> str:
  if v is None:
    return "-"
  if v == 0 or 1e-3 <= abs(v) < 1e4:
    return f"{v:.3g}"
  return f"{v:.2e}"
