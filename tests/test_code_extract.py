"""Program extraction from model answers (evals/code_extract.py), on fixed strings."""

import ast

import pytest

from evals.code_extract import extract_code

PROMPT = 'def add(a, b):\n    """Add two numbers."""\n'


def _defs(code: str) -> list[str]:
  return [n.name for n in ast.parse(code).body if isinstance(n, ast.FunctionDef)]


def test_thinking_then_fenced_block():
  answer = (
    "<think>Maybe:\n```python\ndef add(a, b):\n    return a - b\n```\nNo, wrong."
    "</think>\nHere it is:\n```python\ndef add(a, b):\n    return a + b\n```\n"
  )
  assert extract_code(answer, "add") == "def add(a, b):\n    return a + b"


def test_longest_block_defining_the_entry_point_wins():
  answer = (
    "```python\ndef add(a, b):\n    return a + b\n```\n"
    "Usage:\n```python\nprint(add(1, 2))\nprint(add(3, 4))\nprint(add(5, 6))\n```\n"
    "```python\ndef add(a, b):\n    # the same, explained\n    total = a + b\n"
    "    return total\n```\n"
  )
  assert "total = a + b" in extract_code(answer, "add")


def test_python_blocks_preferred_over_other_fences():
  answer = (
    "```text\ndef add(a, b):\n    return 0  # a long, long, long, long comment\n```\n"
    "```py\ndef add(a, b):\n    return a + b\n```\n"
  )
  assert extract_code(answer, "add") == "def add(a, b):\n    return a + b"


def test_untagged_fence_used_when_no_python_fence():
  assert (
    extract_code("```\ndef add(a, b):\n    return a + b\n```", "add")
    == "def add(a, b):\n    return a + b"
  )


def test_unclosed_fence_of_a_truncated_answer():
  assert (
    extract_code("```python\ndef add(a, b):\n    return a + b\n", "add")
    == "def add(a, b):\n    return a + b"
  )


def test_no_fences_code_runs_inside_prose():
  answer = "Sure. The idea is simple.\ndef add(a, b):\n    return a + b\nThis returns the sum."
  assert extract_code(answer, "add") == "def add(a, b):\n    return a + b"


def test_body_continuation_gets_the_prompt():
  code = extract_code("    return a + b\n", "add", PROMPT)
  assert code.startswith("def add(a, b):") and code.endswith("return a + b")
  ns = {}
  exec(code, ns)
  assert ns["add"](2, 3) == 5


def test_helpers_and_imports_kept_junk_dropped():
  answer = """```python
import math
from typing import List
SCALE = 2
UNUSED = 5

def helper(x):
    return math.floor(x) * SCALE

class Box:
    def __init__(self, v):
        self.v = v

def unused_helper():
    return 1

@staticmethod
def decorated_unused():
    return 2

def solve(xs: List[float]) -> int:
    return sum(helper(x) for x in xs) + Box(0).v

print(solve([1.5]))
assert solve([1.0]) == 2
if __name__ == "__main__":
    solve([])
```"""
  code = extract_code(answer, "solve")
  assert _defs(code) == ["helper", "solve"]
  assert "import math" in code and "from typing import List" in code
  assert "SCALE = 2" in code and "class Box" in code
  for junk in ("UNUSED", "unused_helper", "decorated_unused", "print(", "assert ", "__main__"):
    assert junk not in code
  ns = {}
  exec(code, ns)
  assert ns["solve"]([1.5]) == 2


def test_decorated_entry_point_and_transitive_helpers_kept():
  answer = """```python
from functools import lru_cache
BASE = 1
def base():
    return BASE
@lru_cache(maxsize=None)
def fib(n):
    return base() if n < 2 else fib(n - 1) + fib(n - 2)
```"""
  code = extract_code(answer, "fib")
  assert "@lru_cache" in code and "def base" in code and "BASE = 1" in code
  ns = {}
  exec(code, ns)
  assert ns["fib"](10) == 89


def test_redefinitions_kept_in_order():
  code = extract_code("```python\ndef f():\n    return 1\ndef f():\n    return 2\n```", "f")
  ns = {}
  exec(code, ns)
  assert ns["f"]() == 2


def test_without_entry_point_every_definition_is_kept():
  code = extract_code("```python\nimport os\nX = 1\ndef a():\n    return X\nprint(a())\n```")
  assert code == "import os\nX = 1\ndef a():\n    return X"


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
    None,
    12,
  ],
)
def test_garbage_gives_empty_string(garbage):
  assert extract_code(garbage, "f") == ""


def test_entry_point_missing_returns_what_parses():
  assert extract_code("```python\ndef g():\n    return 1\n```", "f") == "def g():\n    return 1"


def test_line_breaks_inside_strings_and_crlf():
  answer = "```python\r\ndef f():\r\n    return 'a\x0cb\u2028c'\r\nprint(f())\r\n```"
  code = extract_code(answer, "f")
  ns = {}
  exec(code, ns)
  assert ns["f"]() == "a\x0cb\u2028c" and "print" not in code
