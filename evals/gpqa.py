"""GPQA: per-(seed, question) choice shuffling, the prompts, and the answer-letter cascade.

The reference (lm-eval `gpqa_diamond_better_prompt`) shuffles the four choices with Python's
global `random` state, so its order depends on everything that ran before. We derive the order
from a hash of (seed, question id) instead: the same seed gives the same prompt on any machine,
in any order, on a rerun that resumes half-way.
"""

from __future__ import annotations

import hashlib
import random
import re

LETTERS = "ABCD"

REFERENCE_PROMPT = (
  "You are solving a multiple-choice question. At the end, present your final answer using the "
  "format: Final Answer: \\boxed{{X}}, where X is one of A, B, C, or D.\n\n"
  "Question: {question}\nChoices:\n(A) {A}\n(B) {B}\n(C) {C}\n(D) {D}\n\n"
)
# lighteval's gpqa_instruct (simple-evals wording); its answers end with "Answer: X".
LIGHTEVAL_PROMPT = (
  "Answer the following multiple choice question. The last line of your response should be of "
  "the following format: 'Answer: $LETTER' (without quotes) where LETTER is one of ABCD. Think "
  "step by step before answering.\n\n{question}\n\nA) {A}\nB) {B}\nC) {C}\nD) {D}"
)


def clean_choice(text: str | None) -> str:
  """lm-eval's GPQA `preprocess`: drop `[...]` markup and doubled spaces."""
  if text is None:
    return " "
  text = text.strip().replace(" [title]", ". ")
  text = re.sub(r"\[.*?\]", "", text)
  return text.replace("  ", " ")


def shuffled_choices(record: dict, seed: int) -> tuple[list[str], str]:
  """(the four choices in the order shown for `seed`, the letter of the correct one)."""
  choices = [clean_choice(record["correct"])] + [clean_choice(c) for c in record["incorrect"]]
  digest = hashlib.sha256(f"{seed}\x00{record['id']}".encode()).digest()
  order = list(range(4))
  random.Random(int.from_bytes(digest[:8], "big")).shuffle(order)
  return [choices[i] for i in order], LETTERS[order.index(0)]


def build_prompt(record: dict, seed: int, template: str = "reference") -> str:
  choices, _ = shuffled_choices(record, seed)
  fmt = REFERENCE_PROMPT if template == "reference" else LIGHTEVAL_PROMPT
  return fmt.format(question=record["question"], **dict(zip(LETTERS, choices)))


def correct_letter(record: dict, seed: int) -> str:
  return shuffled_choices(record, seed)[1]


# A letter as models decorate it: "B", "(B)", "**B**", "\\text{B}", "\\textbf{(B)}", "B." ... The
# phrases are case-insensitive; a bare letter must be a capital ("the answer is a bit..." is no
# answer), a lower-case one counts only when bracketed: "(b)", "{b}".
_LETTER = (
  r"[\s*$(\[{]*(?:\\(?:text|textbf|mathrm|mathbf)\s*\{\s*\(?)?\s*"
  r"([ABCD]|(?<=[({])[abcd](?=[)}]))\b"
)
_SEP = r"[\s*_]*(?i:is)?[\s*_]*[:：]?"
_BOXED = re.compile(r"\\boxed\s*\{" + _LETTER)
_FINAL = re.compile(r"(?i:final\s+answer)" + _SEP + _LETTER)
_THE_ANSWER = re.compile(r"(?i:the\s+(?:correct\s+)?answer\s+is)[\s*_]*[:：]?" + _LETTER)
_ANSWER_COLON = re.compile(r"(?i:answer)[\s*_]*[:：]" + _LETTER)


def _last(pattern: re.Pattern, text: str) -> str | None:
  found = pattern.findall(text)
  return found[-1].upper() if found else None


def extract_letter(text: str, template: str = "reference") -> str | None:
  """The answer letter by the reference's cascade, or None.

  `\\boxed{X}` first, else `Final Answer: X`, else `the answer is X` (the last match of
  the first rule that matches). With the lighteval template, `Answer: X` (what that prompt
  asks for) is tried after them.
  """
  rules = [_BOXED, _FINAL, _THE_ANSWER]
  if template == "lighteval":
    rules.append(_ANSWER_COLON)
  for rule in rules:
    letter = _last(rule, text or "")
    if letter:
      return letter
  return None


def grade_gpqa(response: str, record: dict, seed: int, template: str = "reference") -> dict:
  gold = correct_letter(record, seed)
  pred = extract_letter(response, template)
  return {"extracted": pred, "gold": gold, "correct": pred == gold}
