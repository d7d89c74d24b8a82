"""transformers save -> load_pretrained -> save_pretrained -> transformers load keeps the logits."""

import json

import numpy as np
import pytest
import torch
import transformers
from helpers import hf_logits, left_padded_batch, tiny_hf_model

import lora_jax


def _roundtrip(tmp_path, hf, **save_kw):
  ids, mask, positions = left_padded_batch(hf.config.vocab_size)
  ref, _ = hf_logits(hf, ids, mask, positions)
  model = lora_jax.load_pretrained(str(tmp_path / "in"))
  lora_jax.save_pretrained(model, str(tmp_path / "out"), **save_kw)
  back = transformers.AutoModelForCausalLM.from_pretrained(
    str(tmp_path / "out"), dtype=torch.float32
  ).eval()
  got, _ = hf_logits(back, ids, mask, positions)
  real = mask.astype(bool)
  assert np.abs(got - ref)[real].max() < 1e-5
  return back


@pytest.mark.parametrize(
  "kind,overrides",
  [
    ("qwen2", dict(tie_word_embeddings=True)),
    ("qwen2", {}),
    ("qwen3", dict(head_dim=32)),
    ("llama", {}),
  ],
)
def test_roundtrip_single_file(tmp_path, kind, overrides):
  hf = tiny_hf_model(kind, **overrides)
  hf.save_pretrained(tmp_path / "in")
  back = _roundtrip(tmp_path, hf)
  assert type(back) is type(hf)
  assert back.config.tie_word_embeddings == hf.config.tie_word_embeddings
  sd_in, sd_out = hf.state_dict(), back.state_dict()
  for name, tensor in sd_in.items():
    assert torch.equal(tensor, sd_out[name]), name


def test_roundtrip_sharded_with_index(tmp_path):
  hf = tiny_hf_model("qwen2", num_hidden_layers=4)
  hf.save_pretrained(tmp_path / "in", max_shard_size="40KB")
  assert (tmp_path / "in" / "model.safetensors.index.json").exists()
  _roundtrip(tmp_path, hf, max_shard_bytes=40_000)
  index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
  files = set(index["weight_map"].values())
  assert len(files) > 1 and all((tmp_path / "out" / f).exists() for f in files)


def test_transformers_4x_config_form(tmp_path):
  """config.json with top-level rope_theta / torch_dtype (transformers 4.x) loads the same."""
  hf = tiny_hf_model("qwen2", rope_theta=5e4)
  hf.save_pretrained(tmp_path / "in")
  cfg_path = tmp_path / "in" / "config.json"
  cfg = json.loads(cfg_path.read_text())
  theta = cfg.pop("rope_parameters")["rope_theta"]
  cfg["rope_theta"], cfg["rope_scaling"] = theta, None
  cfg["torch_dtype"] = cfg.pop("dtype", "float32")
  cfg_path.write_text(json.dumps(cfg))
  assert lora_jax.load_config(str(tmp_path / "in")).rope_theta == 5e4
  _roundtrip(tmp_path, hf)


def test_bfloat16_checkpoint_loads_and_exports(tmp_path):
  hf = tiny_hf_model("llama").to(torch.bfloat16)
  hf.save_pretrained(tmp_path / "in")
  model = lora_jax.load_pretrained(str(tmp_path / "in"), dtype="bfloat16")
  lora_jax.save_pretrained(model, str(tmp_path / "out"))
  back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"))
  assert back.dtype == torch.bfloat16
  for name, tensor in hf.state_dict().items():
    assert torch.equal(tensor, back.state_dict()[name]), name
