"""Issue 9's "no slower" check: the kernel benchmarks on two checkouts of lora_jax, alternating.

The same scripts (this checkout's benchmarks/train.py workers and the decode worker below) run
with `lora_jax` imported from `--old` (default: a worktree of 6ac8b20, before the refactor) and
from `--new` (this checkout), each side resident in its own process, `--repeats` alternating
rounds (old, new, new, old, ...). Reported: new / old throughput (>= 1.0 means no slower), with
the spread of the per-round ratios.

  git worktree add /work/wt/bench_old 6ac8b20
  python benchmarks/ab_refactor.py --old /work/wt/bench_old [--layers 8] [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.environ.get("BENCH_LIB", os.path.dirname(HERE)))
import common  # noqa: E402  (pins thread counts before numpy/jax load)
import numpy as np  # noqa: E402

PROMPT_LEN = 128


def decode_worker(a) -> None:
  """Greedy decoding of `--new_tokens` tokens for `--batch` random 128-token prompts."""
  import lora_jax
  from lora_jax.sampling import Engine, Request

  state = {}

  def setup():
    model = lora_jax.load_pretrained(a.ckpt_dir, dtype="float32")
    prompts = np.random.RandomState(0).randint(0, 151936, (a.batch, PROMPT_LEN)).tolist()
    engine = Engine(model, max_len=PROMPT_LEN + a.new_tokens, max_batch=a.batch, stop_token_ids=())
    state.update(engine=engine, prompts=prompts)
    t = time.perf_counter()
    run_once()
    return {"first_run_s": time.perf_counter() - t, "lib": lora_jax.__file__}

  def run_once():
    reqs = [Request(p, a.new_tokens, index=i) for i, p in enumerate(state["prompts"])]
    out = list(state["engine"].run(reqs))
    assert all(len(c.token_ids) == a.new_tokens for c in out)
    return {"tokens": a.batch * a.new_tokens}

  common.serve(setup, run_once)


def pair(a, name: str, script: str, args: list[str]) -> dict:
  old = common.Worker("old", script, *args, env={"BENCH_LIB": a.old})
  new = common.Worker("new", script, *args, env={"BENCH_LIB": a.new})
  print(f"{name}: set up (old {old.setup}, new {new.setup})", flush=True)
  runs = common.alternate([old, new], a.repeats)
  old.close(), new.close()
  return compare(runs)


def compare(runs: dict) -> dict:
  wall = {k: common.summary([r["wall_s"] for r in v]) for k, v in runs.items()}
  per_round = common.summary([o["wall_s"] / n["wall_s"] for o, n in zip(runs["old"], runs["new"])])
  return dict(
    wall_s=wall,
    cpu_s={k: common.summary([r["cpu_s"] for r in v]) for k, v in runs.items()},
    new_over_old_speed=wall["old"]["median"] / wall["new"]["median"],
    per_round=per_round,
  )


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--worker", action="store_true")
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--new_tokens", type=int, default=64)
  p.add_argument("--old", default="/work/wt/bench_old")
  p.add_argument("--new", default=os.path.dirname(HERE))
  p.add_argument("--layers", type=int, default=8, help="decoder layers (24 in Qwen2.5-0.5B)")
  p.add_argument("--steps", type=int, default=1, help="train steps per repeat")
  p.add_argument("--seq", type=int, default=512)
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--cases", default="train_lora,train_full,decode_b1,decode_b8")
  p.add_argument("--ckpt_dir", default=None)
  p.add_argument("--out", default="benchmarks/results/ab_refactor.json")
  p.add_argument("--from_log", default=None, help="the cases an interrupted run's log shows")
  a = p.parse_args()
  a.ckpt_dir = a.ckpt_dir or os.path.join(
    tempfile.gettempdir(), f"lora_jax_bench_qwen05b_{a.layers}l"
  )
  if a.worker:
    return decode_worker(a)
  before = common.machine()
  common.write_checkpoint_if_missing(a.ckpt_dir, num_layers=a.layers)
  train_script = os.path.join(HERE, "train.py")
  results = {}
  if a.from_log:
    for head, runs in common.runs_from_log(a.from_log):
      results[head.split(":", 1)[0]] = dict(compare(runs), source=f"log: {head}")
  for case in a.cases.split(",") if not a.from_log else ():
    if case.startswith("train_"):
      args = ["--side", "jax", "--mode", case[6:], "--steps", str(a.steps)]
      args += ["--seq", str(a.seq), "--ckpt_dir", a.ckpt_dir]
      results[case] = pair(a, case, train_script, args)
    else:
      args = ["--batch", case[len("decode_b") :], "--new_tokens", str(a.new_tokens)]
      results[case] = pair(a, case, __file__, args + ["--ckpt_dir", a.ckpt_dir])
  common.write_json(
    a.out,
    dict(benchmark="ab_refactor", settings=vars(a), results=results),
    before,
  )
  rows = [
    [
      case,
      common.fmt(r["wall_s"]["old"]),
      common.fmt(r["wall_s"]["new"]),
      f"{r['new_over_old_speed']:.2f}",
      common.fmt(r["per_round"]),
      common.verdict(r["new_over_old_speed"], 1.0),
    ]
    for case, r in results.items()
  ]
  common.print_table(
    f"lora_jax {a.old} (old) vs {a.new} (new): Qwen2.5-0.5B shape with {a.layers} layers, "
    f"float32; wall s per repeat, median (min-max) of {a.repeats} alternating repeats",
    ["case", "old s", "new s", "new speed / old", "per-round ratio", "no slower"],
    rows,
  )


if __name__ == "__main__":
  main()
