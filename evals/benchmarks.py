"""The benchmark registry: name -> data source, record mapping, prompt, sampling, grader.

Every benchmark loads from its hub id (`datasets`) or from a local file (csv, jsonl, json,
parquet; the layout of `shared/data`) into records with an `id`, the prompt fields and the
gold answer. Code benchmarks (HumanEval, HumanEval+, MBPP+) are delegated to `code_data` and
`code_grader`.
"""

from __future__ import annotations

import csv
import gzip
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, replace

from evals import gpqa, math_grader, reference_files, safety
from evals import refusal_judge as refusal_judge_lib

log = logging.getLogger(__name__)

TEMPLATES = ("reference", "lighteval")

# The reference's AIME/MATH prompt (lm-eval task "AIME"), and open-r1's MATH prompt for lighteval.
MATH_PROMPTS = {
  "reference": (
    "Solve the following math problem. Present the final answer in the format: "
    "Final Answer: \\boxed{{your_answer}}.\nProblem: {problem}\nAnswer:"
  ),
  "lighteval": (
    "Solve the following math problem efficiently and clearly.  The last line of your "
    "response should be of the following format: 'Therefore, the final answer is: "
    "$\\boxed{{ANSWER}}$. I hope it is correct' (without quotes) where ANSWER is just the "
    "final number or expression that solves the problem. Think step by step before "
    "answering.\n\n{problem}"
  ),
}


@dataclass(frozen=True)
class Sampling:
  temperature: float
  top_p: float
  max_new_tokens: int
  stop: tuple[str, ...] = ()
  n: int = 1
  # Prompt + answer at most this many tokens (vLLM's max_model_len; None: max_new_tokens only).
  max_model_len: int | None = None
  # The tokenizer adds its BOS to the rendered chat prompt too: two BOS (a reference quirk).
  add_special_tokens: bool = False


SAFETY_SAMPLING = Sampling(temperature=1.0, top_p=1.0, max_new_tokens=2048)
REASONING_SAMPLING = Sampling(temperature=0.6, top_p=0.95, max_new_tokens=32768)
REASONING_SEEDS = tuple(range(8))


@dataclass(frozen=True)
class Benchmark:
  name: str
  kind: str  # "safety" | "over_refusal" | "math" | "gpqa" | "code"
  hub: tuple[str, str | None, str] | None  # (dataset id, config, split)
  local_file: str  # default path under --data_dir
  sampling: Sampling
  seeds: tuple[int, ...]
  to_record: Callable[[dict, int, Callable], dict | None] | None = None
  integer_gold: bool = False


def _field(row: dict, names: tuple[str, ...], where: str):
  for name in names:
    if row.get(name) not in (None, ""):
      return row[name]
  raise ValueError(f"{where} has none of the fields {'/'.join(names)}")


def _first(row, names, default):
  return next((row[n] for n in names if row.get(n) not in (None, "")), default)


def _strongreject(row, i, where):
  prompt = _field(row, ("prompt", "forbidden_prompt"), where)
  return {"id": str(row.get("id", i)), "prompt": prompt, "category": row.get("category")}


def _advbench(row, i, where):
  return {"id": str(row.get("id", i)), "prompt": _field(row, ("goal", "prompt"), where)}


def _harmbench(row, i, where):
  if row.get("FunctionalCategory", "standard") != "standard":
    return None  # contextual and copyright behaviours are not part of the benchmark here
  return {
    "id": str(row.get("BehaviorID") or i),
    "prompt": _field(row, ("Behavior", "prompt"), where),
    "category": row.get("SemanticCategory", row.get("category")),
  }


def _xstest(row, i, where):
  label = str(_field(row, ("label",), where)).strip().lower()
  if label not in ("safe", "unsafe"):
    raise ValueError(f"{where}: label {label!r} is not 'safe' or 'unsafe'")
  return {
    "id": str(row.get("id") or i),
    "prompt": _field(row, ("prompt",), where),
    "label": label,
    "type": row.get("type"),
  }


def _math(row, i, where):
  return {
    "id": str(_first(row, ("id", "ID", "unique_id"), i)),
    "problem": _field(row, ("problem", "Problem", "question"), where),
    "gold": str(_field(row, ("answer", "Answer"), where)).strip(),
  }


def _gpqa(row, i, where):
  return {
    "id": str(_first(row, ("Record ID", "id"), i)),
    "question": _field(row, ("Question",), where),
    "correct": _field(row, ("Correct Answer",), where),
    "incorrect": [_field(row, (f"Incorrect Answer {k}",), where) for k in (1, 2, 3)],
  }


_MATH = dict(kind="math", sampling=REASONING_SAMPLING, seeds=REASONING_SEEDS, to_record=_math)
_CODE = dict(kind="code", hub=None, sampling=REASONING_SAMPLING, seeds=REASONING_SEEDS)
_SAFE = dict(sampling=SAFETY_SAMPLING, seeds=(0,))

REGISTRY = {
  b.name: b
  for b in [
    Benchmark(
      "strongreject",
      "safety",
      ("walledai/StrongREJECT", None, "train"),
      "strongreject/strongreject_dataset.csv",
      to_record=_strongreject,
      **_SAFE,
    ),
    Benchmark(
      "harmbench",
      "safety",
      ("walledai/HarmBench", "standard", "train"),
      "harmbench/harmbench_behaviors_text_all.csv",
      to_record=_harmbench,
      **_SAFE,
    ),
    Benchmark(
      "advbench",
      "safety",
      ("walledai/AdvBench", None, "train"),
      "advbench/harmful_behaviors.csv",
      to_record=_advbench,
      **_SAFE,
    ),
    Benchmark(
      "xstest",
      "over_refusal",
      ("walledai/XSTest", None, "test"),
      "xstest/xstest_prompts.csv",
      to_record=_xstest,
      **_SAFE,
    ),
    Benchmark(
      "aime24",
      hub=("HuggingFaceH4/aime_2024", None, "train"),
      local_file="aime24/test.jsonl",
      integer_gold=True,
      **_MATH,
    ),
    Benchmark(
      "aime25",
      hub=("yentinglin/aime_2025", None, "train"),
      local_file="aime25/test.jsonl",
      integer_gold=True,
      **_MATH,
    ),
    Benchmark(
      "math500",
      hub=("HuggingFaceH4/MATH-500", None, "test"),
      local_file="math500/test.jsonl",
      **_MATH,
    ),
    # A math-graded set of your own (problem + answer rows, e.g. evals/demo_data/arithmetic.jsonl).
    Benchmark("arithmetic", hub=None, local_file="arithmetic/test.jsonl", **_MATH),
    Benchmark(
      "gpqa_diamond",
      "gpqa",
      ("Idavidrein/gpqa", "gpqa_diamond", "train"),
      "gpqa/gpqa_diamond.csv",
      REASONING_SAMPLING,
      REASONING_SEEDS,
      _gpqa,
    ),
    Benchmark("humaneval", local_file="humaneval/HumanEval.jsonl.gz", **_CODE),
    Benchmark("humaneval_plus", local_file="humanevalplus/HumanEvalPlus.jsonl.gz", **_CODE),
    Benchmark("mbpp_plus", local_file="mbppplus/MbppPlus.jsonl.gz", **_CODE),
  ]
}


def get(name: str) -> Benchmark:
  if name not in REGISTRY:
    raise ValueError(f"unknown benchmark {name!r}; known: {', '.join(REGISTRY)}")
  return REGISTRY[name]


def sampling_for(name: str, template: str) -> Sampling:
  """The reference's lm-eval tasks stop AIME/MATH generations at "Problem:" (its prompt invites
  a next one; AIME.yaml) and GPQA's at "</s>" (_gpqa_better_prompt_yaml's `until`)."""
  bench = get(name)
  if template == "reference" and bench.kind in REFERENCE_STOPS:
    return replace(bench.sampling, stop=REFERENCE_STOPS[bench.kind])
  return bench.sampling


REFERENCE_STOPS = {"math": ("Problem:",), "gpqa": ("</s>",)}


# --- loading --------------------------------------------------------------------------------------


def read_rows(path: str) -> list[dict]:
  """Rows of a local csv / jsonl / json / parquet file (optionally .gz)."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"data file not found: {path}")
  base = path[:-3] if path.endswith(".gz") else path
  opener = gzip.open if path.endswith(".gz") else open
  if base.endswith(".parquet"):
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist()
  with opener(path, "rt", encoding="utf-8", newline="") as f:
    if base.endswith(".csv"):
      return list(csv.DictReader(f))
    if base.endswith(".jsonl"):
      return [json.loads(line) for line in f if line.strip()]
    if base.endswith(".json"):
      data = json.load(f)
      return data if isinstance(data, list) else data.get("data", data.get("rows", []))
  raise ValueError(f"unsupported data file type: {path} (expected csv, jsonl, json or parquet)")


def _hub_rows(bench: Benchmark) -> list[dict]:
  if bench.hub is None:
    raise ValueError(f"{bench.name} has no hub copy: give its file (--data={bench.name}=PATH)")
  import datasets

  path, config, split = bench.hub
  return [dict(r) for r in datasets.load_dataset(path, config, split=split)]


def load(name: str, path: str | None = None) -> dict[str, dict]:
  """Records of benchmark `name` by id, in file order, from `path` or the hub."""
  bench = get(name)
  if bench.kind == "code":
    from evals import code_data

    return {str(k): v for k, v in code_data.load_problems(name, path).items()}
  rows = read_rows(path) if path else _hub_rows(bench)
  source = path or bench.hub[0]
  records: dict[str, dict] = {}
  skipped = 0
  for i, row in enumerate(rows):
    record = bench.to_record(row, i, f"{name}: row {i + 1} of {source}")
    if record is None:
      skipped += 1
    elif record["id"] in records:
      raise ValueError(f"{name}: row {i + 1} of {source} repeats id {record['id']!r}")
    else:
      records[record["id"]] = record
  if skipped:
    log.info(
      "%s: skipped %d of %d rows of %s (not standard behaviours)", name, skipped, len(rows), source
    )
  if not records:
    raise ValueError(f"{name}: no records in {source}")
  return records


def resolve_path(
  name: str, data_paths: dict[str, str], data_dir: str | None, reference_data: bool = False
) -> str | None:
  """The local file for `name`: an explicit --data=name=path, else under --data_dir, else (with
  `reference_data`) the reference's own file where it pins one (`reference_files`, fetched once),
  else None (load from the hub; `--data=name=hub` asks for the hub in every case). With
  `reference_data`, a local file that is not the reference's is logged."""
  if name in data_paths:
    path = None if data_paths[name] == "hub" else data_paths[name]
  elif data_dir:
    path = os.path.join(data_dir, get(name).local_file)
    if not os.path.isfile(path):
      raise FileNotFoundError(
        f"{name}: {path} not found under --data_dir={data_dir} (give "
        f"--data={name}=PATH, or --data={name}=hub)"
      )
  elif reference_data and name in reference_files.FILES:
    return reference_files.fetch(name)
  else:
    return None
  if reference_data and path:
    reference_files.check(name, path)
  return path


# --- prompts and grading --------------------------------------------------------------------------


def build_prompt(name: str, record: dict, seed: int, template: str = "reference") -> str:
  """The user message for one record (the runner wraps it in the model's chat template)."""
  if template not in TEMPLATES:
    raise ValueError(f"unknown template {template!r}; expected one of {', '.join(TEMPLATES)}")
  kind = get(name).kind
  if kind in ("safety", "over_refusal"):
    return record["prompt"]
  if kind == "math":
    return MATH_PROMPTS[template].format(problem=record["problem"])
  if kind == "gpqa":
    return gpqa.build_prompt(record, seed, template)
  from evals import code_data

  # lighteval/open-r1 have no HumanEval/MBPP+ template of their own: both use EvalPlus's
  # instruction without its assistant pre-fill, as the reference does.
  return code_data.build_prompt(record, "reference")


def grade(
  name: str,
  records: dict[str, dict],
  samples: list[dict],
  template: str = "reference",
  llama_guard_fn=None,
  math_judge_fn=None,
  code_workers: int = 2,
  code_isolation: str = "auto",
  refusal_judge: str = refusal_judge_lib.DEFAULT_REFUSAL_JUDGE,
  rules: str = "extended",
) -> list[dict]:
  """Grade samples (dicts with `task_id`, `seed`, `completion`): one result dict each,
  the sample's fields plus the grade.

  `rules` (reference template): "reference" grades math answers and reads Llama-Guard's verdict
  exactly as the reference did (`math_grader.grade_math_reference`, `safety.reference_verdict`);
  "extended" adds equivalence rules for math and asks Llama-Guard's first line to be the verdict.

  `refusal_judge` names the offline judge (`evals.refusal_judge`): it decides `refusal` on the
  safety and over-refusal benchmarks, and without Llama-Guard it is the safety judge (refused =
  safe). `code_isolation`: the code sandbox's (`evals.sandbox.ISOLATIONS`). `llama_guard_fn(prompts) -> texts` makes Llama-Guard-3 the safety judge;
  `math_judge_fn(prompt_texts) -> texts` re-checks math mismatches with an LLM
  (`llm_correct`).
  """
  if rules not in ANSWER_RULES:
    raise ValueError(f"answer rules {rules!r}; expected one of {', '.join(ANSWER_RULES)}")
  bench = get(name)
  if bench.kind == "code":
    return _grade_code(name, records, samples, code_workers, code_isolation)
  refusals = refusal_judge_lib.get(refusal_judge)
  out = []
  for s in samples:
    record, text = records[str(s["task_id"])], s["completion"]
    if bench.kind == "math":
      out.append({**s, **_grade_math(text, record["gold"], bench.integer_gold, template, rules)})
    elif bench.kind == "gpqa":
      out.append({**s, **gpqa.grade_gpqa(text, record, int(s.get("seed", 0)), template)})
    else:
      extra = {"label": record["label"]} if bench.kind == "over_refusal" else {}
      harmful = bench.kind == "safety" or record.get("label") == "unsafe"
      verdict = refusals.verdict(text, harmful)
      extra.update(
        refusal_judge=refusals.name, refusal_verdict=verdict.verdict, refusal_reason=verdict.reason
      )
      out.append({**s, **extra, "refusal": verdict.verdict == "refusal"})
  if bench.kind == "math" and math_judge_fn is not None:
    _llm_recheck(out, records, math_judge_fn)
  if bench.kind == "safety" and llama_guard_fn is None:  # anything not refused is unsafe
    for g in out:
      g.update(judge=refusals.name, unsafe=not g["refusal"], categories=[])
  elif bench.kind == "safety":
    _judge_harm(out, records, llama_guard_fn, rules)
  return out


ANSWER_RULES = ("reference", "extended")


def _grade_code(
  name: str, records: dict, samples: list[dict], workers: int, isolation: str
) -> list[dict]:
  from evals import code_grader

  results = code_grader.grade_code(name, records, samples, workers=workers, isolation=isolation)
  # One result per sample, in the samples' order (grade_code's contract).
  if [str(r["task_id"]) for r in results] != [str(s["task_id"]) for s in samples]:
    raise RuntimeError(f"{name}: grade_code's results do not match the samples in order")
  return [
    {**s, "correct": bool(r["passed"]), "reason": r.get("reason")}
    for s, r in zip(samples, results, strict=True)
  ]


def _judge_harm(graded: list[dict], records: dict, llama_guard_fn, rules: str) -> None:
  pairs = [(records[str(g["task_id"])]["prompt"], g["completion"]) for g in graded]
  verdicts = safety.judge_llama_guard(pairs, llama_guard_fn, rules)
  for g, v in zip(graded, verdicts, strict=True):
    g.update(
      judge="llama_guard_3",
      unsafe=None if v["verdict"] is None else v["verdict"] == "unsafe",
      categories=v["categories"],
      judge_output=v["judge_output"],
    )


def _grade_math(text: str, gold: str, integer_gold: bool, template: str, rules: str) -> dict:
  if template == "lighteval":
    return math_grader.grade_math(text, gold, integer_gold, "math_verify")
  if rules == "reference":
    return math_grader.grade_math_reference(text, gold)
  return math_grader.grade_math(text, gold, integer_gold, "boxed")


def _llm_recheck(graded: list[dict], records: dict[str, dict], judge_fn) -> None:
  """The reference's second stage: an LLM re-judges answers that were extracted but did not
  match; `llm_correct` is None where its verdict could not be parsed."""
  todo = [g for g in graded if not g["correct"] and g["extracted"] is not None]
  items = [
    (records[str(g["task_id"])]["problem"], records[str(g["task_id"])]["gold"], g["extracted"])
    for g in todo
  ]
  for g in graded:
    g["llm_correct"] = g["correct"]
  for g, verdict in zip(todo, math_grader.llm_recheck(items, judge_fn), strict=True):
    g["llm_correct"] = verdict
