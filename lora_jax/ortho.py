"""The reference's orthogonal regulariser: keep LoRA's update out of W0's top singular subspace.

With W0 ~ U_k S_k V_k^T (top-k SVD, computed once from the frozen weights) and dW = B A in PEFT's
orientation ([out, in], without the alpha / r scale), the penalty per adapted module and layer is

  column: ||S_k U_k^T dW||_F^2        row: ||dW V_k S_k||_F^2       both: ||S_k U_k^T dW V_k S_k||_F^2

"uniform" (weighted=False) drops S_k; "normalize" divides each span by its Frobenius norm and the
penalty by ||dW||_F^2 + 1e-8. Loss = CE + beta * sum of penalties. (Reference: models.py,
`OrthogonalRegularizationMixin`; it uses torch.svd_lowrank(q=k) and stores spans in bfloat16, which
are the defaults here.) Our A is [in, r] and B [r, out], so PEFT's dW = B^T A^T; every product
below is ordered to stay [k, r]-sized, never materialising dW.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

MODES = ("column", "row", "both")


@dataclasses.dataclass(frozen=True)
class OrthoConfig:
  beta: float = 0.0
  k: int = 16
  mode: str = "column"
  weighted: bool = True
  normalize: bool = False
  targets: tuple[str, ...] = ("gate_proj", "up_proj", "down_proj")
  span_dtype: str = "bfloat16"
  svd: str = "randomized"  # "randomized" (torch.svd_lowrank's algorithm, niter=2) or "exact"

  def __post_init__(self):
    if self.mode not in MODES:
      raise ValueError(f"ortho.mode={self.mode!r}; expected one of {MODES}")
    if self.svd not in ("randomized", "exact"):
      raise ValueError(f"ortho.svd={self.svd!r}; expected 'randomized' or 'exact'")


def top_k_svd(w: jax.Array, k: int, key: jax.Array, method: str = "randomized", niter: int = 2):
  """U [m, k], S [k], V [n, k] of w [m, n]. The randomized form is Halko et al.'s range finder with
  `niter` power iterations and no oversampling, as torch.svd_lowrank(w, q=k)."""
  w = w.astype(jnp.float32)
  k = min(k, *w.shape)
  if method == "exact":
    u, s, vt = jnp.linalg.svd(w, full_matrices=False)
    return u[:, :k], s[:k], vt[:k].T
  q, _ = jnp.linalg.qr(w @ jax.random.normal(key, (w.shape[1], k), jnp.float32))
  for _ in range(niter):
    q, _ = jnp.linalg.qr(w.T @ q)
    q, _ = jnp.linalg.qr(w @ q)
  u_small, s, vt = jnp.linalg.svd(q.T @ w, full_matrices=False)
  return q @ u_small, s, vt.T


def module_spans(kernel: jax.Array, cfg: OrthoConfig, key: jax.Array) -> dict[str, jax.Array]:
  """Spans for one stacked kernel [L, out, in]: "c" [L, k, out] and/or "r" [L, in, k]."""

  def one(w, key):
    u, s, v = top_k_svd(w, cfg.k, key, cfg.svd)
    out = {}
    if cfg.mode in ("column", "both"):
      out["c"] = (s[:, None] * u.T) if cfg.weighted else u.T
    if cfg.mode in ("row", "both"):
      out["r"] = (v * s[None, :]) if cfg.weighted else v
    if cfg.normalize and cfg.weighted:
      out = {n: x / jnp.linalg.norm(x) for n, x in out.items()}
    return {n: x.astype(cfg.span_dtype) for n, x in out.items()}

  keys = jax.random.split(key, kernel.shape[0])
  return jax.lax.map(lambda args: one(*args), (kernel, keys))


def compute_spans(model, cfg: OrthoConfig, seed: int = 0) -> dict[str, dict[str, jax.Array]]:
  """Spans of every targeted module that carries an adapter (computed once, before training)."""
  spans = {}
  for i, name in enumerate(cfg.targets):
    lin = getattr(model.layers, name)
    if getattr(lin, "lora_a", None) is None:
      raise ValueError(
        f"ortho target {name} has no LoRA adapter; adapt it (lora.targets) or "
        f"drop it from ortho.targets"
      )
    spans[name] = jax.jit(module_spans, static_argnums=1)(
      lin.kernel[...], cfg, jax.random.key(seed + i)
    )
  return spans


def penalty(
  a: jax.Array, b: jax.Array, spans: dict[str, jax.Array], cfg: OrthoConfig, active: jax.Array
) -> jax.Array:
  """Summed penalty over layers of one module. a [L, in, r], b [L, r, out]; `active` [L] is 1 on
  adapted layers (out-of-range layers have no adapter in the reference, so they add nothing)."""
  a = a.astype(jnp.float32)
  b = b.astype(jnp.float32)
  if cfg.mode == "column":  # S U^T dW = (c B^T) A^T: [k, r] @ [r, in]
    prod = jnp.einsum("lko,lro->lkr", spans["c"].astype(jnp.float32), b)
    prod = jnp.einsum("lkr,lir->lki", prod, a)
  elif cfg.mode == "row":  # dW V S = B^T (A^T r): [out, r] @ [r, k]
    prod = jnp.einsum("lir,lik->lrk", a, spans["r"].astype(jnp.float32))
    prod = jnp.einsum("lro,lrk->lok", b, prod)
  else:
    left = jnp.einsum("lko,lro->lkr", spans["c"].astype(jnp.float32), b)
    right = jnp.einsum("lir,lik->lrk", a, spans["r"].astype(jnp.float32))
    prod = jnp.einsum("lkr,lrj->lkj", left, right)
  per_layer = jnp.sum(prod * prod, axis=(1, 2))
  if cfg.normalize:  # ||dW||_F^2 = <A^T A, B B^T>, an [r, r] contraction
    dw2 = jnp.sum(jnp.einsum("lir,lis->lrs", a, a) * jnp.einsum("lro,lso->lrs", b, b), axis=(1, 2))
    per_layer = per_layer / (dw2 + 1e-8)
  return jnp.sum(per_layer * active)


def total_penalty(lora_params: dict, spans: dict, scales: dict, cfg: OrthoConfig) -> jax.Array:
  """beta-free sum over all targeted modules. lora_params[name] = {"lora_a", "lora_b"}."""
  total = jnp.zeros((), jnp.float32)
  for name, s in spans.items():
    p = lora_params[name]
    total = total + penalty(
      p["lora_a"], p["lora_b"], s, cfg, (scales[name] != 0).astype(jnp.float32)
    )
  return total
