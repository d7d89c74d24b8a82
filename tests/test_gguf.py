"""GGUF import: the real SmolLM2 file, and tiny files written here with the `gguf` package."""

import gguf
import numpy as np
import pytest
import torch
import transformers
from helpers import tiny_hf_model

import lora_jax
from lora_jax.io.mapping import entries

QTYPES = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0"]
Q = gguf.GGMLQuantizationType


def test_smollm2_matches_transformers_gguf_loading(smollm2_gguf):
  import os

  model = lora_jax.load_pretrained(smollm2_gguf)
  cfg = model.config
  assert (cfg.family, cfg.num_layers, cfg.hidden_size, cfg.num_kv_heads) == ("llama", 30, 576, 3)
  assert cfg.tie_word_embeddings
  hf = transformers.AutoModelForCausalLM.from_pretrained(
    os.path.dirname(smollm2_gguf), gguf_file=os.path.basename(smollm2_gguf), dtype=torch.float32
  ).eval()
  tok = lora_jax.load_tokenizer(smollm2_gguf)
  msgs = [{"role": "user", "content": "What is the capital of France?"}]
  text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
  assert "<|im_start|>assistant" in text  # the chat template came from the GGUF
  ids = np.asarray([tok(text, add_special_tokens=False)["input_ids"]])
  with torch.no_grad():
    ref = hf(torch.tensor(ids)).logits.numpy()
  ours = np.asarray(model(ids))
  # Both dequantise the same Q4_1 blocks; what is left is float32 summation order.
  assert np.abs(ours - ref).max() < 1e-3 * np.abs(ref).max()
  assert (ours[0].argmax(-1) == ref[0].argmax(-1)).mean() > 0.99


def _write_gguf(path, hf, qtype: str):
  """Write a random HF model as llama.cpp would: names, q/k row permutation, quantisation."""
  cfg = lora_jax.ModelConfig.from_hf(hf.config.to_dict())
  arch = cfg.family
  w = gguf.GGUFWriter(str(path), arch)
  w.add_block_count(cfg.num_layers)
  w.add_context_length(cfg.max_position_embeddings)
  w.add_embedding_length(cfg.hidden_size)
  w.add_feed_forward_length(cfg.intermediate_size)
  w.add_head_count(cfg.num_heads)
  w.add_head_count_kv(cfg.num_kv_heads)
  w.add_key_length(cfg.head_dim)
  w.add_value_length(cfg.head_dim)
  w.add_rope_freq_base(cfg.rope_theta)
  w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
  w.add_vocab_size(cfg.vocab_size)
  w.add_file_type(gguf.LlamaFileType.ALL_F32)
  sd = {k: v.numpy() for k, v in hf.state_dict().items()}
  expected = {}
  for e in entries(cfg):
    names = (
      [(e.hf.format(i=i), e.gguf.format(i=i)) for i in range(cfg.num_layers)]
      if e.stacked
      else [(e.hf, e.gguf)]
    )
    for hf_name, gg_name in names:
      t = sd[hf_name].astype(np.float32)
      if arch == "llama" and (".attn_q." in gg_name or ".attn_k." in gg_name):
        heads = cfg.num_heads if ".attn_q." in gg_name else cfg.num_kv_heads
        t = (
          t.reshape(heads, 2, t.shape[0] // heads // 2, *t.shape[1:])
          .swapaxes(1, 2)
          .reshape(t.shape)
        )
      qt = Q[qtype] if t.ndim == 2 else Q.F32
      data = gguf.quants.quantize(t, qt)
      w.add_tensor(
        gg_name,
        data,
        raw_shape=data.shape if qt in (Q.F32, Q.F16) else None,
        raw_dtype=qt if qt not in (Q.F32, Q.F16) else None,
      )
      expected[gg_name] = gguf.quants.dequantize(data, qt).reshape(t.shape)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return expected


@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_tiny_gguf_loads_dequantised_weights_and_matches_transformers(tmp_path, kind, qtype):
  hf = tiny_hf_model(kind, tie_word_embeddings=(kind == "qwen2"))
  path = tmp_path / f"tiny-{qtype}.gguf"
  expected = _write_gguf(path, hf, qtype)
  model = lora_jax.load_pretrained(str(path))
  # Weights: ours (q/k rows unpermuted) equal the dequantised tensors.
  q = expected["blk.1.attn_q.weight"]
  if kind == "llama":
    heads = hf.config.num_attention_heads
    q = q.reshape(heads, q.shape[0] // heads // 2, 2, -1).swapaxes(1, 2).reshape(q.shape)
  np.testing.assert_array_equal(np.asarray(model.layers.q_proj.kernel[...][1]), q)
  np.testing.assert_array_equal(np.asarray(model.embed[...]), expected["token_embd.weight"])
  # Logits: transformers' own GGUF loading of the same file.
  ref_model = transformers.AutoModelForCausalLM.from_pretrained(
    str(tmp_path), gguf_file=path.name, dtype=torch.float32
  ).eval()
  ids = np.random.RandomState(0).randint(0, 128, (2, 9))
  with torch.no_grad():
    ref = ref_model(torch.tensor(ids)).logits.numpy()
  assert np.abs(np.asarray(model(ids)) - ref).max() < 1e-4


def test_unknown_quant_type_is_one_clear_line(tmp_path):
  hf = tiny_hf_model("llama")
  path = tmp_path / "bad.gguf"
  _write_gguf(path, hf, "Q8_0")
  raw = bytearray(path.read_bytes())
  # Patch the type id of the first 2-D tensor (token_embd, Q8_0 = 8) to an id no ggml type has.
  name = b"token_embd.weight"
  at = raw.index(name) + len(name)
  n_dims = int.from_bytes(raw[at : at + 4], "little")
  type_at = at + 4 + 8 * n_dims
  assert int.from_bytes(raw[type_at : type_at + 4], "little") == Q.Q8_0
  raw[type_at : type_at + 4] = (77).to_bytes(4, "little")
  path.write_bytes(bytes(raw))
  with pytest.raises(lora_jax.CheckpointError, match=r"bad.gguf.*(quant|type).*77"):
    lora_jax.load_pretrained(str(path))
