"""Building a run's model: the base model, its adapter, and the trainable/frozen split.

Training builds it from a `RunConfig`; export and evaluation rebuild it from a workdir (its saved
config.json and a checkpoint), so both sides make exactly the same model.

    model, tokenizer = build_model(cfg, mesh)
    graphdef, trainable, frozen = split_trainable(model, cfg.train.mode)
    model, tokenizer, cfg, step = restore_model(workdir, step=None)
"""

from __future__ import annotations

import json
import os

import jax
from flax import nnx

from lora_jax import checkpoint as ckpt_lib
from lora_jax import lora as lora_lib
from lora_jax.io import load_pretrained, load_tokenizer
from lora_jax.precision import numerics
from lora_jax.run_config import RunConfig, from_dict


def build_model(cfg: RunConfig, mesh=None):
  """The model to train (with its fresh adapter in LoRA mode) and its tokenizer."""
  m = cfg.model
  model = load_pretrained(
    m.source,
    dtype=m.dtype,
    mesh=mesh,
    compute_dtype=m.compute_dtype or None,
    remat=m.remat,
    attention=m.attention,
  )
  model.residual_dtype = numerics(cfg.train.precision, cfg.train.mode).residual_dtype
  tokenizer = load_tokenizer(m.tokenizer_source)
  if cfg.adapter is not None:
    lora_lib.apply_lora(model, cfg.adapter, seed=cfg.train.seed)
  return model, tokenizer


def split_trainable(model, mode: str):
  """(graphdef, trainable, frozen): LoRA trains only the adapters; full trains every Param."""
  return nnx.split(model, nnx.LoRAParam if mode == "lora" else nnx.Param, ...)


_identity_donated = jax.jit(lambda x: x, donate_argnums=0)


def own_buffers(tree):
  """The same arrays in buffers XLA allocated. On CPU, load_pretrained hands JAX the host buffers
  it read the checkpoint into (zero-copy); XLA cannot reuse such a buffer for a donated output, so
  the first train step would hold the trainable params twice. A donated identity copies each leaf
  into an XLA buffer and frees the original, one leaf at a time (XLA-owned leaves pass through
  without a copy)."""
  return jax.tree.map(_identity_donated, tree)


def load_run_config(workdir: str) -> RunConfig:
  """The config a workdir was trained with (its config.json; keys this version does not know
  are logged and ignored, so older workdirs still load)."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"no config.json in {workdir}: is it a training workdir?")
  with open(path) as f:
    return from_dict(json.load(f), strict=False)


def checkpoint_steps(workdir: str) -> list[int]:
  """Steps of the workdir's checkpoints, oldest first."""
  if not os.path.isdir(os.path.join(workdir, "checkpoints")):  # opening one would create it
    return []
  checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
  steps = checkpointer.all_steps()
  checkpointer.close()
  return steps


def restore_model(workdir: str, step: int | None = None, mesh=None):
  """(model with the checkpoint's weights, tokenizer, run config, step); the latest step unless
  one is asked for."""
  cfg = load_run_config(workdir)
  checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
  try:
    steps = checkpointer.all_steps()
    if not steps:
      raise FileNotFoundError(f"no checkpoints in {workdir}/checkpoints")
    step = steps[-1] if step is None else step
    if step not in steps:
      raise FileNotFoundError(
        f"no checkpoint for step {step} in {workdir}/checkpoints (have {steps})"
      )
    model, tokenizer = build_model(cfg, mesh)
    graphdef, trainable, frozen = split_trainable(model, cfg.train.mode)
    params, _, _ = checkpointer.restore(step, nnx.to_pure_dict(trainable))
  finally:
    checkpointer.close()
  nnx.replace_by_pure_dict(trainable, params)
  return nnx.merge(graphdef, trainable, frozen), tokenizer, cfg, step
