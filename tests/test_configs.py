"""Every config file builds through the typed boundary and the paper configs carry the reference's
settings. (Every key of configs/base.py refusing a wrong value in one line:
tests/faults/test_fault_configs.py.)"""

import json
import subprocess
import sys

import pytest

from configs import base, demo
from configs.paper import common, full, lora, ortho
from lora_jax import run_config
from lora_jax.lora import resolve_layers, resolve_targets
from lora_jax.run_config import RULES, RunConfig, RunConfigError, from_dict

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
  assert from_dict(c).mesh.axes == {"fsdp": -1}
  assert from_dict(demo.get_config()).model.source.endswith(".gguf")


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
    lc = from_dict(c).lora
    if c.lora.layers:
      resolve_layers(c.lora.layers, common.MODELS[size][1])
    assert lc.rank == int(variant.rsplit("_r", 1)[1])
  for variant in ortho.VARIANTS:
    oc = from_dict(ortho.get_config(f"{size},{variant}")).regulariser
    assert oc.beta == 0.1 and oc.k == 16 and oc.k_mode == "reference"
  c = from_dict(full.get_config(size))
  # The reference's README runs the 32B model for 1 epoch (DeepSpeed ZeRO-3), the others 5.
  assert c.train.mode == "full" and c.train.epochs == (1 if size == "32b" else 5)
  assert c.adapter is None and c.data.loss_on == "completion"


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


def _flat(c) -> dict:
  return {f"{s}.{k}": v for s, block in c.to_dict().items() for k, v in block.items()}


def test_base_is_the_typed_defaults_and_round_trips():
  c = base.get_config()
  assert sorted(_flat(c)) == sorted(RULES), "configs/base.py and run_config.RULES disagree"
  cfg = from_dict(c)
  assert cfg == RunConfig()  # the dataclass defaults are configs/base.py's
  assert from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
  assert cfg.data.seed == cfg.train.seed == 0  # data.seed None means train.seed
  paper = from_dict(lora.get_config("14b,lora_up_proj_only_from16_to31_r1"))
  assert paper.lora.layers == (16, 31) and paper.lora.targets == ("up_proj",)
  assert from_dict(paper.to_dict()) == paper


def test_cross_key_rules_and_unknown_keys():
  def refused(match, **dotted):
    raw = base.get_config().to_dict()
    for key, value in dotted.items():
      section, field = key.split("__")
      raw[section][field] = value
    with pytest.raises(RunConfigError, match=match):
      from_dict(raw)

  refused(
    r"config.train.grad_accum=3: expected a divisor of train.batch_size=8",
    train__batch_size=8,
    train__grad_accum=3,
  )
  refused(
    r"config.ortho.beta=0.1: expected 0 with train.mode='full'", ortho__beta=0.1, train__mode="full"
  )
  refused(r"lora.targets='up_proj' lacks gate_proj,down_proj", ortho__beta=0.1)
  refused(r"config.train.epochs=0: expected >= 1 when train.steps is 0", train__epochs=0)
  with pytest.raises(RunConfigError, match=r"config.data.fromat: unknown key; known: data.source"):
    from_dict({"data": {"fromat": "chat"}})
  with pytest.raises(RunConfigError, match=r"config.optimizer: unknown key"):
    from_dict({"optimizer": {"lr": 1.0}})


def test_an_older_saved_config_still_loads(tmp_path):
  """config.json as the ConfigDict wrote it before the typed boundary (groups unresolved, None
  for data.seed), with a key this version no longer knows and one missing."""
  old = base.get_config().to_dict()
  old["lora"]["targets"] = "qkvo_mlp"
  old["train"]["retired_option"] = 1
  del old["log"]["progress"]
  cfg = run_config.from_dict(old, strict=False)
  assert cfg.lora.targets == resolve_targets("qkvo_mlp") and cfg.log.progress is True
  with pytest.raises(RunConfigError, match="config.train.retired_option: unknown key"):
    run_config.from_dict(old)
