"""Math grading: extraction, normalisation, math-verify; AIME and MATH-500 golds as models write
them."""

import json
import os
from concurrent.futures import ThreadPoolExecutor

import pytest

from evals import math_grader as mg

DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")
AIME24 = os.path.join(DATA, "aime24", "test.jsonl")
MATH500 = os.path.join(DATA, "math500", "test.jsonl")
THINK = "<think>\nLet me compute this carefully. Maybe \\boxed{7}? No, recheck.\n</think>\n\n"


def _rows(path):
  if not os.path.exists(path):
    pytest.skip(f"shared data missing: {path}")
  with open(path) as f:
    return [json.loads(line) for line in f]


@pytest.mark.parametrize(
  "text,expected",
  [
    ("so \\boxed{\\frac{1}{2}} done", "\\frac{1}{2}"),
    ("\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}", "\\left( 3, \\frac{\\pi}{2} \\right)"),
    ("first \\boxed{1} then \\boxed{2}", "2"),
    ("$\\boxed 5$ is it", "5"),
    ("\\fbox{12}", "12"),
    ("\\boxed{x^{2}+{1}}", "x^{2}+{1}"),
    ("cut off \\boxed{\\frac{1}{", None),
    ("no box here: 42", None),
    ("", None),
  ],
)
def test_extract_boxed(text, expected):
  assert mg.extract_boxed(text) == expected


@pytest.mark.parametrize(
  "raw,expected",
  [
    ("\\dfrac12", "\\frac{1}{2}"),
    ("0.5", "\\frac{1}{2}"),
    ("k = 5", "5"),
    ("3/4", "\\frac{3}{4}"),
    ("\\sqrt3", "\\sqrt{3}"),
    ("90^\\circ", "90"),
    ("\\left( 1, 2 \\right)", "(1,2)"),
    ("5\\text{ cm}", "5"),
    ("50\\%", "50"),
  ],
)
def test_strip_string(raw, expected):
  assert mg.strip_string(raw) == expected


def test_minerva_normalisation():
  assert mg.normalize_final_answer("100,000") == "100000"
  assert mg.normalize_final_answer("x = \\text{Monday}") == "Monday"
  assert mg.normalize_final_answer("\\frac12") == "\\frac{1}{2}"


def test_rules_in_order():
  assert mg.answers_match(None, "1") == (False, "no_answer")
  assert mg.answers_match("033", "33", integer_gold=True) == (True, "integer")
  assert mg.answers_match("34", "033", integer_gold=True) == (False, "integer")
  assert mg.answers_match("\\dfrac{1}{2}", "\\frac12") == (True, "strip_string")
  assert mg.answers_match("10 \\text{inches}", "10") == (True, "minerva")
  assert mg.answers_match("\\frac{2}{4}", "\\frac{1}{2}") == (True, "math_verify")
  assert mg.answers_match("\\frac{3}{4}", "\\frac{1}{2}") == (False, "mismatch")


def test_math_verify_off_the_main_thread():
  with ThreadPoolExecutor(1) as pool:
    same = pool.submit(mg.math_verify_equal, "\\frac{1}{2}", "0.5").result()
    other = pool.submit(mg.math_verify_equal, "\\frac{1}{2}", "0.25").result()
  assert same is True and other is False


def test_aime24_golds_as_models_write_them():
  rows = _rows(AIME24)
  assert len(rows) == 30
  for i, row in enumerate(rows):
    gold, value = row["answer"], int(row["answer"])
    for answer in (
      f"Final Answer: \\boxed{{{value}}}",
      f"\\boxed{{{value:03d}}}",
      f"the final answer is $\\boxed{{{value}}}$.",
      f"$\\boxed {value}$",
    ):
      got = mg.grade_math(THINK + answer, gold, integer_gold=True)
      assert got["correct"], (gold, answer, got)
    other = int(rows[(i + 1) % len(rows)]["answer"])
    for wrong in (other if other != value else value + 1, value + 1, value * 10):
      got = mg.grade_math(THINK + f"Final Answer: \\boxed{{{wrong}}}", gold, True)
      assert not got["correct"], (gold, wrong, got)
    # Unboxed: no answer; a box left in the thinking is then the last one (as the reference).
    unboxed = mg.grade_math(f"<think>x</think>Final Answer: {value}", gold, True)
    assert unboxed["rule"] == "no_answer"
    assert not mg.grade_math(THINK + f"Final Answer: {value}", gold, True)["correct"]


def test_math500_all_golds_boxed_grade_right():
  rows = _rows(MATH500)
  assert len(rows) == 500
  failures = []
  for row in rows:
    gold = row["answer"]
    for written in (gold, gold.replace("\\frac", "\\dfrac"), gold.replace(" ", "")):
      got = mg.grade_math(THINK + f"Final Answer: $\\boxed{{{written}}}$", gold)
      if not got["correct"]:
        failures.append((gold, written, got["rule"]))
  assert not failures, failures[:10]


def test_math500_wrong_answers_grade_wrong():
  rows = _rows(MATH500)
  checked = 0
  for i in range(0, len(rows), 5):  # every fifth problem, against the next problem's answer
    gold, other = rows[i]["answer"], rows[(i + 1) % len(rows)]["answer"]
    if mg.strip_string(gold) == mg.strip_string(other):
      continue
    got = mg.grade_math(THINK + f"Final Answer: \\boxed{{{other}}}", gold)
    assert not got["correct"], (gold, other, got)
    checked += 1
  assert checked > 80


def test_llm_recheck_hook():
  seen = []

  def judge(conversations):
    seen.extend(conversations)
    return ["True", " False.", "I am not sure"]

  items = [("What is 1/2?", "\\frac12", "0.50"), ("p", "3", "4"), ("q", "x", "y")]
  assert mg.llm_recheck(items, judge) == [True, False, None]
  assert seen[0][0]["role"] == "system" and seen[0][1]["role"] == "user"
  assert "Correct Answer: \\frac12\nModel's Generated Answer: 0.50" in seen[0][1]["content"]
  assert mg.llm_recheck([], judge) == []


@pytest.mark.parametrize(
  "text,expected",
  [
    ("7 + 5 = 12\n\nThe final answer is 12.", "12"),  # unboxed: the last expression
    (
      "maybe $\\frac{1}{2}$. Therefore, the final answer is: $\\boxed{\\frac{3}{4}}$. I hope it is "
      "correct",
      "\\frac{3}{4}",
    ),  # a boxed answer wins over earlier LaTeX
    ("no answer here", None),
  ],
)
def test_lighteval_extraction(text, expected):
  assert mg.extract_math_verify(text) == expected
  with ThreadPoolExecutor(1) as pool:  # off the main thread too (no SIGALRM there)
    assert pool.submit(mg.extract_math_verify, text).result() == expected


def test_aime24_unboxed_answers_with_lighteval_extraction():
  rows = _rows(AIME24)
  for row in rows[:10]:
    gold, value = row["answer"], int(row["answer"])
    for answer in (f"The final answer is {value}.", f"Final Answer: \\boxed{{{value:03d}}}"):
      got = mg.grade_math(answer, gold, integer_gold=True, extraction="math_verify")
      assert got["correct"], (gold, answer, got)
    wrong = mg.grade_math(f"The final answer is {value + 1}.", gold, True, "math_verify")
    assert not wrong["correct"]
    # the reference's extraction finds no answer in the same unboxed text
    assert mg.grade_math(f"The final answer is {value}.", gold, True)["rule"] == "no_answer"
  with pytest.raises(ValueError, match="extraction"):
    mg.grade_math("x", "1", extraction="last_number")
