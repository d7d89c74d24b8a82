"""train.precision: the loss scaler against torch's GradScaler, the reference's dtypes for LoRA and
full fine-tuning, skipped steps, resume with the scaler, and the config rules."""

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
import torch
from flax import nnx
from helpers import read_metrics, tiny_run, tiny_run_dir, train_config

from configs.paper import full, lora, ortho
from lora_jax import precision
from lora_jax.checkpoint import Checkpointer
from lora_jax.run import build_model
from lora_jax.run_config import RunConfigError, from_dict
from lora_jax.sharding import make_mesh
from lora_jax.train import compile_step, init_state, load_data, train

# Per step, the gradient's coefficients: 1e34 overflows float32 once scaled by 2**16 but not by
# 2**15; NaN is skipped at any scale.
COEFFS = [1.0, 1e34, 1e34, 2.0, -1.0, 3.0, 0.5, 1e34, float("nan"), 1.0, 1.0, 1.0, 1.0, 4.0]


def test_loss_scaler_matches_torch_gradscaler_step_for_step():
  """The same grads through torch.amp.GradScaler + SGD and through our scaler + optax.sgd: the
  same scale after every step, the same steps skipped, the same params (growth interval 3 so
  the scale also grows in a short run; the defaults are GradScaler's)."""
  d = precision.LossScaleConfig()
  torch_default = torch.amp.GradScaler("cpu")
  assert (d.init_scale, d.growth_factor, d.backoff_factor, d.growth_interval) == (
    torch_default.get_scale(),
    torch_default.get_growth_factor(),
    torch_default.get_backoff_factor(),
    torch_default.get_growth_interval(),
  )
  p = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5]))
  sgd = torch.optim.SGD([p], lr=0.1)
  scaler = torch.amp.GradScaler("cpu", growth_interval=3)
  theirs = []
  for c in COEFFS:
    sgd.zero_grad()
    scaler.scale((p * torch.tensor([c, 1.0, -1.0])).sum()).backward()
    before = p.detach().clone()
    scaler.step(sgd)
    scaler.update()
    theirs.append(
      (scaler.get_scale(), bool(torch.equal(before, p.detach())), p.detach().clone().numpy())
    )

  tx = precision.with_loss_scale(optax.sgd(0.1), precision.LossScaleConfig(growth_interval=3))
  params = jnp.asarray([1.0, -2.0, 0.5], jnp.float32)
  state = tx.init(params)
  for i, c in enumerate(COEFFS):
    scale = precision.current_scale(state)
    loss = lambda w, c=c, s=scale: jnp.sum(w * jnp.asarray([c, 1.0, -1.0], jnp.float32)) * s
    grads = precision.unscale(jax.grad(loss)(params), scale)
    params, state, m = precision.apply(tx, grads, state, params)
    want_scale, want_skip, want_params = theirs[i]
    assert float(precision.current_scale(state)) == want_scale, i
    assert bool(m["step_skipped"]) == want_skip and float(m["loss_scale"]) == float(scale), i
    np.testing.assert_allclose(np.asarray(params), want_params, rtol=1e-6, err_msg=str(i))
  skipped = [s for _, s, _ in theirs]
  assert int(precision.skipped_steps(state)) == sum(skipped) == 3  # both 1e34 at 2**16, NaN
  assert [t[0] for t in theirs[:4]] == [2.0**16, 2.0**15, 2.0**15, 2.0**15]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  return tiny_run_dir(tmp_path_factory.mktemp("tiny"), intermediate_size=64)


def _state(run_dir, **dotted):
  cfg = tiny_run(run_dir, **{"train.steps": 4, **dotted})
  mesh = make_mesh(cfg.mesh.axes)
  model, tokenizer = build_model(cfg, mesh)
  data = load_data(cfg, tokenizer)
  state = init_state(cfg, model, 4, mesh)
  return cfg, state, compile_step(cfg, state), next(data.it)


def _host(tree):
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def _dtypes(tree) -> set:
  return {np.dtype(x.dtype).name for x in jax.tree.leaves(tree)}


def test_reference_lora_skips_an_overflow_step_bitwise(run_dir):
  """precision=reference, LoRA: a bfloat16 base, float32 adapters, float16 compute with a float32
  residual stream; a step whose scaled gradients overflow float16 changes no param and no
  optimizer state, halves the scale and counts one skip; the next step trains."""
  _, s, step_fn, batch = _state(run_dir, **{"train.precision": "reference"})
  model = nnx.merge(s.graphdef, s.trainable, s.frozen)
  assert (model.dtype, model.residual_dtype) == ("float16", "float32")
  assert _dtypes(nnx.state(model, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam)))) == {"bfloat16"}
  assert _dtypes(s.trainable) == {"float32"}
  huge = jax.device_put(jnp.float32(2.0**100), s.opt_state.loss_scale.scale.sharding)
  opt = s.opt_state._replace(loss_scale=s.opt_state.loss_scale._replace(scale=huge))
  params_before, inner_before = _host(s.trainable), _host(opt.inner.inner_state)
  trainable, opt, m = step_fn(s.trainable, opt, s.frozen, batch, 0)
  assert float(m["step_skipped"]) == 1 and int(opt.inner.total_notfinite) == 1
  assert float(opt.loss_scale.scale) == 2.0**99 and np.isfinite(float(m["loss"]))
  for a, b in zip(_host(trainable), params_before):
    np.testing.assert_array_equal(a, b)
  for a, b in zip(_host(opt.inner.inner_state), inner_before):
    np.testing.assert_array_equal(a, b)
  normal = jax.device_put(jnp.float32(2.0**16), huge.sharding)
  opt = opt._replace(loss_scale=opt.loss_scale._replace(scale=normal))
  trainable, opt, m = step_fn(trainable, opt, s.frozen, batch, 1)
  assert float(m["step_skipped"]) == 0 and int(opt.inner.total_notfinite) == 1
  assert float(m["lr"]) == pytest.approx(1e-3)  # the schedule's step 0: the skip did not count
  assert any(not np.array_equal(a, b) for a, b in zip(_host(trainable), params_before))


def test_reference_full_finetuning_is_pure_bfloat16(run_dir):
  """precision=reference, full: bfloat16 weights and Adam moments, no float32 master, no
  loss scaler; a step keeps every dtype and moves the weights."""
  cfg, s, step_fn, batch = _state(run_dir, **{"train.precision": "reference", "train.mode": "full"})
  assert (cfg.model.dtype, cfg.model.compute_dtype) == ("bfloat16", "bfloat16")
  assert precision.current_scale(s.opt_state) is None
  before = _host(s.trainable)
  trainable, opt, m = step_fn(s.trainable, s.opt_state, s.frozen, batch, 0)
  assert _dtypes(trainable) == {"bfloat16"} and np.isfinite(float(m["loss"]))
  adam = opt[-1][0]  # chain(clip, adamw(...)) -> adamw's chain -> ScaleByAdamState
  assert isinstance(adam, optax.ScaleByAdamState)
  assert _dtypes(adam.mu) == _dtypes(adam.nu) == {"bfloat16"}
  assert any(not np.array_equal(a, b) for a, b in zip(_host(trainable), before))


@pytest.mark.slow
def test_resume_with_the_loss_scaler_is_exact(run_dir, tmp_path):
  """A reference-precision LoRA run with a checkpoint every step; its last two are set aside and
  the run resumed from step 3: it logs the same losses and scales for steps 4 and 5 and ends with
  the same adapter and optimizer state (the scaler's growth tracker included, 5 by then)."""
  cfg = tiny_run(
    run_dir,
    **{
      "train.steps": 5,
      "train.precision": "reference",
      "lora.dropout": 0.1,
      "checkpoint.every_steps": 1,
    },
  )
  work = tmp_path / "run"
  train(cfg, str(work))
  shutil.copytree(work / "checkpoints" / "5", tmp_path / "uninterrupted")
  ckpt = Checkpointer(str(work / "checkpoints"), async_save=False)
  for step in (4, 5):
    ckpt.manager.delete(step)
  ckpt.close()
  assert train(cfg, str(work)).step == 5
  rows = [r for r in read_metrics(work) if "train/loss" in r]
  logged = [
    (r["step"], r["train/loss"], r["train/loss_scale"], r["train/skipped_steps"]) for r in rows
  ]
  assert [x[0] for x in logged] == [1, 2, 3, 4, 5, 4, 5] and logged[5:] == logged[3:5]
  restore = lambda path: ocp.PyTreeCheckpointer().restore(str(path))
  for item in ("params", "opt_state"):
    whole, part = restore(tmp_path / "uninterrupted" / item), restore(work / "checkpoints/5" / item)
    assert jax.tree.structure(whole) == jax.tree.structure(part)
    for a, b in zip(jax.tree.leaves(whole), jax.tree.leaves(part)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  scaler = restore(work / "checkpoints/5/opt_state")["loss_scale"]
  assert (int(scaler["growth_tracker"]), float(scaler["scale"])) == (5, 2.0**16)


def test_precision_sets_the_dtypes_and_refuses_what_disagrees():
  def resolved(**dotted):
    cfg = from_dict(train_config("unused", **dotted))
    return cfg.train.precision, cfg.model.dtype, cfg.model.compute_dtype

  assert resolved() == ("float32", "float32", "float32")
  # mixed is what configs/paper set before train.precision: float32 master, bfloat16 compute.
  assert resolved(**{"train.precision": "mixed"}) == ("mixed", "float32", "bfloat16")
  assert resolved(**{"train.precision": "reference"}) == ("reference", "bfloat16", "float16")
  full_ref = {"train.precision": "reference", "train.mode": "full"}
  assert resolved(**full_ref) == ("reference", "bfloat16", "bfloat16")
  assert resolved(**{"train.precision": "mixed", "model.compute_dtype": "bfloat16"})[0] == "mixed"
  with pytest.raises(RunConfigError, match=r"^config.train.precision='fp8': expected one of"):
    resolved(**{"train.precision": "fp8"})
  with pytest.raises(
    RunConfigError,
    match=r"^config.model.dtype='float32': expected '' or 'bfloat16' \(train.precision='reference'",
  ):
    resolved(**{"train.precision": "reference", "model.dtype": "float32"})
  # A config.json from before train.precision: the precision is read from its dtypes.
  old = train_config("unused").to_dict()
  del old["train"]["precision"]
  old["model"].update(dtype="float32", compute_dtype="bfloat16")
  assert from_dict(old).train.precision == "mixed"
  old["model"].update(dtype="float32", compute_dtype="")
  assert from_dict(old).train.precision == "float32"
  old["model"].update(dtype="bfloat16", compute_dtype="")
  with pytest.raises(
    RunConfigError, match=r"^config.model.dtype='bfloat16', .*set train.precision"
  ):
    from_dict(old)
  cfg = from_dict(train_config("unused", **full_ref))
  assert from_dict(cfg.to_dict()) == cfg
  for c in (
    lora.get_config("7b,lora_up_proj_only_r1"),
    ortho.get_config("7b"),
    full.get_config("7b"),
  ):
    assert from_dict(c).train.precision == "reference"
