"""Extract the program from a model's answer to a code problem.

Order of choice: the text after the last `</think>`; its fenced blocks tagged python (else all
fenced blocks; else the whole text if it parses; else runs of code-looking lines); of those that
parse, the longest one defining the entry point (else the longest); an answer that only continues
the prompt's function body gets the prompt prepended. Then, like EvalPlus's `sanitize`
(tree-sitter there, `ast` here), only the entry point and what it needs are kept: every
top-level import, and the functions, classes and assignments its names reach, transitively.
Top-level calls, prints, asserts and `if __name__ == "__main__":` blocks are dropped.

Deliberate differences from EvalPlus 0.3.1's sanitize: decorated functions are kept (its
tree-sitter walk drops them), functions without `return` are kept, and a redefined name keeps
every definition in source order (it keeps the first), so the code means what Python would run.
"""

from __future__ import annotations

import ast
import functools
import re
import warnings

_FENCE = re.compile(r"^[ \t]*```[ \t]*([\w+.-]*)[^\n]*\n(.*?)(?:^[ \t]*```|\Z)", re.M | re.S)
_PY_TAGS = {"python", "py", "python3", "py3"}
# Lines that may start a top-level code run in an unfenced answer.
_CODE_START = re.compile(r"^(def |async def |class |import |from \S+ import |@)")


def extract_code(answer: str, entry_point: str | None = None, prompt: str | None = None) -> str:
  """The program in `answer` (sanitised around `entry_point`), or "" if there is none.
  Never raises."""
  try:
    return _extract(answer, entry_point, prompt)
  except (RecursionError, MemoryError, ValueError, SyntaxError):
    return ""


def _extract(answer, entry_point, prompt) -> str:
  if not isinstance(answer, str):
    return ""
  # One newline convention, so that ast's line numbers index split("\n") (splitlines() also
  # breaks at form feeds and other separators that may sit inside string literals).
  text = answer.rsplit("</think>", 1)[-1].replace("\r\n", "\n").replace("\r", "\n")
  if prompt:
    prompt = prompt.replace("\r\n", "\n").replace("\r", "\n")
  best = _choose(_candidates(text, prompt), entry_point, prompt)
  return "" if best is None else _sanitize(*best, entry_point)


def _candidates(text: str, prompt: str | None) -> list[str]:
  blocks = [(tag.lower(), body) for tag, body in _FENCE.findall(text)]
  tagged = [body for tag, body in blocks if tag in _PY_TAGS]
  if tagged:
    return tagged
  if blocks:
    return [body for _, body in blocks]
  if _parse(text) is not None or (prompt and _parse(prompt + text) is not None):
    return [text]
  return _code_runs(text)


def _code_runs(text: str) -> list[str]:
  """Maximal runs of lines that start at a def/class/import line and continue with indented,
  blank or further top-level code lines; trailing lines are trimmed until the run parses."""
  lines = text.split("\n")
  runs, i = [], 0
  while i < len(lines):
    if not _CODE_START.match(lines[i]):
      i += 1
      continue
    j = i + 1
    while j < len(lines) and (
      not lines[j].strip() or lines[j][0] in " \t#" or _CODE_START.match(lines[j])
    ):
      j += 1
    for end in range(j, max(i, j - 50), -1):  # bounded: answers can be long
      chunk = "\n".join(lines[i:end])
      if _parse(chunk) is not None:
        runs.append(chunk)
        break
    i = j
  return runs


def _choose(candidates: list[str], entry_point, prompt):
  """(code, tree) of the longest candidate that parses and defines the entry point (as is, or
  as a continuation of the prompt), else of the longest that parses."""
  valid, defining = [], []
  for code in candidates:
    tree = _parse(code)
    if tree is not None and entry_point and entry_point in _top_level_names(tree):
      defining.append((code, tree))
      continue
    if prompt:  # a continuation of the prompt's function?
      cont = _parse(prompt + code)
      if cont is not None and entry_point and entry_point in _top_level_names(cont):
        defining.append((prompt + code, cont))
        continue
    if tree is not None:
      valid.append((code, tree))
  pool = defining or valid
  return max(pool, key=lambda ct: len(ct[0].strip())) if pool else None


@functools.lru_cache(maxsize=16)  # the same text is often parsed twice (candidates, choice)
def _parse(code: str):
  if not code.strip():
    return None
  try:
    with warnings.catch_warnings():  # e.g. invalid escape sequences: the program's business
      warnings.simplefilter("ignore")
      return ast.parse(code)
  except (SyntaxError, ValueError, RecursionError, MemoryError):
    return None


def _top_level_names(tree: ast.Module) -> set[str]:
  return {name for node in tree.body for name in _defined(node)}


def _defined(node: ast.stmt) -> list[str]:
  if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
    return [node.name]
  if isinstance(node, ast.Assign):
    return [n.id for t in node.targets for n in ast.walk(t) if isinstance(n, ast.Name)]
  if isinstance(node, (ast.AnnAssign, ast.AugAssign)) and isinstance(node.target, ast.Name):
    return [node.target.id]
  return []


def _used(node: ast.stmt) -> set[str]:
  return {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}


def _sanitize(code: str, tree: ast.Module, entry_point: str | None) -> str:
  defs = [(node, _defined(node)) for node in tree.body]
  if entry_point and any(entry_point in names for _, names in defs):
    needed, todo = set(), [entry_point]
    while todo:  # closure over the names the kept definitions use
      name = todo.pop()
      if name in needed:
        continue
      needed.add(name)
      for node, names in defs:
        if name in names:
          todo.extend(_used(node) - needed)
  else:  # no entry point to anchor on: keep every definition
    needed = {name for _, names in defs for name in names}
  lines = code.split("\n")
  kept = []
  for node, names in defs:
    if isinstance(node, (ast.Import, ast.ImportFrom)) or needed & set(names):
      start = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
      kept.append("\n".join(lines[start - 1 : node.end_lineno]))
  return "\n".join(kept).strip()
