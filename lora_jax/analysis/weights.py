"""Where the analysis reads weights: one linear kernel (or one module's adapter) at a time.

`ModelTensors` reads W0 (or a merged model's W) per layer and module from a HF directory, hub id or
GGUF file; `open_run` describes what to compare against it: a training workdir (LoRA adapters or
full fine-tuning checkpoints, read one module at a time with an Orbax partial restore) or another
model (e.g. an OrthoMerged export). Every check that can fail runs before any work starts.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Iterator

import ml_dtypes
import numpy as np

from lora_jax import checkpoint as ckpt_lib
from lora_jax import lora as lora_lib
from lora_jax.analysis.spectral import AnalysisError, PenaltySettings
from lora_jax.config import ModelConfig
from lora_jax.io import resolve
from lora_jax.io.gguf_meta import config_from_gguf
from lora_jax.io.mapping import entries
from lora_jax.io.sources import GGUFSource, SafetensorsSource
from lora_jax.model import LINEARS

log = logging.getLogger(__name__)
# What two models must share for one's weights to be compared with the other's.
SHAPE_KEYS = (
  "family",
  "vocab_size",
  "hidden_size",
  "num_layers",
  "intermediate_size",
  "num_heads",
  "num_kv_heads",
)
_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}


class ModelTensors:
  """Linear kernels [out, in] of a HF dir / hub id / GGUF model, read one tensor at a time."""

  def __init__(self, source: str):
    self.source = source
    kind, self.path = resolve(source)
    if kind == "gguf":
      self._src = GGUFSource(self.path)
      self.config = config_from_gguf(self._src)
      self._names = {e.path: e.gguf for e in entries(self.config)}
    else:
      self._src = SafetensorsSource(self.path)
      self.config = ModelConfig.from_file(os.path.join(self.path, "config.json"))
      self._names = {e.path: e.hf for e in entries(self.config)}

  def shape(self, module: str) -> tuple[int, int]:
    return tuple(self._src.shape(self._name(module, 0)))

  def stored_dtype(self, module: str):
    dtype = getattr(self._src, "dtype", None)
    return np.dtype(np.float32) if dtype is None else np.dtype(dtype(self._name(module, 0)))

  def kernel(self, module: str, layer: int) -> np.ndarray:
    """A float32 copy of one layer's kernel (the source reuses its read buffer)."""
    out = np.array(self._src.read(self._name(module, layer)), np.float32)
    if isinstance(self._src, GGUFSource):
      self._src.forget()
    return out

  def _name(self, module: str, layer: int) -> str:
    return self._names[f"layers.{module}.kernel"].format(i=layer)


def check_same_base(what: str, theirs: dict, base: ModelTensors) -> None:
  """One line naming both models when `theirs` (shape fields) is not the base's architecture."""
  ours = {k: getattr(base.config, k) for k in SHAPE_KEYS}
  diff = [k for k in SHAPE_KEYS if theirs.get(k) != ours[k]]
  if diff:
    got = ", ".join(f"{k}={theirs.get(k)}" for k in diff)
    want = ", ".join(f"{k}={ours[k]}" for k in diff)
    raise AnalysisError(
      f"{what} is of another base model ({got}) than --base={base.source} ({want})"
    )


@dataclasses.dataclass
class Run:
  """One thing to analyse against the base: a training workdir or another model."""

  name: str
  path: str
  kind: str  # "lora" | "full" | "model"
  steps: list  # checkpoint steps, or [None] for a model
  modules: tuple[str, ...]
  settings: PenaltySettings
  num_layers: int
  scales: np.ndarray | None = None  # LoRA: alpha / r per layer (0 outside the adapted range)
  dtype: np.dtype = np.dtype(np.float32)  # full / model: the dtype W0 was rounded to
  _ckpt: ckpt_lib.Checkpointer | None = None
  _model: ModelTensors | None = None

  def updates(self, module: str, step) -> Iterator[tuple[int, tuple]]:
    """(layer, update) per layer: ("lora", a [in, r], b [r, out], scale) or ("weights", W, dtype):
    the fine-tuned kernel in float32 and the dtype it was trained in, for dW = W - round(W0)."""
    if self.kind == "model":
      for layer in range(self.num_layers):
        yield layer, ("weights", self._model.kernel(module, layer), self.dtype)
      return
    names = ("lora_a", "lora_b") if self.kind == "lora" else ("kernel",)
    leaves = self._ckpt.read_params(step, [("layers", module, n) for n in names])
    if self.kind == "lora":
      a, b = (leaves[("layers", module, n)] for n in names)
      for layer in range(self.num_layers):
        if self.scales[layer] != 0:
          yield layer, ("lora", a[layer], b[layer], float(self.scales[layer]))
      return
    stacked = leaves[("layers", module, "kernel")]
    for layer in range(self.num_layers):
      yield layer, ("weights", stacked[layer].astype(np.float32), self.dtype)

  def close(self) -> None:
    if self._ckpt is not None:
      self._ckpt.close()


def update_from_weights(w: np.ndarray, w0: np.ndarray, dtype) -> np.ndarray:
  """dW = W - W0 with W0 rounded to the dtype the fine-tuned copy started from, so an untouched
  weight has dW = 0 exactly."""
  return w - (w0 if np.dtype(dtype) == np.float32 else w0.astype(dtype).astype(np.float32))


def open_run(name: str, path: str, base: ModelTensors, steps="all") -> Run:
  """Describe and check one run: another base model, a missing step: one line, before any work."""
  if not os.path.isdir(os.path.join(path, "checkpoints")):
    if os.path.isdir(path) and not os.path.exists(os.path.join(path, "config.json")):
      raise AnalysisError(f"{path} is neither a training workdir (no checkpoints/) nor a model")
    model = ModelTensors(path)
    check_same_base(f"model {path}", dataclasses.asdict(model.config), base)
    stored = model.stored_dtype(LINEARS[0])
    return Run(
      name,
      path,
      "model",
      [None],
      LINEARS,
      PenaltySettings(),
      base.config.num_layers,
      dtype=stored,
      _model=model,
    )
  from lora_jax.run import load_run_config

  cfg = load_run_config(path)
  ckpt = ckpt_lib.Checkpointer(os.path.join(path, "checkpoints"), async_save=False)
  try:
    chosen = _choose_steps(steps, ckpt.all_steps(), path)
    meta = ckpt.read_meta(chosen[-1])
    check_same_base(f"run {path} (from {cfg.model.source})", meta.get("fingerprint") or {}, base)
  except Exception:
    ckpt.close()
    raise
  _warn_other_source(cfg.model.source, base.source, path)
  settings = PenaltySettings(cfg.ortho.weighted, cfg.ortho.normalize)
  L = base.config.num_layers
  if cfg.adapter is not None:
    scales = np.asarray(lora_lib.layer_scales(cfg.adapter, L))
    return Run(
      name, path, "lora", chosen, cfg.adapter.targets, settings, L, scales=scales, _ckpt=ckpt
    )
  dtype = np.dtype(_DTYPES[cfg.model.dtype])
  return Run(name, path, "full", chosen, LINEARS, settings, L, dtype=dtype, _ckpt=ckpt)


def _choose_steps(steps, present: list[int], path: str) -> list[int]:
  if not present:
    raise AnalysisError(f"{path}/checkpoints holds no checkpoint")
  if steps in (None, "all"):
    return present
  if steps == "last":
    return present[-1:]
  wanted = [int(s) for s in (steps.split(",") if isinstance(steps, str) else steps)]
  missing = [s for s in wanted if s not in present]
  if missing:
    raise AnalysisError(f"{path} has no checkpoint for step {missing}; steps present: {present}")
  return sorted(set(wanted))


def _warn_other_source(run_source: str, base_source: str, path: str) -> None:
  same = os.path.abspath(os.path.expanduser(run_source)) == os.path.abspath(base_source)
  if not same and run_source != base_source:
    log.warning("%s was trained from %s, analysed against --base=%s", path, run_source, base_source)
