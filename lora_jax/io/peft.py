"""PEFT adapter directories: `adapter_config.json` + `adapter_model.safetensors`, PEFT key names
(`io/mapping.py`).

An adapter written here loads with `peft.PeftModel.from_pretrained` (and serves with vLLM's LoRA
support); one written by PEFT loads here, unmerged. PEFT stores lora_A as [r, in] and lora_B as
[out, r]; ours are stacked [layers, in, r] and [layers, r, out]. Only adapted layers are written:
a layer range becomes PEFT's `layers_to_transform`.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load_file, save_file

from lora_jax import lora as lora_lib
from lora_jax.io.mapping import parse_peft_key, peft_key
from lora_jax.io.save import to_host
from lora_jax.io.sources import CheckpointError


def _adapted_layers(lin) -> list[int]:
  return [int(i) for i in np.nonzero(to_host(lin.lora_scale))[0]]


def save_peft_adapter(
  model, out_dir: str, lora_cfg: lora_lib.LoRAConfig, base_model_name_or_path: str = ""
) -> None:
  """Write the model's adapter as a PEFT LoRA directory (every process calls; process 0 writes)."""
  names = lora_lib.adapted(model)
  if not names:
    raise ValueError("the model has no LoRA adapter to export")
  tensors, layers = {}, None
  for name in names:
    lin = getattr(model.layers, name)
    a, b = to_host(lin.lora_a).astype(np.float32), to_host(lin.lora_b).astype(np.float32)
    layers = _adapted_layers(lin)
    for i in layers:
      tensors[peft_key(name, i, "A")] = np.ascontiguousarray(a[i].T)
      tensors[peft_key(name, i, "B")] = np.ascontiguousarray(b[i].T)
  num_layers = model.config.num_layers
  config = {
    "peft_type": "LORA",
    "task_type": "CAUSAL_LM",
    "base_model_name_or_path": base_model_name_or_path,
    "r": lora_cfg.rank,
    "lora_alpha": lora_cfg.alpha,
    "lora_dropout": lora_cfg.dropout,
    "target_modules": list(names),
    "bias": "none",
    "fan_in_fan_out": False,
    "use_rslora": lora_cfg.use_rslora,
    "init_lora_weights": True,
    "inference_mode": True,
    "modules_to_save": None,
    "layers_to_transform": None if len(layers) == num_layers else layers,
    "layers_pattern": None if len(layers) == num_layers else "layers",
  }
  if jax.process_index() != 0:
    return
  os.makedirs(out_dir, exist_ok=True)
  save_file(tensors, os.path.join(out_dir, "adapter_model.safetensors"), metadata={"format": "pt"})
  with open(os.path.join(out_dir, "adapter_config.json"), "w") as f:
    json.dump(config, f, indent=2)


def read_peft_config(adapter_dir: str) -> lora_lib.LoRAConfig:
  path = os.path.join(adapter_dir, "adapter_config.json")
  if not os.path.exists(path):
    raise CheckpointError(f"no adapter_config.json in {adapter_dir}")
  with open(path) as f:
    c = json.load(f)
  if c.get("peft_type", "LORA") != "LORA":
    raise CheckpointError(f"{path}: peft_type={c.get('peft_type')!r}; only LORA adapters load")
  if c.get("bias", "none") != "none" or c.get("modules_to_save") or c.get("use_dora"):
    raise CheckpointError(f"{path}: LoRA with bias, DoRA or modules_to_save is not supported")
  if c.get("rank_pattern") or c.get("alpha_pattern"):
    raise CheckpointError(f"{path}: per-module rank_pattern/alpha_pattern is not supported")
  targets = c["target_modules"]
  if isinstance(targets, str):
    raise CheckpointError(
      f"{path}: regex target_modules {targets!r} is not supported; list the module names"
    )
  # The reference writes per-layer targets ("layers.16.mlp.up_proj"); the weights file says
  # which layers are adapted either way, so keep only the module names here.
  modules = sorted({t.rsplit(".", 1)[-1] for t in targets}, key=lora_lib.LINEARS.index)
  return lora_lib.LoRAConfig(
    rank=int(c["r"]),
    alpha=float(c["lora_alpha"]),
    dropout=float(c.get("lora_dropout", 0.0)),
    targets=tuple(modules),
    use_rslora=bool(c.get("use_rslora", False)),
  )


def load_peft_adapter(model, adapter_dir: str):
  """Apply a PEFT LoRA adapter to `model` unmerged (in place; returns the model)."""
  cfg = read_peft_config(adapter_dir)
  path = os.path.join(adapter_dir, "adapter_model.safetensors")
  if not os.path.exists(path):
    raise CheckpointError(f"no adapter_model.safetensors in {adapter_dir}")
  weights = load_file(path)
  per_module: dict[str, dict[int, dict[str, np.ndarray]]] = {}
  for key, value in weights.items():
    parsed = parse_peft_key(key)
    if parsed is None:
      raise CheckpointError(f"{path}: unexpected adapter tensor {key}")
    name, layer, ab = parsed
    per_module.setdefault(name, {}).setdefault(layer, {})[ab] = value
  lora_lib.apply_lora(model, cfg)
  L = model.config.num_layers
  for name in cfg.targets:
    lin = getattr(model.layers, name)
    a = np.zeros(lin.lora_a.shape, np.float32)
    b = np.zeros(lin.lora_b.shape, np.float32)
    scale = np.zeros((L,), np.float32)
    for layer, ab in per_module.get(name, {}).items():
      if layer >= L or set(ab) != {"A", "B"}:
        raise CheckpointError(f"{path}: {name} of layer {layer} is incomplete or out of range")
      want = {"A": a.shape[:0:-1], "B": b.shape[:0:-1]}
      for part in "AB":
        if ab[part].shape != want[part]:
          raise CheckpointError(
            f"{path}: layers.{layer}.{name}.lora_{part} has shape "
            f"{list(ab[part].shape)}, expected {list(want[part])}"
          )
      a[layer], b[layer] = ab["A"].T, ab["B"].T
      scale[layer] = cfg.scale
    for var, value in ((lin.lora_a, a), (lin.lora_b, b), (lin.lora_scale, scale)):
      arr = jnp.asarray(value, var[...].dtype)
      var.set_value(jax.device_put(arr, var[...].sharding))
  return model
