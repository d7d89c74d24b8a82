"""GPQA: reproducible per-seed shuffles, the prompts, the letter cascade, and the loader.

The questions are made up here: GPQA itself must never be copied into the repo.
"""

import csv
import random

import pytest

from evals import benchmarks, gpqa


def _record(qid="rec1"):
  return {
    "id": qid,
    "question": "Which colour is a ripe banana?",
    "correct": "Yellow",
    "incorrect": ["Blue [title]", "Purple", "Black"],
  }


def test_shuffle_is_reproducible_and_independent_of_global_random():
  record = _record()
  random.seed(1)
  first = gpqa.shuffled_choices(record, seed=3)
  random.seed(99)
  random.random()
  assert gpqa.shuffled_choices(record, seed=3) == first


def test_shuffle_differs_across_seeds_and_questions():
  orders = {tuple(gpqa.shuffled_choices(_record(), s)[0]) for s in range(8)}
  assert len(orders) > 1
  by_question = {tuple(gpqa.shuffled_choices(_record(f"q{i}"), 0)[0]) for i in range(8)}
  assert len(by_question) > 1


def test_correct_letter_tracks_the_shuffle():
  letters = set()
  for seed in range(16):
    choices, letter = gpqa.shuffled_choices(_record(), seed)
    assert choices["ABCD".index(letter)] == "Yellow"
    # lm-eval's cleaning turns "Blue [title]" into "Blue. ".
    assert sorted(choices) == sorted(["Yellow", "Blue. ", "Purple", "Black"])
    assert gpqa.correct_letter(_record(), seed) == letter
    letters.add(letter)
  assert len(letters) > 1


def test_reference_and_lighteval_prompts():
  choices, _ = gpqa.shuffled_choices(_record(), 5)
  a, b, c, d = choices
  assert gpqa.build_prompt(_record(), 5) == (
    "You are solving a multiple-choice question. At the end, present your final answer using "
    "the format: Final Answer: \\boxed{X}, where X is one of A, B, C, or D.\n\n"
    "Question: Which colour is a ripe banana?\nChoices:\n"
    f"(A) {a}\n(B) {b}\n(C) {c}\n(D) {d}\n\n"
  )
  assert gpqa.build_prompt(_record(), 5, "lighteval").endswith(
    f"Which colour is a ripe banana?\n\nA) {a}\nB) {b}\nC) {c}\nD) {d}"
  )


# The reference's cascade (mcq_metric_gpqa.py, extract_answer), its rules in order, each case
# worked out by hand from the reference's code: 1. the last box's first capital after
# upper-casing; 2. "Final Answer" / "Answer" / "Answer is" + letter (case-insensitive pattern,
# case-sensitive check, the last match only); 3.-5. "The (correct|final) answer is X".
@pytest.mark.parametrize(
  "text,letter",
  [
    ("<think>maybe A</think>\nFinal Answer: \\boxed{C}", "C"),  # rule 1
    ("Answer: A ... \\boxed{C}", "C"),  # rule 1 before rule 2
    ("\\boxed{A} was wrong; Final Answer: C", "A"),
    ("\\boxed{A} ... \\boxed{D}", "D"),  # the last box
    ("\\boxed{(D)}", "D"),
    ("\\boxed{b}", "B"),  # upper-cased in rule 1
    ("\\boxed {C}", "C"),  # "\\boxed " (a space) is a box too
    ("\\fbox{B}", "B"),
    ("\\boxed{Answer B}", "A"),  # quirk: the first capital of the box
    ("Final Answer: \\boxed{\\text{B}}", None),  # quirk: "\\TEXT{B}" reads T, no rule matches
    ("Answer: C", "C"),  # rule 2: the bare "Answer: X"
    ("AnswerD", "D"),  # rule 2: spaces and colon are optional
    ("Final Answer: B. Hmm, the answer is D", "D"),  # rule 2's last match
    ("After all that, the answer is (B).", "B"),
    ("Final Answer: Bob", "B"),  # quirk: the B of "Bob"
    ("FINAL ANSWER: (d)", None),  # rule 2 finds "d": not a capital choice
    ("final answer is **C**.", None),  # rule 2 finds the "i" of "is"
    ("**Final Answer:** A", None),  # "**" between the colon and the letter
    ("The Answer Is \\textbf{A}", None),  # rule 2 finds "I", rule 3 a backslash
    ("The answer is B. Answers vary.", "B"),  # rule 2 ends on "s" of Answers: rule 3 reads B
    ("the answer is a bit unclear", None),
    ("", None),
  ],
)
def test_reference_cascade(text, letter):
  assert gpqa.extract_letter(text) == letter == gpqa.reference_letter(text)


def test_lighteval_answer_line():
  assert gpqa.extract_letter("reasoning...\nAnswer: C", "lighteval") == "C"
  assert gpqa.extract_letter("Final Answer: \\boxed{\\text{B}}", "lighteval") == "B"
  assert gpqa.extract_letter("the answer is a bit unclear", "lighteval") is None


def test_grade_gpqa():
  record, seed = _record(), 2
  gold = gpqa.correct_letter(record, seed)
  wrong = next(x for x in "ABCD" if x != gold)
  assert gpqa.grade_gpqa(f"Final Answer: \\boxed{{{gold}}}", record, seed)["correct"]
  assert not gpqa.grade_gpqa(f"Final Answer: \\boxed{{{wrong}}}", record, seed)["correct"]
  assert gpqa.grade_gpqa("no idea", record, seed) == {
    "extracted": None,
    "gold": gold,
    "correct": False,
  }


def test_loader_from_csv(tmp_path):
  path = tmp_path / "gpqa_diamond.csv"
  fields = [
    "Record ID",
    "Question",
    "Correct Answer",
    "Incorrect Answer 1",
    "Incorrect Answer 2",
    "Incorrect Answer 3",
  ]
  with open(path, "w", newline="") as f:
    w = csv.DictWriter(f, fields)
    w.writeheader()
    w.writerow(dict(zip(fields, ["r1", "Q one?", "yes", "no", "maybe", "never"])))
    w.writerow(dict(zip(fields, ["r2", "Q two?", "4", "3", "5", "6"])))
  records = benchmarks.load("gpqa_diamond", str(path))
  assert list(records) == ["r1", "r2"]
  assert records["r2"] == {
    "id": "r2",
    "question": "Q two?",
    "correct": "4",
    "incorrect": ["3", "5", "6"],
  }
  prompt = benchmarks.build_prompt("gpqa_diamond", records["r1"], seed=0)
  assert prompt.startswith("You are solving a multiple-choice question.") and "Q one?" in prompt


def test_loader_names_the_missing_field(tmp_path):
  path = tmp_path / "bad.csv"
  path.write_text("Record ID,Question\nr1,Q?\n")
  with pytest.raises(ValueError, match=r"row 1 of .*bad.csv has none of the fields Correct An"):
    benchmarks.load("gpqa_diamond", str(path))
