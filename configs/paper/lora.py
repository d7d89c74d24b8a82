"""LoRA experiments, with the reference's mode names (train.py, parse_config_string):

  lora_qkvo_mlp_r{r}                    q, k, v, o, gate, up, down on every layer
  lora_mlp_r{r}                         gate, up, down
  lora_{module}_only_r{r}               one module, e.g. lora_up_proj_only_r1
  lora_{module}_only_from{a}_to{b}_r{r} one module (or "mlp") on layers a..b inclusive

Every mode: alpha 16, dropout 0.05, 10 epochs. Example:
  --config=configs/paper/lora.py:14b,lora_up_proj_only_from16_to31_r1
"""

import re

from configs.paper import common

PATTERNS = [
  (r"lora_qkvo_mlp_r(\d+)", lambda m: ("qkvo_mlp", "", m[1])),
  (r"lora_mlp_r(\d+)", lambda m: ("mlp", "", m[1])),
  (r"lora_(.+?)_only_r(\d+)", lambda m: (m[1], "", m[2])),
  (r"lora_(.+?)_only_from(\d+)_to(\d+)_r(\d+)", lambda m: (m[1], f"{m[2]}-{m[3]}", m[4])),
]


# The paper's grid: ranks 1..64 on qkvo_mlp and mlp, single modules, and a middle-layer range.
# The range 16..31 of the 14B model is the paper's; other sizes take their middle third (ours).
def variants(size: str) -> list[str]:
  layers = common.MODELS[size][1]
  lo, hi = (16, 31) if size == "14b" else (layers // 3, 2 * layers // 3 - 1)
  return (
    [f"lora_qkvo_mlp_r{r}" for r in (1, 4, 8, 16, 32, 64)]
    + [f"lora_mlp_r{r}" for r in (1, 4, 8, 16, 32, 64)]
    + [f"lora_{m}_only_r{r}" for m in ("up_proj", "down_proj", "gate_proj") for r in (1, 4, 16)]
    + [f"lora_up_proj_only_from{lo}_to{hi}_r1", f"lora_mlp_only_from{lo}_to{hi}_r1"]
  )


def parse_mode(mode: str) -> tuple[str, str, int]:
  """(targets, layers, rank) of a reference mode string."""
  for pattern, fields in PATTERNS:
    m = re.fullmatch(pattern, mode)
    if m:
      targets, layers, rank = fields(m)
      return targets, layers, int(rank)
  raise ValueError(
    f"unknown LoRA mode {mode!r}; expected e.g. lora_qkvo_mlp_r4, lora_mlp_r1, "
    f"lora_up_proj_only_r1, lora_up_proj_only_from16_to31_r1"
  )


def get_config(config_string: str = "7b,lora_up_proj_only_r1"):
  size, mode = common.split(config_string, "lora")
  c = common.paper_config(size)
  targets, layers, rank = parse_mode(mode or "lora_up_proj_only_r1")
  c.train.mode = "lora"
  c.train.epochs = 10
  c.lora.rank = rank
  c.lora.alpha = 16.0
  c.lora.dropout = 0.05
  c.lora.targets = targets
  c.lora.layers = layers
  return c
