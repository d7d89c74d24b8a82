"""Weight-space metrics of one fine-tuning update dW against its base matrix W0.

Orientation: kernels are stored as torch stores `nn.Linear.weight`, [out, in] (m = out, n = in),
the orientation the reference's formulas are written for, so nothing is transposed. W0 = U S V^T:
U [m, K] spans W0's column space, the output side ("left", the regulariser's "column"); V [n, K]
spans its row space, the input side ("right", "row").

For each k <= K, with ||.|| the Frobenius norm:
  overlap left  ||U_k^T dW||^2 / ||dW||^2        a random dW gives k / m on average
  overlap right ||dW V_k||^2 / ||dW||^2          k / n
  overlap both  ||U_k^T dW V_k||^2 / ||dW||^2    k^2 / (m n)
  stable rank   ||dW||^2 / ||dW||_2^2            <= rank(dW)
and the regulariser's penalty in each mode (`lora_jax.ortho.penalty_one` itself, spans in float32).
The overlaps come from the same function (`ortho.span_energy` with unit spans U_k^T, V_k), so the
analysis and the regulariser agree by construction: the uniform normalised penalty is the overlap.

How, cheaply:
- W0's top K (once per matrix, shared by every checkpoint and run): "exact" is the eigenproblem of
  W0's Gram matrix on its smaller side (an exact SVD in float32: only singular values below
  ~3e-4 sigma_1, far under any top-K used here, lose accuracy) when that side is <= `exact_max`;
  otherwise "randomized" (`ortho.top_k_svd`, K columns of oversampling, 6 power iterations), whose
  error against the exact SVD `tests/test_analysis.py` measures (see `RANDOMIZED_ERROR`). Where
  sigma_k and sigma_k+1 nearly coincide the top-k subspace itself is ill-defined, and any method's
  overlap at that k is as uncertain.
- A dense dW (full fine-tuning, merged models): its singular values from its Gram matrix, as
  above; overlaps and penalties from its projections onto W0's top-K subspaces, computed once
  (2 K m n flops): a span of k <= K lies inside them, so every value equals the one on dW itself.
- A LoRA dW = scale * B^T A^T: QR of both factors leaves an r x r core with dW's singular values;
  overlaps and penalties come from the factors, so dW is never formed.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg

from lora_jax.model import LINEARS
from lora_jax.ortho import (
  MODES,
  OrthoConfig,
  penalty_one,
  span_energy,
  spans_from_svd,
  top_k_svd,
  update_fro2,
)

# Stated accuracy of the randomized path, measured in tests/test_analysis.py against the exact SVD:
# W0's top-K singular values (relative) and overlaps (absolute) on a power-law spectrum over a noise
# floor; a dense dW's stable rank (relative) on a Gaussian dW, the flattest spectrum there is.
RANDOMIZED_ERROR = {"singular_values": 1e-3, "overlap": 1e-3, "stable_rank": 0.03}
RANDOMIZED_NITER = 6


class AnalysisError(ValueError):
  """Bad input to the analysis (wrong base, missing step, k too large): one line."""


@dataclasses.dataclass(frozen=True)
class PenaltySettings:
  """Which penalty the report shows: the run's regulariser settings (defaults: the reference's)."""

  weighted: bool = True
  normalize: bool = False


@dataclasses.dataclass
class Spectrum:
  """W0's top-K singular triplets (u [m, K], s [K], v [n, K]) and ||W0||_F."""

  u: jax.Array
  s: jax.Array
  v: jax.Array
  fro: float
  method: str


def spectrum_key(seed: int, layer: int, module: str) -> jax.Array:
  """The randomized SVD's key for one matrix: the analysis and OrthoMerge draw the same."""
  return jax.random.fold_in(jax.random.key(seed), layer * len(LINEARS) + LINEARS.index(module))


def base_spectrum(w0, kmax: int, key: jax.Array, exact_max: int = 2048) -> Spectrum:
  w = jnp.asarray(w0, jnp.float32)
  m, n = w.shape
  if kmax > min(m, n):
    raise AnalysisError(f"k={kmax} is larger than a {m}x{n} matrix (at most {min(m, n)})")
  if min(m, n) <= exact_max:
    lam, vec, fro2 = _top_eigh(_gram(w), kmax)
    s = np.sqrt(np.maximum(lam, 0.0))
    u, v = (vec, _other_side(w.T, vec)) if m < n else (_other_side(w, vec), vec)
    return Spectrum(jnp.asarray(u), jnp.asarray(s, jnp.float32), jnp.asarray(v), fro2**0.5, "exact")
  u, s, v = _randomized_svd(w, key, kmax)
  return Spectrum(u, s, v, float(jnp.linalg.norm(w)), "randomized")


def dense_metrics(dw, spec: Spectrum, ks, settings: PenaltySettings, exact_max: int = 2048):
  """Metrics of a dense dW [m, n] (see the module docstring)."""
  dw = jnp.asarray(dw, jnp.float32)
  if min(dw.shape) <= exact_max:
    sigma_max = float(np.sqrt(max(_top_eigh(_gram(dw), 1, vectors=False)[0][0], 0.0)))
  else:  # the top singular value of a 32-wide randomized sketch
    sigma_max = float(_randomized_svd(dw, jax.random.key(0), 16)[1][0])
  energies = _dense_energies(dw, spec.u, spec.s, spec.v, tuple(ks), settings)
  return _assemble(energies, sigma_max, 1.0, spec, ks, min(dw.shape), settings)


def lora_metrics(a, b, scale: float, spec: Spectrum, ks, settings: PenaltySettings):
  """Metrics of dW = scale * B^T A^T from a [n, r], b [r, m] (our adapter layout). The penalty is
  the regulariser's, on B^T A^T without the scale (as in training); the rest is scale-free or
  scaled explicitly."""
  # dW = B^T A^T = Q_B R_B R_A^T Q_A^T: its singular values are the r x r core R_B R_A^T's.
  r_left = np.linalg.qr(np.asarray(b, np.float64).T, mode="r")
  r_right = np.linalg.qr(np.asarray(a, np.float64), mode="r")
  sigma_max = float(np.linalg.svd(r_left @ r_right.T, compute_uv=False)[0])
  energies = _lora_energies(a, b, spec.u, spec.s, spec.v, tuple(ks), settings)
  return _assemble(energies, sigma_max, abs(scale), spec, ks, np.shape(a)[1], settings)


def _assemble(energies, sigma_max: float, scale: float, spec: Spectrum, ks, rank_bound, settings):
  e = jax.device_get(energies)
  fro2 = float(e["fro2"])
  m, n = spec.u.shape[0], spec.v.shape[0]
  out = {
    "fro": scale * fro2**0.5,
    "rel_fro": scale * fro2**0.5 / spec.fro if spec.fro else None,
    "spectral": scale * sigma_max,
    "stable_rank": fro2 / sigma_max**2 if sigma_max > 0 else None,
    "rank_bound": int(rank_bound),
    "w0_svd": spec.method,
    "overlap": {},
    "penalty": {},
    "penalty_settings": dataclasses.asdict(settings),
  }
  for i, k in enumerate(ks):
    sides = {
      side: (float(e[side][i]) / fro2 if fro2 > 0 else None) for side in ("left", "right", "both")
    }
    sides.update(random_left=k / m, random_right=k / n, random_both=k * k / (m * n))
    out["overlap"][str(k)] = sides
    out["penalty"][str(k)] = {mode: float(e["penalty_" + mode][i]) for mode in MODES}
  return out


def _energies(operands: dict, fro2, u, s, v, ks, settings: PenaltySettings) -> dict:
  """Overlap energies (unit spans) and penalties for every k: `operands[mode]` = (left, right).

  Each k's spans are the K-wide ones with the rows past k zeroed: they contribute nothing, so
  every value is the one the k-wide spans give, and one vmapped graph serves all k (an unrolled
  loop over k and modes took seconds to compile per matrix shape)."""
  cfgs = {
    mode: OrthoConfig(mode=mode, span_dtype="float32", **dataclasses.asdict(settings))
    for mode in MODES
  }

  def one_k(mask):
    unit = {"c": (u * mask).T, "r": v * mask}
    out = {
      side: span_energy(*operands[mode], unit, mode)
      for side, mode in (("left", "column"), ("right", "row"), ("both", "both"))
    }
    for mode, cfg in cfgs.items():
      spans = spans_from_svd(u * mask, s * mask[0], v * mask, cfg)
      out["penalty_" + mode] = penalty_one(*operands[mode], spans, cfg, dw_fro2=fro2)
    return out

  masks = (jnp.arange(u.shape[1])[None, :] < jnp.asarray(ks)[:, None]).astype(u.dtype)
  return jax.vmap(one_k)(masks[:, None, :]) | {"fro2": fro2}


@functools.partial(jax.jit, static_argnames=("ks", "settings"))
def _dense_energies(dw, u, s, v, ks, settings):
  with jax.default_matmul_precision("highest"):
    proj_left = u.T @ dw  # [K, n]
    proj_right = dw @ v  # [m, K]
    operands = {
      "column": (u, proj_left),
      "row": (proj_right, v.T),
      "both": (u, (proj_left @ v) @ v.T),
    }
    return _energies(operands, jnp.sum(dw * dw), u, s, v, ks, settings)


@functools.partial(jax.jit, static_argnames=("ks", "settings"))
def _lora_energies(a, b, u, s, v, ks, settings):
  """dW = B^T A^T from a [n, r], b [r, m]: left = B^T [m, r], right = A^T [r, n]."""
  left, right = b.astype(jnp.float32).T, a.astype(jnp.float32).T
  with jax.default_matmul_precision("highest"):
    operands = dict.fromkeys(MODES, (left, right))
    return _energies(operands, update_fro2(left, right), u, s, v, ks, settings)


@jax.jit
def _gram(w):
  with jax.default_matmul_precision("highest"):
    return w.T @ w if w.shape[0] >= w.shape[1] else w @ w.T


@jax.jit
def _other_side(w, vec):
  """The other side's singular vectors, w vec / sigma, as an orthonormal basis: the QR of w vec
  keeps each prefix's span (so every top-k) and removes float32 drift from orthogonality."""
  with jax.default_matmul_precision("highest"):
    return jnp.linalg.qr(w @ vec)[0]


def _top_eigh(gram, k: int, vectors: bool = True):
  """The k largest eigenvalues (descending), their eigenvectors (None if not `vectors`), and the
  trace of a Gram matrix (LAPACK's syevr on the wanted subset only)."""
  g = np.asarray(gram, np.float32)
  p = g.shape[0]
  got = scipy.linalg.eigh(
    g, eigvals_only=not vectors, subset_by_index=[p - k, p - 1], driver="evr", check_finite=False
  )
  lam, vec = got if vectors else (got, None)
  vec = None if vec is None else np.ascontiguousarray(vec[:, ::-1])
  return lam[::-1].copy(), vec, float(np.trace(g, dtype=np.float64))


@functools.partial(jax.jit, static_argnums=2)
def _randomized_svd(w, key, k):
  with jax.default_matmul_precision("highest"):
    return top_k_svd(w, k, key, "randomized", niter=RANDOMIZED_NITER, oversample=k)
