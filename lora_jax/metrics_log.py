"""Metrics to a JSONL file and TensorBoard event files, written by process 0 only; and the MFU
estimate's two halves (model FLOPs per token, the device's peak)."""

from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp

from lora_jax import jsonl

# Dense peak FLOP/s per device for the compute dtype used on each (bf16 on accelerators).
_PEAK_FLOPS = {
  "TPU v4": 275e12,
  "TPU v5 lite": 197e12,
  "TPU v5e": 197e12,
  "TPU v5p": 459e12,
  "TPU v6 lite": 918e12,
  "A100": 312e12,
  "H100": 989e12,
  "H200": 989e12,
  "L4": 121e12,
  "A10": 125e12,
}
_cpu_peak: float | None = None


class MetricsWriter:
  def __init__(self, workdir: str, tensorboard: bool = True):
    self.enabled = jax.process_index() == 0
    self._jsonl = self._tb = None
    if not self.enabled:
      return
    # A run killed mid-write leaves a torn last line; the appender cuts it before resuming.
    self._jsonl = jsonl.Appender(os.path.join(workdir, "metrics.jsonl"))
    if tensorboard:
      from tensorboardX import SummaryWriter

      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, metrics: dict, prefix: str = "train") -> None:
    if not self.enabled:
      return
    row = {"step": step, "time": time.time(), **{f"{prefix}/{k}": v for k, v in metrics.items()}}
    self._jsonl.write(row)
    if self._tb is not None:
      for k, v in metrics.items():
        if isinstance(v, (int, float)):
          self._tb.add_scalar(f"{prefix}/{k}", v, step)
      self._tb.flush()

  def close(self) -> None:
    if self._jsonl is not None:
      self._jsonl.close()
    if self._tb is not None:
      self._tb.close()


def flops_per_token(cfg, seq_len: int, full_finetune: bool) -> float:
  """Model FLOPs per trained token (PaLM-style MFU: matmuls and attention, no remat)."""
  d, L = cfg.hidden_size, cfg.num_layers
  matmul_params = (
    L * (d * (cfg.q_dim + 2 * cfg.kv_dim) + cfg.q_dim * d + 3 * d * cfg.intermediate_size)
    + cfg.vocab_size * d
  )
  forward = 2 * matmul_params + 4 * L * cfg.q_dim * seq_len
  # Backward: activation grads (~1x forward) always; weight grads (~1x) only when weights train.
  return forward * (3 if full_finetune else 2)


def peak_flops_per_device(override: float = 0.0) -> float:
  """The device's dense peak; on CPU, measured once with a float32 matmul."""
  if override:
    return override
  kind = jax.devices()[0].device_kind
  for name, peak in _PEAK_FLOPS.items():
    if name.lower() in kind.lower():
      return peak
  if jax.devices()[0].platform == "cpu":
    return measured_cpu_matmul_flops()
  return 0.0  # unknown accelerator: MFU is not reported


def measured_cpu_matmul_flops(n: int = 2048, repeats: int = 5, cached: bool = True) -> float:
  """Best float32 matmul FLOP/s over `repeats` runs (cached for the process unless asked)."""
  global _cpu_peak
  if _cpu_peak is None or not cached:
    x = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda a: a @ a)
    f(x).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
      t = time.perf_counter()
      f(x).block_until_ready()
      best = min(best, time.perf_counter() - t)
    _cpu_peak = 2 * n**3 / best
  return _cpu_peak
