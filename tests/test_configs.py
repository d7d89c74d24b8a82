"""Every config file builds, and the paper configs carry the reference's settings."""

import subprocess
import sys

import pytest

from configs import base, demo
from configs.paper import common, full, lora, ortho
from lora_jax.lora import resolve_layers, resolve_targets
from lora_jax.train import lora_config, ortho_config, parse_mesh_shape

REQUIRED = [
  "model.source",
  "data.source",
  "data.format",
  "train.mode",
  "lora.rank",
  "lora.alpha",
  "lora.dropout",
  "lora.targets",
  "lora.layers",
  "train.epochs",
  "train.steps",
  "train.batch_size",
  "train.lr",
  "train.seed",
  "mesh.shape",
]


def _get(c, dotted):
  for part in dotted.split("."):
    c = c[part]
  return c


def test_base_has_the_documented_keys():
  c = base.get_config()
  for key in REQUIRED:
    _get(c, key)
  assert parse_mesh_shape(c.mesh.shape) == {"fsdp": -1}
  assert demo.get_config().model.source.endswith(".gguf")


@pytest.mark.parametrize("size", sorted(common.MODELS))
def test_every_paper_variant_builds(size):
  for variant in lora.variants(size):
    c = lora.get_config(f"{size},{variant}")
    assert (c.train.lr, c.train.batch_size, c.train.weight_decay, c.train.epochs) == (
      5e-5,
      2,
      1e-4,
      10,
    )
    assert (c.lora.alpha, c.lora.dropout, c.train.schedule) == (16.0, 0.05, "cosine")
    lc = lora_config(c)
    if c.lora.layers:
      resolve_layers(c.lora.layers, common.MODELS[size][1])
    assert lc.rank == int(variant.rsplit("_r", 1)[1])
  for variant in ortho.VARIANTS:
    oc = ortho_config(ortho.get_config(f"{size},{variant}"))
    assert oc.beta == 0.1 and oc.k == 16
  c = full.get_config(size)
  assert c.train.mode == "full" and c.train.epochs == 5


def test_reference_mode_strings_parse_like_train_py():
  assert lora.parse_mode("lora_qkvo_mlp_r4") == ("qkvo_mlp", "", 4)
  assert lora.parse_mode("lora_up_proj_only_from16_to31_r1") == ("up_proj", "16-31", 1)
  assert resolve_targets(lora.parse_mode("lora_mlp_only_from16_to31_r1")[0]) == (
    "gate_proj",
    "up_proj",
    "down_proj",
  )
  p = ortho.parse_mode("lora_mlp_orthogonal_down_uniform_norm_r2_beta0.5_k8")
  assert p == dict(
    rank=2, beta=0.5, k=8, down_only=True, weighted=False, normalize=True, mode="column"
  )
  assert ortho.parse_mode("lora_mlp_orthogonal_uniform_norm_both_r1_beta1_k4")["mode"] == "both"
  with pytest.raises(ValueError, match="unknown LoRA mode"):
    lora.parse_mode("lora_everything_r1_x")


def test_config_flags_override_on_the_command_line(tmp_path):
  """`--config=FILE:VARIANT --config.a.b=v` as launch.train parses it."""
  code = (
    "from absl import flags; from ml_collections import config_flags; import sys\n"
    "c = config_flags.DEFINE_config_file('config')\n"
    "flags.FLAGS(sys.argv)\n"
    "print(c.value.model.source, c.value.lora.rank, c.value.lora.layers, c.value.train.lr)"
  )
  out = subprocess.run(
    [
      sys.executable,
      "-c",
      code,
      "--config=configs/paper/lora.py:14b,lora_up_proj_only_from16_to31_r1",
      "--config.lora.rank=4",
      "--config.train.lr=1e-4",
    ],
    capture_output=True,
    text=True,
    check=True,
  ).stdout.split()
  assert out == ["deepseek-ai/DeepSeek-R1-Distill-Qwen-14B", "4", "16-31", "0.0001"]
