"""Turn a training checkpoint into something other tools load: a PEFT adapter or a merged model.

    export_checkpoint(workdir, out_dir, fmt="peft" | "merged", step=None)

The base model is rebuilt from the config saved in the workdir, the checkpoint's trainable params
are restored into it, and the result is written with `save_pretrained` (merged HF safetensors,
LoRA folded in) or `save_peft_adapter`. The tokenizer is written beside a merged model.
"""

from __future__ import annotations

import json
import os

from flax import nnx
from ml_collections import ConfigDict

from lora_jax import checkpoint as ckpt_lib
from lora_jax.io import save_pretrained
from lora_jax.io.peft import save_peft_adapter
from lora_jax.train import build_model, lora_config, split_trainable

FORMATS = ("peft", "merged")


def load_run_config(workdir: str) -> ConfigDict:
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"no config.json in {workdir}: is it a training workdir?")
  with open(path) as f:
    return ConfigDict(json.load(f))


def restore_model(workdir: str, step: int | None = None, mesh=None):
  """(model with the checkpoint's weights, tokenizer, config, step)."""
  config = load_run_config(workdir)
  checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
  steps = checkpointer.all_steps()
  if not steps:
    raise FileNotFoundError(f"no checkpoints in {workdir}/checkpoints")
  step = steps[-1] if step is None else step
  if step not in steps:
    raise FileNotFoundError(
      f"no checkpoint for step {step} in {workdir}/checkpoints (have {steps})"
    )
  model, tokenizer = build_model(config, mesh)
  graphdef, trainable, frozen = split_trainable(model, config.train.mode)
  params, _, _ = checkpointer.restore(step, nnx.to_pure_dict(trainable))
  checkpointer.close()
  nnx.replace_by_pure_dict(trainable, params)
  return nnx.merge(graphdef, trainable, frozen), tokenizer, config, step


def export_checkpoint(
  workdir: str, out_dir: str, fmt: str = "peft", step: int | None = None, mesh=None
) -> str:
  if fmt not in FORMATS:
    raise ValueError(f"format={fmt!r}; expected one of {FORMATS}")
  model, tokenizer, config, step = restore_model(workdir, step, mesh)
  if fmt == "peft":
    if config.train.mode != "lora":
      raise ValueError(f"{workdir} is a full fine-tuning run: export it with --format=merged")
    save_peft_adapter(model, out_dir, lora_config(config), config.model.source)
  else:
    save_pretrained(model, out_dir, dtype=config.model.dtype, tokenizer=tokenizer)
  return out_dir
