"""Training checkpoints with Orbax: async, atomic, every one kept unless told otherwise.

A checkpoint holds the trainable params (the adapter, or the whole model in full fine-tuning), the
optimizer state and a JSON `meta` (step, epoch, data iterator position, config, and a fingerprint
of the base model so a resume onto another model is refused). The RNG needs no saving: every
step's key is fold_in(seed, step). Restore goes onto whatever mesh the abstract target carries, so
a run may resume on a different device layout. Every process calls save/restore (Orbax
coordinates the hosts); no param is ever gathered to one host.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp


class ResumeError(ValueError):
  pass


def model_fingerprint(model_cfg, train_mode: str, lora_cfg=None) -> dict:
  """What a checkpoint must agree on to be resumed: the model's shapes and what is trained."""
  fp = {
    "family": model_cfg.family,
    "vocab_size": model_cfg.vocab_size,
    "hidden_size": model_cfg.hidden_size,
    "num_layers": model_cfg.num_layers,
    "intermediate_size": model_cfg.intermediate_size,
    "num_heads": model_cfg.num_heads,
    "num_kv_heads": model_cfg.num_kv_heads,
    "mode": train_mode,
  }
  if lora_cfg is not None:
    fp.update(rank=lora_cfg.rank, targets=list(lora_cfg.targets))
  return fp


class Checkpointer:
  def __init__(self, directory: str, max_to_keep: int | None = None, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep, create=True, enable_async_checkpointing=async_save
    )
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def save(self, step: int, params, opt_state, meta: dict, force: bool = False) -> None:
    self.manager.save(
      step,
      args=ocp.args.Composite(
        params=ocp.args.StandardSave(params),
        opt_state=ocp.args.StandardSave(opt_state),
        meta=ocp.args.JsonSave(meta),
      ),
      force=force,
    )

  def read_meta(self, step: int | None = None) -> dict:
    step = self.latest_step() if step is None else step
    return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def read_params(self, step: int, paths) -> dict[tuple[str, ...], np.ndarray]:
    """Only the listed leaves of a checkpoint's params, as host arrays in their saved dtype, e.g.
    paths=[("layers", "up_proj", "kernel")]. An Orbax partial restore: nothing else is read, so
    the weight-space analysis holds one module of a 14B model at a time."""
    tree: dict = {}
    for path in paths:
      node = tree
      for part in path[:-1]:
        node = node.setdefault(part, {})
      node[path[-1]] = ocp.RestoreArgs(restore_type=np.ndarray)
    restored = ocp.PyTreeCheckpointer().restore(
      os.path.join(self.directory, str(step), "params"),
      args=ocp.args.PyTreeRestore(item=tree, restore_args=tree, partial_restore=True),
    )
    out = {}
    for path in paths:
      node = restored
      for part in path:
        node = node[part]
      out[tuple(path)] = node
    return out

  def restore(self, step: int, params_like, opt_state_like=None, fingerprint: dict | None = None):
    """(params, opt_state, meta) restored onto the shardings of `*_like` (arrays or
    ShapeDtypeStructs). opt_state_like=None restores the params only (for export)."""
    meta = self.read_meta(step)
    if fingerprint is not None and meta.get("fingerprint") != fingerprint:
      raise ResumeError(
        f"checkpoint {self.directory}/{step} is of another model or training "
        f"mode: it has {meta.get('fingerprint')}, this run has {fingerprint}"
      )
    args = {"params": ocp.args.StandardRestore(_abstract(params_like))}
    if opt_state_like is not None:
      args["opt_state"] = ocp.args.StandardRestore(_abstract(opt_state_like))
    out = self.manager.restore(step, args=ocp.args.Composite(**args))
    return out["params"], out.get("opt_state") if opt_state_like is not None else None, meta

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def _abstract(tree):
  return jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree
  )


def write_config(workdir: str, config: dict) -> None:
  """The run's config (`RunConfig.to_dict()`) beside its checkpoints (process 0 only)."""
  if jax.process_index() != 0:
    return
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    json.dump(config, f, indent=2)
