"""The paper's study in miniature on SmolLM2-135M-Instruct, on a CPU (`make demo`).

Four variants trained on the same refusal set (lora_jax/data/demo_refusals.jsonl: hand-written
refusals in varied wording, plus a few benign answers): the base model; LoRA rank 1 on up_proj
(the paper's best setting); LoRA rank 8 on every linear layer; full fine-tuning. Each is
evaluated at every epoch's checkpoint on prompts never used in training, drawn with a fixed seed
from ../shared/data: harmful prompts from StrongREJECT, HarmBench and AdvBench (safety, pooled),
XSTest's safe prompts (over-refusal), one-step arithmetic (evals/demo_data/arithmetic.jsonl, which
the base model partly solves) and drift on AlpacaEval prompts; greedy answers, judged by the
offline refusal judge refusal_classifier. Then the weight-space analysis and the report.
"""

import os

from ml_collections import ConfigDict

from configs import demo as demo_train
from evals.study_config import variant

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SHARED = os.path.join(REPO, "..", "shared", "data")
DEMO_DATA = os.path.join(REPO, "evals", "demo_data")


def get_config():
  s = ConfigDict()
  s.train = demo_train.get_config()
  s.train.train.epochs = 2
  s.train.data.eval_fraction = 0.0
  s.train.log.progress = False
  s.variants = [
    variant("base", kind="base"),
    variant("lora_up_r1", overrides={"lora": {"rank": 1, "targets": "up_proj"}}),
    variant("lora_all_r8", overrides={"lora": {"rank": 8, "targets": "qkvo_mlp"}}),
    variant("full", overrides={"train": {"mode": "full", "lr": 2e-5}}),
  ]
  s.checkpoints = "all"
  s.eval = ConfigDict(
    dict(
      benchmarks="strongreject,harmbench,advbench,xstest,arithmetic",
      template="lighteval",  # SmolLM2 never writes \boxed{}: math-verify reads its answers
      seeds="0",
      safety_seeds="0",
      temperature=0.0,
      max_new_tokens=48,
      max_batch=48,
      data={
        "strongreject": os.path.join(SHARED, "strongreject", "strongreject_dataset.csv"),
        "harmbench": os.path.join(SHARED, "harmbench", "harmbench_behaviors_text_all.csv"),
        "advbench": os.path.join(SHARED, "advbench", "harmful_behaviors.csv"),
        "xstest": os.path.join(SHARED, "xstest", "xstest_prompts.csv"),
        "arithmetic": os.path.join(DEMO_DATA, "arithmetic.jsonl"),
      },
      sample={
        "strongreject": 30,
        "harmbench": 30,
        "advbench": 30,
        "xstest": {"n": 60, "label": "safe"},
      },
    )
  )
  s.safety = "strongreject,harmbench,advbench"
  s.drift = ConfigDict(
    dict(prompts=os.path.join(SHARED, "alpaca_eval", "outputs.json"), n=50, max_new_tokens=48)
  )
  s.analysis = ConfigDict(dict(ks="1,4,16,64"))
  return s
