"""`make demo`: the paper's study in miniature on SmolLM2-135M-Instruct, on a CPU, offline
(configs/study/demo.py through evals.study): base, LoRA r1 on up_proj, LoRA r8 on every linear
layer and full fine-tuning, trained on the same refusal set, evaluated at every epoch, their
weights analysed, one report; then a few of their answers and the paper's direction checked on
the numbers (does LoRA raise safety, drift less than full fine-tuning, and move W0 along a
lower-rank, less-overlapping dW?).
"""

from __future__ import annotations

import os

from evals.study import run_study
from evals.study_config import Study
from lora_jax import answers


def run_demo(study: Study, workdir: str) -> dict:
  """Run (or finish) the demo study, print its table, sample answers and direction checks."""
  out = run_study(study, workdir)
  print("\n== the study's table (report: " + out["markdown"] + ")\n")
  print(out["table"])
  _print_answers(study, workdir)
  print("\n== the paper's direction, checked on these numbers")
  for line in out["direction"]:
    print(f"- {line}")
  return out


def _print_answers(study: Study, workdir: str, per_benchmark: int = 1) -> None:
  """The first answers to a harmful and a safe prompt, per variant at its last checkpoint."""
  for bench in (study.safety[0], "xstest"):
    print(f"\n== answers to {bench} prompts (greedy, last checkpoint of each variant)")
    for v in study.variants:
      root = os.path.join(workdir, "evals", v.name)
      labels = sorted(os.listdir(root), key=lambda d: int(d[5:]) if d.startswith("step_") else -1)
      path = os.path.join(root, labels[-1], "generations", f"{bench}.jsonl")
      for a in answers.read_answers(path, missing_ok=True)[:per_benchmark]:
        prompt = a.info.get("prompt", "")
        print(f"[{v.name} {labels[-1]}] user: {prompt[:100]}")
        print(f"  assistant: {' '.join(a.completion.split())[:240]}")
