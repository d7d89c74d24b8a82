"""save_pretrained: a `Decoder` -> HF safetensors + config.json that transformers loads.

Params are gathered one at a time (across hosts too), so host memory holds at most one param plus
one output shard. An unmerged LoRA adapter is merged on the way out (W + scale * A @ B).
"""

from __future__ import annotations

import json
import os

import jax
import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

from lora_jax.io.mapping import entries
from lora_jax.model import Decoder, lora_weight_delta

_NP_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}


def to_host(x) -> np.ndarray:
  """A full numpy copy of a (possibly multi-host sharded) array."""
  x = x[...] if hasattr(x, "get_metadata") else x
  if jax.process_count() > 1 and not x.is_fully_addressable:
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


def save_pretrained(
  model: Decoder,
  out_dir: str,
  *,
  dtype: str | None = None,
  max_shard_bytes: int = 5 * 2**30,
  tokenizer=None,
) -> None:
  """Write `out_dir/{config.json, model*.safetensors[, index]}` (and the tokenizer if given).

  dtype: stored dtype (default: the model's param dtype). Every process must call this (params
  are gathered collectively); only process 0 writes.
  """
  cfg = model.config
  dtype = dtype or str(model.embed[...].dtype)
  if dtype not in _NP_DTYPES:
    raise ValueError(f"dtype={dtype!r}; expected one of {sorted(_NP_DTYPES)}")
  np_dtype = _NP_DTYPES[dtype]
  writer = jax.process_index() == 0
  if writer:
    os.makedirs(out_dir, exist_ok=True)
  shards: list[dict[str, np.ndarray]] = [{}]
  sizes = [0]
  files: list[str] = []

  def flush():
    if writer and shards[-1]:
      name = f"model-{len(files) + 1:05d}.safetensors.tmp"
      save_file(shards[-1], os.path.join(out_dir, name), metadata={"format": "pt"})
      files.append(name)
    shards[-1], sizes[-1] = {}, 0

  weight_map = {}
  for e in entries(cfg):
    arr = _merged(model, e.path)
    tensors = (
      [(e.hf.format(i=i), arr[i]) for i in range(arr.shape[0])] if e.stacked else [(e.hf, arr)]
    )
    for name, t in tensors:
      t = np.ascontiguousarray(t.astype(np_dtype))
      if sizes[-1] and sizes[-1] + t.nbytes > max_shard_bytes:
        flush()
      shards[-1][name] = t
      sizes[-1] += t.nbytes
      weight_map[name] = len(files)
    del arr, tensors
  flush()
  if not writer:
    return
  _name_shards(out_dir, files, weight_map)
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump(cfg.to_hf(dtype), f, indent=2)
  if tokenizer is not None:
    tokenizer.save_pretrained(out_dir)


def _name_shards(out_dir: str, files: list[str], weight_map: dict[str, int]) -> None:
  """Give the written `.tmp` shards their final names (HF's, so a kill leaves no half model under
  them) and write the index when there is more than one."""
  total = len(files)
  if total == 1:
    os.replace(os.path.join(out_dir, files[0]), os.path.join(out_dir, "model.safetensors"))
    return
  final = [f"model-{i + 1:05d}-of-{total:05d}.safetensors" for i in range(total)]
  for tmp, name in zip(files, final):
    os.replace(os.path.join(out_dir, tmp), os.path.join(out_dir, name))
  index = {
    "metadata": {"total_size": sum(os.path.getsize(os.path.join(out_dir, f)) for f in final)},
    "weight_map": {n: final[i] for n, i in sorted(weight_map.items())},
  }
  with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
    json.dump(index, f, indent=2)


def _merged(model: Decoder, path: str) -> np.ndarray:
  """A param on the host; for a LoRA-adapted kernel, W + scale * A @ B per layer."""
  parent, leaf = path.rsplit(".", 1) if "." in path else (None, path)
  obj = model
  for part in parent.split(".") if parent else []:
    obj = getattr(obj, part)
  w = to_host(getattr(obj, leaf))
  if leaf == "kernel" and getattr(obj, "lora_a", None) is not None:
    delta = lora_weight_delta(to_host(obj.lora_a), to_host(obj.lora_b), to_host(obj.lora_scale))
    w = (w.astype(np.float32) + delta).astype(w.dtype)
  return w
