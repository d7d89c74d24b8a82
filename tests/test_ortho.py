"""The orthogonal regulariser against the reference's formula (models.py) and by hand."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from lora_jax.ortho import OrthoConfig, module_spans, penalty, top_k_svd


def _ours(w0, a_peft, b_peft, cfg):
  """Penalty and grads (in PEFT's orientation) for one layer: w0 [out, in], A [r, in], B [out, r]."""
  spans = module_spans(jnp.asarray(w0)[None], cfg, jax.random.key(0))
  f = lambda a, b: penalty(a[None], b[None], spans, cfg, jnp.ones((1,)))
  value, (ga, gb) = jax.value_and_grad(f, argnums=(0, 1))(
    jnp.asarray(a_peft.T), jnp.asarray(b_peft.T)
  )
  return float(value), np.asarray(ga).T, np.asarray(gb).T


def _reference(w0, a_peft, b_peft, k, mode, weighted, normalize, dtype):
  """models.py's penalty, with an exact SVD in place of torch.svd_lowrank."""
  w = torch.tensor(w0, dtype=torch.float32)
  u, s, vh = torch.linalg.svd(w, full_matrices=False)
  u, s, v = u[:, :k], s[:k], vh[:k].T
  span_c = (torch.diag(s) @ u.T) if weighted else u.T.contiguous()
  span_r = (v @ torch.diag(s)) if weighted else v.contiguous()
  if weighted and normalize:
    span_c, span_r = span_c / torch.norm(span_c, p="fro"), span_r / torch.norm(span_r, p="fro")
  span_c, span_r = span_c.to(dtype).float(), span_r.to(dtype).float()
  a = torch.tensor(a_peft, requires_grad=True)
  b = torch.tensor(b_peft, requires_grad=True)
  dw = b @ a
  if mode == "column":
    p = torch.norm(span_c @ dw, p="fro") ** 2
  elif mode == "row":
    p = torch.norm(dw @ span_r, p="fro") ** 2
  else:
    p = torch.norm(span_c @ dw @ span_r, p="fro") ** 2
  if normalize:
    p = p / (torch.norm(dw, p="fro") ** 2 + 1e-8)
  p.backward()
  return p.item(), a.grad.numpy(), b.grad.numpy()


@pytest.mark.parametrize(
  "mode,weighted,normalize",
  list(itertools.product(["column", "row", "both"], [True, False], [False, True])),
)
def test_penalty_and_gradient_match_reference_formula(mode, weighted, normalize):
  rng = np.random.RandomState(0)
  w0 = rng.normal(size=(24, 16)).astype(np.float32)
  a = rng.normal(size=(3, 16)).astype(np.float32) * 0.3
  b = rng.normal(size=(24, 3)).astype(np.float32) * 0.3
  cfg = OrthoConfig(
    beta=1.0,
    k=5,
    mode=mode,
    weighted=weighted,
    normalize=normalize,
    span_dtype="float32",
    svd="exact",
  )
  ours = _ours(w0, a, b, cfg)
  ref = _reference(w0, a, b, 5, mode, weighted, normalize, torch.float32)
  np.testing.assert_allclose(ours[0], ref[0], rtol=1e-5)
  for got, want in zip(ours[1:], ref[1:]):  # float32 summation order: relative to the scale
    np.testing.assert_allclose(got, want, atol=1e-5 * np.abs(want).max())


def test_bfloat16_spans_as_the_reference_stores_them():
  rng = np.random.RandomState(1)
  w0, a, b = (rng.normal(size=s).astype(np.float32) for s in [(20, 12), (2, 12), (20, 2)])
  cfg = OrthoConfig(beta=1.0, k=4, mode="column", span_dtype="bfloat16", svd="exact")
  ref = _reference(w0, a, b, 4, "column", True, False, torch.bfloat16)
  np.testing.assert_allclose(_ours(w0, a, b, cfg)[0], ref[0], rtol=1e-4)


def test_hand_checked_example():
  """W0 = diag(3, 2, 1), k = 1: U = V = e1, S = 3. dW = B A with B = (1, 1, 0)^T, A = (1, 0, 0):
  column ||3 e1^T dW||^2 = 9, row ||dW e1 3||^2 = 18, both (3 * 1 * 3)^2 = 81, uniform column 1,
  normalised column ||e1^T dW||^2 / ||dW||^2 = 1 / 2."""
  w0 = np.diag([3.0, 2.0, 1.0]).astype(np.float32)
  a = np.array([[1.0, 0.0, 0.0]], np.float32)
  b = np.array([[1.0], [1.0], [0.0]], np.float32)
  expect = {
    ("column", True, False): 9.0,
    ("row", True, False): 18.0,
    ("both", True, False): 81.0,
    ("column", False, False): 1.0,
    ("column", True, True): 0.5,
  }
  for (mode, weighted, normalize), value in expect.items():
    cfg = OrthoConfig(
      beta=1.0,
      k=1,
      mode=mode,
      weighted=weighted,
      normalize=normalize,
      span_dtype="float32",
      svd="exact",
    )
    assert _ours(w0, a, b, cfg)[0] == pytest.approx(value, rel=1e-6), (mode, weighted, normalize)


def test_randomized_svd_finds_the_top_subspace():
  rng = np.random.RandomState(2)
  u, _ = np.linalg.qr(rng.normal(size=(64, 64)))
  v, _ = np.linalg.qr(rng.normal(size=(48, 48)))
  s = np.concatenate([[50.0, 40.0, 30.0], np.full(45, 0.1)])
  w = (u[:, :48] * s) @ v.T
  uk, sk, vk = top_k_svd(jnp.asarray(w, jnp.float32), 3, jax.random.key(0), "randomized")
  np.testing.assert_allclose(np.asarray(sk), s[:3], rtol=1e-4)
  assert np.abs(np.abs(np.asarray(uk).T @ u[:, :3]) - np.eye(3)).max() < 1e-4
