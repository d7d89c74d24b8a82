"""LoRA equals PEFT's: loss, gradients, merge, module/layer selection, adapter export/import."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from helpers import tiny_run_dir
from peft import LoraConfig, PeftModel, get_peft_model

import lora_jax
from lora_jax import lora
from lora_jax.data import DEMO_REFUSALS, DataConfig, load_examples, make_iterator
from lora_jax.io.peft import load_peft_adapter, save_peft_adapter
from lora_jax.train import token_loss

MODULES = list(lora.LINEARS)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  return tiny_run_dir(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def batch(run_dir):
  tok = lora_jax.load_tokenizer(run_dir)
  examples, _ = load_examples(
    DataConfig(source=DEMO_REFUSALS, format="prompt_completion", max_length=64), tok
  )
  return next(make_iterator(examples, global_batch=4, seed=3, pad_id=tok.pad_token_id))


def _peft_model(run_dir, targets, layers=None, r=4):
  hf = transformers.AutoModelForCausalLM.from_pretrained(run_dir, dtype=torch.float32)
  cfg = LoraConfig(
    r=r,
    lora_alpha=16,
    lora_dropout=0.0,
    bias="none",
    task_type="CAUSAL_LM",
    target_modules=list(targets),
    layers_to_transform=layers,
  )
  return get_peft_model(hf, cfg)


def _ours(run_dir, targets, layers=None, r=4, seed=0):
  """Our model with the same adapter shape, A and B random (B non-zero so grads of A exist)."""
  model = lora_jax.load_pretrained(run_dir)
  lora.apply_lora(
    model, lora.LoRAConfig(rank=r, alpha=16, dropout=0.0, targets=tuple(targets), layers=layers)
  )
  rng = np.random.RandomState(seed)
  for name in lora.adapted(model):
    lin = getattr(model.layers, name)
    lin.lora_a.set_value(jnp.asarray(rng.normal(0, 0.1, lin.lora_a.shape), jnp.float32))
    lin.lora_b.set_value(jnp.asarray(rng.normal(0, 0.1, lin.lora_b.shape), jnp.float32))
  return model


def _peft_module(pm, layer, name):
  parent = "self_attn" if name in MODULES[:4] else "mlp"
  return getattr(getattr(pm.base_model.model.model.layers[layer], parent), name)


def _copy_adapter(model, pm, layers):
  for name in lora.adapted(model):
    lin = getattr(model.layers, name)
    for l in layers:
      mod = _peft_module(pm, l, name)
      mod.lora_A["default"].weight.data = torch.tensor(np.asarray(lin.lora_a[...][l]).T.copy())
      mod.lora_B["default"].weight.data = torch.tensor(np.asarray(lin.lora_b[...][l]).T.copy())


def test_loss_and_gradients_equal_peft(run_dir, batch):
  layers = [1, 2]
  model = _ours(run_dir, MODULES, layers=(1, 2))
  pm = _peft_model(run_dir, MODULES, layers=layers)
  _copy_adapter(model, pm, layers)

  graphdef, adapter, rest = nnx.split(model, nnx.LoRAParam, ...)

  def loss_fn(adapter):
    nll, n = token_loss(nnx.merge(graphdef, adapter, rest), batch, None)
    return nll / n

  loss, grads = jax.value_and_grad(loss_fn)(adapter)
  ids = torch.tensor(batch["input_ids"], dtype=torch.long)
  labels = torch.where(torch.tensor(batch["loss_mask"]) > 0, ids, -100)
  out = pm(input_ids=ids, attention_mask=torch.tensor(batch["attention_mask"]), labels=labels)
  out.loss.backward()
  assert abs(float(loss) - out.loss.item()) < 1e-5

  grads = nnx.to_pure_dict(grads)["layers"]
  checked = 0
  for name in MODULES:
    for l in range(3):
      ga, gb = np.asarray(grads[name]["lora_a"][l]), np.asarray(grads[name]["lora_b"][l])
      if l not in layers:  # out of range: no adapter in PEFT, exactly zero gradient here
        assert not ga.any() and not gb.any()
        continue
      mod = _peft_module(pm, l, name)
      np.testing.assert_allclose(ga, mod.lora_A["default"].weight.grad.numpy().T, atol=1e-5)
      np.testing.assert_allclose(gb, mod.lora_B["default"].weight.grad.numpy().T, atol=1e-5)
      checked += 1
  assert checked == len(MODULES) * len(layers)


def test_merge_equals_peft_merge_and_unload(run_dir):
  model = _ours(run_dir, ["up_proj", "q_proj"])
  pm = _peft_model(run_dir, ["up_proj", "q_proj"])
  _copy_adapter(model, pm, range(3))
  merged_hf = pm.merge_and_unload().state_dict()
  lora.merge(model)
  assert lora.adapted(model) == ()
  for l in range(3):
    for name, parent in [("up_proj", "mlp"), ("q_proj", "self_attn")]:
      ours = np.asarray(getattr(model.layers, name).kernel[...][l])
      theirs = merged_hf[f"model.layers.{l}.{parent}.{name}.weight"].numpy()
      np.testing.assert_allclose(ours, theirs, atol=1e-6)


@pytest.mark.parametrize(
  "mode", ["qkvo_mlp", "mlp", "up_proj", "down_proj", "up_proj@1-2", "mlp@0-1"]
)
def test_modes_select_the_reference_modules_and_layers(run_dir, mode):
  """The reference (train.py) builds these PEFT configs; the same (layer, module) set is adapted."""
  group, _, rng = mode.partition("@")
  names = lora.resolve_targets(group)
  if rng:  # reference: target_modules=[f"layers.{i}.mlp.{module}" for i in from..to]
    lo, hi = map(int, rng.split("-"))
    ref_targets = [f"layers.{i}.mlp.{n}" for n in names for i in range(lo, hi + 1)]
    ours = _ours(run_dir, names, layers=rng)
  else:
    ref_targets = list(names)
    ours = _ours(run_dir, names)
  pm = _peft_model(run_dir, ref_targets)
  theirs = {
    (int(n.split(".layers.")[1].split(".")[0]), n.rsplit(".", 1)[-1])
    for n, m in pm.named_modules()
    if hasattr(m, "lora_A") and n.endswith("_proj")
  }
  mine = {
    (l, n)
    for n in lora.adapted(ours)
    for l in np.nonzero(np.asarray(getattr(ours.layers, n).lora_scale[...]))[0].tolist()
  }
  assert mine == theirs


def test_target_that_matches_nothing_lists_modules():
  with pytest.raises(lora.LoRAError, match=r"'mlp_up' matches no module; modules: \['q_proj'"):
    lora.resolve_targets("mlp_up")
  with pytest.raises(lora.LoRAError, match="outside the model's 0..2"):
    lora.resolve_layers("from1_to5", 3)
  assert lora.resolve_layers("from16_to31", 48) == (16, 31)


def test_peft_adapter_round_trip_and_merged_export(run_dir, tmp_path):
  """Our adapter loads in PEFT with our logits; the merged export loads in transformers."""
  model = _ours(run_dir, ["q_proj", "up_proj", "down_proj"], layers=(1, 2))
  ids = np.random.RandomState(0).randint(3, 200, (2, 12))
  ours = np.asarray(model(ids))
  save_peft_adapter(
    model,
    str(tmp_path / "adapter"),
    lora.LoRAConfig(
      rank=4, alpha=16, dropout=0.0, targets=("q_proj", "up_proj", "down_proj"), layers=(1, 2)
    ),
  )
  base = transformers.AutoModelForCausalLM.from_pretrained(run_dir, dtype=torch.float32)
  pm = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
  with torch.no_grad():
    theirs = pm(torch.tensor(ids)).logits.numpy()
  assert np.abs(ours - theirs).max() < 1e-5

  back = load_peft_adapter(lora_jax.load_pretrained(run_dir), str(tmp_path / "adapter"))
  assert np.abs(np.asarray(back(ids)) - ours).max() < 1e-6

  lora_jax.save_pretrained(model, str(tmp_path / "merged"))
  merged = transformers.AutoModelForCausalLM.from_pretrained(
    str(tmp_path / "merged"), dtype=torch.float32
  ).eval()
  with torch.no_grad():
    assert np.abs(merged(torch.tensor(ids)).logits.numpy() - ours).max() < 1e-5


def test_merge_formula_and_adapter_names_equal_peft(run_dir):
  """`lora_weight_delta` (used by merge and by the merged export) is PEFT's `get_delta_weight`,
  on numpy and on jax arrays; PEFT's tensor names are the ones `io/mapping.py` writes and reads."""
  from peft import get_peft_model_state_dict

  from lora_jax.io.mapping import parse_peft_key, peft_key
  from lora_jax.model import lora_weight_delta

  model = _ours(run_dir, MODULES, layers=(1, 2))
  pm = _peft_model(run_dir, MODULES, layers=[1, 2])
  _copy_adapter(model, pm, [1, 2])
  for name in MODULES:
    lin = getattr(model.layers, name)
    a, b, scale = lin.lora_a[...], lin.lora_b[...], lin.lora_scale[...]
    from_numpy = lora_weight_delta(np.asarray(a), np.asarray(b), np.asarray(scale))
    from_jax = np.asarray(lora_weight_delta(a, b, scale))
    assert isinstance(from_numpy, np.ndarray) and from_numpy.shape == lin.kernel.shape
    assert not from_numpy[0].any()  # layer 0 is outside the range: scale 0
    for layer in (1, 2):
      theirs = _peft_module(pm, layer, name).get_delta_weight("default").detach().numpy()
      np.testing.assert_allclose(from_numpy[layer], theirs, atol=1e-6)
      np.testing.assert_allclose(from_jax[layer], theirs, atol=1e-6)
  peft_names = set(get_peft_model_state_dict(pm))
  ours = {peft_key(n, layer, part) for n in MODULES for layer in (1, 2) for part in "AB"}
  assert ours == peft_names
  assert {parse_peft_key(k) for k in peft_names} == {
    (n, layer, part) for n in MODULES for layer in (1, 2) for part in "AB"
  }
  assert parse_peft_key("base_model.model.model.layers.3.mlp.up_proj.lora_A.default.weight") == (
    "up_proj",
    3,
    "A",
  )
  assert parse_peft_key("base_model.model.model.layers.3.mlp.up_proj.weight") is None
