"""The reference's orthogonal regulariser: keep LoRA's update out of W0's top singular subspace.

Orientation. Our kernels are stored as torch stores `nn.Linear.weight`: [out, in]. The reference's
formulas are written for that weight, so they apply unchanged: W0 ~ U_k S_k V_k^T (top-k SVD,
computed once from the frozen weights) has U_k [out, k] in the output space ("left", "column": the
column space of W0) and V_k [in, k] in the input space ("right", "row"). With dW = B A in PEFT's
orientation ([out, in], without the alpha / r scale) the penalty per adapted module and layer is

  column: ||S_k U_k^T dW||_F^2        row: ||dW V_k S_k||_F^2       both: ||S_k U_k^T dW V_k S_k||_F^2

"uniform" (weighted=False) drops S_k; "normalize" divides each span by its Frobenius norm and the
penalty by ||dW||_F^2 + 1e-8. Loss = CE + beta * sum of penalties. (Reference: models.py,
`OrthogonalRegularizationMixin`; it uses torch.svd_lowrank(q=k) and stores spans in bfloat16, which
are the defaults here.) Our A is [in, r] and B [r, out], so PEFT's dW = B^T A^T.

Which k. The reference computes the spans in one walk over the PEFT model's modules and reassigns
`k = min(k, min(weight.shape))` for every module with a weight, the adapters' own lora_A [r, in]
and lora_B [out, r] included. The first adapted module (the lowest adapted layer, first target in
the model's order) gets the configured k; its lora_A then lowers k to r, so every later module
gets min(k, r). `k_mode="reference"` (the paper configs) reproduces that: spans keep k columns
everywhere, the ones past min(k, r) zero (they add nothing), and the min(k, r)-wide spans come
from their own top-min(k, r) SVD, as the reference's `svd_lowrank(q=min(k, r))`.
`k_mode="per_module"` gives every module the configured k.

`span_energy` / `penalty_one` take dW of one matrix as a product `left @ right` (`right` None for a
dense dW) and order every product to stay [k, r]-sized for a factored dW, never materialising it.
The weight-space analysis (`lora_jax.analysis`) calls the same two functions, so its penalty values
and the regulariser's agree by construction; with unit spans (U_k^T, V_k) the energy over
||dW||_F^2 is the analysis's overlap.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

MODES = ("column", "row", "both")
K_MODES = ("reference", "per_module")


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
  k_mode: str = "per_module"  # "reference": k on the first adapted module, min(k, r) after it

  def __post_init__(self):
    if self.mode not in MODES:
      raise ValueError(f"ortho.mode={self.mode!r}; expected one of {MODES}")
    if self.k_mode not in K_MODES:
      raise ValueError(f"ortho.k_mode={self.k_mode!r}; expected one of {K_MODES}")
    if self.svd not in ("randomized", "exact"):
      raise ValueError(f"ortho.svd={self.svd!r}; expected 'randomized' or 'exact'")


def top_k_svd(
  w: jax.Array,
  k: int,
  key: jax.Array,
  method: str = "randomized",
  niter: int = 2,
  oversample: int = 0,
):
  """U [m, k], S [k], V [n, k] of w [m, n]. The randomized form is Halko et al.'s range finder with
  `niter` power iterations on a sketch of k + `oversample` columns; the defaults (no oversampling)
  are torch.svd_lowrank(w, q=k)'s."""
  w = w.astype(jnp.float32)
  k = min(k, *w.shape)
  if method == "exact":
    u, s, vt = jnp.linalg.svd(w, full_matrices=False)
    return u[:, :k], s[:k], vt[:k].T
  width = min(k + oversample, *w.shape)
  q, _ = jnp.linalg.qr(w @ jax.random.normal(key, (w.shape[1], width), jnp.float32))
  power = lambda _, q: jnp.linalg.qr(w @ jnp.linalg.qr(w.T @ q)[0])[0]
  q = jax.lax.fori_loop(0, niter, power, q)
  u_small, s, vt = jnp.linalg.svd(q.T @ w, full_matrices=False)
  return (q @ u_small)[:, :k], s[:k], vt[:k].T


def spans_from_svd(u: jax.Array, s: jax.Array, v: jax.Array, cfg: OrthoConfig) -> dict:
  """The regulariser's spans of one matrix from its top-k SVD: "c" [k, out] and/or "r" [in, k]."""
  out = {}
  if cfg.mode in ("column", "both"):
    out["c"] = (s[:, None] * u.T) if cfg.weighted else u.T
  if cfg.mode in ("row", "both"):
    out["r"] = (v * s[None, :]) if cfg.weighted else v
  if cfg.normalize and cfg.weighted:
    out = {n: x / jnp.linalg.norm(x) for n, x in out.items()}
  return {n: x.astype(cfg.span_dtype) for n, x in out.items()}


def module_spans(kernel: jax.Array, cfg: OrthoConfig, key: jax.Array) -> dict[str, jax.Array]:
  """Spans for one stacked kernel [L, out, in]: "c" [L, k, out] and/or "r" [L, in, k]."""

  def one(w, key):
    return spans_from_svd(*top_k_svd(w, cfg.k, key, cfg.svd), cfg)

  keys = jax.random.split(key, kernel.shape[0])
  return jax.lax.map(lambda args: one(*args), (kernel, keys))


def compute_spans(
  model, cfg: OrthoConfig, seed: int = 0, first_layer: int = 0
) -> dict[str, dict[str, jax.Array]]:
  """Spans of every targeted module that carries an adapter (computed once, before training).
  `first_layer` is the lowest adapted layer (where the reference's walk meets its first adapter)."""
  spans = {}
  spans_of = jax.jit(module_spans, static_argnums=1)
  for i, name in enumerate(cfg.targets):
    lin = getattr(model.layers, name)
    if getattr(lin, "lora_a", None) is None:
      raise ValueError(
        f"ortho target {name} has no LoRA adapter; adapt it (lora.targets) or "
        f"drop it from ortho.targets"
      )
    kernel, key = lin.kernel[...], jax.random.key(seed + i)
    rank = lin.lora_a.shape[-1]
    if cfg.k_mode == "per_module" or rank >= cfg.k:
      spans[name] = spans_of(kernel, cfg, key)
      continue
    width = min(cfg.k, *kernel.shape[1:])  # the configured k's span width
    spans[name] = _pad_k(spans_of(kernel, dataclasses.replace(cfg, k=rank), key), width)
    if i == 0:  # the reference's first adapted module still had the configured k
      layer_key = jax.random.split(key, kernel.shape[0])[first_layer]
      first = spans_from_svd(*top_k_svd(kernel[first_layer], cfg.k, layer_key, cfg.svd), cfg)
      spans[name] = {n: x.at[first_layer].set(first[n]) for n, x in spans[name].items()}
  return spans


def _pad_k(spans: dict, width: int) -> dict:
  """Zero-pad stacked spans ("c" [L, k, out], "r" [L, in, k]) to `width` along k."""
  axis = {"c": 1, "r": 2}
  widths = lambda n, x: [(0, width - x.shape[a]) if a == axis[n] else (0, 0) for a in range(3)]
  return {n: jnp.pad(x, widths(n, x)) for n, x in spans.items()}


def span_energy(left: jax.Array, right: jax.Array | None, spans: dict, mode: str) -> jax.Array:
  """||c dW||_F^2 (column), ||dW r||_F^2 (row) or ||c dW r||_F^2 (both) of dW = left @ right
  ([out, r] @ [r, in]; `right` None: dW = left) against spans c [k, out], r [in, k]."""
  f32 = lambda x: x.astype(jnp.float32)
  if mode == "column":  # (c left) right: [k, r] @ [r, in]
    prod = f32(spans["c"]) @ left
    prod = prod if right is None else prod @ right
  elif mode == "row":  # left (right r): [out, r] @ [r, k]
    prod = left @ f32(spans["r"]) if right is None else left @ (right @ f32(spans["r"]))
  else:
    c_dw = f32(spans["c"]) @ left  # [k, r] (or [k, in] for a dense dW)
    prod = c_dw @ f32(spans["r"]) if right is None else c_dw @ (right @ f32(spans["r"]))
  return jnp.sum(prod * prod)


def update_fro2(left: jax.Array, right: jax.Array | None) -> jax.Array:
  """||left @ right||_F^2 as an [r, r] contraction <left^T left, right right^T>."""
  if right is None:
    return jnp.sum(left * left)
  return jnp.sum((left.T @ left) * (right @ right.T))


def penalty_one(left, right, spans: dict, cfg: OrthoConfig, dw_fro2=None) -> jax.Array:
  """The penalty of one matrix's update dW = left @ right. `dw_fro2` overrides ||dW||_F^2 when the
  operands are a projection of dW that leaves the span products unchanged (the analysis's)."""
  value = span_energy(left, right, spans, cfg.mode)
  if cfg.normalize:
    value = value / ((update_fro2(left, right) if dw_fro2 is None else dw_fro2) + 1e-8)
  return value


def penalty(
  a: jax.Array, b: jax.Array, spans: dict[str, jax.Array], cfg: OrthoConfig, active: jax.Array
) -> jax.Array:
  """Summed penalty over layers of one module. a [L, in, r], b [L, r, out]; `active` [L] is 1 on
  adapted layers (out-of-range layers have no adapter in the reference, so they add nothing)."""
  a = a.astype(jnp.float32)
  b = b.astype(jnp.float32)
  one = lambda a_l, b_l, s_l: penalty_one(b_l.T, a_l.T, s_l, cfg)
  return jnp.sum(jax.vmap(one)(a, b, spans) * active)


def total_penalty(lora_params: dict, spans: dict, scales: dict, cfg: OrthoConfig) -> jax.Array:
  """beta-free sum over all targeted modules. lora_params[name] = {"lora_a", "lora_b"}."""
  total = jnp.zeros((), jnp.float32)
  for name, s in spans.items():
    p = lora_params[name]
    total = total + penalty(
      p["lora_a"], p["lora_b"], s, cfg, (scales[name] != 0).astype(jnp.float32)
    )
  return total
