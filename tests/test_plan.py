"""Memory plans (lora_jax.plan): the HLO counts, the shipped paper shapes, agreement with what
training compiles and places, and the planned figure against the measured peak of a real step."""

import dataclasses
import gc
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO

from configs import base
from configs.paper import common as paper
from lora_jax import train as train_lib
from lora_jax.metrics_log import flops_per_token
from lora_jax.optim import init_opt_state
from lora_jax.plan import (
  PlanError,
  Target,
  abstract,
  format_plan,
  hlo,
  make_plan,
  model_config,
  parse_size,
  plan_train_step,
  planner,
  shipped_shapes,
)
from lora_jax.plan.fit import plan_mesh
from lora_jax.run_config import from_dict

SHAPES = str(REPO / "configs/paper/shapes")
# Parameter counts of the published checkpoints (the safetensors totals shown on their model pages).
PUBLISHED_PARAMS = {"1.5b": 1.78e9, "7b": 7.62e9, "14b": 14.8e9, "32b": 32.8e9}
TINY = {
  "architectures": ["Qwen2ForCausalLM"],
  "model_type": "qwen2",
  "vocab_size": 32000,
  "hidden_size": 512,
  "intermediate_size": 1536,
  "num_hidden_layers": 4,
  "num_attention_heads": 8,
  "num_key_value_heads": 2,
  "rms_norm_eps": 1e-6,
  "rope_theta": 10000.0,
  "tie_word_embeddings": False,
}


def tiny_run(path, mode="full", mesh="fsdp:-1", max_length=128, remat="none"):
  c = base.get_config()
  c.model.source = str(path)
  c.model.remat = remat
  c.train.mode = mode
  c.train.batch_size = 2
  c.data.max_length = max_length
  c.mesh.shape = mesh
  return from_dict(c)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  path = tmp_path_factory.mktemp("plan") / "config.json"
  path.write_text(json.dumps(TINY))
  return path, model_config(str(path))


# ---- HLO counts ------------------------------------------------------------------------------------
def test_hlo_counts_loop_bodies_as_often_as_they_run():
  """A 10-layer scan, weights sharded over 4 devices: 3x the forward's matmul FLOPs per device
  (forward, input and weight gradients), and one all-gather / all-reduce per layer."""
  mesh = plan_mesh("fsdp:4", 4)
  P = jax.sharding.PartitionSpec
  sharded, replicated = (jax.sharding.NamedSharding(mesh, p) for p in (P(None, "fsdp"), P()))

  def loss(w, x):
    return jax.lax.scan(lambda h, wl: (jnp.tanh(h @ wl), None), x, w)[0].sum()

  w = jax.ShapeDtypeStruct((10, 256, 256), jnp.float32, sharding=sharded)
  x = jax.ShapeDtypeStruct((64, 256), jnp.float32, sharding=replicated)
  compiled = jax.jit(jax.grad(loss)).lower(w, x).compile()
  counts = hlo.analyze(compiled.as_text())
  assert counts.dot_flops == 3 * 10 * 2 * 64 * 256 * 256 / 4
  gathers, _ = counts.collectives["all-gather"]
  reduces, reduced = counts.collectives["all-reduce"]
  assert gathers == 10 and reduces == 10
  assert reduced == 10 * 64 * 256 * 4  # the [64, 256] float32 activation gradient per layer
  cost = compiled.cost_analysis()
  assert (cost[0] if isinstance(cost, list) else cost)["flops"] < counts.dot_flops / 5


def test_shape_bytes():
  assert hlo.shape_bytes("(s32[], bf16[4,8]{1,0}, /*index=2*/f32[2])") == 4 + 64 + 8
  assert hlo.shape_bytes("pred[<=16]") == 16


# ---- shipped shapes and inputs --------------------------------------------------------------------
def test_shipped_paper_shapes_match_the_published_models():
  shapes = shipped_shapes(SHAPES)
  for size, (hub_id, layers) in paper.MODELS.items():
    assert hub_id in shapes, f"no shipped shapes for {hub_id}"
    assert shapes[hub_id]["_source"], "each shape file says where it came from"
    cfg = model_config(hub_id, SHAPES)
    assert cfg.num_layers == layers
    assert cfg.num_params() == pytest.approx(PUBLISHED_PARAMS[size], rel=0.005)
  seven = model_config(paper.MODELS["7b"][0], SHAPES)  # ../shared/paper-setup.md's figures
  assert (seven.hidden_size, seven.num_heads, seven.num_kv_heads) == (3584, 28, 4)
  assert (seven.intermediate_size, seven.vocab_size, seven.rope_theta) == (18944, 152064, 1e4)
  assert seven.qkv_bias and not seven.tie_word_embeddings and seven.rms_norm_eps == 1e-6


def test_unknown_model_and_bad_sizes_are_one_line_errors():
  with pytest.raises(PlanError, match="no shipped shapes.*planning never downloads"):
    model_config("someone/NoSuchModel", SHAPES)
  with pytest.raises(PlanError, match="expected a number with a unit"):
    parse_size("80 parsecs")
  assert parse_size("80GiB") == 80 << 30 and parse_size("16GB") == 16_000_000_000
  with pytest.raises(PlanError, match="only 8 JAX devices"):
    plan_mesh("fsdp:-1", 16)


def test_optimizer_state_is_placed_as_training_places_it(tiny):
  """The plan evaluates train.init_opt_state on abstract params: same shardings as the real call."""
  path, config = tiny
  for mesh_spec in ("fsdp:-1", "fsdp:4,tensor:2", "data:2,fsdp:2"):
    cfg = tiny_run(path, mesh=mesh_spec)
    mesh = plan_mesh(mesh_spec, 8)
    x = abstract.train_inputs(cfg, config, mesh)
    real = jax.tree.map(
      lambda s: jax.device_put(np.zeros(s.shape, s.dtype), s.sharding), x.trainable
    )
    placed = init_opt_state(x.tx, real, mesh)
    planned = jax.tree.map(lambda s: s.sharding, x.opt_state)
    assert jax.tree.map(lambda a: a.sharding, placed) == planned


def test_planned_step_is_the_step_training_compiles(tiny):
  """Same memory analysis as train.compile_step on real arrays of the same run."""
  path, config = tiny
  cfg = tiny_run(path, mode="lora", mesh="fsdp:4")
  mesh = plan_mesh("fsdp:4", 4)
  plan = plan_train_step(cfg, config, mesh)
  x = abstract.train_inputs(cfg, config, mesh)
  real = lambda t: jax.tree.map(lambda s: jax.device_put(np.zeros(s.shape, s.dtype), s.sharding), t)
  state = train_lib.State(
    x.graphdef, real(x.trainable), real(x.frozen), real(x.opt_state), x.tx, x.schedule, None,
    config, {},
  )  # fmt: skip
  compiled = (
    train_lib.compile_step(cfg, state)
    .lower(state.trainable, state.opt_state, state.frozen, real(x.batch), 0)
    .compile()
  )
  mem = compiled.memory_analysis()
  assert plan.argument_bytes == mem.argument_size_in_bytes == sum(plan.inputs.values())
  assert plan.alias_bytes == mem.alias_size_in_bytes
  assert plan.temp_bytes == pytest.approx(mem.temp_size_in_bytes, rel=0.02)


# ---- figures ---------------------------------------------------------------------------------------
def test_train_flops_match_the_analytic_count(tiny):
  """Full fine-tuning, no remat: matmul FLOPs = 3 x forward (PaLM's count, metrics_log)."""
  path, config = tiny
  cfg = tiny_run(path, mesh="fsdp:1", max_length=128)
  plan = plan_train_step(cfg, config, plan_mesh("fsdp:1", 1))
  expected = flops_per_token(config, 128, full_finetune=True) * 2 * 128
  assert plan.dot_flops == pytest.approx(expected, rel=0.05)
  assert plan.collective_bytes == 0


def _rss_kib(field: str) -> int:
  with open("/proc/self/status") as f:
    return int(next(line.split()[1] for line in f if line.startswith(field + ":")))


@pytest.mark.slow
def test_planned_memory_is_the_measured_peak_of_the_step(tiny):
  """The plan's per-device figure against the real step on one CPU device. Measured: the step's
  arguments (resident before it runs, their exact nbytes) plus the growth of the process's peak
  RSS while it runs (VmHWM reset through /proc/self/clear_refs just before), i.e. every page the
  step newly touches: its temporaries, its outputs, the runtime's scratch. One device, so the
  process's growth is that device's; the second call is measured (steady state of a training loop,
  donated buffers already XLA's own)."""
  path, config = tiny
  cfg = tiny_run(path, mesh="fsdp:1", max_length=256)
  mesh = plan_mesh("fsdp:1", 1)
  plan = plan_train_step(cfg, config, mesh)
  jitted, args, _ = planner.train_step_program(cfg, config, mesh)
  compiled = jitted.lower(*args).compile()
  rng = np.random.default_rng(0)

  def real(s):
    if jnp.issubdtype(s.dtype, jnp.floating):
      return jax.device_put(rng.normal(0, 0.02, s.shape).astype(s.dtype), s.sharding)
    return jax.device_put(rng.integers(0, 100, s.shape).astype(s.dtype), s.sharding)

  trainable, opt_state, frozen, batch = jax.tree.map(real, args[:4])
  batch = {k: jnp.ones_like(v) for k, v in batch.items()}  # every token real and trained on
  trainable, opt_state, _ = compiled(trainable, opt_state, frozen, batch, np.int32(0), None)
  jax.block_until_ready(trainable)
  resident = sum(a.nbytes for a in jax.tree.leaves((trainable, opt_state, frozen, batch)))
  gc.collect()
  with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # peak RSS := current RSS
  before = _rss_kib("VmRSS")
  out = compiled(trainable, opt_state, frozen, batch, np.int32(1), None)
  jax.block_until_ready(out)
  growth = (_rss_kib("VmHWM") - before) * 1024
  measured = resident + growth
  print(
    f"planned {plan.device_bytes / 2**20:.1f} MiB, measured {measured / 2**20:.1f} MiB "
    f"(arguments {resident / 2**20:.1f} + growth {growth / 2**20:.1f})"
  )
  assert resident + 4 == plan.argument_bytes  # + the int32 step index
  assert plan.device_bytes == pytest.approx(measured, rel=0.2)


@pytest.fixture(scope="module")
def full_4_and_8(tiny):
  """Full fine-tuning of the tiny model (short rows: the state dominates) on 4 and 8 devices."""
  path, config = tiny
  plans = {}
  for n in (4, 8):
    cfg = tiny_run(path, mesh="fsdp:-1", max_length=16)
    plans[n] = plan_train_step(cfg, config, plan_mesh("fsdp:-1", n))
  return plans


def test_fsdp_halves_the_state_per_device(full_4_and_8):
  """Params and Adam's moments both sharded over fsdp (the moments like their params)."""
  four, eight = full_4_and_8[4], full_4_and_8[8]
  for part in ("trainable params", "optimizer state"):
    assert eight.inputs[part] == pytest.approx(four.inputs[part] / 2, rel=0.01)
  assert eight.collectives["all-gather"][0] > 0  # params are gathered for the matmuls


def test_full_finetuning_per_device_memory_halves_with_twice_the_devices(full_4_and_8):
  four, eight = full_4_and_8[4], full_4_and_8[8]
  print(
    f"per device: 4 devices {four.device_bytes / 2**20:.1f} MiB, 8 devices "
    f"{eight.device_bytes / 2**20:.1f} MiB (optimizer state {four.inputs['optimizer state'] / 2**20:.1f}"
    f" -> {eight.inputs['optimizer state'] / 2**20:.1f} MiB)"
  )
  assert eight.device_bytes / four.device_bytes < 0.6


def test_plan_recommends_the_least_recompute_that_fits(tiny):
  path, config = tiny
  cfg = tiny_run(path, mesh="fsdp:1", max_length=256)
  plan = make_plan(
    cfg, config, Target(devices=1, device_memory=1 << 40, sample_rows=0, search=True)
  )
  by_remat = {a.remat: a.step for a in plan.attempts}
  assert list(by_remat) == ["none", "dots", "full"]
  assert (
    by_remat["none"].device_bytes > by_remat["dots"].device_bytes >= by_remat["full"].device_bytes
  )
  assert by_remat["full"].dot_flops > by_remat["none"].dot_flops  # the recompute is counted
  assert plan.fits and plan.recommended is plan.train
  # A device between what dots and none need: none does not fit, dots is the recommendation.
  middle = (by_remat["none"].device_bytes + by_remat["dots"].device_bytes) / 2 / 0.9
  tight = dataclasses.replace(plan, target=Target(devices=1, device_memory=int(middle)))
  assert not tight.fits and tight.recommended.remat == "dots"
  text = format_plan(tight)
  assert "does NOT fit" in text and "fits with --config.model.remat=dots" in text
  assert "bfloat16 matmuls in float32" in text  # a GPU plan says what XLA:CPU gets wrong
  tiny_device = dataclasses.replace(plan, target=Target(devices=1, device_memory=1 << 20))
  assert tiny_device.recommended is None
  assert "use more devices" in format_plan(tiny_device)


@pytest.mark.slow
def test_launch_plan_end_to_end(tiny, tmp_path):
  path, _ = tiny
  cmd = [
    sys.executable, "-m", "launch.plan", "--config=configs/base.py", f"--config.model.source={path}",
    "--config.train.mode=full", "--config.data.max_length=32", "--devices=2", "--device_memory=16GiB",
    "--sample_rows=2", "--sample_length=64", f"--json={tmp_path / 'plan.json'}",
  ]  # fmt: skip
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # launch.plan makes its devices
  done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
  assert done.returncode == 0, done.stderr[-2000:]
  assert "train step, mesh fsdp:2, remat none" in done.stdout and "decode step" in done.stdout
  assert "verdict: the run fits as configured." in done.stdout
  saved = json.loads((tmp_path / "plan.json").read_text())
  assert saved["fits"] and saved["attempts"][0]["mesh"] == {"fsdp": 2}
  assert (
    saved["decode"]["inputs"]["KV cache"]
    == 2 * TINY["num_hidden_layers"] * 2 * 64 * 2 * 64 * 4 // 2
  )
  bad = subprocess.run(
    cmd[:5] + ["--device_memory=lots"], cwd=REPO, env=env, capture_output=True, text=True
  )
  assert bad.returncode == 2
  assert bad.stderr.strip().splitlines()[-1] == (
    "error: size 'lots': expected a number with a unit, e.g. 80GiB or 16GB"
  )
