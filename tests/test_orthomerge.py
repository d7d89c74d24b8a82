"""OrthoMerge: the projections against explicit projectors, the merged model's overlap (zero at
its k) and logits (the base model plus exactly the projected update), the export flags, bad input."""

import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from analysis_runs import make_runs

import lora_jax
from lora_jax.analysis import AnalysisError, analyze_runs
from lora_jax.export import export_checkpoint, restore_model
from lora_jax.model import LINEARS
from lora_jax.orthomerge import project_adapter, project_update

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _explicit(dw, u_k, v_k, mode):
  left = np.eye(dw.shape[0]) - u_k @ u_k.T
  right = np.eye(dw.shape[1]) - v_k @ v_k.T
  return {"column": left @ dw, "row": dw @ right, "both": left @ dw @ right}[mode]


@pytest.mark.parametrize("mode", ["column", "row", "both"])
def test_projections_equal_explicit_projectors(mode):
  rng = np.random.default_rng(0)
  w0 = rng.standard_normal((20, 12))
  u, _, vt = np.linalg.svd(w0)
  u_k, v_k = u[:, :3], vt[:3].T
  a, b = rng.standard_normal((12, 2)), rng.standard_normal((2, 20))  # dW = (a b)^T
  dw = (a @ b).T
  want = _explicit(dw, u_k, v_k, mode)
  np.testing.assert_allclose(project_update(dw, u_k, v_k, mode), want, atol=1e-12)
  pa, pb = project_adapter(a, b, u_k, v_k, mode)
  np.testing.assert_allclose((pa @ pb).T, want, atol=1e-12)  # still rank 2, same update
  np.testing.assert_allclose(project_update(want, u_k, v_k, mode), want, atol=1e-12)  # idempotent
  if mode != "row":
    assert np.abs(u_k.T @ want).max() < 1e-12
  if mode != "column":
    assert np.abs(want @ v_k).max() < 1e-12


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  return make_runs(tmp_path_factory)


def _max_overlap(records, k, sides):
  return max(r["overlap"][str(j)][s] for r in records for j in (1, k) for s in sides)


def test_orthomerged_lora_has_no_overlap_and_exactly_the_projected_logits(runs, tmp_path):
  out = export_checkpoint(
    runs["lora"], str(tmp_path / "om"), "merged", 2, ortho="column", ortho_k=4
  )
  records = analyze_runs(runs["base"], {"om": out}, ks=(1, 4, 16), progress=False)["om"]
  assert len(records) == 3 * len(LINEARS)
  assert _max_overlap(records, 4, ["left", "both"]) < 1e-6
  assert min(r["overlap"]["16"]["left"] for r in records) > 1e-3  # only the top 4 was removed

  trained, _, _, _ = restore_model(runs["lora"], 2)
  expected = lora_jax.load_pretrained(runs["base"])
  for name in LINEARS:
    lin, base_lin = getattr(trained.layers, name), getattr(expected.layers, name)
    w0 = np.asarray(base_lin.kernel[...], np.float64)
    a, b = (np.asarray(x[...], np.float64) for x in (lin.lora_a, lin.lora_b))
    scale = np.asarray(lin.lora_scale[...])
    new = np.empty_like(w0)
    for layer in range(w0.shape[0]):
      u = np.linalg.svd(w0[layer])[0][:, :4]
      dw = scale[layer] * (a[layer] @ b[layer]).T
      new[layer] = w0[layer] + (np.eye(len(u)) - u @ u.T) @ dw
    base_lin.kernel.set_value(jnp.asarray(new, jnp.float32))
  merged = lora_jax.load_pretrained(out)
  ids = np.random.default_rng(0).integers(0, merged.config.vocab_size, (2, 12))
  got, want = np.asarray(merged(ids)), np.asarray(expected(ids))
  np.testing.assert_allclose(got, want, atol=2e-5 * np.abs(want).max())
  plain = lora_jax.load_pretrained(
    export_checkpoint(runs["lora"], str(tmp_path / "p"), "merged", 2)
  )
  assert np.abs(np.asarray(plain(ids)) - want).max() > 1e-3  # the projection changed the model


def test_orthomerged_full_run_has_no_overlap_on_either_side(runs, tmp_path):
  out = export_checkpoint(runs["full"], str(tmp_path / "om"), "merged", 2, ortho="both", ortho_k=4)
  records = analyze_runs(runs["base"], {"om": out}, ks=(1, 4, 16), progress=False)["om"]
  assert _max_overlap(records, 4, ["left", "right", "both"]) < 1e-6
  trained, _, _, _ = restore_model(runs["full"], 2)
  merged = lora_jax.load_pretrained(out)
  # Params other than the linear kernels keep their fine-tuned values.
  for get in (lambda m: m.layers.mlp_norm, lambda m: m.embed, lambda m: m.layers.q_proj.bias):
    np.testing.assert_array_equal(np.asarray(get(merged)[...]), np.asarray(get(trained)[...]))


def test_export_flags_and_bad_input(runs, tmp_path):
  out = tmp_path / "row"
  cmd = [sys.executable, "-m", "launch.export", f"--workdir={runs['lora']}", "--format=merged"]
  proc = subprocess.run(
    cmd + ["--ortho=row", "--ortho_k=4", f"--out={out}"], capture_output=True, text=True, cwd=REPO
  )
  assert proc.returncode == 0, proc.stderr
  records = analyze_runs(runs["base"], {"row": str(out)}, ks=(1, 4), progress=False)["row"]
  assert _max_overlap(records, 4, ["right", "both"]) < 1e-6
  proc = subprocess.run(
    cmd + ["--ortho=column", "--ortho_k=40", f"--out={tmp_path / 'bad'}"],
    capture_output=True,
    text=True,
    cwd=REPO,
  )
  assert proc.returncode == 2 and "Traceback" not in proc.stderr
  assert proc.stderr.strip().splitlines()[-1] == (
    "error: --ortho_k=40 is larger than k_proj (32x64): at most 32"
  )
  assert not (tmp_path / "bad").exists()
  with pytest.raises(AnalysisError, match="ortho='diagonal'; expected one of"):
    export_checkpoint(runs["lora"], str(tmp_path / "x"), "merged", ortho="diagonal")
