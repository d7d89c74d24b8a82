"""Full fine-tuning as the reference: lr 5e-5, 5 epochs (the 32B model: 1 epoch, as the
reference's README runs it with DeepSpeed ZeRO-3), pure bfloat16 (train.precision="reference":
bfloat16 weights and AdamW moments, as its 7B/14B runs; its 32B run used DeepSpeed's float16 with
float32 master weights instead, which we do not reproduce), sharded with FSDP.

  --config=configs/paper/full.py:7b
"""

from configs.paper import common

VARIANTS = ["full"]


def get_config(config_string: str = "7b"):
  size, mode = common.split(config_string, "full")
  if mode not in ("", "full"):
    raise ValueError(f"configs/paper/full.py takes only a size (got mode {mode!r})")
  c = common.paper_config(size)
  c.train.mode = "full"
  c.train.epochs = 1 if size == "32b" else 5
  c.model.remat = "full"
  return c
