"""Code answers graded by lora_jax and by EvalPlus 0.3.1's own sanitize + evaluate: do the
verdicts agree, answer by answer, on the base and the plus tests?

The answers (`benchmarks/code_answer_shapes.py`) are HumanEval+ and MBPP+ problems' canonical
solutions, mutated, slow and broken, in the shapes models write (fences, prose, usage examples,
test calls, thinking, no fence, body only, ...). Each is graded twice:
- lora_jax: `evals.code_grader.grade_code` on the raw answer (it extracts with
  `evals.code_extract`);
- EvalPlus: `evalplus.sanitize.sanitize` on the text its codegen would hand it (a chat model's
  answer; a completion model's after the prompt; the thinking dropped, as lora_jax does, and
  for the thinking shapes also kept: `raw`), then `evalplus.evaluate.check_correctness` with
  its defaults (fast check, 1 s minimum and 4x time limits), on ground truth it computes itself.

Prints a table per shape and per program variant, then every disagreement with both programs,
and writes JSON. Needs evalplus 0.3.1 (`pip install --no-deps evalplus==0.3.1`, see BUILD.md)
and the EvalPlus release files (`../shared/data/`, or `--humaneval_plus` / `--mbpp_plus`).

    python benchmarks/code_extract_agreement.py --problems 12 --workers 2
"""

from __future__ import annotations

import argparse
import difflib
import hashlib
import os
import random
import sys
import time
from concurrent.futures import ProcessPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.code_answer_shapes import SHAPES, VARIANTS, make_answers  # noqa: E402
from benchmarks.common import print_table, write_json  # noqa: E402

SHARED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data")
RELEASES = {
  "humaneval_plus": (
    "humaneval",
    "HUMANEVAL_OVERRIDE_PATH",
    "humanevalplus/HumanEvalPlus.jsonl.gz",
  ),
  "mbpp_plus": ("mbpp", "MBPP_OVERRIDE_PATH", "mbppplus/MbppPlus.jsonl.gz"),
}
THINKING = tuple(s for s in SHAPES if s.startswith("think"))


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--problems", type=int, default=12, help="problems per benchmark")
  ap.add_argument("--seed", type=int, default=0, help="which problems")
  ap.add_argument("--workers", type=int, default=2)
  ap.add_argument(
    "--slow_loads",
    type=int,
    default=1,
    help="problems per benchmark given a program that never finishes loading (each costs ~2 min)",
  )
  ap.add_argument("--humaneval_plus", default=os.path.join(SHARED, RELEASES["humaneval_plus"][2]))
  ap.add_argument("--mbpp_plus", default=os.path.join(SHARED, RELEASES["mbpp_plus"][2]))
  ap.add_argument("--out", default="benchmarks/results/code_extract_agreement.json")
  args = ap.parse_args()
  paths = {"humaneval_plus": args.humaneval_plus, "mbpp_plus": args.mbpp_plus}
  for benchmark, path in paths.items():
    if not os.path.isfile(path):
      raise SystemExit(f"--{benchmark}: no EvalPlus release file at {path}")
    os.environ[RELEASES[benchmark][1]] = os.path.abspath(path)  # read when evalplus is imported
  try:
    import evalplus.sanitize  # noqa: F401
  except ImportError as e:
    raise SystemExit(
      f"evalplus 0.3.1 is needed ({e}): pip install --no-deps evalplus==0.3.1 "
      "tree-sitter tree-sitter-python wget tempdir appdirs"
    ) from None

  records, timing = [], {"lora_jax_s": 0.0, "evalplus_s": 0.0}
  for benchmark, path in paths.items():
    records += compare(benchmark, path, args, timing)
  summary = summarise(records)
  report(summary, records, timing)
  write_json(
    args.out, {"args": vars(args), "timing": timing, "summary": summary, "answers": records}
  )


def compare(benchmark: str, path: str, args, timing: dict) -> list[dict]:
  """One record per answer: both programs and both verdicts."""
  from evals.code_data import load_problems
  from evals.code_extract import extract_code
  from evals.code_grader import grade_code

  problems = load_problems(benchmark, path)
  chosen = sorted(
    random.Random(args.seed).sample(sorted(problems), args.problems), key=list(problems).index
  )
  subset = {t: problems[t] for t in chosen}
  answers = make_answers(benchmark, subset, args.slow_loads)
  print(f"{benchmark}: {len(answers)} answers to {len(chosen)} problems: {', '.join(chosen)}")

  start = time.perf_counter()
  for a in answers:  # extraction alone, timed (grade_code extracts again, in its workers)
    p = subset[a["task_id"]]
    extract_code(a["completion"], p["entry_point"], p["prompt"])
  timing["lora_jax_s"] += time.perf_counter() - start
  start = time.perf_counter()
  ours = grade_code(
    benchmark,
    subset,
    [{"task_id": a["task_id"], "completion": a["completion"]} for a in answers],
    workers=args.workers,
    progress=False,
  )
  timing[f"{benchmark}_lora_jax_grading_s"] = round(time.perf_counter() - start, 1)
  theirs = evalplus_verdicts(benchmark, chosen, answers, args.workers, timing)
  records = []
  for a, o, t in zip(answers, ours, theirs):
    r = {
      **a,
      "benchmark": benchmark,
      "code": o["extracted_code"],
      "base": o["base_status"],
      "plus": o["plus_status"],
      "reason": o["reason"],
      "evalplus": t,
    }
    r["same_code"] = r["code"] == t["answer"]["code"]
    r["base_agree"] = r["base"] == t["answer"]["base"]
    r["plus_agree"] = r["plus"] == t["answer"]["plus"]
    if "raw" in t:
      r["raw_agree"] = (r["base"], r["plus"]) == (t["raw"]["base"], t["raw"]["plus"])
    records.append(r)
  return records


def evalplus_verdicts(benchmark, task_ids, answers, workers, timing) -> list[dict]:
  """EvalPlus's program and verdicts for every answer: {"answer": {...}, "raw": {...}} (raw:
  the thinking kept, thinking shapes only). Each distinct program is evaluated once."""
  from evalplus import data as ep_data
  from evalplus.eval._special_oracle import MBPP_OUTPUT_NOT_NONE_TASKS
  from evalplus.evaluate import check_correctness, get_groundtruth
  from evalplus.sanitize import sanitize

  dataset = RELEASES[benchmark][0]
  if dataset == "humaneval":
    every, digest, not_none = ep_data.get_human_eval_plus(), ep_data.get_human_eval_plus_hash(), []
  else:
    every, digest, not_none = ep_data.get_mbpp_plus(), ep_data.get_mbpp_plus_hash(), None
    not_none = MBPP_OUTPUT_NOT_NONE_TASKS
  problems = {t: every[t] for t in task_ids}
  key = hashlib.sha256((digest + ",".join(task_ids)).encode()).hexdigest()[:16]
  expected = get_groundtruth(problems, f"lora_jax_agreement_{dataset}_{key}", not_none)

  def program(a, keep_thinking):
    text = a["completion"] if keep_thinking else a["completion"].rsplit("</think>", 1)[-1]
    if a["mode"] == "completion":  # codegen: prompt.strip() + "\n" + the model's output
      text = problems[a["task_id"]]["prompt"].strip() + "\n" + text
    start = time.perf_counter()
    code = sanitize(text, problems[a["task_id"]]["entry_point"])
    timing["evalplus_s"] += time.perf_counter() - start
    return code

  out = []
  for a in answers:
    row = {"answer": {"code": program(a, False)}}
    if a["shape"] in THINKING:
      row["raw"] = {"code": program(a, True)}
    out.append(row)
  jobs = {(a["task_id"], v["code"]) for a, row in zip(answers, out) for v in row.values()}
  start = time.perf_counter()
  with ProcessPoolExecutor(workers) as pool:
    futures = {
      (t, code): pool.submit(
        check_correctness, dataset, 0, problems[t], code, expected[t], False, True, None
      )
      for t, code in sorted(jobs)
    }
    verdicts = {k: (f.result()["base"][0], f.result()["plus"][0]) for k, f in futures.items()}
  timing[f"{benchmark}_evalplus_grading_s"] = round(time.perf_counter() - start, 1)
  for a, row in zip(answers, out):
    for v in row.values():
      v["base"], v["plus"] = verdicts[(a["task_id"], v["code"])]
  return out


# --- summary ------------------------------------------------------------------------------------


def summarise(records: list[dict]) -> dict:
  def counts(rs):
    n = len(rs)
    row = {
      "answers": n,
      "lora_jax_pass": sum(r["base"] == r["plus"] == "pass" for r in rs),
      "evalplus_pass": sum(
        r["evalplus"]["answer"]["base"] == r["evalplus"]["answer"]["plus"] == "pass" for r in rs
      ),
      "same_code": sum(r["same_code"] for r in rs),
      "base_agree": sum(r["base_agree"] for r in rs),
      "plus_agree": sum(r["plus_agree"] for r in rs),
      "both_agree": sum(r["base_agree"] and r["plus_agree"] for r in rs),
    }
    raw = [r for r in rs if "raw_agree" in r]
    if raw:
      row["raw_answers"], row["raw_both_agree"] = len(raw), sum(r["raw_agree"] for r in raw)
    return row

  return {
    "by_shape": {
      s: counts([r for r in records if r["shape"] == s])
      for s in SHAPES
      if any(r["shape"] == s for r in records)
    },
    "by_variant": {
      v: counts([r for r in records if r["variant"] == v])
      for v in VARIANTS
      if any(r["variant"] == v for r in records)
    },
    "by_benchmark": {b: counts([r for r in records if r["benchmark"] == b]) for b in RELEASES},
    "all": counts(records),
  }


def report(summary: dict, records: list[dict], timing: dict) -> None:
  header = [
    "",
    "answers",
    "pass (ours / EvalPlus)",
    "same program",
    "base agree",
    "plus agree",
    "both agree",
    "vs EvalPlus on raw thinking",
  ]
  for title, group in (
    ("shape", "by_shape"),
    ("program", "by_variant"),
    ("benchmark", "by_benchmark"),
  ):
    rows = [[name, *_cells(c)] for name, c in summary[group].items()]
    rows.append(["all", *_cells(summary["all"])])
    print_table(
      f"Agreement with EvalPlus 0.3.1 sanitize + evaluate, by {title}", [title, *header[1:]], rows
    )
  print(
    f"\nextraction time over all answers: lora_jax {timing['lora_jax_s']:.2f} s, "
    f"EvalPlus sanitize {timing['evalplus_s']:.2f} s"
  )
  print("\nDisagreements (with EvalPlus; with EvalPlus given the thinking too):")
  for r in records:
    if not (r["base_agree"] and r["plus_agree"]):
      _print_disagreement(r, r["evalplus"]["answer"], "EvalPlus")
    if not r.get("raw_agree", True):
      _print_disagreement(r, r["evalplus"]["raw"], "EvalPlus on the raw answer")


def _print_disagreement(r: dict, theirs: dict, who: str) -> None:
  print(
    f"\n* {r['task_id']} | {r['shape']} | {r['variant']}: lora_jax {r['base']}/{r['plus']} "
    f"({r['reason'] or 'passed'}), {who} {theirs['base']}/{theirs['plus']}"
  )
  if r["code"] == theirs["code"]:
    print("  same program: the graders differ")
    return
  diff = difflib.unified_diff(
    r["code"].split("\n"), theirs["code"].split("\n"), "lora_jax", who, lineterm="", n=1
  )
  print("\n".join("  " + line for line in list(diff)[:30]))


def _cells(c: dict) -> list[str]:
  n = c["answers"]
  raw = f"{c['raw_both_agree']}/{c['raw_answers']}" if "raw_answers" in c else ""
  return [
    n,
    f"{c['lora_jax_pass']} / {c['evalplus_pass']}",
    f"{c['same_code']}/{n}",
    f"{c['base_agree']}/{n}",
    f"{c['plus_agree']}/{n}",
    f"{c['both_agree']}/{n}",
    raw,
  ]


if __name__ == "__main__":
  main()
