"""Bad input gets one clear line naming what is wrong."""

import json

import numpy as np
import pytest
from helpers import tiny_hf_model
from safetensors.numpy import load_file, save_file

import lora_jax


@pytest.fixture()
def ckpt(tmp_path):
  tiny_hf_model("qwen2").save_pretrained(tmp_path)
  return tmp_path


def _edit_config(path, **changes):
  cfg = json.loads((path / "config.json").read_text())
  cfg.update(changes)
  (path / "config.json").write_text(json.dumps(cfg))


def _one_line(excinfo):
  assert "\n" not in str(excinfo.value)


def test_missing_path(tmp_path):
  with pytest.raises(FileNotFoundError, match="no such file or directory: .*nothing-here") as e:
    lora_jax.load_pretrained(str(tmp_path / "nothing-here"))
  _one_line(e)
  with pytest.raises(FileNotFoundError, match="model.gguf"):
    lora_jax.load_pretrained(str(tmp_path / "model.gguf"))


def test_missing_config_and_weights(tmp_path):
  (tmp_path / "w").mkdir()
  with pytest.raises(lora_jax.CheckpointError, match="no model.safetensors"):
    lora_jax.load_pretrained(str(tmp_path / "w"))


def test_unsupported_architecture_lists_supported(ckpt):
  _edit_config(ckpt, model_type="mixtral", architectures=["MixtralForCausalLM"])
  with pytest.raises(lora_jax.ConfigError, match="mixtral.*supported: qwen2.*qwen3.*llama") as e:
    lora_jax.load_pretrained(str(ckpt))
  _one_line(e)


@pytest.mark.parametrize(
  "changes,match",
  [
    (
      dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}),
      "unsupported rope scaling type 'yarn'",
    ),
    (dict(use_sliding_window=True), "use_sliding_window"),
    (dict(hidden_act="gelu"), "hidden_act='gelu'"),
  ],
)
def test_math_changing_fields_are_refused(ckpt, changes, match):
  _edit_config(ckpt, **changes)
  with pytest.raises(lora_jax.ConfigError, match=match):
    lora_jax.load_pretrained(str(ckpt))


def test_wrong_tensor_shape_is_named(ckpt):
  tensors = load_file(ckpt / "model.safetensors")
  name = "model.layers.1.mlp.up_proj.weight"
  tensors[name] = np.zeros((5, 64), np.float32)
  save_file(tensors, ckpt / "model.safetensors")
  with pytest.raises(
    lora_jax.CheckpointError, match=rf"{name} has shape \[5, 64\], expected \[96, 64\]"
  ) as e:
    lora_jax.load_pretrained(str(ckpt))
  _one_line(e)


def test_missing_tensor_is_named(ckpt):
  tensors = load_file(ckpt / "model.safetensors")
  del tensors["model.layers.2.self_attn.k_proj.bias"]
  save_file(tensors, ckpt / "model.safetensors")
  with pytest.raises(
    lora_jax.CheckpointError, match="missing tensor model.layers.2.self_attn.k_proj.bias"
  ):
    lora_jax.load_pretrained(str(ckpt))
