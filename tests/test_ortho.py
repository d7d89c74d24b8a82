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


def _reference_walk_k(peft_model, k: int, targets) -> dict:
  """The k the reference's span loop (models.py, inject_orthogonal_regularization) gives each
  adapted module: it walks named_modules() in order and sets k = min(k, min(weight.shape)) on
  every module whose name contains a target and that has a weight (the adapters' lora_A [r, in]
  and lora_B [out, r] included). Written from its description; {(layer, module): k}."""
  out = {}
  for name, module in peft_model.named_modules():
    hit = [t for t in targets if t in name]
    if not hit or not hasattr(module, "weight"):
      continue
    k = min(k, min(module.weight.shape))
    if hasattr(module, "lora_A") and hasattr(module, "lora_B"):
      out[(int(name.split("layers.")[1].split(".")[0]), hit[0])] = k
  return out


@pytest.mark.parametrize("layers", [None, (1, 2)])
def test_k_mode_reference_gives_the_reference_loops_effective_k(tmp_path, layers):
  """k=5, r=2: the reference's walk keeps k=5 for its first adapted module and 2 after it;
  k_mode="reference" spans have exactly that many nonzero rows per (module, layer), per_module
  5 everywhere; the first module's spans equal per_module's, the rest its own top-2 SVD."""
  import peft
  from helpers import tiny_hf_model

  from lora_jax import load_pretrained
  from lora_jax.lora import LoRAConfig, apply_lora
  from lora_jax.ortho import compute_spans

  mlp = ("gate_proj", "up_proj", "down_proj")
  hf = tiny_hf_model("qwen2", num_hidden_layers=4)
  hf.save_pretrained(tmp_path)
  extra = {} if layers is None else {"layers_to_transform": list(range(layers[0], layers[1] + 1))}
  wrapped = peft.get_peft_model(
    hf, peft.LoraConfig(r=2, lora_alpha=16, target_modules=list(mlp), **extra)
  )
  want = _reference_walk_k(wrapped, 5, mlp)
  first = next(iter(want))  # the walk meets (lowest adapted layer, "gate_proj") first
  assert first == (0 if layers is None else layers[0], "gate_proj")
  assert want[first] == 5 and {v for key, v in want.items() if key != first} == {2}

  model = load_pretrained(str(tmp_path))
  apply_lora(model, LoRAConfig(rank=2, targets=mlp, layers=layers))
  lo = 0 if layers is None else layers[0]
  base = dict(beta=1.0, k=5, mode="both", span_dtype="float32", svd="exact", targets=mlp)
  ref = compute_spans(model, OrthoConfig(**base, k_mode="reference"), first_layer=lo)
  per = compute_spans(model, OrthoConfig(**base, k_mode="per_module"), first_layer=lo)
  for (layer, name), k in want.items():
    c, r = np.asarray(ref[name]["c"][layer]), np.asarray(ref[name]["r"][layer])
    assert (np.linalg.norm(c, axis=1) > 0).sum() == k, (layer, name)
    assert (np.linalg.norm(r, axis=0) > 0).sum() == k, (layer, name)
    assert (np.linalg.norm(np.asarray(per[name]["c"][layer]), axis=1) > 0).sum() == 5
    # Exact SVD: the top-k rows agree with per_module's (a smaller k truncates the same SVD).
    np.testing.assert_allclose(c[:k], np.asarray(per[name]["c"][layer])[:k], atol=1e-5)
