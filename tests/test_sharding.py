"""Loaded onto 8 fake CPU devices, the sharded model gives the single-device logits."""

import jax
import numpy as np
import pytest
from flax import nnx
from helpers import left_padded_batch, tiny_hf_model

import lora_jax
from lora_jax.sharding import logical_to_spec, make_mesh

MESHES = [{"fsdp": 4, "tensor": 2}, {"fsdp": 8}, {"data": 2, "fsdp": 2, "tensor": 2}]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  path = tmp_path_factory.mktemp("ckpt")
  tiny_hf_model(
    "qwen2", intermediate_size=128, num_attention_heads=8, num_key_value_heads=2
  ).save_pretrained(path)
  return str(path)


@pytest.mark.parametrize("shape", MESHES, ids=[str(m) for m in MESHES])
def test_sharded_logits_equal_single_device(checkpoint, shape):
  assert jax.device_count() == 8
  ids, mask, _ = left_padded_batch(128, batch=4)
  single = np.asarray(lora_jax.load_pretrained(checkpoint)(ids, attention_mask=mask))
  mesh = make_mesh(shape)
  model = lora_jax.load_pretrained(checkpoint, mesh=mesh)

  # Params really are sharded: each device holds a slice of the big matrices.
  for var, axis_size in [
    (model.layers.up_proj.kernel, mesh.shape["tensor"] * mesh.shape["fsdp"]),
    (model.embed, mesh.shape["tensor"] * mesh.shape["fsdp"]),
  ]:
    arr = var[...]
    shard = arr.addressable_shards[0].data
    assert arr.size // shard.size == axis_size, (arr.sharding, shard.shape)
  # kv projections (2 heads * 16) split over tensor too, when tensor divides them.
  k = model.layers.k_proj.kernel  # [layers, kv_heads * head_dim, embed]
  assert k[...].sharding.spec == logical_to_spec(("layers", "kv_heads", "embed"), k.shape, mesh)

  sharded = np.asarray(nnx.jit(lambda m, i, a: m(i, attention_mask=a))(model, ids, mask))
  real = mask.astype(bool)
  assert np.abs(sharded - single)[real].max() < 1e-5


def test_mesh_errors():
  with pytest.raises(lora_jax.MeshError, match="needs 6 devices, but there are 8"):
    make_mesh({"fsdp": 3, "tensor": 2})
  with pytest.raises(lora_jax.MeshError, match="unknown mesh axes"):
    make_mesh({"model": 8})


def test_rule_table_drops_axes_that_do_not_divide():
  mesh = make_mesh({"fsdp": 2, "tensor": 4})
  assert logical_to_spec(("embed", "kv_heads"), (64, 2), mesh) == jax.sharding.PartitionSpec(
    "fsdp", None
  )
  assert logical_to_spec(("batch", "seq"), (4, 10), mesh) == jax.sharding.PartitionSpec(
    "fsdp", None
  )
