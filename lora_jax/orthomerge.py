"""OrthoMerge: merge a fine-tuning update with its part inside W0's top-k singular subspace removed.

With W0 = U S V^T (kernel layout [out, in]: U_k [out, k] spans the output side, V_k [in, k] the
input side; the same top-k as `lora_jax.analysis`, computed by the same function and key) the merged
weight is W0 + P(dW), where

  column: P(dW) = (I - U_k U_k^T) dW                  (left overlap becomes 0)
  row:    P(dW) = dW (I - V_k V_k^T)                  (right overlap becomes 0)
  both:   P(dW) = (I - U_k U_k^T) dW (I - V_k V_k^T)  (left, right and both overlaps become 0)

Why this formula (the paper's definition is not public): each P is the orthogonal projection of dW
onto the updates that satisfy the regulariser's constraint exactly, so it is the smallest change
to dW (in Frobenius norm) that reaches the regulariser's goal: column's U_k^T X = 0 is where the
column penalty ||S_k U_k^T X||^2 is zero, row's X V_k = 0 the row penalty's; "both" asks for both
at once (stricter than the "both" penalty, which vanishes as soon as U_k^T X V_k = 0) so that
every overlap the analysis reports is zero at that k. Unweighted projectors, because removing a
direction entirely is what the hard constraint means; S_k only weights the soft penalty.

A LoRA update dW = scale * B^T A^T stays rank r: column replaces B^T by (I - U_k U_k^T) B^T and
row A^T by A^T (I - V_k V_k^T), so the projected adapter is merged with the usual LoRA formula. A
full fine-tuning update is projected per layer against the run's base weights; only the linear
kernels are projected, every other fine-tuned param (norms, biases, embeddings) is kept.
"""

from __future__ import annotations

import dataclasses
import logging

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax.analysis.spectral import AnalysisError, base_spectrum, spectrum_key
from lora_jax.analysis.weights import ModelTensors, check_same_base
from lora_jax.lora import adapted
from lora_jax.model import LINEARS

log = logging.getLogger(__name__)
MODES = ("column", "row", "both")


def project_update(dw, u_k, v_k, mode: str):
  """P(dW) of a dense dW [out, in] (see the module docstring)."""
  _check_mode(mode)
  if mode in ("column", "both"):
    dw = dw - u_k @ (u_k.T @ dw)
  if mode in ("row", "both"):
    dw = dw - (dw @ v_k) @ v_k.T
  return dw


def project_adapter(a, b, u_k, v_k, mode: str):
  """The projected LoRA factors of one layer: a [in, r], b [r, out] (our layout, dW = (a b)^T)."""
  _check_mode(mode)
  if mode in ("column", "both"):  # B^T <- (I - U U^T) B^T, i.e. b <- b - (b U) U^T
    b = b - (b @ u_k) @ u_k.T
  if mode in ("row", "both"):  # A^T <- A^T (I - V V^T), i.e. a <- a - V (V^T a)
    a = a - v_k @ (v_k.T @ a)
  return a, b


def orthomerge(model, base_source: str, mode: str, k: int, *, exact_max: int = 2048, seed: int = 0):
  """Project the update of every linear module of `model` in place against `base_source`'s W0.

  A LoRA model keeps its (projected) adapters, which the merged export folds in; a fully
  fine-tuned model gets W0 + P(W - W0) in its kernels."""
  _check_mode(mode)
  base = ModelTensors(base_source)
  check_same_base("the model being merged", dataclasses.asdict(model.config), base)
  lora_modules = adapted(model)
  for name in lora_modules or LINEARS:
    lin = getattr(model.layers, name)
    m, n = lin.kernel.shape[1:]
    if k > min(m, n):
      raise AnalysisError(f"--ortho_k={k} is larger than {name} ({m}x{n}): at most {min(m, n)}")
    if lora_modules:
      _project_lora(lin, base, name, mode, k, exact_max, seed)
    else:
      _project_full(lin, base, name, mode, k, exact_max, seed)
  log.info("OrthoMerge (%s, k=%d) of %s", mode, k, ", ".join(lora_modules or LINEARS))
  return model


def _project_lora(lin, base, name, mode, k, exact_max, seed):
  with jax.default_matmul_precision("highest"):
    _project_lora_layers(lin, base, name, mode, k, exact_max, seed)


def _project_lora_layers(lin, base, name, mode, k, exact_max, seed):
  a_all = np.array(lin.lora_a[...], np.float32)
  b_all = np.array(lin.lora_b[...], np.float32)
  scales = np.asarray(lin.lora_scale[...])
  for layer in range(a_all.shape[0]):
    if scales[layer] == 0:
      continue
    u_k, v_k = _top_k(base, name, layer, k, exact_max, seed)
    a, b = project_adapter(jnp.asarray(a_all[layer]), jnp.asarray(b_all[layer]), u_k, v_k, mode)
    a_all[layer], b_all[layer] = np.asarray(a), np.asarray(b)
  _set(lin.lora_a, a_all)
  _set(lin.lora_b, b_all)


def _project_full(lin, base, name, mode, k, exact_max, seed):
  with jax.default_matmul_precision("highest"):
    _project_full_layers(lin, base, name, mode, k, exact_max, seed)


def _project_full_layers(lin, base, name, mode, k, exact_max, seed):
  kernel = np.array(lin.kernel[...], np.float32)
  dtype = lin.kernel[...].dtype
  for layer in range(kernel.shape[0]):
    w0 = base.kernel(name, layer)
    w0_run = np.asarray(jnp.asarray(w0).astype(dtype), np.float32)  # as the run started from it
    u_k, v_k = _top_k(base, name, layer, k, exact_max, seed, w0)
    dw = project_update(jnp.asarray(kernel[layer] - w0_run), u_k, v_k, mode)
    kernel[layer] = w0_run + np.asarray(dw)
  _set(lin.kernel, kernel)


def _top_k(base, name, layer, k, exact_max, seed, w0=None):
  w0 = base.kernel(name, layer) if w0 is None else w0
  spec = base_spectrum(w0, k, spectrum_key(seed, layer, name), exact_max)
  return spec.u[:, :k], spec.v[:, :k]


def _set(variable, value: np.ndarray) -> None:
  old = variable[...]
  variable.set_value(jax.device_put(jnp.asarray(value, old.dtype), old.sharding))


def _check_mode(mode: str) -> None:
  if mode not in MODES:
    raise AnalysisError(f"ortho={mode!r}; expected one of {MODES}")
