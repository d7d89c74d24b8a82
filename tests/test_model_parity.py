"""The Flax decoder equals transformers' PyTorch model (float32) on tiny random configs."""

import numpy as np
import pytest
from helpers import hf_logits, left_padded_batch, tiny_hf_model

import lora_jax

CASES = [
  ("qwen2", dict(tie_word_embeddings=True)),  # Qwen2.5-0.5B style: tied head, QKV bias
  ("qwen2", dict(tie_word_embeddings=False, num_key_value_heads=1)),  # MQA, untied
  ("qwen2", dict(num_attention_heads=8, num_key_value_heads=8, hidden_size=64)),  # MHA, hd 8
  ("qwen3", dict(head_dim=32)),  # explicit head_dim != hidden / heads, q/k norm
  (
    "qwen3",
    dict(num_attention_heads=6, num_key_value_heads=3, head_dim=16, tie_word_embeddings=True),
  ),
  ("llama", dict(num_key_value_heads=1, rope_theta=1e5)),  # SmolLM2-like
  (
    "llama",
    dict(
      num_attention_heads=4,
      num_key_value_heads=4,
      head_dim=32,
      rope_scaling={
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
      },
    ),
  ),
]


@pytest.mark.parametrize(
  "kind,overrides", CASES, ids=[f"{k}-{i}" for i, (k, _) in enumerate(CASES)]
)
def test_logits_and_hidden_states_match_transformers(tmp_path, kind, overrides):
  hf = tiny_hf_model(kind, **overrides)
  hf.save_pretrained(tmp_path)
  ids, mask, positions = left_padded_batch(hf.config.vocab_size)
  ref_logits, ref_hidden = hf_logits(hf, ids, mask, positions)

  model = lora_jax.load_pretrained(str(tmp_path))
  real = mask.astype(bool)
  logits = np.asarray(model(ids, attention_mask=mask))
  assert logits.shape == ref_logits.shape
  assert np.abs(logits - ref_logits)[real].max() < 1e-4

  hidden = model.hidden_states(ids, attention_mask=mask)
  assert len(hidden) == len(ref_hidden) == hf.config.num_hidden_layers + 1
  for layer, (ours, ref) in enumerate(zip(hidden, ref_hidden)):
    assert np.abs(np.asarray(ours) - ref)[real].max() < 1e-4, f"hidden state {layer}"


def test_left_padding_does_not_change_real_token_logits(tmp_path):
  hf = tiny_hf_model("qwen2")
  hf.save_pretrained(tmp_path)
  model = lora_jax.load_pretrained(str(tmp_path))
  ids = np.random.RandomState(1).randint(0, 128, (1, 7))
  alone = np.asarray(model(ids))
  padded = np.concatenate([np.zeros((1, 5), int), ids], axis=1)
  mask = np.concatenate([np.zeros((1, 5), int), np.ones((1, 7), int)], axis=1)
  assert np.abs(np.asarray(model(padded, attention_mask=mask))[:, 5:] - alone).max() < 1e-5


def test_packed_segments_equal_separate_sequences(tmp_path):
  hf = tiny_hf_model("qwen3", head_dim=16)
  hf.save_pretrained(tmp_path)
  model = lora_jax.load_pretrained(str(tmp_path))
  rng = np.random.RandomState(2)
  a, b = rng.randint(0, 128, (1, 5)), rng.randint(0, 128, (1, 6))
  packed = np.concatenate([a, b], axis=1)
  seg = np.array([[1] * 5 + [2] * 6])
  pos = np.array([list(range(5)) + list(range(6))])
  out = np.asarray(model(packed, positions=pos, segment_ids=seg))
  assert np.abs(out[:, :5] - np.asarray(model(a))).max() < 1e-5
  assert np.abs(out[:, 5:] - np.asarray(model(b))).max() < 1e-5


def test_bfloat16_compute_is_close(tmp_path):
  hf = tiny_hf_model("llama")
  hf.save_pretrained(tmp_path)
  ids, mask, _ = left_padded_batch(128)
  f32 = np.asarray(lora_jax.load_pretrained(str(tmp_path))(ids, attention_mask=mask))
  bf16 = lora_jax.load_pretrained(str(tmp_path), dtype="bfloat16")
  assert bf16.embed[...].dtype.name == "bfloat16"
  out = np.asarray(bf16(ids, attention_mask=mask))
  real = mask.astype(bool)
  assert np.abs(out - f32)[real].max() < 0.1 * np.abs(f32).max()
