"""Weight-space analysis: known answers on constructed matrices, the randomized SVD against the
exact one, agreement with the regulariser, and whole runs (LoRA, full, merged) with bad input."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from analysis_runs import make_runs

from lora_jax.analysis import (
  RANDOMIZED_ERROR,
  AnalysisError,
  PenaltySettings,
  analyze_runs,
  base_spectrum,
  dense_metrics,
  lora_metrics,
  write_report,
)
from lora_jax.analysis.weights import ModelTensors, open_run
from lora_jax.export import export_checkpoint
from lora_jax.ortho import MODES, OrthoConfig, module_spans, penalty

KEY = jax.random.key(0)
KS = (1, 4, 8)


def _base(m=48, n=32, seed=0):
  """W0 = U diag(10 .. 1) V^T with known singular vectors (distinct values: a clear top-k)."""
  rng = np.random.default_rng(seed)
  u, _ = np.linalg.qr(rng.standard_normal((m, m)))
  v, _ = np.linalg.qr(rng.standard_normal((n, n)))
  p = min(m, n)
  w0 = (u[:, :p] * np.linspace(10, 1, p)) @ v[:, :p].T
  return w0.astype(np.float32), u, v, rng


def _overlap(dw, spec, k, side):
  return dense_metrics(dw, spec, KS, PenaltySettings())["overlap"][str(k)][side]


def test_update_inside_the_top_k_span_has_overlap_one():
  w0, u, v, rng = _base()
  spec = base_spectrum(w0, 8, KEY)
  assert spec.method == "exact"
  left = u[:, :4] @ rng.standard_normal((4, 32))
  right = rng.standard_normal((48, 4)) @ v[:, :4].T
  both = u[:, :4] @ rng.standard_normal((4, 4)) @ v[:, :4].T
  for k in (4, 8):
    assert _overlap(left, spec, k, "left") == pytest.approx(1.0, abs=1e-6)
    assert _overlap(right, spec, k, "right") == pytest.approx(1.0, abs=1e-6)
    assert _overlap(both, spec, k, "both") == pytest.approx(1.0, abs=1e-6)
  assert _overlap(left, spec, 1, "left") < 0.9  # only part of it lies along u_1


def test_update_orthogonal_to_the_top_k_span_has_overlap_zero():
  w0, u, v, rng = _base()
  spec = base_spectrum(w0, 8, KEY)
  dense = u[:, 8:12] @ rng.standard_normal((4, 32))
  a, b = rng.standard_normal((32, 2)), rng.standard_normal((2, 4)) @ u[:, 8:12].T
  for k in KS:
    assert _overlap(dense, spec, k, "left") < 1e-6
    assert _overlap(dense, spec, k, "both") < 1e-6
    lora = lora_metrics(a, b, 2.0, spec, KS, PenaltySettings())["overlap"][str(k)]
    assert lora["left"] < 1e-6 and lora["both"] < 1e-6
  assert _overlap(dense, spec, 8, "right") > 0.05  # the input side is unconstrained


def test_rank_r_update_has_stable_rank_at_most_r():
  w0, _, _, rng = _base()
  spec = base_spectrum(w0, 8, KEY)
  for r in (1, 5):
    a, b = rng.standard_normal((32, r)), rng.standard_normal((r, 48))
    dense = dense_metrics((a @ b).T, spec, KS, PenaltySettings())["stable_rank"]
    lora = lora_metrics(a, b, 0.5, spec, KS, PenaltySettings())["stable_rank"]
    assert 1 - 1e-5 <= dense <= r + 1e-4 and 1 - 1e-5 <= lora <= r + 1e-4
    assert lora == pytest.approx(dense, rel=1e-4)
  assert dense > 1.5  # a random rank-5 update is not dominated by one direction


def test_random_update_overlaps_at_chance():
  """A Gaussian dW spreads its energy evenly: left k/m, right k/n, both k^2/(mn) on average
  (relative spread sqrt(2 / (k n)) for left: 3 % at k=16 here)."""
  rng = np.random.default_rng(5)
  m, n = 256, 192
  w0 = rng.standard_normal((m, n)).astype(np.float32)
  spec = base_spectrum(w0, 64, KEY)
  record = dense_metrics(rng.standard_normal((m, n)), spec, (16, 64), PenaltySettings())
  for k in (16, 64):
    o = record["overlap"][str(k)]
    assert o["random_left"] == k / m and o["random_right"] == k / n
    assert o["left"] == pytest.approx(k / m, rel=0.12)
    assert o["right"] == pytest.approx(k / n, rel=0.12)
  assert record["overlap"]["64"]["both"] == pytest.approx(64 * 64 / (m * n), rel=0.1)


@pytest.mark.parametrize("m,n", [(40, 56), (48, 48), (56, 40)])
def test_exact_spectrum_equals_lapack_in_float64(m, n):
  """Tall, square and wide: the Gram matrix is taken on the smaller side."""
  w0, _, _, _ = _base(m=m, n=n, seed=2)
  spec = base_spectrum(w0, 8, KEY)
  u, s, vt = np.linalg.svd(w0.astype(np.float64))
  np.testing.assert_allclose(np.asarray(spec.s), s[:8], rtol=1e-5)
  np.testing.assert_allclose(np.abs(np.asarray(spec.u).T @ u[:, :8]), np.eye(8), atol=1e-4)
  np.testing.assert_allclose(np.abs(np.asarray(spec.v).T @ vt[:8].T), np.eye(8), atol=1e-4)
  assert spec.fro == pytest.approx(np.linalg.norm(w0), rel=1e-6)


def test_randomized_svd_within_its_stated_error():
  """W0 with a power-law spectrum over a noise floor (like a trained weight); dW of several kinds.
  Overlaps are absolute errors, singular values and stable rank relative ones."""
  rng = np.random.default_rng(1)
  m, n, K = 600, 300, 32
  u, _ = np.linalg.qr(rng.standard_normal((m, n)))
  v, _ = np.linalg.qr(rng.standard_normal((n, n)))
  w0 = (u * np.arange(1, n + 1) ** -0.5) @ v.T + 0.002 * rng.standard_normal((m, n))
  exact = base_spectrum(w0, K, KEY, exact_max=4096)
  rand = base_spectrum(w0, K, KEY, exact_max=100)
  assert (exact.method, rand.method) == ("exact", "randomized")
  s_err = np.max(np.abs(np.asarray(rand.s) / np.asarray(exact.s) - 1))
  assert s_err <= RANDOMIZED_ERROR["singular_values"], s_err
  ks = (1, 4, 16, 32)
  updates = [
    u[:, :16] @ rng.standard_normal((16, n)),
    rng.standard_normal((m, 24)) @ v[:, :24].T,
    rng.standard_normal((m, n)),
  ]
  worst = 0.0
  for dw in updates:
    a = dense_metrics(dw, exact, ks, PenaltySettings())["overlap"]
    b = dense_metrics(dw, rand, ks, PenaltySettings())["overlap"]
    worst = max(worst, *(abs(a[str(k)][s] - b[str(k)][s]) for k in ks for s in a[str(k)]))
  assert worst <= RANDOMIZED_ERROR["overlap"], worst
  gauss = rng.standard_normal((m, n))  # the flattest spectrum: the randomized sigma_1's worst case
  sr_exact = dense_metrics(gauss, exact, ks, PenaltySettings(), exact_max=4096)["stable_rank"]
  sr_rand = dense_metrics(gauss, exact, ks, PenaltySettings(), exact_max=100)["stable_rank"]
  assert abs(sr_rand / sr_exact - 1) <= RANDOMIZED_ERROR["stable_rank"], (sr_rand, sr_exact)


@pytest.mark.parametrize("weighted,normalize", [(True, False), (False, True)])
def test_penalty_is_the_regularisers_own(weighted, normalize):
  """The analysis's penalty equals `ortho.penalty` (the training loss term) on the same adapter,
  and with uniform normalised spans it is the overlap."""
  w0, _, _, rng = _base(m=24, n=16)
  a, b = rng.standard_normal((16, 3)), rng.standard_normal((3, 24))
  spec = base_spectrum(w0, 6, KEY)
  settings = PenaltySettings(weighted, normalize)
  record = lora_metrics(a, b, 5.0, spec, (2, 6), settings)
  dense = dense_metrics(5.0 * (a @ b).T, spec, (2, 6), settings)
  for mode in MODES:
    for k in (2, 6):
      cfg = OrthoConfig(
        k=k, mode=mode, weighted=weighted, normalize=normalize, span_dtype="float32", svd="exact"
      )
      spans = module_spans(w0[None], cfg, KEY)
      want = float(penalty(a[None], b[None], spans, cfg, np.ones(1, np.float32)))
      assert record["penalty"][str(k)][mode] == pytest.approx(want, rel=1e-5)
      scale2 = 1.0 if normalize else 25.0  # the dense dW carries the alpha / r scale
      assert dense["penalty"][str(k)][mode] == pytest.approx(want * scale2, rel=1e-4)
  uniform = lora_metrics(a, b, 1.0, spec, (2,), PenaltySettings(False, True))
  assert uniform["penalty"]["2"]["column"] == pytest.approx(uniform["overlap"]["2"]["left"], 1e-6)


def test_lora_and_dense_paths_agree():
  w0, _, _, rng = _base()
  spec = base_spectrum(w0, 8, KEY)
  a, b = rng.standard_normal((32, 4)), rng.standard_normal((4, 48))
  lora = lora_metrics(a, b, 4.0, spec, KS, PenaltySettings())
  dense = dense_metrics(4.0 * (a @ b).T, spec, KS, PenaltySettings())
  for key in ("fro", "rel_fro", "spectral", "stable_rank"):
    assert lora[key] == pytest.approx(dense[key], rel=1e-5), key
  for k in KS:
    for side, value in lora["overlap"][str(k)].items():
      assert value == pytest.approx(dense["overlap"][str(k)][side], rel=1e-4, abs=1e-7)


# ---- whole runs ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  return make_runs(tmp_path_factory)


@pytest.fixture(scope="module")
def analysed(runs):
  return analyze_runs(runs["base"], {"lora": runs["lora"], "full": runs["full"]}, progress=False)


def test_records_cover_every_step_layer_and_module(analysed):
  for name, recs in analysed.items():
    assert {r["step"] for r in recs} == {1, 2}
    assert len(recs) == 2 * 3 * 7  # steps x layers x modules (LoRA: qkvo_mlp on every layer)
    r = recs[-1]
    assert set(r["overlap"]) == {"1", "4", "16"}  # the default ks up to k_proj's 32 x 64
    assert r["fro"] > 0 and 1 <= r["stable_rank"] <= r["rank_bound"]
    assert r["kind"] == name and r["w0_svd"] == "exact"
  assert all(r["rank_bound"] == 4 for r in analysed["lora"])


def test_lora_update_from_the_adapter_equals_merged_minus_base(runs, analysed, tmp_path):
  merged = export_checkpoint(runs["lora"], str(tmp_path / "merged"), "merged", step=2)
  base = ModelTensors(runs["base"])
  run = open_run("lora", runs["lora"], base, steps=[2])
  merged_tensors = ModelTensors(merged)
  for module in ("q_proj", "down_proj"):
    for layer, (_, a, b, scale) in run.updates(module, 2):
      want = merged_tensors.kernel(module, layer) - base.kernel(module, layer)
      np.testing.assert_allclose(scale * (a @ b).T, want, atol=1e-6)
  run.close()
  as_model = analyze_runs(runs["base"], {"merged": merged}, progress=False)["merged"]
  lora = [r for r in analysed["lora"] if r["step"] == 2]
  assert len(as_model) == len(lora)
  for got, want in zip(as_model, lora):
    assert (got["layer"], got["module"]) == (want["layer"], want["module"])
    assert got["stable_rank"] == pytest.approx(want["stable_rank"], rel=1e-3)
    assert got["fro"] == pytest.approx(want["fro"], rel=1e-4)
    for k, sides in want["overlap"].items():
      for side in ("left", "right", "both"):
        assert got["overlap"][k][side] == pytest.approx(sides[side], rel=1e-3, abs=1e-6)


def test_report_files(analysed, tmp_path):
  last = {name: [r for r in recs if r["step"] == 2] for name, recs in analysed.items()}
  paths = write_report(last, str(tmp_path / "out"))
  lines = open(paths["records"]).read().splitlines()
  assert len(lines) == sum(map(len, last.values()))
  assert json.loads(lines[0])["run"] in last
  summary = open(paths["summary"]).read()
  assert "Runs side by side" in summary and "(chance" in summary and "## lora, step 2" in summary
  names = {os.path.basename(p) for p in paths["images"]}
  assert {
    "heatmap_stable_rank_full_step2.png",
    "lines_stable_rank.png",
    "lines_overlap_k4.png",
  } <= (names)
  assert all(os.path.getsize(p) > 1000 for p in paths["images"])


def test_bad_input_is_one_line(runs, tmp_path_factory):
  from helpers import tiny_run_dir

  other = tiny_run_dir(tmp_path_factory.mktemp("other"), hidden_size=32)
  with pytest.raises(AnalysisError, match=r"another base model \(hidden_size=64\).*hidden_size=32"):
    analyze_runs(other, [runs["lora"]], progress=False)
  with pytest.raises(AnalysisError, match=r"no checkpoint for step \[7\]; steps present: \[1, 2\]"):
    analyze_runs(runs["base"], [runs["full"]], steps="2,7", progress=False)
  with pytest.raises(AnalysisError, match="k=64 is larger than k_proj .32x64.: k must be <= 32"):
    analyze_runs(runs["base"], [runs["full"]], ks="4,64", progress=False)
  out = tmp_path_factory.mktemp("cli") / "out"
  proc = subprocess.run(
    [sys.executable, "-m", "launch.analyze", f"--run={runs['full']}", "--k=40", f"--out={out}"],
    capture_output=True,
    text=True,
    cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
  )
  assert proc.returncode == 2, proc.stderr
  assert proc.stderr.strip().splitlines() == [
    "error: k=40 is larger than k_proj (32x64): k must be <= 32 (or leave k_proj out with --modules)"
  ]
  assert not out.exists()  # nothing written, nothing lost
