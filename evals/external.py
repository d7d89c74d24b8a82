"""Answers made outside the runner: grade them (`grade_only`), or render a benchmark's prompts
for another sampler (`write_prompts`).

    n, sampling = write_prompts(cfg, "aime24", "prompts.jsonl")   # -> launch.sample --prompts
    scores = grade_only("aime24", "answers.jsonl", "scores.json")  # <- launch.sample --out

The answers file may come from `launch.sample`, EvalPlus, lm-eval or an OpenAI batch
(`lora_jax.answers` has the field mapping); each answer is graded once.
"""

from __future__ import annotations

import os

from evals import benchmarks, runner
from evals.benchmarks import Sampling
from lora_jax import answers, jsonl


def read_generations(path: str, records: dict[str, dict], name: str) -> list[dict]:
  """Answers made anywhere (`lora_jax.answers`: ours, EvalPlus, lm-eval, OpenAI batch) as
  samples to grade. An id is a task id of the benchmark, else its 0-based index; an id that is
  neither, or a second answer to the same (task, seed, sample), is an error naming the line."""
  ids, out, first = list(records), [], {}
  kind = benchmarks.get(name).kind
  for a in answers.read_answers(path):
    bad = lambda reason, a=a: jsonl.bad_line(path, a.line, reason)
    task = a.id if a.id in records else None
    if task is None and a.id.isdigit() and int(a.id) < len(ids):
      task = ids[int(a.id)]
    if task is None:
      raise bad(f"id {a.id!r} is not a {name} task id or index (0..{len(ids) - 1})")
    if kind == "gpqa" and a.format == "lm_eval":
      raise bad(
        "lm-eval's GPQA answers use lm-eval's choice order, not lora_jax's per-seed shuffle; "
        "sample prompts from `launch.eval --write_prompts` to grade them here"
      )
    key = (task, a.seed, a.sample)
    if key in first:
      raise bad(
        f"a second answer to {name} task {task!r} seed {a.seed} sample {a.sample} "
        f"(first on line {first[key]}): an answer is graded once"
      )
    first[key] = a.line
    out.append(runner.answer_sample(a, task))
  if not out:
    raise ValueError(f"{path}: no answers")
  return out


def write_prompts(cfg: runner.EvalConfig, name: str, path: str) -> tuple[int, Sampling]:
  """The benchmark's prompts for `launch.sample` (or any sampler): one row per (task, seed), as
  the runner would render them; returns the row count and the benchmark's sampling settings."""
  records = runner.load_records(cfg, name)
  rows = [
    {"id": t, "seed": seed, "prompt": benchmarks.build_prompt(name, records[t], seed, cfg.template)}
    for seed in runner.seeds(cfg, name)
    for t in records
  ]
  jsonl.write_atomic(path, rows)
  return len(rows), runner.sampling(cfg, name)


def grade_only(
  name: str,
  generations_path: str,
  out_path: str,
  *,
  data_path: str | None = None,
  template: str = "reference",
  judges: runner.Judges | None = None,
  code_workers: int = 2,
  code_isolation: str = "auto",
  rules: str = "extended",
  preset: str | None = None,
) -> dict:
  """Grade a generations file; writes scores to `out_path` and the graded answers beside it
  (`<out>.graded.jsonl`). `rules`: `benchmarks.ANSWER_RULES`; `preset` is recorded."""
  records = benchmarks.load(name, data_path)
  samples = read_generations(generations_path, records, name)
  graded, result = runner.grade_and_score(
    name,
    records,
    samples,
    template,
    judges or runner.Judges(),
    code_workers,
    rules,
    code_isolation=code_isolation,
  )
  stem = out_path[:-5] if out_path.endswith(".json") else out_path
  jsonl.write_atomic(stem + ".graded.jsonl", graded)
  scores = {
    "label": os.path.basename(stem),
    "step": None,
    "generations": generations_path,
    "template": template,
    "preset": preset,
    "benchmarks": {name: result},
  }
  runner.write_json(out_path, scores)
  return scores
