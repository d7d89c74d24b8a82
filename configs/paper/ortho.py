"""LoRA on the MLP with the reference's orthogonal regulariser (train.py mode names):

  lora_mlp_orthogonal[_down][_uniform][_norm][_both]_r{r}_beta{beta}_k{k}

LoRA always adapts gate, up and down (rank r, alpha 16, dropout 0.05); the penalty covers all three,
or down_proj only with `_down`; `_uniform` drops S_k, `_norm` normalises, `_both` penalises both
sides. The paper's beta and k are unverified; they are in the name. Example:
  --config=configs/paper/ortho.py:14b,lora_mlp_orthogonal_norm_r1_beta0.1_k16
"""

import re

from configs.paper import common

# The combinations train.py accepts (suffix -> (down only, uniform, normalize, mode)).
SUFFIXES = {
  "": (False, False, False, "column"),
  "_norm": (False, False, True, "column"),
  "_down": (True, False, False, "column"),
  "_down_uniform": (True, True, False, "column"),
  "_down_norm": (True, False, True, "column"),
  "_down_uniform_norm": (True, True, True, "column"),
  "_norm_both": (False, False, True, "both"),
  "_uniform_norm_both": (False, True, True, "both"),
}
VARIANTS = [f"lora_mlp_orthogonal{s}_r1_beta0.1_k16" for s in SUFFIXES]


def parse_mode(mode: str):
  m = re.fullmatch(r"lora_mlp_orthogonal(\w*?)_r(\d+)_beta([\d.]+)_k(\d+)", mode)
  if not m or m[1] not in SUFFIXES:
    raise ValueError(
      f"unknown orthogonal mode {mode!r}; expected lora_mlp_orthogonal"
      f"{{{'|'.join(s for s in SUFFIXES if s)}}}_r{{r}}_beta{{b}}_k{{k}}"
    )
  down, uniform, normalize, ortho_mode = SUFFIXES[m[1]]
  return dict(
    rank=int(m[2]),
    beta=float(m[3]),
    k=int(m[4]),
    down_only=down,
    weighted=not uniform,
    normalize=normalize,
    mode=ortho_mode,
  )


def get_config(config_string: str = "7b,lora_mlp_orthogonal_r1_beta0.1_k16"):
  size, mode = common.split(config_string, "ortho")
  p = parse_mode(mode or VARIANTS[0])
  c = common.paper_config(size)
  c.train.mode = "lora"
  c.train.epochs = 10
  c.lora.rank = p["rank"]
  c.lora.targets = "mlp"
  c.lora.alpha, c.lora.dropout = 16.0, 0.05
  c.ortho.beta = p["beta"]
  c.ortho.k = p["k"]
  c.ortho.mode = p["mode"]
  c.ortho.weighted = p["weighted"]
  c.ortho.normalize = p["normalize"]
  c.ortho.targets = "down_proj" if p["down_only"] else "gate_proj,up_proj,down_proj"
  c.ortho.span_dtype = "bfloat16"
  c.ortho.svd = "randomized"
  return c
