"""Settings shared by every reference experiment (paper-setup.md; the reference's train.py).

Select a model and a mode with the config string, in the reference's own mode names:

  --config=configs/paper/lora.py:7b,lora_up_proj_only_from16_to31_r1
  --config=configs/paper/ortho.py:14b,lora_mlp_orthogonal_norm_r1_beta0.1_k16
  --config=configs/paper/full.py:7b

Loss tokens (`data.loss_on`). The reference hands (prompt, completion) pairs to TRL's SFTTrainer
without pinning TRL: 0.15 and 0.16 concatenate the pair and train on every token, 0.17 trains on
the completion only. Its environment.yml pins transformers==4.47.1, and TRL 0.18 and later need
transformers>=4.50, so the newest TRL the reference could have run with it is 0.17
(lora_jax/data/formats.py, whose tokenisation is 0.17's). The paper configs therefore use
`data.loss_on="completion"`; that the reference ran 0.17 is a deduction, not a record, so
`--config.data.loss_on=all` gives the 0.15 / 0.16 behaviour for comparison.

These configs hold the training settings only. The reference's evaluation settings (judges,
budgets, bfloat16 merge, answer rules, data files) are one preset of the evaluator:
`python -m launch.eval --preset=reference ...` (evals/presets.py; README, "Reference vs fast").
"""

from configs import base

MODELS = {  # size -> (hub id, number of decoder layers)
  "1.5b": ("deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B", 28),
  "7b": ("deepseek-ai/DeepSeek-R1-Distill-Qwen-7B", 28),
  "14b": ("deepseek-ai/DeepSeek-R1-Distill-Qwen-14B", 48),
  "32b": ("deepseek-ai/DeepSeek-R1-Distill-Qwen-32B", 64),
}


def split(config_string: str, family: str) -> tuple[str, str]:
  size, _, mode = (config_string or "").partition(",")
  size = size.strip().lower()
  if size not in MODELS:
    raise ValueError(
      f"configs/paper/{family}.py:SIZE,MODE: size {size!r} is not one of {sorted(MODELS)}"
    )
  return size, mode.strip()


def paper_config(size: str):
  """DirectRefusal in the DeepSeek format, AdamW lr 5e-5 (0.9, 0.999, 1e-8), weight decay 1e-4,
  cosine without warm-up, clip 1.0, global batch 2, no accumulation, a checkpoint every epoch."""
  c = base.get_config()
  c.model.source, _ = MODELS[size]
  c.train.precision = "reference"  # the reference's torch numerics (lora_jax/precision.py)
  c.model.remat = "none" if size in ("1.5b", "7b") else "full"
  c.data.source = "TianshengHuang/DirectRefusal"
  c.data.format = "direct_refusal"
  c.data.max_length = 1024
  c.train.batch_size = 2
  c.train.grad_accum = 1
  c.train.lr = 5e-5
  c.train.weight_decay = 1e-4
  c.train.schedule = "cosine"
  c.train.warmup_steps = 0
  c.train.clip_norm = 1.0
  c.data.loss_on = "completion"  # TRL 0.17's prompt-completion default; see the docstring
  c.ortho.k_mode = "reference"  # the reference's walk: k on the first module, min(k, r) after
  c.checkpoint.every_epoch = True
  c.mesh.shape = "fsdp:-1"
  return c
