"""The sampler runs the model's own layer: its cached forward and its weight-major layout give the
training forward's numbers on the same params (with an unmerged LoRA adapter)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import tiny_hf_model

import lora_jax
from lora_jax import lora
from lora_jax.model import dense
from lora_jax.sampling.forward import forward, layer_params, new_cache, weight_major


@pytest.fixture(scope="module")
def adapted_model(tmp_path_factory):
  """Qwen2 (QKV bias) with an adapter on every linear layer, B random so that it counts."""
  path = tmp_path_factory.mktemp("qwen2")
  tiny_hf_model("qwen2", num_key_value_heads=1).save_pretrained(path)
  model = lora_jax.load_pretrained(str(path))
  lora.apply_lora(model, lora.LoRAConfig(rank=2, targets=("qkvo_mlp",), dropout=0.0))
  for i, name in enumerate(lora.adapted(model)):
    lin = getattr(model.layers, name)
    lin.lora_b.set_value(0.3 * jax.random.normal(jax.random.key(i), lin.lora_b.shape))
  return model


def test_weight_major_dense_and_logits_equal_the_training_layout(adapted_model):
  m = adapted_model
  p = jax.tree.map(lambda a: a[1], layer_params(m, unstack=False)["q_proj"])
  assert {"kernel", "bias", "lora_a", "lora_b", "lora_scale"} <= set(p)
  x = jax.random.normal(jax.random.key(0), (3, 1, m.config.hidden_size))
  token_major = dense(x, p, m.dtype)
  np.testing.assert_allclose(dense(x, p, m.dtype, weight_major=True), token_major, atol=1e-5)
  np.testing.assert_allclose(m.logits(x, weight_major=True), m.logits(x), atol=1e-5)
  assert weight_major(64) and not weight_major(65)  # this machine's devices are CPUs


@pytest.mark.parametrize("unstack", [True, False])
def test_cached_forward_equals_the_training_forward(adapted_model, unstack):
  """A prefill of 40 tokens x 2 rows (token-major), then 4 tokens decoded one at a time
  (weight-major) through the per-layer cache: the training forward's hidden states."""
  m = adapted_model
  ids = np.random.RandomState(0).randint(0, m.config.vocab_size, (2, 44))
  expected = np.asarray(m.hidden(ids))
  layers = layer_params(m, unstack)
  run = jax.jit(lambda ids, pos, cache: forward(m, layers, ids, pos, cache))
  cache = new_cache(m, 2, 64)
  positions = np.broadcast_to(np.arange(44), (2, 44)).astype(np.int32)
  hidden, cache = run(ids[:, :40], positions[:, :40], cache)
  np.testing.assert_allclose(hidden, expected[:, :40], atol=1e-4)
  for t in range(40, 44):
    hidden, cache = run(ids[:, t : t + 1], positions[:, t : t + 1], cache)
    np.testing.assert_allclose(hidden[:, 0], expected[:, t], atol=1e-4)
  keys = np.asarray(cache[0][0])
  assert keys[:, :44].any(axis=(2, 3)).all() and not keys[:, 44:].any()  # slots = positions
  assert jnp.dtype(cache[0][0].dtype) == jnp.dtype(m.dtype)
