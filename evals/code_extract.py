"""Extract the program from a model's answer to a code problem, as EvalPlus 0.3.1 does.

EvalPlus's `sanitize` (evalplus/sanitize.py; tree-sitter there, the standard library's `ast`
and `tokenize` here), reproduced rule for rule, quirks included, so that a verdict means what
EvalPlus's means:
1. The run: the longest range of at least two consecutive lines that parses as Python, length
   counted in non-blank lines; of equally long ones, the first. No fence or prose rule: fence
   and prose lines end a run because they do not parse. Nothing parses: the first line.
2. From the run, every top-level import (not `from __future__`), then the definitions the entry
   point's identifiers reach, transitively, in source order: undecorated functions that contain
   a `return`, undecorated classes, assignments whose first target is a name; the first
   definition of a name wins. Everything else is dropped: decorated definitions, tuple or
   attribute assignments, calls, prints, asserts, `if __name__ == "__main__":` blocks.
3. Nothing left: the run itself, unsanitised.

Two steps EvalPlus leaves to its caller, done here:
- A reasoning model's thinking is dropped: only the text after the last `</think>` is read
  (EvalPlus would search the thinking too, and pick a draft there if it is the longest run).
- An answer that only continues the prompt's function body (its first line is indented) and does
  not define the entry point by itself is read after the prompt, as EvalPlus's codegen reads a
  completion model's output: `prompt.strip() + "\\n" + answer`. Any other answer is read alone,
  as EvalPlus reads a chat model's.

EvalPlus searches every range of lines (a parse per pair of lines: cubic in the answer's
length, ~3 s at 330 lines, hours for a long reasoning trace); here the parser's error line
prunes the search to a few parses per line, with the same result.
"""

from __future__ import annotations

import ast
import functools
import io
import re
import threading
import tokenize
import warnings

THINK_END = "</think>"
# How ast numbers lines (universal newlines), to turn its (line, column) into byte offsets.
_LINE_BREAK = re.compile(rb"\r\n|\r|\n")
# One extraction at a time: CPython 3.11's ast constructors keep a recursion counter that threads
# share ("SystemError: AST constructor recursion depth mismatch" when two threads parse), and
# warnings.catch_warnings is process-wide. Extraction is pure Python under the GIL: no loss.
_ONE_AT_A_TIME = threading.Lock()


def extract_code(answer: str, entry_point: str | None = None, prompt: str | None = None) -> str:
  """The program EvalPlus's `sanitize` finds in `answer` for `entry_point`: in the text after the
  last `</think>`, read after `prompt` if it only continues the prompt's function body. Never
  raises; "" for a non-string answer."""
  if not isinstance(answer, str):
    return ""
  with _ONE_AT_A_TIME:
    return _extract(answer, entry_point, prompt)


def _extract(answer: str, entry_point: str | None, prompt: str | None) -> str:
  try:
    text = answer.rsplit(THINK_END, 1)[-1]
    code = sanitize(text, entry_point)
    if prompt and entry_point and _continues_a_body(text) and not defines(code, entry_point):
      return sanitize(prompt.strip() + "\n" + text, entry_point)
    return code
  except (RecursionError, MemoryError):
    return ""


def sanitize(text: str, entry_point: str | None = None) -> str:
  """EvalPlus 0.3.1's `sanitize(text, entry_point)`: the longest run of lines that parses,
  reduced to the imports and the definitions `entry_point` needs (all of them without one)."""
  run = longest_parsing_run(text)
  return _keep_definitions(run, entry_point).strip() or run


def _continues_a_body(text: str) -> bool:
  first = next((line for line in text.split("\n") if line.strip()), "")
  return first[:1] in (" ", "\t")


def defines(code: str, name: str) -> bool:
  """Whether `code` parses and binds `name` at its top level (what running it and looking the
  name up needs)."""
  tree = _parse(code)
  return tree is not None and any(name in _bound(node) for node in tree.body)


# --- 1. the longest run of lines that parses ----------------------------------------------------


def longest_parsing_run(text: str) -> str:
  """EvalPlus's `code_extract`: the first of the longest ranges (in non-blank lines, at least
  two lines) of `text`'s lines that parse."""
  return _RunSearch(text).run()


class _RunSearch:
  """EvalPlus parses every range of lines; here, when lines[i..j] fail at line k, the ranges
  from i that end at or past line k are skipped when they cannot parse either:
  - the parser stopped on what lines up to k hold, and code follows line k: longer ranges stop
    there too, and so do shorter ones that reach line k;
  - a bracket or a string opened at line k is still open at line j: shorter ranges leave it
    open too, and so do longer ones when no later line could close it.
  ast also breaks lines at a lone CR: such text is searched range by range, as EvalPlus does."""

  def __init__(self, text: str):
    self.lines = text.split("\n")
    self.filled = [0]  # filled[k]: non-blank lines among lines[:k]
    for line in self.lines:
      self.filled.append(self.filled[-1] + bool(line.strip()))
    self.pruned = "\r" not in text.replace("\r\n", "")
    # The last line that could close an open bracket / triple-quoted string.
    self.last_closer = {
      kind: max(
        (k for k, line in enumerate(self.lines) if any(c in line for c in closers)), default=-1
      )
      for kind, closers in (("bracket", ")]}"), ("string", ('"""', "'''")))
    }

  def run(self) -> str:
    n, filled = len(self.lines), self.filled
    best, pair = 0, (0, 0)
    for i in range(n):
      if filled[n] - filled[i] <= best:
        break  # no range starting here or later can be longer
      j = self._last_end_that_may_parse(i) if self.pruned else n - 1
      while j > i and filled[j + 1] - filled[i] > best:
        error = self._error(i, j)
        if error is None:  # the longest range from line i
          best, pair = filled[j + 1] - filled[i], (i, self._shortest_as_long(i, j))
          break
        j = min(j - 1, i + error[0] - 2) if self.pruned else j - 1
    return "\n".join(self.lines[pair[0] : pair[1] + 1])

  def _last_end_that_may_parse(self, i: int) -> int:
    """An end past which no range from line i parses, found with windows of 2, 4, 8, ...
    lines: a prose line costs one small parse, a block of code about two of its length."""
    width, last = 2, len(self.lines) - 1
    while True:
      end = min(i + width - 1, last)
      error = self._error(i, end)
      if error is not None:
        line, settled, closer = error
        if settled or (closer and end >= self.last_closer[closer]):
          return i + line - 2
      if end == last:
        return end
      width *= 2

  def _shortest_as_long(self, i: int, j: int) -> int:
    """The end EvalPlus keeps (it walks ends upwards, keeping only longer ranges): the first
    that parses of the ends that give lines[i..j]'s length (without trailing blank lines)."""
    ends = [k for k in range(i + 1, j) if self.filled[k + 1] == self.filled[j + 1]]
    return next((k for k in ends if self._error(i, k) is None), j)

  def _error(self, i: int, j: int) -> tuple[int, bool, str | None] | None:
    """None if lines[i..j] parse, else (line, settled, closer): the error's line (1 = line i;
    past the end if the range only ended too early); whether it stands whatever follows line
    j (nothing open at the end, code after the error's line); what is open at line j from that
    line on, a "bracket" or a "string", if anything."""
    lines = self.lines
    try:
      _parse_strict("\n".join(lines[i : j + 1]))
      return None
    except SyntaxError as e:
      if "null bytes" in e.msg:  # no range with a null byte parses
        return next(k for k in range(i, j + 1) if "\0" in lines[k]) - i + 1, True, None
      if not e.lineno or e.msg.startswith("unexpected EOF"):
        return j - i + 2, False, None
      if "was never closed" in e.msg:  # ast names the innermost open bracket: all are open
        return _outermost_open_bracket(lines, i, j) or e.lineno, False, "bracket"
      if "unterminated triple-quoted" in e.msg:
        return e.lineno, False, "string"
      code_after = any(
        line.strip() and not line.lstrip().startswith("#") for line in lines[i + e.lineno : j + 1]
      )
      return e.lineno, code_after, None
    except (ValueError, MemoryError, RecursionError):  # too deep to parse, in any range
      return j - i + 2, False, None


def _outermost_open_bracket(lines: list[str], i: int, j: int) -> int | None:
  """The line (1 = line i) of the outermost bracket still open at the end of lines[i..j]."""
  opened = []
  try:
    for tok in tokenize.generate_tokens(io.StringIO("\n".join(lines[i : j + 1])).readline):
      if tok.type == tokenize.OP and tok.string in ("(", "[", "{"):
        opened.append(tok.start[0])
      elif tok.type == tokenize.OP and tok.string in (")", "]", "}") and opened:
        opened.pop()
  except (tokenize.TokenError, SyntaxError):
    pass  # the end of the range, inside the brackets
  return opened[0] if opened else None


# --- 2. the imports and the definitions the entry point needs -----------------------------------


def _keep_definitions(code: str, entry_point: str | None) -> str:
  """EvalPlus's `extract_target_code_or_empty` on a run (what tree-sitter finds there, found
  with ast): imports first, then the reachable definitions, each as its exact source text."""
  tree = _parse(code)
  if tree is None:
    return ""
  raw = code.encode()
  starts = [0] + [m.end() for m in _LINE_BREAK.finditer(raw)]

  def source(node) -> bytes:  # ast columns are UTF-8 byte offsets, as tree-sitter's
    begin = starts[node.lineno - 1] + node.col_offset
    return raw[begin : _end(raw, starts, node)]

  imports, definitions, seen = [], [], set()
  for node in tree.body:
    if isinstance(node, ast.Import) or (
      isinstance(node, ast.ImportFrom) and node.module != "__future__"
    ):
      imports.append(node)
      continue
    name = _definition_name(node)
    if name is _NOT_KEPT or name in seen:
      continue
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not any(
      isinstance(n, ast.Return) for n in ast.walk(node)
    ):
      continue  # EvalPlus keeps only functions that return (and leaves their name free)
    seen.add(name)
    definitions.append((name, node))
  if entry_point:
    needs = {name: _identifiers(node, source(node)) for name, node in definitions}
    reached, todo = {entry_point}, [entry_point]
    while todo:
      for name in needs.get(todo.pop(), ()):
        if name not in reached:
          reached.add(name)
          todo.append(name)
    definitions = [(name, node) for name, node in definitions if name in reached]
  kept = [source(node) for node in imports] + [source(node) for _, node in definitions]
  return b"\n".join(kept).decode(errors="replace")


def _end(raw: bytes, starts: list[int], node: ast.stmt) -> int:
  """Where tree-sitter ends a node: as ast, except that a function or class also takes the
  comments after its last statement, on that line or on the following lines down to the first
  comment indented less than its body."""
  end = starts[node.end_lineno - 1] + node.end_col_offset
  if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
    return end
  first = node.body[0]
  body_indent = _indent(raw[starts[first.lineno - 1] : starts[first.lineno - 1] + first.col_offset])
  line_end = _line_end(raw, starts, node.end_lineno - 1)
  if raw[end:line_end].lstrip(b" \t\f").startswith(b"#"):
    end = line_end
  for k in range(node.end_lineno, len(starts)):
    line = raw[starts[k] : _line_end(raw, starts, k)]
    text = line.lstrip(b" \t\f")
    if not text or text == b"\\":  # blank, or a bare line continuation
      continue
    if not text.startswith(b"#") or _indent(line[: len(line) - len(text)]) < body_indent:
      break
    end = starts[k] + len(line)
  return end


def _indent(prefix: bytes) -> int:
  """An indentation's width as tree-sitter's scanner counts it: a tab is 8, a form feed resets."""
  width = 0
  for c in prefix:
    width = 0 if c == 0x0C else width + (8 if c == 0x09 else 1)
  return width


def _line_end(raw: bytes, starts: list[int], k: int) -> int:
  """The offset of line k's end, before its line break."""
  end = starts[k + 1] if k + 1 < len(starts) else len(raw)
  return len(raw[starts[k] : end].rstrip(b"\r\n")) + starts[k]


_NOT_KEPT = object()


def _definition_name(node: ast.stmt):
  """The name EvalPlus files a top-level statement under as a definition: None for an assignment
  to something other than a name (kept only without an entry point), `_NOT_KEPT` for the
  statements it never keeps."""
  if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
    return _NOT_KEPT if node.decorator_list else node.name  # tree-sitter: decorated_definition
  if isinstance(node, ast.Assign):
    target = node.targets[0]
  elif isinstance(node, ast.AnnAssign):
    target = node.target
  else:
    return _NOT_KEPT
  return target.id if isinstance(target, ast.Name) else None


def _identifiers(node: ast.stmt, source: bytes) -> set[str]:
  """Every identifier in a definition, as tree-sitter's identifier nodes: its name tokens
  (keywords too: harmless, nothing is defined under a keyword), and what ast names inside it,
  which adds the names inside f-strings (kept whole by the tokenizer before Python 3.12)."""
  names = {
    value
    for n in ast.walk(node)
    for value in (getattr(n, f, None) for f in ("id", "attr", "arg", "name"))
    if isinstance(value, str)
  }
  try:
    for tok in tokenize.tokenize(io.BytesIO(source).readline):
      if tok.type == tokenize.NAME:
        names.add(tok.string)
  except (tokenize.TokenError, SyntaxError):
    pass  # cannot happen on a parsed statement; ast's names stand
  return names


def _bound(node: ast.stmt) -> set[str]:
  """Names a top-level statement binds."""
  if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
    return {node.name}
  if isinstance(node, (ast.Import, ast.ImportFrom)):
    return {(a.asname or a.name).split(".")[0] for a in node.names}
  targets = {
    ast.Assign: lambda n: n.targets,
    ast.AnnAssign: lambda n: [n.target] if n.value is not None else [],
    ast.AugAssign: lambda n: [n.target],
  }.get(type(node), lambda n: [])(node)
  return {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}


# --- parsing --------------------------------------------------------------------------------------


def _parse_strict(code: str) -> ast.Module:
  with warnings.catch_warnings():  # e.g. invalid escape sequences: the program's business
    warnings.simplefilter("ignore")
    return ast.parse(code)


@functools.lru_cache(maxsize=32)  # the chosen run is parsed again to sanitise it
def _parse(code: str) -> ast.Module | None:
  try:
    return _parse_strict(code)
  except (SyntaxError, ValueError, MemoryError, RecursionError):
    return None
