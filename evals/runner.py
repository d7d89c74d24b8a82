"""Evaluation runner: generate (resumable), grade, score. (Answers made elsewhere: evals/external.py.)

Layout of one model's results under `out_dir/<label>/`::

    generations/<benchmark>.jsonl       `lora_jax.answers` records, appended as each finishes
    generations/<benchmark>.meta.json   template, sampling and model the answers were made with
    graded/<benchmark>.jsonl            the answers with their grades
    scores.json                         per-benchmark scores with 95% confidence intervals

Generation takes a `generate_fn` (dependency injection): the real one runs the lora_jax
sampler, tests pass a fake. Its contract: `generate_fn(prompts, *, seed, sampling, chat_template,
on_result)` calls `on_result(r)` once per finished answer, `r` having `.index` (position in
`prompts`), `.sample`, `.text`, `.finish_reason`, `.token_ids`, `.num_prompt_tokens`.
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


@dataclass
class Judges:
  llama_guard: Callable | None = None  # rendered prompts -> texts; None: the refusal judge
  refusal: str = refusal_judge.DEFAULT_REFUSAL_JUDGE  # offline refusal judge, by name
  math: Callable | None = None  # chat conversations -> texts; None: no LLM re-check


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
  return replace(s, **{k: v for k, v in overrides.items() if v is not None})


def seeds(cfg: EvalConfig, name: str) -> tuple[int, ...]:
  bench = benchmarks.get(name)
  chosen = cfg.safety_seeds if bench.kind in SAFETY_KINDS else cfg.seeds
  return tuple(chosen) if chosen is not None else bench.seeds


def load_records(cfg: EvalConfig, name: str) -> dict[str, dict]:
  path = benchmarks.resolve_path(name, cfg.data_paths, cfg.data_dir)
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
  _check_meta(
    base + ".meta.json", {"template": cfg.template, "sampling": asdict(s), "model": model_info}
  )
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
  kind = benchmarks.get(name).kind
  if kind == "safety":
    result = metrics.score_safety(graded)
  elif kind == "over_refusal":
    result = metrics.score_over_refusal(graded)
  else:
    result = metrics.score_correctness(graded)
    if any("llm_correct" in g for g in graded):
      result["pass@1_llm"] = metrics.score_correctness(graded, "llm_correct")["pass@1"]
      result["n_llm_unparsable"] = sum(g.get("llm_correct", False) is None for g in graded)
  return {"kind": kind, **result}


def grade_and_score(
  name: str,
  records: dict[str, dict],
  samples: list[dict],
  template: str,
  judges: Judges,
  code_workers: int = 2,
) -> tuple[list[dict], dict]:
  graded = benchmarks.grade(
    name,
    records,
    samples,
    template,
    llama_guard_fn=judges.llama_guard,
    math_judge_fn=judges.math,
    code_workers=code_workers,
    refusal_judge=judges.refusal,
  )
  return graded, score(name, graded)


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
    graded, result = grade_and_score(name, records, samples, cfg.template, judges, cfg.code_workers)
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
  judges: Callable[[], Judges],
  *,
  dtype: str = "float32",
  max_batch: int = 8,
) -> dict[str, dict]:
  """Generate every model's missing answers on the lora_jax sampler, one model in memory at a
  time; then load the judges once (`judges()`) and grade them all. Scores by label."""
  for name in cfg.benchmarks:
    benchmarks.get(name)
  for label, source, adapter in models:
    generate_fn = sampler_generate_fn(source, adapter, dtype, max_batch)
    generate_all(cfg, label, generate_fn, {"model": source, "adapter": adapter})
    del generate_fn
    gc.collect()
  loaded = judges()
  return {
    label: grade_all(cfg, label, loaded, {"model": source, "adapter": adapter})
    for label, source, adapter in models
  }


# --- the lora_jax sampler as generate_fn and as judges --------------------------------------------


def model_generate_fn(model, tokenizer, max_batch: int = 8):
  """A `generate_fn` over the lora_jax sampler for a model already in memory."""

  def generate_fn(prompts, *, seed, sampling, chat_template, on_result):
    from lora_jax.sampling import generate_text

    generate_text(
      model,
      tokenizer,
      prompts,
      max_new_tokens=sampling.max_new_tokens,
      temperature=sampling.temperature,
      top_p=sampling.top_p,
      top_k=0,
      min_p=0.0,
      seed=seed,
      n=sampling.n,
      stop=sampling.stop,
      stop_token_ids=(),
      chat_template=chat_template,
      max_batch=max_batch,
      on_result=on_result,
    )

  return generate_fn


def sampler_generate_fn(
  source: str, adapter: str | None = None, dtype: str = "float32", max_batch: int = 8
):
  """A `generate_fn` over the lora_jax sampler. The model loads on the first call (so a rerun
  with nothing left to generate loads nothing) and is freed with the function."""
  state = {}

  def generate_fn(prompts, **kwargs):
    if not state:
      import lora_jax

      model = lora_jax.load_pretrained(source, dtype=dtype, mesh=None)
      if adapter:
        from lora_jax.io.peft import load_peft_adapter

        model = load_peft_adapter(model, adapter)
      state["fn"] = model_generate_fn(model, lora_jax.load_tokenizer(source), max_batch)
    state["fn"](prompts, **kwargs)

  return generate_fn


def texts_fn(generate_fn, max_new_tokens: int, chat_template: bool):
  """Adapt a `generate_fn` to a judge: greedy, one text per prompt, in order."""
  greedy = Sampling(temperature=0.0, top_p=1.0, max_new_tokens=max_new_tokens)

  def run(prompts):
    texts = [None] * len(prompts)
    generate_fn(
      prompts,
      seed=0,
      sampling=greedy,
      chat_template=chat_template,
      on_result=lambda r: texts.__setitem__(r.index, r.text),
    )
    missing = sum(t is None for t in texts)
    if missing:
      raise RuntimeError(f"judge returned no text for {missing} of {len(prompts)} prompts")
    return texts

  return run


def sampler_judges(
  llama_guard_source: str | None,
  math_judge_source: str | None,
  dtype: str = "float32",
  max_batch: int = 8,
) -> Judges:
  """Judges running on our sampler: Llama-Guard-3 on its rendered prompts (no second chat
  template), 512 greedy tokens as the reference; the math re-check judge on chat messages, 20
  greedy tokens."""
  from evals.safety import LLAMA_GUARD_MAX_NEW_TOKENS

  guard = math = None
  if llama_guard_source:
    guard = texts_fn(
      sampler_generate_fn(llama_guard_source, None, dtype, max_batch),
      LLAMA_GUARD_MAX_NEW_TOKENS,
      chat_template=False,
    )
  if math_judge_source:
    math = texts_fn(
      sampler_generate_fn(math_judge_source, None, dtype, max_batch), 20, chat_template=True
    )
  return Judges(llama_guard=guard, math=math)
