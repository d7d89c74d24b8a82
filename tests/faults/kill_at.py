"""Run a launcher and SIGKILL it at a chosen point of its work (the fault suite's injector):

    python tests/faults/kill_at.py append N launch.sample --prompts=... --out=...
    python tests/faults/kill_at.py grade N launch.eval --benchmark=... --generations=...
    python tests/faults/kill_at.py done N launch.study --config=... --workdir=...

`append`: half-way through writing the N-th JSONL line (`lora_jax.jsonl.Appender`, which every
resumable output goes through), so the file ends in a torn line as after a real kill mid-write.
`grade`: as the N-th answer is being graded (`evals.benchmarks._grade_math`). `done`: right
after the N-th completion marker (`done.json`) of a study unit is written. With KILL_AT_PATH
set, only writes to paths containing it are counted."""

import json
import os
import runpy
import signal
import sys

point, n, module, *args = sys.argv[1:]
n, calls = int(n), 0
ONLY = os.environ.get("KILL_AT_PATH", "")


def _count(path: str = "") -> bool:
  global calls
  if ONLY not in str(path):
    return False
  calls += 1
  return calls == n


def _die() -> None:
  os.kill(os.getpid(), signal.SIGKILL)


if point == "append":
  from lora_jax import jsonl

  write = jsonl.Appender.write

  def torn_write(self, record):
    if _count(self.path):
      line = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
      self._f.write(line[: len(line) // 2])
      self._f.flush()
      _die()
    write(self, record)

  jsonl.Appender.write = torn_write
elif point == "grade":
  from evals import benchmarks

  grade_math = benchmarks._grade_math

  def dying_grade(*a, **k):
    if _count():
      _die()
    return grade_math(*a, **k)

  benchmarks._grade_math = dying_grade
elif point == "done":
  from evals import runner

  write_json = runner.write_json

  def dying_write_json(path, obj):
    write_json(path, obj)
    if str(path).endswith("done.json") and _count(path):
      _die()

  runner.write_json = dying_write_json
else:
  raise SystemExit(f"unknown kill point {point!r}: expected append, grade or done")
sys.argv = [module, *args]
runpy.run_module(module, run_name="__main__", alter_sys=True)
