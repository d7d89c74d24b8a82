"""Training checkpoints with Orbax: async, atomic, every one kept unless told otherwise.

A checkpoint holds the trainable params (the adapter, or the whole model in full fine-tuning), the
optimizer state and a JSON `meta` (step, epoch, data iterator position, config, and a fingerprint
of the base model so a resume onto another model is refused). The RNG needs no saving: every
step's key is fold_in(seed, step). Restore goes onto whatever mesh the abstract target carries, so
a run may resume on a different device layout. Every process calls save/restore (Orbax
coordinates the hosts); no param is ever gathered to one host.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os

import jax
import numpy as np
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)
UNREADABLE = ".unreadable"  # suffix of a checkpoint directory set aside by `restore_latest`


class ResumeError(ValueError):
  pass


class CheckpointWriteError(OSError):
  """A checkpoint that could not be written (a full disk, a quota, a file-size limit)."""


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
    self.async_save = async_save
    options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep, create=True, enable_async_checkpointing=async_save
    )
    self.manager = ocp.CheckpointManager(self.directory, options=options)
    self._pending: int | None = None  # the step being written in the background
    self._reported = False  # a failed write was raised as CheckpointWriteError

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def save(self, step: int, params, opt_state, meta: dict, force: bool = False) -> None:
    """Start writing `step` (in the background with async_save). A write that fails, now or in
    the background, raises CheckpointWriteError at this or the next save/wait/close."""
    with self._writing(step):
      self.manager.save(
        step,
        args=ocp.args.Composite(
          params=ocp.args.StandardSave(params),
          opt_state=ocp.args.StandardSave(opt_state),
          meta=ocp.args.JsonSave(meta),
        ),
        force=force,
      )
    self._pending = step if self.async_save else None

  @contextlib.contextmanager
  def _writing(self, step: int | None):
    """One line for a failed write (an earlier async step's failure surfaces here too); Orbax
    never commits a step it could not finish, so the last complete one is what a rerun uses."""
    try:
      yield
    except (OSError, ValueError) as e:
      if not _is_io_error(e):  # e.g. Orbax's StepAlreadyExistsError: a bug, not the disk
        raise
      if self._reported and step is None:  # Orbax raises a failed write again at every wait
        return
      self._reported = True
      failed = self._pending if self._pending is not None else step
      self._pending = None
      self.manager.reload()
      reason = e.strerror if isinstance(e, OSError) and e.strerror else " ".join(str(e).split())
      full = any(s in reason for s in ("File too large", "No space left", "quota exceeded"))
      raise CheckpointWriteError(
        f"could not write checkpoint step {failed} to {self.directory}: {reason[:300]}"
        f"{' (the disk is full?)' if full else ''}; the last complete checkpoint is step "
        f"{self.latest_step()}"
      ) from e

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

  def restore_latest(self, params_like, opt_state_like=None, fingerprint: dict | None = None):
    """(step, params, opt_state, meta) of the newest checkpoint that reads back, or None when
    there is none. Orbax commits a step atomically (a kill mid-write leaves only a tmp directory
    it ignores), but a committed step can still be damaged: a truncated or deleted file, a copy
    cut short. Such a step is logged, renamed to `<step>.unreadable` (kept for inspection, out of
    Orbax's way) and the one before it is used. A checkpoint of another model (ResumeError) is
    not damage: it stops the run."""
    for step in reversed(self.all_steps()):
      try:
        restored, error = self.restore(step, params_like, opt_state_like, fingerprint), None
      except ResumeError:
        raise
      except Exception as e:  # tensorstore, JSON and file errors alike mean "unreadable"
        restored, error = None, e
      if _all_processes_read(error is None):
        return (step, *restored)
      reason = " ".join(str(error).split())[:300] if error else "unreadable on another process"
      aside = os.path.join(self.directory, f"{step}{UNREADABLE}")
      log.warning(
        "checkpoint %s/%d is unreadable (%s): moved to %s; resuming from the one before it",
        self.directory,
        step,
        reason,
        aside,
      )
      self._set_aside(step, aside)
    return None

  def _set_aside(self, step: int, aside: str) -> None:
    if jax.process_index() == 0:
      os.replace(os.path.join(self.directory, str(step)), aside)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils

      multihost_utils.sync_global_devices(f"set aside checkpoint {step}")
    self.manager.reload()

  def wait(self) -> None:
    with self._writing(None):
      self.manager.wait_until_finished()
    self._pending = None

  def close(self) -> None:
    try:
      self.wait()
    finally:
      with self._writing(None):
        self.manager.close()


def _is_io_error(e: Exception) -> bool:
  """An OSError, or tensorstore's report of one (a ValueError naming the OS error)."""
  return isinstance(e, OSError) or any(
    s in str(e) for s in ("os_error_code", "Error writing", "Failed writing")
  )


def committed_steps(directory: str) -> list[int]:
  """The steps Orbax committed in `directory`, read from the directory names alone (no manager,
  so no barrier: usable when another process has died). In-progress writes are tmp-suffixed."""
  if not os.path.isdir(directory):
    return []
  return sorted(int(n) for n in os.listdir(directory) if n.isdigit())


def _all_processes_read(ok: bool) -> bool:
  """Whether every process read its part of a checkpoint (all must resume from the same step)."""
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils

  return bool(np.all(multihost_utils.process_allgather(np.int32(ok))))


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
