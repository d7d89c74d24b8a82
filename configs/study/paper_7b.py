"""The paper's grid on DeepSeek-R1-Distill-Qwen-7B, as one study (`python -m launch.study
--config=configs/study/paper_7b.py --workdir=runs/paper_7b`).

Every trained variant is a configs/paper/* experiment under its reference mode name (its settings
come from there, not retyped here): full fine-tuning; LoRA rank 1/4/16/64 on qkvo_mlp, mlp and
up_proj alone; up_proj rank 1 on the middle third of the layers; the orthogonal regulariser's
variants; OrthoMerge of LoRA (mlp r1) and of full fine-tuning at k=16. Evaluated at every epoch's
checkpoint on StrongREJECT (safety), AIME 2024, GPQA-Diamond, HumanEval+ and MBPP+ (8 seeds, the
reference template), plus drift on 50 AlpacaEval prompts; data from ../shared/data where it has a
copy (GPQA from the hub). Pass --config.eval.max_batch=... for your accelerator.
"""

import os

from ml_collections import ConfigDict

from configs.paper import common, full, lora, ortho
from evals.study_config import variant

SIZE = "7b"
SHARED = os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "data")


def _paper(module, mode: str = "") -> dict:
  config = module.get_config(f"{SIZE},{mode}" if mode else SIZE)
  return config.to_dict()


def variants() -> list[dict]:
  out = [variant("base", kind="base"), variant("full", overrides=_paper(full))]
  for target, mode in (
    ("qkvo_mlp", "lora_qkvo_mlp"),
    ("mlp", "lora_mlp"),
    ("up", "lora_up_proj_only"),
  ):
    for r in (1, 4, 16, 64):
      out.append(variant(f"lora_{target}_r{r}", overrides=_paper(lora, f"{mode}_r{r}")))
  layer_range = next(m for m in lora.variants(SIZE) if m.startswith("lora_up_proj_only_from"))
  out.append(variant(layer_range, overrides=_paper(lora, layer_range)))
  out += [variant(mode, overrides=_paper(ortho, mode)) for mode in ortho.VARIANTS]
  out.append(variant("orthomerge_lora_mlp_r1", "orthomerge", of="lora_mlp_r1", mode="column", k=16))
  out.append(variant("orthomerge_full", "orthomerge", of="full", mode="column", k=16))
  return out


def get_config():
  s = ConfigDict()
  s.train = common.paper_config(SIZE)
  s.variants = variants()
  s.checkpoints = "all"  # every epoch, as the paper's curves
  s.eval = ConfigDict(
    dict(
      benchmarks="strongreject,aime24,gpqa_diamond,humaneval_plus,mbpp_plus",
      template="reference",
      seeds="0-7",
      safety_seeds="0",
      max_batch=64,
      data={
        "strongreject": os.path.join(SHARED, "strongreject", "strongreject_dataset.csv"),
        "aime24": os.path.join(SHARED, "aime24", "test.jsonl"),
        "humaneval_plus": os.path.join(SHARED, "humanevalplus", "HumanEvalPlus.jsonl.gz"),
        "mbpp_plus": os.path.join(SHARED, "mbppplus", "MbppPlus.jsonl.gz"),
      },
    )
  )
  s.safety = "strongreject"
  s.drift = ConfigDict(
    dict(prompts=os.path.join(SHARED, "alpaca_eval", "outputs.json"), n=50, max_new_tokens=256)
  )
  s.analysis = ConfigDict(dict(ks="1,4,16,64,256"))
  return s
