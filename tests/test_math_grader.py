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
    pytest.fail(f"shared data missing: {path} (the ../shared/data checkout)")
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

  def judge(prompts):
    seen.extend(prompts)
    return ["True", " False.", "I am not sure"]

  items = [("What is 1/2?", "\\frac12", "0.50"), ("p", "3", "4"), ("q", "x", "y")]
  assert mg.llm_recheck(items, judge) == [True, False, None]
  assert seen[0] == mg.judge_prompt(*items[0])
  assert mg.llm_recheck([], judge) == []


def test_judge_prompt_is_the_reference_text():
  """check_answers_with_llm's input_text in math_metric_llm_eval_general.py, as written there."""
  assert mg.judge_prompt("What is $1+1$?", "2", "3") == (
    "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    "<|im_end|>\n<|im_start|>user\nGiven a math problem, its correct answer, and the model's "
    "generated answer, determine if the model's generated answer is correct. Respond with 'True' "
    "if the answer is correct and 'False' if it is incorrect. Directly provide your judgement "
    "'True' or 'False' without any other description.\nProblem: What is $1+1$?\n"
    "Correct Answer: 2\nModel's Generated Answer: 3\nYour judgement:<|im_end|>\n"
    "<|im_start|>assistant\n"
  )


# The reference's extraction (remove_boxed(last_boxed_only_string(..))), its quirks included.
@pytest.mark.parametrize(
  "text,expected",
  [
    ("so \\boxed{\\frac{1}{2}} done", "\\frac{1}{2}"),
    ("first \\boxed{1} then \\boxed{2}", "2"),
    ("\\fbox{12}", "12"),
    ("cut off \\boxed{\\frac{1}{", None),  # the last box never closes: no answer
    ("$\\boxed 5$ and later \\boxed{7}", "5"),  # quirk: any "\\boxed " wins
    ("\\boxed 5\nmore text", "5\nmore text"),  # quirk: up to the next "$" only
    ("\\fbox{3} then \\boxed{4}", "4"),  # \\fbox only when there is no \\boxed
    ("\\boxed\n{5}", "{5"),  # quirk: the first 7 characters are cut, whatever they are
    ("\\boxed{\\fbox{1}}", None),  # the reference's assert stopped its script here
    ("no answer: 42", None),
    ("", None),
  ],
)
def test_reference_boxed(text, expected):
  assert mg.reference_boxed(text) == expected


@pytest.mark.parametrize(
  "pred,gold,expected",
  [
    ("\\dfrac{1}{2}", "\\frac12", (True, "is_equiv")),
    ("0.5", "\\frac{1}{2}", (True, "is_equiv")),
    ("033", "33", (False, "is_equiv")),  # no integer rule in the reference
    ("10 \\text{inches}", "10", (False, "is_equiv")),  # no Minerva rule
    ("\\frac{2}{4}", "\\frac{1}{2}", (False, "is_equiv")),  # no math-verify
    # where the reference's strip_string raises, the raw strings are compared
    ("x/2", "x/2", (True, "is_equiv_raw")),
    ("x / 2", "x/2", (False, "is_equiv_raw")),
    ("1\\text{ a}\\text{ b}", "1", (False, "is_equiv_raw")),
    ("2\\sqrt", "2\\sqrt", (True, "is_equiv_raw")),
  ],
)
def test_reference_is_equiv(pred, gold, expected):
  assert mg.reference_is_equiv(pred, gold) == expected


def test_strict_strip_string_only_differs_where_the_reference_raises():
  assert mg.strip_string("x/2") == "x/2"  # total
  with pytest.raises(ValueError):
    mg.strip_string("x/2", strict=True)
  assert mg.strip_string("\\frac{3}{4}", strict=True) == mg.strip_string("\\frac{3}{4}")


def test_aime24_by_the_reference_rules():
  rows = _rows(AIME24)
  padded_golds = []
  for row in rows:
    gold, value = row["answer"], int(row["answer"])
    right = mg.grade_math_reference(THINK + f"Final Answer: \\boxed{{{gold}}}", gold)
    assert right == {"extracted": gold, "correct": True, "rule": "is_equiv"}
    # The file writes 7 golds with a leading zero ("025"): the reference's rules call the
    # model's "25" a mismatch and leave it to its LLM re-check (the extended rules do not).
    plain = mg.grade_math_reference(f"\\boxed{{{value}}}", gold)
    assert plain["correct"] is (gold == str(value)), (gold, plain)
    if gold != str(value):
      padded_golds.append(gold)
      assert plain["rule"] == "mismatch"
      assert mg.grade_math(f"\\boxed{{{value}}}", gold, integer_gold=True)["correct"]
    none = mg.grade_math_reference(f"<think>x</think>Final Answer: {value}", gold)
    assert none == {"extracted": None, "correct": False, "rule": "no_answer"}
  assert padded_golds == ["025", "073", "023", "045", "033", "080", "055"]


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
