"""Attention implementations against the plain XLA path (lora_jax/attention.py), on CPU.

cuDNN cannot run here: its adapter is checked through the same `jax.nn.dot_product_attention`
call with implementation="xla". Splash attention runs in Pallas interpret mode. Blocked decode
is checked against plain attention over the whole cache, then through the sampler.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import left_padded_batch

from lora_jax import attention as attn
from lora_jax.run_config import RunConfigError, from_dict

B, K, G, H = 3, 2, 3, 16


def _qkv(T, S=None, seed=0, kv_heads=K, groups=G):
  rng = np.random.RandomState(seed)
  S = S or T
  q = jnp.asarray(rng.randn(B, T, kv_heads, groups, H), jnp.float32)
  k = jnp.asarray(rng.randn(B, S, kv_heads, H), jnp.float32)
  v = jnp.asarray(rng.randn(B, S, kv_heads, H), jnp.float32)
  return q, k, v


def _packed(T):
  """positions, segment ids [B, T]: row 0 one full segment, row 1 left padding then two packed
  segments, row 2 right padding; and which tokens are real."""
  seg = np.ones((B, T), np.int32)
  seg[1, : T // 4] = 0
  seg[1, T // 2 :] = 2
  seg[2, T - T // 3 :] = 0
  pos = np.zeros((B, T), np.int32)
  for b in range(B):
    for s in (1, 2):
      idx = np.flatnonzero(seg[b] == s)
      pos[b, idx] = np.arange(len(idx))
  return jnp.asarray(pos), jnp.asarray(seg), seg > 0


def test_auto_resolves_by_backend_and_bad_names_are_refused():
  assert attn.resolve("auto", jnp.float32) == "xla"  # this machine: CPU
  assert attn.resolve("auto", jnp.float32, "cpu") == "xla"
  assert attn.resolve("auto", jnp.bfloat16, "gpu") == "cudnn"
  assert attn.resolve("auto", jnp.float32, "gpu") == "xla"  # cuDNN has no float32 kernel
  assert attn.resolve("auto", jnp.float32, "tpu") == "splash"
  assert attn.resolve("splash", jnp.float32, "cpu") == "splash"
  with pytest.raises(attn.AttentionError, match="bfloat16 or float16"):
    attn.resolve("cudnn", jnp.float32, "gpu")
  with pytest.raises(attn.AttentionError, match="expected one of auto, xla, cudnn, splash"):
    attn.resolve("flash", jnp.float32)


def test_config_field_is_one_line_naming_key_and_choices():
  assert from_dict({}).model.attention == "auto"
  assert from_dict({"model": {"attention": "splash"}}).model.attention == "splash"
  with pytest.raises(RunConfigError) as e:
    from_dict({"model": {"attention": "flash"}})
  assert str(e.value) == (
    "config.model.attention='flash': expected one of 'auto', 'xla', 'cudnn', 'splash'"
  )


@pytest.mark.parametrize("causal", [False, True])
def test_dot_product_adapter_equals_plain(causal):
  """The cuDNN path's layout and mask adapter, run by jax.nn.dot_product_attention's xla twin."""
  T = 24
  q, k, v = _qkv(T)
  pos, seg, real = _packed(T)
  allowed = attn.allowed_mask(pos, seg)
  want = attn.plain(q, k, v, allowed)
  got = attn.dot_product(q, k, v, allowed, "xla", causal=causal)
  assert np.isfinite(np.asarray(got)).all()  # pad rows included
  np.testing.assert_allclose(np.asarray(got)[real], np.asarray(want)[real], atol=2e-6)


def test_splash_interpret_equals_plain_with_gradients():
  """Forward and backward kernels; T=300 is padded to 384, three kernel blocks (causal skipping).
  One kv head of two query heads keeps interpret mode's grid small."""
  T = 300
  q, k, v = _qkv(T, kv_heads=1, groups=2)
  pos, seg, real = _packed(T)
  allowed = attn.allowed_mask(pos, seg)
  weights = jnp.asarray(np.random.RandomState(1).randn(*q.shape) * real[:, :, None, None, None])

  def loss(fn, q, k, v):
    out = fn(q, k, v)
    return jnp.sum(out * weights), out

  plain = jax.value_and_grad(
    lambda *a: loss(lambda *x: attn.plain(*x, allowed), *a), (0, 1, 2), True
  )
  splash = jax.value_and_grad(lambda *a: loss(lambda *x: attn.splash(*x, seg), *a), (0, 1, 2), True)
  (_, want), want_grads = plain(q, k, v)
  (_, got), got_grads = splash(q, k, v)
  np.testing.assert_allclose(np.asarray(got)[real], np.asarray(want)[real], atol=2e-5)
  for g, w in zip(got_grads, want_grads):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-4)


def test_splash_under_a_mesh_equals_one_device():
  """shard_map over rows (fsdp) and heads (tensor) gives the single-device answer."""
  from lora_jax.sharding import make_mesh

  q, k, v = _qkv(32, groups=1)
  q, k, v = (jnp.concatenate([x, x[:1]]) for x in (q, k, v))  # 4 rows: fsdp 2 divides them
  seg = jnp.ones((4, 32), jnp.int32).at[1, :5].set(0)
  mesh = make_mesh("fsdp:2,tensor:2", jax.devices()[:4])
  got = jax.jit(lambda q, k, v, s: attn.splash(q, k, v, s, mesh))(q, k, v, seg)
  want = attn.splash(q, k, v, seg)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-6)


def test_decoder_with_splash_equals_xla():
  """The whole model: attention="splash" (interpret mode) against "xla" on left-padded rows."""
  from flax import nnx

  from lora_jax.config import ModelConfig
  from lora_jax.model import Decoder

  cfg = ModelConfig("qwen2", 64, 32, 48, 2, 4, 2, 8, qkv_bias=True)
  ids, mask, _ = left_padded_batch(cfg.vocab_size, batch=3, length=12)
  out = {}
  for name in ("xla", "splash"):
    model = Decoder(cfg, rngs=nnx.Rngs(0), attention=name)
    out[name] = np.asarray(model(ids, attention_mask=mask))
  real = mask.astype(bool)
  np.testing.assert_allclose(out["splash"][real], out["xla"][real], atol=2e-5)
  assert np.abs(out["xla"][real]).max() > 0.1  # not trivially equal


@pytest.mark.parametrize("T", [1, 2])
def test_blocked_decode_equals_plain_over_the_whole_cache(T):
  """GQA, rows at different positions (one at slot 0, one at the last slot), a cache length
  that is not a multiple of the block."""
  S, block = 200, 64
  q, k, v = _qkv(T, S)
  last = np.array([0, 77, S - 1])
  pos = jnp.asarray(np.maximum(last[:, None] - np.arange(T)[::-1], 0), jnp.int32)
  allowed = jnp.arange(S)[None, None, :] <= pos[:, :, None]
  want = attn.plain(q, k, v, allowed)
  got = attn.decode_attention(q, k, v, pos, block=block)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)


def test_blocked_decode_skips_blocks_past_the_longest_row():
  """Slots past every row's position are never read: NaN there leaves the answer unchanged."""
  S, block = 200, 64
  q, k, v = _qkv(1, S)
  pos = jnp.asarray([[3], [100], [120]], jnp.int32)  # two blocks hold every row's keys
  allowed = jnp.arange(S)[None, None, :] <= pos[:, :, None]
  want = attn.plain(q, k, v, allowed)
  k, v = (x.at[:, 2 * block :].set(jnp.nan) for x in (k, v))
  got = attn.decode_attention(q, k, v, pos, block=block)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)
