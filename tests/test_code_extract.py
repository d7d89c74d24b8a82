"""Program extraction from model answers (evals/code_extract.py): EvalPlus 0.3.1's sanitize,
checked against the evalplus package itself; the shapes models write, with the verdicts EvalPlus
gives them, graded by `evals.code_grader.grade_code`."""

import json
import pathlib
import random
import subprocess
import sys

import pytest

from evals import code_data
from evals.code_extract import extract_code, longest_parsing_run, sanitize

SHARED = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"
HE_PLUS = SHARED / "humanevalplus" / "HumanEvalPlus.jsonl.gz"
MBPP_PLUS = SHARED / "mbppplus" / "MbppPlus.jsonl.gz"
PROMPT = 'def add(a, b):\n    """Add two numbers."""\n'
ADD = "def add(a, b):\n    return a + b"


@pytest.fixture(scope="module")
def evalplus_sanitize():
  """evalplus 0.3.1's own sanitize module (installed without its code-generation dependencies,
  see BUILD.md)."""
  try:
    from evalplus import sanitize as module
  except ImportError as e:
    pytest.fail(
      f"evalplus 0.3.1 is needed as the reference ({e}): pip install --no-deps evalplus==0.3.1 "
      "(make setup does), with the test extra (tree-sitter, tree-sitter-python, wget, tempdir, "
      "appdirs)"
    )
  return module


# --- EvalPlus's rules, on fixed strings ---------------------------------------------------------

FIXED = {
  "thinking dropped": (
    "<think>Maybe:\n```python\ndef add(a, b):\n    x = a\n    return x - b\n```\nNo, wrong."
    "</think>\nHere it is:\n```python\ndef add(a, b):\n    return a + b\n```\n",
    ADD,
  ),
  "longest run wins, whatever its fence": (
    "```python\ndef add(a, b):\n    return a + b\n```\n"
    "```text\ndef add(a, b):\n    total = a + b\n    return total\n```\n",
    "def add(a, b):\n    total = a + b\n    return total",
  ),
  "first of equally long runs": (
    "```text\ndef add(a, b):\n    return 0\n```\n```py\ndef add(a, b):\n    return a + b\n```\n",
    "def add(a, b):\n    return 0",
  ),
  "unclosed fence of a truncated answer": ("```python\ndef add(a, b):\n    return a + b\n", ADD),
  "no fence, prose around": (f"Sure. The idea is simple.\n{ADD}\nThis returns the sum.", ADD),
  "prose that parses is code (annotations), and can be the longest run": (
    f"```python\n{ADD}\n```\nNote: sum\nUsage: add(1, 2)\nOutput: 3\n",
    "Note: sum\nUsage: add(1, 2)\nOutput: 3",
  ),
  "usage longer than the solution: EvalPlus takes the usage": (
    f"```python\n{ADD}\n```\nUsage:\n```python\nprint(add(1, 2))\nprint(add(3, 4))\n"
    "print(add(5, 6))\n```\n",
    "print(add(1, 2))\nprint(add(3, 4))\nprint(add(5, 6))",
  ),
  "decorated entry point dropped (tree-sitter's decorated_definition)": (
    "```python\nfrom functools import lru_cache\nBASE = 1\n@lru_cache(maxsize=None)\n"
    "def add(a, b):\n    return a + b + BASE\n```",
    "from functools import lru_cache",
  ),
  "first definition of a name wins": (
    "```python\ndef add(a, b):\n    return 1\ndef add(a, b):\n    return 2\n```",
    "def add(a, b):\n    return 1",
  ),
  "function without return skipped, a later one kept": (
    "```python\ndef add(a, b):\n    print(a + b)\ndef add(a, b):\n    return a + b\n```",
    ADD,
  ),
  "nothing kept: the run itself": (
    "```python\ndef add(a, b):\n    print(a + b)\n\nadd(1, 2)\n```",
    "def add(a, b):\n    print(a + b)\n\nadd(1, 2)",
  ),
  "trailing comments of a function kept, as tree-sitter ends it": (
    "```python\ndef add(a, b):\n    return a + b  # sum\n    # done\n# after\nprint(1)\n```",
    "def add(a, b):\n    return a + b  # sum\n    # done",
  ),
  "one line: no run of two lines, the first line": (
    "def add(a, b): return a + b",
    "def add(a, b): return a + b",
  ),
}


@pytest.mark.parametrize("name", list(FIXED))
def test_rules_on_fixed_answers(name, evalplus_sanitize):
  answer, expected = FIXED[name]
  assert extract_code(answer, "add") == expected
  assert evalplus_sanitize.sanitize(answer.rsplit("</think>", 1)[-1], "add") == expected


def test_imports_first_helpers_reached_junk_dropped(evalplus_sanitize):
  answer = """```python
from __future__ import annotations
import math
SCALE = 2
UNUSED = 5
a, b = 1, 2

def helper(x):
    return math.floor(x) * SCALE + f"{OFFSET}".count("1")

OFFSET = 10

class Box:
    def __init__(self, v):
        self.v = v

def unused_helper():
    return 1

from typing import List

def solve(xs: List[float]) -> int:
    return sum(helper(x) for x in xs) + Box(0).v

print(solve([1.5]))
assert solve([1.0]) == 2
if __name__ == "__main__":
    solve([])
```"""
  code = extract_code(answer, "solve")
  assert code == evalplus_sanitize.sanitize(answer, "solve")
  assert code.split("\n")[:2] == ["import math", "from typing import List"]  # imports first
  for kept in ("SCALE = 2", "def helper", "OFFSET = 10", "class Box", "def solve"):
    assert kept in code
  for junk in ("__future__", "UNUSED", "a, b", "unused_helper", "print(", "assert ", "__main__"):
    assert junk not in code
  ns = {}
  exec(code, ns)
  assert ns["solve"]([1.5]) == 3


def test_without_entry_point_every_definition_is_kept():
  code = extract_code("```python\nimport os\nX = 1\ndef a():\n    return X\nprint(a())\n```")
  assert code == "import os\nX = 1\ndef a():\n    return X"


def test_body_continuation_read_after_the_prompt_chat_answers_alone():
  code = extract_code("    return a + b\n", "add", PROMPT)
  assert code == PROMPT + "    return a + b"
  # A chat answer that does not define the entry point is not joined to the prompt.
  assert extract_code("```python\nprint(add(1, 2))\nprint(3)\n```", "add", PROMPT) == (
    "print(add(1, 2))\nprint(3)"
  )


@pytest.mark.parametrize(
  "garbage",
  [
    "",
    "no code here at all",
    "```python\ndef f(:\n```",
    "</think>",
    "```",
    "\x00\x01\x02",
    "def " * 10000,
    "(" * 5000,
    "x = (1,\n" * 300 + "prose\n" * 300,
    '"""\n' * 50,
    None,
    12,
  ],
)
def test_garbage_never_raises_nor_defines(garbage):
  code = extract_code(garbage, "f", "def f():\n    pass\n")
  assert isinstance(code, str) and "def f" not in code


def test_line_breaks_inside_strings_and_crlf(evalplus_sanitize):
  answer = "```python\r\ndef f():\r\n    return 'a\x0cb\u2028c'\r\nprint(f())\r\n```"
  code = extract_code(answer, "f")
  assert code == evalplus_sanitize.sanitize(answer, "f")
  ns = {}
  exec(code, ns)
  assert ns["f"]() == "a\x0cb\u2028c" and "print" not in code


# --- the same as evalplus on random mixes of code and prose -------------------------------------

NOISE = [
  "Here is the code:",
  "```python",
  "```",
  "",
  "Example usage:",
  "Output: 5",
  "Okay",
  "(note this",
  'x = """',
  "    indented prose",
  "print(f(1))",
  "assert f(2) == 3",
  "# comment",
  "  # indented comment",
  "\t# tab comment",
  "def g():",
  "    return 1",
  "@decorator",
  "if __name__ == '__main__':",
  "    main()",
  "\\",
  "Wait, that's wrong.",
  "x = [1,",
  "  2]",
  '"""',
  "'''",
  ")",
  "So f(x = 3",
  "try:",
  "else:",
  "x = 1  # trailing",
  "def h(): return 2  # one-liner",
  "class K:\n    y = 1\n    # in class",
  "a, b = 1, 2",
  "v: int = 3",
  "t = u = 4",
  "x += 1",
  's = f"{g(1)}"',
  "from __future__ import annotations",
  "@d\ndef dd():\n    return 1",
  "async def a():\n    return 1",
]


def test_random_mixes_match_evalplus(evalplus_sanitize):
  """Canonical programs cut and interleaved with prose, fence, comment and broken lines: the
  same run (a search pruned by the parser's error line vs EvalPlus's every range) and the same
  sanitised program."""
  programs = [
    (p["prompt"] + p["canonical_solution"], p["entry_point"])
    for p in code_data.load_problems("humaneval_plus", str(HE_PLUS)).values()
  ] + [
    (p["canonical_solution"], p["entry_point"])
    for p in code_data.load_problems("mbpp_plus", str(MBPP_PLUS)).values()
  ]
  rng = random.Random(0)
  for _ in range(150):
    lines = []
    for _ in range(1 + (rng.random() < 0.3)):
      code, ep = rng.choice(programs)
      for line in code.split("\n"):
        r = rng.random()
        if r < 0.2:
          lines.append(rng.choice(NOISE))
        if r > 0.1:
          lines.append(line)
    text = "\n".join(lines)
    assert longest_parsing_run(text) == evalplus_sanitize.code_extract(text), text
    assert sanitize(text, ep) == evalplus_sanitize.sanitize(text, ep), text


# --- the shapes models write, extracted and graded as EvalPlus does ------------------------------

HE_TASK, MBPP_TASK = "HumanEval/4", "Mbpp/6"
SOL = (
  "from typing import List\n\n\ndef mean_absolute_deviation(numbers: List[float]) -> float:\n"
  "    mean = sum(numbers) / len(numbers)\n"
  "    return sum(abs(x - mean) for x in numbers) / len(numbers)"
)
WRONG = SOL.replace("sum(numbers) / len", "sum(numbers) * len")  # a wrong operator
# What sanitize returns: the import, then the function (each node's text, one per line).
SOL_CODE, WRONG_CODE = (code.replace("\n\n\n", "\n", 1) for code in (SOL, WRONG))
CALL = "mean_absolute_deviation([1.0, 2.0, 3.0, 4.0])"
IMPORT = "from typing import List"
SIGNATURE = "def mean_absolute_deviation(numbers: List[float]) -> float:"
PRINTS = "\n".join([f"print({CALL})"] * 6)
MBPP_SOL = (
  "def is_Power_Of_Two(x: int):\n    return x > 0 and (x & (x - 1)) == 0\n\n"
  "def differ_At_One_Bit_Pos(a: int, b: int):\n    return is_Power_Of_Two(a ^ b)"
)


def _fence(code):
  return f"```python\n{code}\n```"


PASSED, FAILED = ("pass", "pass"), ("fail", "fail")
# name: (task, answer, the program EvalPlus's sanitize finds, EvalPlus's base/plus verdicts).
# Verdicts as EvalPlus 0.3.1's evaluate gives them (checked live below).
SHAPES = {
  "fenced, prose around": (
    HE_TASK,
    f"Here it is.\n\n{_fence(SOL)}\n\nLinear time.",
    SOL_CODE,
    PASSED,
  ),
  # Graded wrong before: the usage block, glued to the prompt's function, won as the longest.
  "example usage after the solution": (
    HE_TASK,
    f"{_fence(SOL)}\n\nExample usage:\n{_fence(f'print({CALL})')}\n",
    SOL_CODE,
    PASSED,
  ),
  "usage longer than the solution": (
    HE_TASK,
    f"{_fence(SOL)}\n\nExample usage:\n{_fence(PRINTS)}\n",
    PRINTS,
    FAILED,
  ),
  "test calls after the code": (
    HE_TASK,
    _fence(
      f"{SOL}\n\n# Tests\nprint({CALL})\nassert {CALL} == 1.0\n\n"
      f'if __name__ == "__main__":\n    print({CALL})'
    ),
    SOL_CODE,
    PASSED,
  ),
  "several fences": (
    HE_TASK,
    f"Plan:\n```text\n1. mean\n2. deviations\n```\nRun:\n```bash\npython3 mad.py\n```\n"
    f"{_fence(SOL)}\nChecks:\n{_fence(f'assert {CALL} == 1.0')}",
    SOL_CODE,
    PASSED,
  ),
  "repeated signature": (
    HE_TASK,
    f"We fill in\n{_fence(SIGNATURE + chr(10) + '    ...')}\nso:\n{_fence(SOL)}",
    SOL_CODE,
    PASSED,
  ),
  "thinking with a longer wrong draft": (
    HE_TASK,
    f"<think>\nLet me draft it.\n{WRONG}\n{PRINTS}\nHmm, the mean is wrong.\n</think>\n\n"
    f"{_fence(SOL)}",
    SOL_CODE,
    PASSED,
  ),
  "no fence": (HE_TASK, f"Sure!\n\n{SOL}\n\nIt averages the deviations.", SOL_CODE, PASSED),
  "after EvalPlus's pre-fill": (HE_TASK, f"{SOL}\n```\n\nDone.", SOL_CODE, PASSED),
  "imports left out": (
    HE_TASK,
    _fence(SOL.replace(IMPORT + "\n\n\n", "")),
    SOL.replace(IMPORT + "\n\n\n", ""),
    FAILED,
  ),
  "wrong operator": (HE_TASK, _fence(WRONG), WRONG_CODE, FAILED),
  "misspelt return": (HE_TASK, _fence(SOL.replace("    return", "    retrun")), IMPORT, FAILED),
  "wrong name": (
    HE_TASK,
    _fence(SOL.replace("def mean_absolute_deviation", "def solve")),
    IMPORT,
    FAILED,
  ),
  "never returns": (
    HE_TASK,
    _fence(SOL.replace("    mean =", "    while True:\n        pass\n    mean =")),
    SOL_CODE.replace("    mean =", "    while True:\n        pass\n    mean ="),
    FAILED,
  ),
  "MBPP+: helper kept, usage dropped": (
    MBPP_TASK,
    f"{_fence(MBPP_SOL)}\nExample:\n{_fence('print(differ_At_One_Bit_Pos(13, 9))')}",
    MBPP_SOL.replace("\n\n", "\n"),
    PASSED,
  ),
}


def _prompt_shapes(he_prompt: str) -> dict[str, tuple[str, str, str, tuple[str, str]]]:
  """The shapes that hold HumanEval/4's prompt."""
  prompt_def = he_prompt[he_prompt.index("def ") :].rstrip("\n")
  body = SOL.split(SIGNATURE, 1)[1]  # the body, after the signature's line
  return {
    "prompt restated with its docstring": (
      HE_TASK,
      _fence(he_prompt + body.lstrip("\n")),
      f"{IMPORT}\n{prompt_def}\n{body.lstrip(chr(10))}",
      PASSED,
    ),
    "stub (longer) then code": (
      HE_TASK,
      f"You gave:\n{_fence(he_prompt.strip())}\nMine:\n{_fence(SOL)}",
      IMPORT,
      FAILED,
    ),
    "body only (a completion model)": (
      HE_TASK,
      body + "\n",
      f"{IMPORT}\n{prompt_def}\n{body}",
      PASSED,
    ),
  }


SHAPE_NAMES = [*SHAPES, *_prompt_shapes("def _():\n")]


@pytest.fixture(scope="module")
def problems():
  return {
    "humaneval_plus": code_data.load_problems("humaneval_plus", str(HE_PLUS)),
    "mbpp_plus": code_data.load_problems("mbpp_plus", str(MBPP_PLUS)),
  }


@pytest.fixture(scope="module")
def shapes(problems):
  return {**SHAPES, **_prompt_shapes(problems["humaneval_plus"][HE_TASK]["prompt"])}


@pytest.fixture(scope="module")
def graded(problems, shapes, tmp_path_factory):
  """Our grader's results for every shape, by name."""
  from evals.code_grader import grade_code

  cache = str(tmp_path_factory.mktemp("code_gt"))
  out = {}
  for benchmark, task in (("humaneval_plus", HE_TASK), ("mbpp_plus", MBPP_TASK)):
    names = [n for n, s in shapes.items() if s[0] == task]
    gens = [{"task_id": task, "completion": shapes[n][1]} for n in names]
    subset = {task: problems[benchmark][task]}
    out.update(zip(names, grade_code(benchmark, subset, gens, cache_dir=cache, progress=False)))
  return out


@pytest.mark.parametrize("name", SHAPE_NAMES)
def test_shapes_extracted_and_graded_as_evalplus(name, shapes, graded, problems, evalplus_sanitize):
  task, answer, expected_code, verdicts = shapes[name]
  result = graded[name]
  assert result["extracted_code"] == expected_code
  assert (result["base_status"], result["plus_status"]) == verdicts, result["reason"]
  # EvalPlus's codegen hands sanitize a chat answer alone, a completion after the prompt.
  benchmark = "humaneval_plus" if task == HE_TASK else "mbpp_plus"
  text = answer.rsplit("</think>", 1)[-1]
  if name.startswith("body only"):
    text = problems[benchmark][task]["prompt"].strip() + "\n" + text
  assert evalplus_sanitize.sanitize(text, problems[benchmark][task]["entry_point"]) == expected_code


def test_thinking_kept_evalplus_would_grade_the_draft(shapes, evalplus_sanitize):
  """Why the thinking is dropped: on the whole answer, EvalPlus's longest run is the draft."""
  _, answer, _, _ = shapes["thinking with a longer wrong draft"]
  assert evalplus_sanitize.sanitize(answer, "mean_absolute_deviation") == WRONG_CODE


# EvalPlus's own evaluate, in a fresh interpreter (it forks a process per test set).
_EVALPLUS_EVALUATE = """
import json, sys
from evalplus import evaluate
from evalplus.eval._special_oracle import MBPP_OUTPUT_NOT_NONE_TASKS
from evals import code_data
args = json.load(sys.stdin)
evaluate.CACHE_DIR = args["cache"]  # its ground truth, computed here, cached in a temporary dir
verdicts = []
for benchmark, dataset, path, not_none in (
    ("humaneval_plus", "humaneval", args["he"], []),
    ("mbpp_plus", "mbpp", args["mbpp"], MBPP_OUTPUT_NOT_NONE_TASKS)):
    jobs = [(t, c) for b, t, c in args["jobs"] if b == benchmark]
    problems = code_data.load_problems(benchmark, path)
    subset = {t: problems[t] for t, _ in jobs}
    truth = evaluate.get_groundtruth(subset, "lora_jax_test_" + dataset, not_none)
    for t, code in jobs:
        r = evaluate.check_correctness(dataset, 0, subset[t], code, truth[t], False, True, None)
        verdicts.append([r["base"][0], r["plus"][0]])
print(json.dumps(verdicts))
"""


def test_pinned_verdicts_are_evalplus_verdicts(shapes, evalplus_sanitize, tmp_path):
  """EvalPlus 0.3.1's `check_correctness` (its defaults: fast check, 1 s / 4x time limits) gives
  the pinned verdicts to the programs its sanitize finds."""
  jobs = {}
  for task, _, code, verdicts in shapes.values():
    benchmark = "humaneval_plus" if task == HE_TASK else "mbpp_plus"
    jobs[(benchmark, task, code)] = list(verdicts)
  ordered = [k for b in ("humaneval_plus", "mbpp_plus") for k in jobs if k[0] == b]
  args = {"cache": str(tmp_path), "he": str(HE_PLUS), "mbpp": str(MBPP_PLUS), "jobs": ordered}
  repo = pathlib.Path(__file__).resolve().parents[1]
  proc = subprocess.run(
    [sys.executable, "-c", _EVALPLUS_EVALUATE],
    input=json.dumps(args),
    capture_output=True,
    text=True,
    cwd=repo,
    timeout=600,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  got = json.loads(proc.stdout.strip().splitlines()[-1])
  assert dict(zip(ordered, got)) == {k: jobs[k] for k in ordered}
