"""Math answer grading: last \\boxed{} extraction, MATH normalisation, math-verify, LLM re-check.

The reference (the paper's lm-evaluation-harness fork, `math_metric_llm_eval_general.py`) takes
the last `\\boxed{...}` of the response, compares it with the gold by Hendrycks' MATH `is_equiv`
and re-judges the mismatches with an LLM (Qwen2.5-32B-Instruct). Two rule sets:

- "reference" (`grade_math_reference`): exactly those rules, quirks included (`reference_boxed`,
  `reference_is_equiv`), so that the rule-based figure and the set of re-judged answers are the
  reference's;
- "extended" (`grade_math`): our extraction, then three more rule-based checks before any LLM
  (integer equality for AIME, Minerva's `normalize_final_answer`, math-verify's symbolic
  equivalence). Each grade records which rule matched. With the lighteval template, answers are
  extracted as lighteval does (math-verify's LaTeX, then plain expression extraction), so an
  unboxed "The final answer is 12." counts too.
"""

from __future__ import annotations

import re
import threading

# --- extraction -----------------------------------------------------------------------------------

_BOX = re.compile(r"\\(?:boxed|fbox)")


def _braced(text: str, open_at: int) -> str | None:
  """The text inside the brace group opening at `open_at`; None if it never closes."""
  depth = 0
  for i in range(open_at, len(text)):
    if text[i] == "{":
      depth += 1
    elif text[i] == "}":
      depth -= 1
      if depth == 0:
        return text[open_at + 1 : i]
  return None


def extract_boxed(text: str) -> str | None:
  """Content of the last `\\boxed{..}` / `\\fbox{..}` / `\\boxed 5` in `text`.

  Like the reference, only the last box counts: if it never closes (a truncated answer) the
  result is None rather than an earlier box.
  """
  if not text:
    return None
  matches = list(_BOX.finditer(text))
  if not matches:
    return None
  end = matches[-1].end()
  rest = text[end:]
  if rest.startswith("{"):
    return _braced(text, end)
  if rest.startswith(" "):
    # "\boxed 5$" form: the reference takes everything up to the next "$".
    return re.split(r"[$\n]", rest.lstrip(), maxsplit=1)[0].strip() or None
  return None


def reference_boxed(text: str) -> str | None:
  """The answer exactly as the reference extracts it: `remove_boxed(last_boxed_only_string(t))`
  of math_metric_llm_eval_general.py (Hendrycks' MATH helpers), quirks included:

  - REFERENCE QUIRK: any "\\boxed " (with a space) anywhere wins over every "\\boxed{": the
    answer is the text after the last "\\boxed ", up to the next "$" (newlines kept);
  - "\\fbox" counts only when the text has no "\\boxed" at all;
  - the braces are counted from the "\\boxed" on, whatever comes between ("\\boxed\n{5}");
  - a box that never closes is no answer (no fallback to an earlier box).
  An expression the reference's asserts reject (a "\\fbox{" inside another box) stopped the
  reference's script with an AssertionError; here it is no answer.
  """
  if not text:
    return None
  if "\\boxed " in text:
    expr = "\\boxed " + text.split("\\boxed ")[-1].split("$")[0]
  else:
    start = text.rfind("\\boxed")
    if start < 0:
      start = text.rfind("\\fbox")
    if start < 0:
      return None
    expr = _through_closing_brace(text, start)
    if expr is None:
      return None
  return _unbox(expr)


def _through_closing_brace(text: str, start: int) -> str | None:
  depth = 0
  for i in range(start, len(text)):
    if text[i] == "{":
      depth += 1
    elif text[i] == "}":
      depth -= 1
      if depth == 0:
        return text[start : i + 1]
  return None


def _unbox(expr: str) -> str | None:
  if "\\fbox{" in expr:
    if not (expr.startswith("\\fbox{") and expr.endswith("}")):
      return None  # the reference's assert
    return expr[len("\\fbox{") : -1]
  if "\\boxed " in expr:
    return expr[len("\\boxed ") :]
  return expr[len("\\boxed{") : -1]  # the reference cuts 7 characters, whatever they are


# --- Hendrycks MATH normalisation (the reference's is_equiv) --------------------------------------


class _StripError(ValueError):
  """Where the reference's `strip_string` raises (its `is_equiv` then compares raw strings)."""


def _fix_fracs(s: str, strict: bool) -> str:
  # "\frac12" -> "\frac{1}{2}", "\frac1{72}" -> "\frac{1}{72}".
  head, *parts = s.split("\\frac")
  out = head
  for part in parts:
    out += "\\frac"
    if strict and not part:
      raise _StripError("\\frac with nothing after it")
    if part.startswith("{"):
      out += part
      continue
    if len(part) < 2:
      return s
    a, b, tail = part[0], part[1], part[2:]
    out += "{" + a + "}" + (b + tail if b == "{" else "{" + b + "}" + tail)
  return out


def _fix_a_slash_b(s: str, strict: bool) -> str:
  parts = s.split("/")
  if len(parts) != 2:
    return s
  try:
    a, b = int(parts[0]), int(parts[1])
  except ValueError:
    if strict:
      raise _StripError("a/b that is not two integers") from None
    return s
  return f"\\frac{{{a}}}{{{b}}}" if s == f"{a}/{b}" else s


def _fix_sqrt(s: str, strict: bool) -> str:
  # "\sqrt3" -> "\sqrt{3}".
  head, *parts = s.split("\\sqrt")
  if strict and "" in parts:
    raise _StripError("\\sqrt with nothing after it")
  return head + "".join(
    "\\sqrt" + (p if p.startswith("{") or not p else "{" + p[0] + "}" + p[1:]) for p in parts
  )


def strip_string(s: str, strict: bool = False) -> str:
  """Hendrycks' MATH `strip_string` (as in the reference), made total: it never raises.
  strict=True raises `_StripError` (a ValueError) wherever the reference's copy raises: more than
  one "\\text{ ", "\\sqrt" or "\\frac" with nothing after it, an "a/b" of non-integers."""
  s = s.replace("\n", "").replace("\\!", "").replace("\\\\", "\\")
  s = s.replace("tfrac", "frac").replace("dfrac", "frac")
  s = s.replace("\\left", "").replace("\\right", "")
  s = s.replace("^{\\circ}", "").replace("^\\circ", "")
  s = s.replace("\\$", "")
  units = s.split("\\text{ ")
  if len(units) == 2:  # the original drops a trailing unit only when there is exactly one
    s = units[0]
  elif strict and len(units) > 2:
    raise _StripError("more than one \\text{ ")
  s = s.replace("\\%", "")
  s = s.replace(" .", " 0.").replace("{.", "{0.")
  if not s:
    return s
  if s[0] == ".":
    s = "0" + s
  sides = s.split("=")
  if len(sides) == 2 and len(sides[0]) <= 2:  # "k = 5" -> "5"
    s = sides[1]
  s = _fix_sqrt(s, strict).replace(" ", "")
  s = _fix_fracs(s, strict)
  if s == "0.5":
    s = "\\frac{1}{2}"
  return _fix_a_slash_b(s, strict)


# --- Minerva normalisation (Lewkowycz et al. 2022, appendix D) ------------------------------------

_SUBSTITUTIONS = [
  ("an ", ""),
  ("a ", ""),
  (".$", "$"),
  ("\\$", ""),
  (r"\ ", ""),
  (" ", ""),
  ("mbox", "text"),
  (",\\text{and}", ","),
  ("\\text{and}", ","),
  ("\\text{m}", "\\text{}"),
]
_REMOVED = [
  "square",
  "ways",
  "integers",
  "dollars",
  "mph",
  "inches",
  "ft",
  "hours",
  "km",
  "units",
  "\\ldots",
  "sue",
  "points",
  "feet",
  "minutes",
  "digits",
  "cents",
  "degrees",
  "cm",
  "gm",
  "pounds",
  "meters",
  "meals",
  "edges",
  "students",
  "childrentickets",
  "multiples",
  "\\text{s}",
  "\\text{.}",
  "\\text{\ns}",
  "\\text{}^2",
  "\\text{}^3",
  "\\text{\n}",
  "\\text{}",
  r"\mathrm{th}",
  r"^\circ",
  r"^{\circ}",
  r"\;",
  r",\!",
  "{,}",
  '"',
  "\\dots",
]


def normalize_final_answer(s: str) -> str:
  """Minerva's `normalize_final_answer`."""
  s = s.split("=")[-1]
  for before, after in _SUBSTITUTIONS:
    s = s.replace(before, after)
  for expr in _REMOVED:
    s = s.replace(expr, "")
  s = re.sub(r"(.*?)(\$)(.*?)(\$)(.*)", "$\\3$", s)
  s = re.sub(r"(\\text\{)(.*?)(\})", "\\2", s)
  s = re.sub(r"(\\textbf\{)(.*?)(\})", "\\2", s)
  s = re.sub(r"(\\overline\{)(.*?)(\})", "\\2", s)
  s = re.sub(r"(\\boxed\{)(.*)(\})", "\\2", s)
  s = re.sub(r"(frac)([^{])(.)", "frac{\\2}{\\3}", s)
  s = re.sub(r"(sqrt)([^{])", "sqrt{\\2}", s)
  s = s.replace("$", "")
  if s.replace(",", "").isdigit():
    s = s.replace(",", "")
  return s


# --- math-verify with a time bound ----------------------------------------------------------------

MATH_VERIFY_TIMEOUT_S = 5


def _math_verify_run(gold: str, pred: str, timeout: int | None) -> bool:
  from math_verify import parse, verify

  g = parse("\\boxed{" + gold + "}", parsing_timeout=timeout)
  p = parse("\\boxed{" + pred + "}", parsing_timeout=timeout)
  return bool(g and p and verify(g, p, timeout_seconds=timeout))


def _bounded(fn, timeout: int, calls: int):
  """fn(timeout) with math-verify's time bounds, or None when it ran out of time.

  math-verify bounds its own time with SIGALRM, which works only on the main thread. Elsewhere
  we switch its timeouts off and bound the wait ourselves; a sympy call that hangs is then left
  running in a daemon thread (it cannot be interrupted) and the call counts as a timeout.
  """
  if threading.current_thread() is threading.main_thread():
    return fn(timeout)
  box: list = []
  worker = threading.Thread(target=lambda: box.append(fn(None)), daemon=True)
  worker.start()
  worker.join(calls * timeout)
  return box[0] if box else None


def math_verify_equal(gold: str, pred: str, timeout: int = MATH_VERIFY_TIMEOUT_S) -> bool | None:
  """math-verify equivalence of two answers; None when it ran out of time."""
  return _bounded(lambda t: _math_verify_run(gold, pred, t), timeout, calls=3)


def extract_math_verify(text: str, timeout: int = MATH_VERIFY_TIMEOUT_S) -> str | None:
  """The answer as lighteval / open-r1 extract it: math-verify's LaTeX extraction (a \\boxed
  answer first), else its plain-expression extraction (the last number or expression, e.g. "12"
  in "The final answer is 12."). Returns the matched string, or None."""
  from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse

  config = [LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()]
  found = _bounded(lambda t: parse(text, config, parsing_timeout=t), timeout, calls=1)
  return found[1] if found and len(found) > 1 else None


# --- the grade ------------------------------------------------------------------------------------


def _as_int(s: str) -> int | None:
  s = strip_string(s).strip("{}")
  return int(s) if re.fullmatch(r"[+-]?\d+", s) else None


def answers_match(pred: str | None, gold: str, integer_gold: bool = False) -> tuple[bool, str]:
  """(correct, rule) where rule is the first rule that matched, or why none did."""
  if pred is None:
    return False, "no_answer"
  if integer_gold:  # AIME: "033" and "33" are the same answer
    p, g = _as_int(pred), _as_int(gold)
    if p is not None and g is not None:
      return p == g, "integer"
  if strip_string(pred) == strip_string(gold):
    return True, "strip_string"
  if normalize_final_answer(pred) == normalize_final_answer(gold):
    return True, "minerva"
  verdict = math_verify_equal(gold, pred)
  if verdict is None:
    return False, "math_verify_timeout"
  return verdict, "math_verify" if verdict else "mismatch"


EXTRACTIONS = ("boxed", "math_verify")


def grade_math(
  response: str, gold: str, integer_gold: bool = False, extraction: str = "boxed"
) -> dict:
  """Grade one response: the extracted answer, whether it is right, and the rule that said so.
  extraction: "boxed" (the reference: the last \\boxed{}) or "math_verify" (lighteval/open-r1:
  `extract_math_verify`, which also finds an unboxed final answer)."""
  if extraction not in EXTRACTIONS:
    raise ValueError(f"extraction={extraction!r}; expected one of {EXTRACTIONS}")
  pred = extract_boxed(response) if extraction == "boxed" else extract_math_verify(response)
  correct, rule = answers_match(pred, str(gold), integer_gold)
  return {"extracted": pred, "correct": correct, "rule": rule}


def reference_is_equiv(pred: str, gold: str) -> tuple[bool, str]:
  """The reference's `is_equiv`: equal after `strip_string`; REFERENCE QUIRK: where its
  `strip_string` raises (see `strip_string(strict=True)`), the raw strings are compared."""
  try:
    return strip_string(pred, strict=True) == strip_string(gold, strict=True), "is_equiv"
  except _StripError:
    return pred == gold, "is_equiv_raw"


def grade_math_reference(response: str, gold: str) -> dict:
  """Grade one response by the reference's rules only (`reference_boxed`, `reference_is_equiv`):
  its rule-based `exact_match`; the mismatches with an answer are what its LLM re-judges."""
  pred = reference_boxed(response)
  if pred is None:
    return {"extracted": None, "correct": False, "rule": "no_answer"}
  correct, rule = reference_is_equiv(pred, str(gold))
  return {"extracted": pred, "correct": correct, "rule": rule if correct else "mismatch"}


# --- optional LLM re-check of mismatches (the reference's second stage) ---------------------------

JUDGE_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
JUDGE_MAX_NEW_TOKENS = 20  # the reference's SamplingParams(max_tokens=20, temperature=0)


def judge_prompt(problem: str, gold: str, pred: str) -> str:
  """The reference's re-check input, character for character (check_answers_with_llm in
  math_metric_llm_eval_general.py): its True/False question in Qwen's ChatML with Qwen's default
  system prompt, written out by hand, so the judge sees this text whatever its own template."""
  question = (
    "Given a math problem, its correct answer, and the model's generated answer, "
    "determine if the model's generated answer is correct. Respond with 'True' if the answer "
    "is correct and 'False' if it is incorrect. Directly provide your judgement 'True' or "
    "'False' without any other description.\n"
    f"Problem: {problem}\nCorrect Answer: {gold}\nModel's Generated Answer: {pred}\n"
    "Your judgement:"
  )
  return (
    f"<|im_start|>system\n{JUDGE_SYSTEM}<|im_end|>\n"
    f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"
  )


def parse_judge_verdict(text: str) -> bool | None:
  """'True' anywhere wins, then 'False' (the reference's order); None if neither appears."""
  if "True" in text:
    return True
  if "False" in text:
    return False
  return None


def llm_recheck(items: list[tuple[str, str, str]], generate_fn) -> list[bool | None]:
  """Re-judge (problem, gold, extracted) triples with a judge model.

  `generate_fn(list_of_prompt_strings) -> list_of_texts` runs the judge greedily on the
  `judge_prompt` texts as they are (the reference: 20 new tokens, temperature 0). Only answers
  that were extracted but did not match should be passed, as in the reference; unparsable
  verdicts come back as None (the reference counts them wrong).
  """
  if not items:
    return []
  texts = generate_fn([judge_prompt(*item) for item in items])
  return [parse_judge_verdict(t.strip()) for t in texts]
