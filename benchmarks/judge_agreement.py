"""Refusal judges against human labels: agreement, false- and missed-refusal rates, by model.

  python benchmarks/judge_agreement.py [--out benchmarks/results/judge_agreement.json]
                                       [--build_md BUILD.md]

Reads the development set from ../shared/data/xstest_labels_dev/ and the held-out models from
benchmarks/judge_data/ (evals/judge_validation.py), prints the table, writes JSON, and with
`--build_md` replaces the generated block of that file's "Refusal judge agreement" section.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from evals import judge_validation, refusal_judge  # noqa: E402

JUDGES = judge_validation.JUDGES
MODELS = {
  "gpt4": "GPT-4",
  "llama2orig": "Llama-2-70b-chat, original system prompt",
  "llama2new": "Llama-2-70b-chat, no system prompt",
  "mistralinstruct": "Mistral-7B-Instruct-v0.1",
  "mistralguard": "Mistral-7B-Instruct-v0.1, guardrail prompt",
  "all": "all of the split",
}
BEGIN, END = "<!-- judge_agreement: begin -->", "<!-- judge_agreement: end -->"


def _pct(x: float | None) -> str:
  return "—" if x is None else f"{100 * x:.1f}"


def markdown(results: list[dict]) -> str:
  header = (
    "| split | model | judge | this model's labels, for this judge | refusal / compliance items "
    "| agreement % [95% CI] | false refusal % | missed refusal % "
    "| partial refusals: n, % called refusal |"
  )
  lines = [header, "|" + "---|" * 9]
  for r in results:
    a = r["agreement"]
    model = MODELS.get(r["model"], r["model"])
    model = f"**{model}**" if r["model"] == "all" else model
    lines.append(
      f"| {r['split']} | {model} | `{r['judge']}` | {r['role']} "
      f"| {r['n_refusal']} / {r['n_compliance']} "
      f"| {_pct(a['mean'])} [{_pct(a['ci_low'])}, {_pct(a['ci_high'])}] "
      f"| {_pct(r['false_refusal_rate'])} | {_pct(r['missed_refusal_rate'])} "
      f"| {r['n_partial']}, {_pct(r['partial_called_refusal'])} |"
    )
  return "\n".join(lines) + "\n"


def update_build_md(path: str, table: str) -> None:
  """Replace the text between the BEGIN and END markers of `path` with `table`."""
  with open(path, encoding="utf-8") as f:
    text = f.read()
  if BEGIN not in text or END not in text:
    raise ValueError(f"{path}: no '{BEGIN}' ... '{END}' block to replace")
  head, rest = text.split(BEGIN, 1)
  tail = rest.split(END, 1)[1]
  note = "<!-- made by benchmarks/judge_agreement.py --build_md; do not edit by hand -->\n"
  with open(path, "w", encoding="utf-8") as f:
    f.write(f"{head}{BEGIN}\n{note}{table}{END}{tail}")


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--out", default="benchmarks/results/judge_agreement.json")
  ap.add_argument("--build_md", help="rewrite the generated block of this BUILD.md")
  args = ap.parse_args()
  splits = judge_validation.load_splits()
  results = judge_validation.measure(splits, JUDGES)
  table = markdown(results)
  print(table)
  texts = [r["completion"] for rows in splits.values() for r in rows]
  ms = {}
  for name in JUDGES:
    judge = refusal_judge.get(name)
    start = time.perf_counter()
    for text in texts:
      judge.verdict(text, True)
    ms[name] = 1e3 * (time.perf_counter() - start) / len(texts)
    print(f"{name}: {judge.description}; {ms[name]:.3f} ms per answer (one CPU core)")
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w", encoding="utf-8") as f:
    json.dump({"results": results, "ms_per_answer": ms}, f, indent=1)
  if args.build_md:
    update_build_md(args.build_md, table)


if __name__ == "__main__":
  main()
