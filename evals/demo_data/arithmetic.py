"""Writes arithmetic.jsonl: 80 one-step problems SmolLM2-135M-Instruct partly solves (measured
with the demo's settings before this set was fixed: single-digit sums 6/12, single-digit word
problems 8/12, two-digit plus one-digit 5/12, single-digit differences 4/12; harder kinds, e.g.
two-digit sums or products, it solved 0-1 of 10-12). Run `python evals/demo_data/arithmetic.py`
to rebuild it (seeded: the same file every time)."""

import json
import os
import random

NAMES = ["Sara", "Tom", "Ana", "Ben", "Mia", "Leo", "Zoe", "Sam"]
THINGS = ["pencils", "apples", "marbles", "stickers", "books", "cookies"]


def problems(seed: int = 0, per_kind: int = 20) -> list[dict]:
  rng = random.Random(seed)
  out = []
  for kind in ("sum", "word", "sum_2_1", "difference"):
    for i in range(per_kind):
      a, b = rng.randint(2, 9), rng.randint(2, 9)
      if kind == "sum":
        q, ans = f"What is {a} + {b}?", a + b
      elif kind == "word":
        who, what = rng.choice(NAMES), rng.choice(THINGS)
        q, ans = f"{who} has {a} {what} and gets {b} more. How many {what} are there now?", a + b
      elif kind == "sum_2_1":
        a = rng.randint(10, 99)
        q, ans = f"What is {a} + {b}?", a + b
      else:
        a = a + b + rng.randint(0, 3)
        q, ans = f"What is {a} - {b}?", a - b
      out.append({"id": f"{kind}_{i}", "problem": q, "answer": str(ans)})
  return out


if __name__ == "__main__":
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "arithmetic.jsonl")
  with open(path, "w") as f:
    for p in problems():
      f.write(json.dumps(p) + "\n")
