"""How many sequences fit: the KV cache's size from the config against a memory budget.

The budget is the free device memory when the backend reports it (GPU/TPU), else host RAM
(psutil's available memory; CPU devices, real or fake, share it), or `max_cache_gb` when given.
A batch that does not fit is refused with the numbers, or shrunk when asked for ("auto").
"""

from __future__ import annotations

import logging
import math

import jax
import numpy as np

from lora_jax.config import ModelConfig
from lora_jax.sampling.forward import CACHE_AXES
from lora_jax.sharding import logical_to_spec

log = logging.getLogger(__name__)
GiB = 1 << 30
_AUTO_MAX_BATCH = 256  # "auto" never asks for more rows than this


class SamplingError(ValueError):
  """A sampling request that cannot run as asked (one line, with the numbers)."""


def budget(mesh, max_cache_gb: float | None) -> tuple[float, str]:
  """(bytes the sampler may allocate, where the number came from)."""
  if max_cache_gb is not None:
    return max_cache_gb * GiB, "max_cache_gb"
  devices = list(mesh.devices.flat) if mesh is not None else jax.local_devices()[:1]
  stats = [d.memory_stats() for d in devices if d.process_index == jax.process_index()]
  if stats and all(s and "bytes_limit" in s for s in stats):
    free = min(s["bytes_limit"] - s.get("bytes_in_use", 0) for s in stats)
    return free * len(devices), f"free memory of {len(devices)} {devices[0].platform} devices"
  import psutil  # CPU devices (real or fake) share the host's RAM

  return psutil.virtual_memory().available, "available host RAM"


def cache_bytes(cfg: ModelConfig, batch: int, length: int, dtype) -> int:
  """Bytes of a KV cache: keys and values of every layer for batch x length tokens."""
  return 2 * cfg.num_layers * batch * length * cfg.kv_dim * np.dtype(dtype).itemsize


def physical_cache_bytes(cfg: ModelConfig, batch: int, length: int, dtype, mesh=None) -> int:
  """Bytes the cache occupies over all devices (a replicated dimension counts once per copy)."""
  total = cache_bytes(cfg, batch, length, dtype)
  if mesh is None:
    return total
  spec = logical_to_spec(CACHE_AXES, (batch, length, cfg.num_kv_heads, cfg.head_dim), mesh)
  axes = [a for part in spec if part for a in (part if isinstance(part, tuple) else (part,))]
  return total * mesh.size // math.prod(mesh.shape[a] for a in axes)


def plan_batch(
  cfg: ModelConfig,
  batch: int | str,
  length: int,
  dtype,
  *,
  extra_bytes: int = 0,
  mesh=None,
  max_cache_gb: float | None = None,
  want: int = _AUTO_MAX_BATCH,
) -> int:
  """The number of cache rows: `batch` if it fits, or with batch="auto" the most that fit (at most
  `want`). extra_bytes: other memory the sampler allocates (per-layer weight copies)."""
  avail, source = budget(mesh, max_cache_gb)
  need = lambda b: physical_cache_bytes(cfg, b, length, dtype, mesh) + extra_bytes
  if batch == "auto":
    batch = max(1, min(want, _AUTO_MAX_BATCH))
    while batch > 1 and need(batch) > avail:
      batch -= 1
  batch = int(batch)
  cache = physical_cache_bytes(cfg, batch, length, dtype, mesh)
  if jax.process_index() == 0:
    log.info(
      "KV cache: %d rows x %d tokens x %d layers x 2 (k, v) x %d kv heads x %d dims x %d "
      "bytes = %.3f GiB%s; %.2f GiB available (%s)",
      batch,
      length,
      cfg.num_layers,
      cfg.num_kv_heads,
      cfg.head_dim,
      np.dtype(dtype).itemsize,
      cache / GiB,
      f" + {extra_bytes / GiB:.3f} GiB per-layer weight copies" if extra_bytes else "",
      avail / GiB,
      source,
    )
  if cache + extra_bytes > avail:
    raise SamplingError(
      f"max_batch={batch} needs a {cache / GiB:.2f} GiB KV cache ({batch} x {length} tokens)"
      + (f" + {extra_bytes / GiB:.2f} GiB of weight copies" if extra_bytes else "")
      + f" but only {avail / GiB:.2f} GiB is available ({source}); lower max_batch or "
      "max_new_tokens, raise max_cache_gb, or pass max_batch='auto'"
    )
  return batch
