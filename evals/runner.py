"""Evaluation runner: generate (resumable), grade, score. (Answers made elsewhere: evals/external.py.)

Layout of one model's results under `out_dir/<label>/`::

    generations/<benchmark>.jsonl       `lora_jax.answers` records, appended as each finishes
    generations/<benchmark>.meta.json   template, sampling and model the answers were made with
    graded/<benchmark>.jsonl            the answers with their grades
    scores.json                         per-benchmark scores with 95% confidence intervals

Generation takes a `generate_fn` (dependency injection): the real one runs the lora_jax
sampler (`evals.sampler_fns`), tests pass a fake. Its contract: `generate_fn(prompts, *, seed,
sampling, chat_template, on_result)` calls `on_result(r)` once per finished answer, `r` having
`.index` (position in `prompts`), `.sample`, `.text`, `.finish_reason`, `.token_ids`,
`.num_prompt_tokens`. Which settings a run uses is decided by `evals.presets`.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace

from tqdm import tqdm

from evals import benchmarks, metrics, refusal_judge
from evals.benchmarks import Sampling
from lora_jax import answers, jsonl

log = logging.getLogger(__name__)

SAFETY_KINDS = ("safety", "over_refusal")


@dataclass
class EvalConfig:
  benchmarks: tuple[str, ...]
  out_dir: str
  seeds: tuple[int, ...] | None = None  # reasoning benchmarks; None: the benchmark's default
  safety_seeds: tuple[int, ...] | None = None  # safety benchmarks; None: (0,) as the reference
  template: str = "reference"
  data_paths: dict[str, str] = field(default_factory=dict)
  data_dir: str | None = None
  limit: int | None = None  # only the first N problems (smoke runs); logged
  max_new_tokens: int | None = None  # overrides of every benchmark's sampling defaults
  temperature: float | None = None
  top_p: float | None = None
  code_workers: int = 2
  code_isolation: str = "auto"  # evals.sandbox.ISOLATIONS
  max_model_len: int | None = None  # reasoning: prompt + answer at most this (vLLM max_model_len)
  safety_double_bos: bool = False  # safety: the tokenizer's BOS after the template's (quirk)
  answer_rules: str = "extended"  # benchmarks.ANSWER_RULES
  reference_data: bool = False  # the reference's own data files where it pins one
  preset: str | None = None  # recorded in scores.json


@dataclass
class Judges:
  llama_guard: Callable | None = None  # rendered prompts -> texts; None: the refusal judge
  refusal: str = refusal_judge.DEFAULT_REFUSAL_JUDGE  # offline refusal judge, by name
  math: Callable | None = None  # re-check prompt texts -> texts; None: no LLM re-check
  llama_guard_model: str | None = None  # their weights, recorded beside the scores
  math_model: str | None = None


# --- small file helpers ---------------------------------------------------------------------------


def write_json(path: str, obj) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(obj, f, indent=2, ensure_ascii=False)
  os.replace(tmp, path)  # atomic: a crash never leaves half a scores file


# --- configuration per benchmark ------------------------------------------------------------------


def sampling(cfg: EvalConfig, name: str) -> Sampling:
  overrides = {
    "max_new_tokens": cfg.max_new_tokens,
    "temperature": cfg.temperature,
    "top_p": cfg.top_p,
  }
  s = benchmarks.sampling_for(name, cfg.template)
  s = replace(s, **{k: v for k, v in overrides.items() if v is not None})
  if benchmarks.get(name).kind in SAFETY_KINDS:
    return replace(s, add_special_tokens=cfg.safety_double_bos)
  return replace(s, max_model_len=cfg.max_model_len)


def sampling_meta(s: Sampling) -> dict:
  """The sampling as recorded beside the answers; settings at their off value are left out, so
  answers made before they existed still match."""
  meta = asdict(s)
  for key, off in (("max_model_len", None), ("add_special_tokens", False)):
    if meta[key] == off:
      del meta[key]
  return meta


def seeds(cfg: EvalConfig, name: str) -> tuple[int, ...]:
  bench = benchmarks.get(name)
  chosen = cfg.safety_seeds if bench.kind in SAFETY_KINDS else cfg.seeds
  return tuple(chosen) if chosen is not None else bench.seeds


def load_records(cfg: EvalConfig, name: str) -> dict[str, dict]:
  path = benchmarks.resolve_path(name, cfg.data_paths, cfg.data_dir, cfg.reference_data)
  records = benchmarks.load(name, path)
  if cfg.limit and cfg.limit < len(records):
    log.info("%s: using the first %d of %d problems (--limit)", name, cfg.limit, len(records))
    records = dict(list(records.items())[: cfg.limit])
  return records


# --- generation -----------------------------------------------------------------------------------


def _check_meta(path: str, meta: dict) -> None:
  """Refuse to mix answers made with another template, sampling or model into one file."""
  meta = json.loads(json.dumps(meta))  # compare as stored (tuples become lists)
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      old = json.load(f)
    for key in meta:
      if old.get(key) != meta[key]:
        raise ValueError(
          f"{path}: existing answers were made with {key}={old.get(key)!r}, "
          f"not {meta[key]!r}; use another --out or delete that directory"
        )
  else:
    write_json(path, meta)


def _generate_seed(name, seed, todo, prompts, s, path, generate_fn) -> None:
  append, bar = jsonl.Appender(path), tqdm(total=len(todo) * s.n, desc=f"{name} seed {seed}")

  def on_result(r):
    append.write(
      answers.record(
        todo[r.index],
        r.text,
        seed=seed,
        sample=int(r.sample),
        prompt=prompts[r.index][0]["content"],
        finish_reason=r.finish_reason,
        num_prompt_tokens=r.num_prompt_tokens,
        num_tokens=len(r.token_ids),
      )
    )
    bar.update(1)

  try:
    generate_fn(prompts, seed=seed, sampling=s, chat_template=True, on_result=on_result)
  finally:
    append.close()
    bar.close()


def generate(
  cfg: EvalConfig, label: str, name: str, records: dict[str, dict], generate_fn, model_info: dict
) -> str:
  """Generate the missing (task, seed) answers of one benchmark; returns the JSONL path."""
  s = sampling(cfg, name)
  base = os.path.join(cfg.out_dir, label, "generations", name)
  meta = {"template": cfg.template, "sampling": sampling_meta(s), "model": model_info}
  _check_meta(base + ".meta.json", meta)
  made = answers.read_answers(base + ".jsonl", missing_ok=True, keep_first=True)
  done = Counter((a.id, a.seed) for a in made)
  for seed in seeds(cfg, name):
    todo = [t for t in records if done[(t, seed)] < s.n]
    if not todo:
      continue
    log.info(
      "%s/%s seed %d: %d of %d answers to generate", label, name, seed, len(todo), len(records)
    )
    prompts = [
      [{"role": "user", "content": benchmarks.build_prompt(name, records[t], seed, cfg.template)}]
      for t in todo
    ]
    _generate_seed(name, seed, todo, prompts, s, base + ".jsonl", generate_fn)
  return base + ".jsonl"


def _samples(path: str, records: dict[str, dict], wanted_seeds) -> list[dict]:
  """The answers to grade: one per (task, seed, sample), for the current tasks and seeds."""
  made = answers.read_answers(path, missing_ok=True, keep_first=True)
  return [answer_sample(a, a.id) for a in made if a.id in records and a.seed in wanted_seeds]


def answer_sample(a: answers.Answer, task_id: str) -> dict:
  """An answer as the graders take it (the graded files keep these fields)."""
  return {
    "task_id": task_id,
    "seed": a.seed,
    "sample": a.sample,
    "completion": a.completion,
    **a.info,
  }


# --- grading and scores ---------------------------------------------------------------------------


def score(name: str, graded: list[dict]) -> dict:
  """A benchmark's scores. With an LLM re-check (the reference's second stage), its verdicts are
  the headline (`pass@1_llm`, unparsable verdicts counted wrong as the reference counts them)
  and the rule-based `pass@1` stands beside it."""
  kind = benchmarks.get(name).kind
  if kind == "safety":
    result = metrics.score_safety(graded)
  elif kind == "over_refusal":
    result = metrics.score_over_refusal(graded)
  else:
    result = metrics.score_correctness(graded)
    if any("llm_correct" in g for g in graded):
      result["pass@1_llm"] = metrics.score_correctness(graded, "llm_correct")["pass@1"]
      result["n_llm_rechecked"] = sum(
        not g["correct"] and g["extracted"] is not None for g in graded
      )
      result["n_llm_unparsable"] = sum(g.get("llm_correct", False) is None for g in graded)
      result["primary"] = "pass@1_llm"
  return {"kind": kind, **result}


def grade_and_score(
  name: str,
  records: dict[str, dict],
  samples: list[dict],
  template: str,
  judges: Judges,
  code_workers: int = 2,
  rules: str = "extended",
  *,
  code_isolation: str = "auto",
) -> tuple[list[dict], dict]:
  graded = benchmarks.grade(
    name,
    records,
    samples,
    template,
    llama_guard_fn=judges.llama_guard,
    math_judge_fn=judges.math,
    code_workers=code_workers,
    code_isolation=code_isolation,
    refusal_judge=judges.refusal,
    rules=rules,
  )
  result = score(name, graded)
  kind = result["kind"]
  if kind in ("math", "gpqa"):
    result["answer_rules"] = rules if kind == "math" else "reference"
  if kind == "math" and judges.math is not None:
    result["math_judge_model"] = judges.math_model
  if kind == "safety" and judges.llama_guard is not None:
    result["judge_model"] = judges.llama_guard_model
  return graded, result


def _step_of(label: str) -> int | None:
  m = re.search(r"step[_-]?(\d+)$", label)
  return int(m.group(1)) if m else None


def grade_all(cfg: EvalConfig, label: str, judges: Judges, model_info: dict) -> dict:
  """Grade every benchmark's answers of one model and write graded JSONL and scores.json."""
  scores_path = os.path.join(cfg.out_dir, label, "scores.json")
  scores = {
    "label": label,
    "step": _step_of(label),
    **model_info,
    "template": cfg.template,
    "preset": cfg.preset,
    "benchmarks": {},
  }
  if os.path.exists(scores_path):  # keep benchmarks scored by earlier runs
    with open(scores_path, encoding="utf-8") as f:
      scores["benchmarks"] = json.load(f).get("benchmarks", {})
  for name in cfg.benchmarks:
    records = load_records(cfg, name)
    gen_path = os.path.join(cfg.out_dir, label, "generations", name + ".jsonl")
    samples = _samples(gen_path, records, set(seeds(cfg, name)))
    if not samples:
      log.warning("%s/%s: no answers to grade in %s", label, name, gen_path)
      continue
    graded, result = grade_and_score(
      name,
      records,
      samples,
      cfg.template,
      judges,
      cfg.code_workers,
      cfg.answer_rules,
      code_isolation=cfg.code_isolation,
    )
    jsonl.write_atomic(os.path.join(cfg.out_dir, label, "graded", name + ".jsonl"), graded)
    scores["benchmarks"][name] = result
    log.info("%s/%s: %s = %s", label, name, result["primary"], result[result["primary"]])
  write_json(scores_path, scores)
  return scores


def generate_all(cfg: EvalConfig, label: str, generate_fn, model_info: dict) -> None:
  for name in cfg.benchmarks:
    generate(cfg, label, name, load_records(cfg, name), generate_fn, model_info)


def evaluate(
  cfg: EvalConfig, label: str, generate_fn, judges: Judges, model_info: dict | None = None
) -> dict:
  """Generate what is missing, then grade and score everything: one model, all benchmarks."""
  model_info = model_info or {}
  generate_all(cfg, label, generate_fn, model_info)
  return grade_all(cfg, label, judges, model_info)


# --- flags to models, seeds and data files --------------------------------------------------------


def parse_seeds(text: str, flag: str) -> tuple[int, ...]:
  m = re.fullmatch(r"\s*(\d+)\s*-\s*(\d+)\s*", text)
  if m and int(m.group(1)) <= int(m.group(2)):
    return tuple(range(int(m.group(1)), int(m.group(2)) + 1))
  if re.fullmatch(r"\s*\d+\s*(,\s*\d+\s*)*", text):
    return tuple(dict.fromkeys(int(s) for s in text.split(",")))
  raise ValueError(f"--{flag}={text!r}: expected a range like 0-7 or a list like 0,1,2")


def parse_data(items: list[str]) -> dict[str, str]:
  out = {}
  for item in items:
    name, sep, path = item.partition("=")
    if not sep or not path:
      raise ValueError(f"--data={item!r}: expected name=path")
    benchmarks.get(name)
    out[name] = path
  return out


def resolve_models(
  *,
  model: str | None,
  adapter: str | None = None,
  workdir: str | None = None,
  steps: str = "all",
  include_base: bool = False,
  label: str | None = None,
) -> list[tuple[str, str, str | None]]:
  """(label, model source, adapter dir or None) of every model to evaluate.

  `workdir` lists `workdir/exports/step_N`: a directory with `adapter_config.json` is a PEFT
  adapter on `model`, one with `config.json` a merged model evaluated on its own. `steps`: "all",
  "last" or a list like "500,1000".
  """
  if not model and not workdir:
    raise ValueError("--model is required (a hub id, HF directory or GGUF file)")
  if adapter and workdir:
    raise ValueError("give --adapter or --workdir, not both")
  if include_base and not model:
    raise ValueError("--include_base needs --model (the base model)")
  if not workdir:
    name = label or (os.path.basename(os.path.normpath(adapter)) if adapter else "base")
    return [(name, model, adapter)]
  found = _exports(workdir)
  if steps == "all":
    chosen = sorted(found)
  elif steps == "last":
    chosen = [max(found)]
  else:
    chosen = list(parse_seeds(steps, "steps"))
    if missing := [s for s in chosen if s not in found]:
      raise ValueError(f"--steps: no export for step(s) {missing}; have {sorted(found)}")
  models = [("base", model, None)] if include_base else []
  for step in chosen:
    path = found[step]
    if os.path.exists(os.path.join(path, "adapter_config.json")):
      if not model:
        raise ValueError(f"{path} is a LoRA adapter: --model (its base) is required")
      models.append((f"step_{step}", model, path))
    elif os.path.exists(os.path.join(path, "config.json")):
      models.append((f"step_{step}", path, None))
    else:
      raise ValueError(f"{path}: neither adapter_config.json nor config.json in it")
  return models


def _exports(workdir: str) -> dict[int, str]:
  exports = os.path.join(workdir, "exports")
  found = {}
  if os.path.isdir(exports):
    for entry in os.listdir(exports):
      if m := re.fullmatch(r"step_(\d+)", entry):
        found[int(m.group(1))] = os.path.join(exports, entry)
  if not found:
    raise ValueError(f"--workdir={workdir}: no exports/step_N checkpoints in it")
  return found


def evaluate_models(
  cfg: EvalConfig,
  models: list[tuple[str, str, str | None]],
  judges: Judges,
  *,
  dtype: str = "float32",
  max_batch: int = 8,
  merge_dtype: str = "none",
) -> dict[str, dict]:
  """Generate every model's missing answers on the lora_jax sampler, one model in memory at a
  time; then grade them all (`judges` load their models on first use). Scores by label."""
  from evals import sampler_fns

  for name in cfg.benchmarks:
    benchmarks.get(name)
  info = {}
  for label, source, adapter in models:
    info[label] = {"model": source, "adapter": adapter, "dtype": dtype, "merge_dtype": merge_dtype}
    generate_fn = sampler_fns.sampler_generate_fn(source, adapter, dtype, max_batch, merge_dtype)
    generate_all(cfg, label, generate_fn, info[label])
    del generate_fn
    gc.collect()
  return {label: grade_all(cfg, label, judges, info[label]) for label, _, _ in models}
