"""Optimizer state shards like its parameter, on every mesh the tests use, through a train step
and a checkpoint restore (a replicated Adam moment is a full copy of the model per device)."""

import jax
import numpy as np
import pytest
from flax import nnx
from helpers import tiny_run, tiny_run_dir

from lora_jax.checkpoint import Checkpointer
from lora_jax.run import build_model
from lora_jax.sharding import make_mesh
from lora_jax.train import compile_step, init_state

# Every mesh shape the other tests train or load on (test_train, test_sharding, test_sampling,
# tests/faults/test_fault_processes), and one device.
MESHES = [
  "fsdp:1",
  "fsdp:8",
  "fsdp:4,tensor:2",
  "fsdp:2,tensor:4",
  "data:2,fsdp:2,tensor:2",
  "fsdp:2,data:2",
]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  # Every dimension a multiple of 8, so each mesh axis really splits the big matrices.
  return tiny_run_dir(
    tmp_path_factory.mktemp("tiny"),
    hidden_size=64,
    intermediate_size=128,
    num_attention_heads=8,
    num_key_value_heads=4,
  )


def _param_of(opt_path, params: dict):
  """The param whose key path ends the optimizer-state path (None for scalars)."""
  for start in range(len(opt_path)):
    if tuple(opt_path[start:]) in params:
      return params[tuple(opt_path[start:])]
  return None


def _check_like_params(opt_state, trainable, mesh):
  params = {tuple(p): x for p, x in jax.tree_util.tree_flatten_with_path(trainable)[0]}
  leaves = jax.tree_util.tree_flatten_with_path(opt_state)[0]
  moments = 0
  for path, leaf in leaves:
    name = jax.tree_util.keystr(tuple(path))
    param = _param_of(path, params)
    if param is None:
      assert leaf.ndim == 0, name
      assert leaf.sharding.is_equivalent_to(jax.sharding.NamedSharding(mesh, jax.P()), 0), name
      continue
    moments += 1
    assert leaf.sharding.is_equivalent_to(param.sharding, leaf.ndim), (name, leaf.sharding)
    per_device = {s.data.shape for s in leaf.addressable_shards}
    assert per_device == {s.data.shape for s in param.addressable_shards}, name
  assert moments == 2 * len(params)  # Adam's mu and nu for every trainable param
  return moments


def _state(run_dir, shape, mode):
  cfg = tiny_run(run_dir, **{"mesh.shape": shape, "train.mode": mode})
  mesh = make_mesh(cfg.mesh.axes)
  model, _ = build_model(cfg, mesh)
  return cfg, mesh, init_state(cfg, model, total_steps=4, mesh=mesh)


@pytest.mark.parametrize("mode", ["lora", "full"])
@pytest.mark.parametrize("shape", MESHES)
def test_optimizer_state_shards_like_params(run_dir, tmp_path, shape, mode):
  cfg, mesh, state = _state(run_dir, shape, mode)
  _check_like_params(state.opt_state, state.trainable, mesh)
  if mode == "full" and mesh.shape["fsdp"] * mesh.shape["tensor"] > 1:
    # The example of issue 12: an fsdp/tensor-sharded kernel's moment is split the same way.
    mu = state.opt_state[1][0].mu["layers"]["up_proj"]["kernel"]
    kernel = state.trainable["layers"]["up_proj"]["kernel"]
    assert mu.addressable_shards[0].data.size < mu.size
    assert mu.addressable_shards[0].data.shape == kernel[...].addressable_shards[0].data.shape

  # A restored checkpoint comes back with the same shardings.
  ckpt = Checkpointer(str(tmp_path / "ckpt"), async_save=False)
  ckpt.save(1, nnx.to_pure_dict(state.trainable), state.opt_state, {"step": 1})
  ckpt.wait()
  params, opt_state, _ = ckpt.restore(1, nnx.to_pure_dict(state.trainable), state.opt_state)
  ckpt.close()
  nnx.replace_by_pure_dict(state.trainable, params)
  _check_like_params(opt_state, state.trainable, mesh)
  for a, b in zip(jax.tree.leaves(opt_state), jax.tree.leaves(state.opt_state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_train_step_keeps_the_layout(run_dir):
  """The step's out_shardings are its inputs': one mesh and mode shows it (a compile is slow)."""
  cfg, mesh, state = _state(run_dir, "data:2,fsdp:2,tensor:2", "full")
  step = compile_step(cfg, state)
  rows = cfg.train.batch_size
  ids = np.tile(np.arange(16, dtype=np.int32), (rows, 1))
  batch = {
    "input_ids": ids,
    "loss_mask": np.ones_like(ids),
    "attention_mask": np.ones_like(ids),
    "segment_ids": np.ones_like(ids),
    "positions": np.tile(np.arange(16, dtype=np.int32), (rows, 1)),
  }
  batch = jax.device_put(batch, jax.sharding.NamedSharding(mesh, jax.P(("data", "fsdp"))))
  state.trainable, state.opt_state, _ = step(
    state.trainable, state.opt_state, state.frozen, batch, 0
  )
  _check_like_params(state.opt_state, state.trainable, mesh)
