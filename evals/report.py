"""Reports across runs: a markdown table of every score and the safety-vs-reasoning plot.

A run is a directory of checkpoints, each a `scores.json` written by the runner
(`run/scores.json` or `run/<label>/scores.json`); the base model is a run of its own, drawn as
a star.
"""

from __future__ import annotations

import glob
import json
import os

REASONING_KINDS = ("math", "gpqa", "code")
JUDGED_KINDS = ("safety", "over_refusal")  # their numbers are a judge's: the report names it
KIND_ORDER = ("safety", "over_refusal", "math", "gpqa", "code")


def load_checkpoints(path: str) -> list[dict]:
  """The scores of a run (a scores JSON file, or a directory of them), in step order."""
  if os.path.isfile(path):
    files = [path]
  else:
    files = sorted(
      glob.glob(os.path.join(path, "scores.json"))
      + glob.glob(os.path.join(path, "*", "scores.json"))
    )
  if not files:
    raise FileNotFoundError(
      f"{path}: no scores.json (expected RUN/scores.json or RUN/<checkpoint>/scores.json)"
    )
  checkpoints = []
  for f in files:
    with open(f, encoding="utf-8") as fh:
      checkpoints.append(json.load(fh))
  # A checkpoint without a step (the base model of a --include_base run) starts the line.
  return sorted(
    checkpoints, key=lambda c: (c.get("step") is not None, c.get("step") or 0, c.get("label", ""))
  )


def primary(bench_scores: dict) -> dict | None:
  """The `{"mean", "ci_low", "ci_high", "n"}` of a benchmark's primary metric."""
  value = bench_scores.get(bench_scores.get("primary", ""))
  return value if isinstance(value, dict) and value.get("mean") is not None else None


def _benchmarks(runs: list[tuple[str, list[dict]]]) -> list[tuple[str, str]]:
  """(name, kind) of every benchmark in any checkpoint, safety first, then reasoning."""
  seen: dict[str, str] = {}
  for _, checkpoints in runs:
    for c in checkpoints:
      for name, s in c.get("benchmarks", {}).items():
        seen.setdefault(name, s.get("kind", ""))
  rank = {k: i for i, k in enumerate(KIND_ORDER)}
  return sorted(seen.items(), key=lambda nk: (rank.get(nk[1], len(rank)), nk[0]))


def _primary_name(runs: list[tuple[str, list[dict]]], bench: str) -> str:
  for _, checkpoints in runs:
    for c in checkpoints:
      if bench in c.get("benchmarks", {}):
        return c["benchmarks"][bench].get("primary", "")
  return ""


def judge_of(bench_scores: dict) -> str | None:
  """The judge behind a safety or over-refusal number ("unnamed judge" for old scores files);
  None for benchmarks graded without one."""
  if bench_scores.get("kind") not in JUDGED_KINDS:
    return None
  return bench_scores.get("judge") or "unnamed judge"


def _judges(runs: list[tuple[str, list[dict]]], bench: str) -> str:
  """Every judge behind a benchmark's numbers across runs, e.g. for the plot's axis."""
  names = {
    judge_of(c["benchmarks"][bench])
    for _, cs in runs
    for c in cs
    if bench in c.get("benchmarks", {})
  }
  return ", ".join(sorted(n for n in names if n)) or "none"


def _cell(value: dict | None, judge: str | None = None, rules: dict | None = None) -> str:
  if value is None:
    return "—"
  cell = f"{100 * value['mean']:.1f} [{100 * value['ci_low']:.1f}, {100 * value['ci_high']:.1f}]"
  if rules is not None:  # an LLM re-checked headline: the rule-based figure beside it
    cell += f" (rules: {100 * rules['mean']:.1f})"
  return f"{cell} judge: {judge}" if judge else cell


def _bench_cell(bench_scores: dict, column_metric: str) -> str:
  cell = _cell(primary(bench_scores), judge_of(bench_scores), _rule_based(bench_scores))
  own = bench_scores.get("primary", "")
  return cell if own == column_metric else f"{cell} ({own})"  # e.g. one run had no LLM judge


def _rule_based(bench_scores: dict) -> dict | None:
  """The rule-based pass@1 of a benchmark whose headline is something else (AIME's LLM
  re-check, `pass@1_llm`), so a reader sees both figures the reference's table mixes."""
  if bench_scores.get("primary", "pass@1") == "pass@1":
    return None
  value = bench_scores.get("pass@1")
  return value if isinstance(value, dict) and value.get("mean") is not None else None


def markdown_table(runs: list[tuple[str, list[dict]]]) -> str:
  """One row per (run, checkpoint): each benchmark's primary metric in %, with its 95% CI, and
  under every safety or over-refusal number the judge that produced it; beside an LLM re-checked
  headline, the rule-based pass@1."""
  benches = _benchmarks(runs)
  names = {n: _primary_name(runs, n) for n, _ in benches}
  header = ["run", "checkpoint", "step"] + [f"{n} {names[n]}" for n, _ in benches]
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for run, checkpoints in runs:
    for c in checkpoints:
      cells = [run, str(c.get("label", "")), "" if c.get("step") is None else str(c["step"])]
      b = c.get("benchmarks", {})
      cells += [_bench_cell(b[n], names[n]) if n in b else "—" for n, _ in benches]
      lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def _point(checkpoint: dict, safety: str, reasoning: str) -> tuple[float, float] | None:
  b = checkpoint.get("benchmarks", {})
  s = primary(b[safety]) if safety in b else None
  r = primary(b[reasoning]) if reasoning in b else None
  return (100 * r["mean"], 100 * s["mean"]) if s and r else None


def plot(
  runs: list[tuple[str, list[dict]]], base: list[dict] | None, safety: str, path: str
) -> list[str]:
  """Safety against each reasoning score: one subplot per reasoning benchmark, one line per run
  through its checkpoints (in step order), the base model as a star. Returns the benchmarks
  drawn."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  everything = runs + ([("base", base)] if base else [])
  reasoning = [n for n, kind in _benchmarks(everything) if kind in REASONING_KINDS]
  drawable = [r for r in reasoning if any(_point(c, safety, r) for _, cs in everything for c in cs)]
  if not drawable:
    raise ValueError(f"no checkpoint has both {safety} and a reasoning score to plot")
  cols = min(3, len(drawable))
  rows = -(-len(drawable) // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 4.2 * rows), squeeze=False)
  for ax, bench in zip(axes.flat, drawable):
    for run, checkpoints in runs:
      pts = [(c, p) for c in checkpoints if (p := _point(c, safety, bench))]
      if pts:
        ax.plot([p[0] for _, p in pts], [p[1] for _, p in pts], "o-", label=run, ms=4)
        for c, p in pts:
          if c.get("step") is not None:
            ax.annotate(
              str(c["step"]), p, fontsize=6, alpha=0.7, textcoords="offset points", xytext=(3, 3)
            )
    for c in base or []:
      if p := _point(c, safety, bench):
        ax.plot(*p, "*", ms=16, color="black", label="base")
    ax.set_xlabel(f"{bench} {_primary_name(everything, bench)} (%)")
    ax.set_ylabel(
      f"{safety} {_primary_name(everything, safety)} (%)\njudge: {_judges(everything, safety)}"
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  for ax in list(axes.flat)[len(drawable) :]:
    ax.set_visible(False)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return drawable


def write_report(
  run_paths: list[str],
  out_dir: str,
  base_path: str | None = None,
  names: list[str] | None = None,
  safety: str = "strongreject",
) -> dict:
  """Write `report.md` and `safety_vs_reasoning.png` into `out_dir`."""
  if names and len(names) != len(run_paths):
    raise ValueError(f"--names has {len(names)} names for {len(run_paths)} runs")
  names = names or [os.path.basename(os.path.normpath(p)) for p in run_paths]
  runs = [(n, load_checkpoints(p)) for n, p in zip(names, run_paths)]
  base = load_checkpoints(base_path) if base_path else None
  table = markdown_table(([("base", base)] if base else []) + runs)
  png = os.path.join(out_dir, "safety_vs_reasoning.png")
  drawn = plot(runs, base, safety, png)
  md = os.path.join(out_dir, "report.md")
  os.makedirs(out_dir, exist_ok=True)
  with open(md, "w", encoding="utf-8") as f:
    f.write(
      "# Safety and reasoning\n\nEach cell: the primary metric in %, with its 95% "
      "bootstrap confidence interval over problems.\n\n"
      + table
      + f"\n![{safety} against {', '.join(drawn)}](safety_vs_reasoning.png)\n"
    )
  return {"markdown": md, "plot": png, "table": table}
