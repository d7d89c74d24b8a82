"""GPQA: per-(seed, question) choice shuffling, the prompts, and the answer-letter cascade.

The reference (lm-eval `gpqa_diamond_better_prompt`) shuffles the four choices with Python's
global `random` state, so its order depends on everything that ran before. We derive the order
from a hash of (seed, question id) instead: the same seed gives the same prompt on any machine,
in any order, on a rerun that resumes half-way. (A difference from the reference, not a quirk
reproduced: its order cannot be rebuilt outside its own lm-eval and datasets versions.)

The answer letter is read exactly as the reference's second stage reads it
(`mcq_metric_gpqa.py`, `extract_answer`; see `reference_letter`).
"""

from __future__ import annotations

import hashlib
import random
import re

from evals.math_grader import reference_boxed

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


# --- the reference's cascade (mcq_metric_gpqa.py, extract_answer), rule for rule -------------------
#
# 1. the last \boxed{} as the reference's math helpers find it; its first capital letter after
#    upper-casing (REFERENCE QUIRK: "\boxed{\text{B}}" reads "T", not a choice, so rule 1 fails);
# 2. "Final Answer" / "Answer" / "Answer is", an optional colon, optional spaces, an optional "(":
#    the last match's letter. Case is ignored in the pattern but not in the check, and the
#    spaces are optional (REFERENCE QUIRK: "answers" matches with "s", "answer the" with "t";
#    when the last match is such a letter, the rule fails, earlier matches are not tried);
# 3. "The answer is X", 4. "The correct answer is X", 5. "The final answer is X" (the same way).
_VALID = frozenset("ABCD")
_REFERENCE_RULES = [
  re.compile(r"(?:Final Answer|Answer(?: is)?):?\s*\(?([A-Z])\)?", re.IGNORECASE),
  re.compile(r"The answer is\s+\(?([A-Z])\)?", re.IGNORECASE),
  re.compile(r"The correct answer is\s+\(?([A-Z])\)?", re.IGNORECASE),
  re.compile(r"The final answer is\s+\(?([A-Z])\)?", re.IGNORECASE),
]


def reference_letter(text: str) -> str | None:
  """The answer letter by the reference's cascade (module comment above), or None."""
  text = text or ""
  boxed = reference_boxed(text)
  if boxed is not None:
    first = re.search(r"[A-Z]", boxed.strip().upper())
    if first and first.group(0) in _VALID:
      return first.group(0)
  for rule in _REFERENCE_RULES:
    found = rule.findall(text)
    if found and found[-1] in _VALID:
      return found[-1]
  return None


# --- lighteval: a letter as models decorate it ----------------------------------------------------
# "B", "(B)", "**B**", "\text{B}", "\textbf{(B)}", "B." ... The phrases are case-insensitive; a
# bare letter must be a capital ("the answer is a bit..." is no answer), a lower-case one counts
# only when bracketed: "(b)", "{b}".
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


def lighteval_letter(text: str) -> str | None:
  """For the lighteval template: `\\boxed{X}`, else `Final Answer: X`, else `the answer is X`,
  else `Answer: X` (what that prompt asks for), with the decorations models add."""
  for rule in (_BOXED, _FINAL, _THE_ANSWER, _ANSWER_COLON):
    letter = _last(rule, text or "")
    if letter:
      return letter
  return None


def extract_letter(text: str, template: str = "reference") -> str | None:
  """The answer letter for `template`'s prompt: the reference's cascade, or lighteval's."""
  return reference_letter(text) if template == "reference" else lighteval_letter(text)


def grade_gpqa(response: str, record: dict, seed: int, template: str = "reference") -> dict:
  gold = correct_letter(record, seed)
  pred = extract_letter(response, template)
  return {"extracted": pred, "gold": gold, "correct": pred == gold}
