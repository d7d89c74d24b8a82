"""Answers to HumanEval+ / MBPP+ problems in the shapes models write them, for measuring code
extraction (`benchmarks/code_extract_agreement.py`).

Programs (variants) made from each problem's canonical solution:
- `correct`: the canonical solution, its docstring dropped (as models write it);
- `mutated`: one operator or constant changed (`<` to `<=`, `+` to `-`, `n` to `n + 1`, ...);
- `slow`: never returns (a busy loop first in the function: the per-input time limit);
- `slow_load`: never finishes loading (a module-level assignment the function needs calls a
  busy loop: the test set's time budget);
- `syntax`: a misspelt `return`; `wrong_name`: the function renamed `solve`.

Shapes wrap a program in prose, fences, usage examples, test calls, thinking, ... (`SHAPES`).
Every answer is {"task_id", "shape", "variant", "completion", "mode"}: `mode` is how EvalPlus's
codegen would read it, "chat" (the answer alone) or "completion" (after the prompt).
"""

from __future__ import annotations

import ast
import re
import zlib

CORRECT, MUTATED = "correct", "mutated"
VARIANTS = (CORRECT, MUTATED, "slow", "slow_load", "syntax", "wrong_name")
# Shapes that also get the slow / syntax / wrong-name programs (every shape gets the first two).
_BROKEN_SHAPES = ("fenced", "fenced + usage", "no fence", "think, prose only", "body only")

_THOUGHTS = (
  "Okay, let me figure out what the function has to do.",
  "The input is described in the docstring; I should handle the edge cases too.",
  "Wait, what if the input is empty? Then the loop does not run, which is fine.",
  "Let me work it out.",
)


def make_answers(benchmark: str, problems: dict[str, dict], slow_loads: int = 1) -> list[dict]:
  """Every shape of every variant of every problem (shapes that fit the problem). `slow_load`
  programs (each costs a whole time budget, ~1 min per test set) only for the first
  `slow_loads` problems, fenced."""
  answers = []
  for k, (task_id, p) in enumerate(problems.items()):
    programs = _programs(p)
    for variant, program in programs.items():
      for shape, build in SHAPES.items():
        if variant == "slow_load" and (k >= slow_loads or shape != "fenced"):
          continue
        if variant not in (CORRECT, MUTATED) and shape not in _BROKEN_SHAPES:
          continue
        text = build(_Context(benchmark, p, variant, program, programs))
        if text is not None:
          mode = "completion" if shape == "body only" else "chat"
          answers.append(
            {
              "task_id": task_id,
              "shape": shape,
              "variant": variant,
              "completion": text,
              "mode": mode,
            }
          )
  return answers


# --- programs -----------------------------------------------------------------------------------


def _programs(p: dict) -> dict[str, str]:
  ep = p["entry_point"]
  correct = _without_docstring(_canonical_program(p), ep)
  out = {CORRECT: correct}
  mutated = _mutate(correct, ep, zlib.crc32(p["task_id"].encode()))
  if mutated:
    out[MUTATED] = mutated
  out["slow"] = _prepend_to_body(correct, ep, ["while True:", "    pass"])
  spin = "def _spin():\n    while True:\n        pass\n    return 0\n\n\n_READY = _spin()\n\n\n"
  out["slow_load"] = spin + _prepend_to_body(correct, ep, ["_READY"])
  if re.search(r"\breturn\b", _function_source(correct, ep)):
    out["syntax"] = _misspell_return(correct, ep)
  out["wrong_name"] = re.sub(rf"\b{re.escape(ep)}\b", "solve", correct)
  return out


def _canonical_program(p: dict) -> str:
  """HumanEval+ solutions continue the prompt; MBPP+ ones are whole programs."""
  solution = p["canonical_solution"]
  return solution if p["task_id"].startswith("Mbpp/") else p["prompt"] + solution


def _entry_function(tree: ast.Module, ep: str) -> ast.FunctionDef:
  return next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == ep)


def _without_docstring(program: str, ep: str) -> str:
  fn = _entry_function(ast.parse(program), ep)
  first = fn.body[0]
  if not (
    isinstance(first, ast.Expr)
    and isinstance(first.value, ast.Constant)
    and isinstance(first.value.value, str)
    and len(fn.body) > 1
  ):
    return program.strip() + "\n"
  lines = program.split("\n")
  kept = lines[: first.lineno - 1] + lines[first.end_lineno :]
  return "\n".join(kept).strip() + "\n"


def _function_source(program: str, ep: str) -> str:
  return ast.get_source_segment(program, _entry_function(ast.parse(program), ep)) or ""


def _prepend_to_body(program: str, ep: str, statements: list[str]) -> str:
  fn = _entry_function(ast.parse(program), ep)
  first = fn.body[0]
  lines = program.split("\n")
  indent = lines[first.lineno - 1][: first.col_offset]
  added = [indent + s for s in statements]
  return "\n".join(lines[: first.lineno - 1] + added + lines[first.lineno - 1 :])


def _misspell_return(program: str, ep: str) -> str:
  fn = _entry_function(ast.parse(program), ep)
  ret = next(n for n in ast.walk(fn) if isinstance(n, ast.Return))
  lines = program.split("\n")
  line = lines[ret.lineno - 1]
  lines[ret.lineno - 1] = line[: ret.col_offset] + "retrun" + line[ret.col_offset + 6 :]
  return "\n".join(lines)


_SWAP_COMPARE = {
  ast.Lt: ast.LtE,
  ast.LtE: ast.Lt,
  ast.Gt: ast.GtE,
  ast.GtE: ast.Gt,
  ast.Eq: ast.NotEq,
  ast.NotEq: ast.Eq,
  ast.In: ast.NotIn,
  ast.NotIn: ast.In,
  ast.Is: ast.IsNot,
  ast.IsNot: ast.Is,
}
_SWAP_BINOP = {
  ast.Add: ast.Sub,
  ast.Sub: ast.Add,
  ast.Mult: ast.Add,
  ast.FloorDiv: ast.Mult,
  ast.Div: ast.Mult,
  ast.Mod: ast.FloorDiv,
  ast.Pow: ast.Mult,
}


def _mutate(program: str, ep: str, seed: int) -> str | None:
  """One site of the entry function changed: the first comparison, arithmetic operator or
  integer constant (which kind first rotates with `seed`), as ast.unparse writes it."""
  tree = ast.parse(program)
  fn = _entry_function(tree, ep)
  kinds = ["compare", "binop", "constant"]
  kinds = kinds[seed % 3 :] + kinds[: seed % 3]
  for kind in kinds:
    for node in ast.walk(fn):
      if kind == "compare" and isinstance(node, ast.Compare) and type(node.ops[0]) in _SWAP_COMPARE:
        node.ops[0] = _SWAP_COMPARE[type(node.ops[0])]()
      elif kind == "binop" and isinstance(node, ast.BinOp) and type(node.op) in _SWAP_BINOP:
        node.op = _SWAP_BINOP[type(node.op)]()
      elif kind == "constant" and isinstance(node, ast.Constant) and type(node.value) is int:
        node.value += 1
      else:
        continue
      return ast.unparse(tree) + "\n"
  return None


# --- shapes -------------------------------------------------------------------------------------


class _Context:
  def __init__(self, benchmark, p, variant, program, programs):
    self.benchmark, self.p, self.variant, self.program = benchmark, p, variant, program.strip()
    self.programs = programs
    self.name = "solve" if variant == "wrong_name" else p["entry_point"]
    self.humaneval = p["task_id"].startswith("HumanEval/")

  def calls(self, k: int) -> list[str]:
    """`k` calls on the problem's shortest base inputs (repeated if there are fewer)."""
    args = sorted((", ".join(map(repr, inp)) for inp in self.p["base_input"]), key=len)[:6]
    return [f"{self.name}({args[i % len(args)]})" for i in range(k)]

  def other(self) -> str:
    """The other of correct / mutated: the draft a thinking trace holds."""
    other = MUTATED if self.variant == CORRECT else CORRECT
    return self.programs.get(other, self.programs[CORRECT]).strip()

  def body(self) -> str | None:
    """The variant as a continuation of the prompt (HumanEval+ only)."""
    canonical = self.p["canonical_solution"]
    if self.variant == CORRECT:
      return canonical
    if self.variant == "slow":
      return "    while True:\n        pass\n" + canonical
    if self.variant == "syntax" and re.search(r"\breturn\b", canonical):
      return re.sub(r"\breturn\b", "retrun", canonical, count=1)
    if self.variant == MUTATED:
      fn = _entry_function(ast.parse(self.program), self.p["entry_point"])
      return "".join(f"    {line}\n" for s in fn.body for line in ast.unparse(s).split("\n"))
    return None


def _fence(code: str) -> str:
  return f"```python\n{code.strip()}\n```"


def _nonblank(code: str) -> int:
  return sum(bool(line.strip()) for line in code.split("\n"))


def _fenced(c: _Context) -> str:
  return f"Here is a solution.\n\n{_fence(c.program)}\n\nIt goes through the input once."


def _usage(c: _Context) -> str:
  prints = "\n".join(f"print({call})" for call in c.calls(3))
  return f"{_fence(c.program)}\n\nExample usage:\n{_fence(prints)}\n"


def _long_usage(c: _Context) -> str:
  """More usage lines than the program has: EvalPlus takes the usage block."""
  prints = "\n".join(f"print({call})" for call in c.calls(_nonblank(c.program) + 2))
  return f"Solution:\n{_fence(c.program)}\n\nLet's try it on several inputs:\n{_fence(prints)}\n"


def _several_fences(c: _Context) -> str:
  asserts = "\n".join(f"assert {call} is not None" for call in c.calls(2))
  return (
    "The approach:\n```text\n1. Read the input.\n2. Compute the answer.\n```\n"
    "Run it with:\n```bash\npython3 solution.py\n```\n"
    f"The code:\n{_fence(c.program)}\n"
    f"Quick checks:\n{_fence(asserts)}\n"
  )


def _test_calls(c: _Context) -> str:
  calls = c.calls(3)
  tests = "\n".join(
    ["", "", "# Test cases", f"print({calls[0]})", f"assert {calls[1]} is not None", "", ""]
    + ['if __name__ == "__main__":', f"    print({calls[2]})"]
  )
  return f"```python\n{c.program}{tests}\n```\n"


def _restated_prompt(c: _Context) -> str | None:
  """The prompt (signature and docstring) repeated, then the body: HumanEval+ only."""
  body = c.body() if c.humaneval else None
  return None if body is None else _fence(c.p["prompt"] + body) + "\n"


def _repeated_signature(c: _Context) -> str:
  fn = _entry_function(ast.parse(c.program), c.p["entry_point"])
  header = "\n".join(c.program.split("\n")[fn.lineno - 1 : fn.body[0].lineno - 1])
  return (
    f"We need to fill in\n{_fence(header + chr(10) + '    ...')}\n\n"
    f"Here is the full implementation:\n{_fence(c.program)}\n"
  )


def _stub_then_code(c: _Context) -> str | None:
  """The prompt's stub in one fence, the solution in another: HumanEval+ only. The stub is
  often the longer of the two."""
  if not c.humaneval:
    return None
  return f"You gave me:\n{_fence(c.p['prompt'])}\n\nMy implementation:\n{_fence(c.program)}\n"


def _think(c: _Context, draft: str) -> str:
  thoughts = "\n".join(_THOUGHTS)
  return (
    f"<think>\n{thoughts}\n\n{draft}\n\nHmm, let me check that against the examples. "
    f"I think the final version is right.\n</think>\n\n{_fenced(c)}"
  )


def _think_prose(c: _Context) -> str:
  """Thinking without code (an expression in backticks at most): EvalPlus, given the thinking
  too, would find the same program."""
  return _think(c, f"So the answer comes from `{c.calls(1)[0]}`-style calls; now the code.")


def _think_draft(c: _Context) -> str:
  """A draft (the other program, with debug prints) longer than the answer: EvalPlus, given the
  thinking too, would grade the draft."""
  prints = "\n".join(f"print({call})" for call in c.calls(_nonblank(c.program) + 2))
  return _think(c, f"{c.other()}\n\n{prints}")


def _no_fence(c: _Context) -> str:
  return (
    f"Sure! The function below solves it.\n\n{c.program}\n\n"
    "This works because every element is visited once."
  )


def _body_only(c: _Context) -> str | None:
  return c.body() if c.humaneval else None


def _prefill(c: _Context) -> str:
  """What follows EvalPlus's assistant pre-fill, which ends inside a ```python fence."""
  return f"{c.program}\n```\n\nThe function above handles every case in the docstring."


def _missing_import(c: _Context) -> str | None:
  """The solution without the prompt's imports (`from typing import List`): HumanEval+ only."""
  if not c.humaneval or not re.search(r"^(from|import) ", c.program, re.M):
    return None
  kept = [line for line in c.program.split("\n") if not re.match(r"(from|import) ", line)]
  return f"{_fence(chr(10).join(kept))}\n"


SHAPES = {
  "fenced": _fenced,
  "fenced + usage": _usage,
  "fenced + long usage": _long_usage,
  "several fences": _several_fences,
  "test calls after": _test_calls,
  "restated prompt": _restated_prompt,
  "repeated signature": _repeated_signature,
  "stub then code": _stub_then_code,
  "think, prose only": _think_prose,
  "think + draft": _think_draft,
  "no fence": _no_fence,
  "body only": _body_only,
  "after pre-fill": _prefill,
  "imports left out": _missing_import,
}
