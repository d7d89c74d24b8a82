"""LoRA adapters as PEFT defines them: y = x W + (alpha / r) * dropout(x) A B.

A is Kaiming-uniform (PEFT's `kaiming_uniform_(a=sqrt(5))`, i.e. U(-1/sqrt(in), 1/sqrt(in))), B is
zero. Adapters are stacked over all layers like the kernels they adapt; `lora_scale[layer]` is
alpha / r on the chosen layer range and 0 elsewhere, so out-of-range layers contribute nothing,
get zero gradients and are never exported. Adapter params are `nnx.LoRAParam`, which is how the
trainer tells trainable from frozen.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from lora_jax.model import LINEARS, Decoder, lora_weight_delta

# The reference's target modes, plus "all" for every linear layer.
TARGET_GROUPS = {
  "qkvo_mlp": LINEARS,
  "all": LINEARS,
  "mlp": ("gate_proj", "up_proj", "down_proj"),
  "attn": ("q_proj", "k_proj", "v_proj", "o_proj"),
  "qkvo": ("q_proj", "k_proj", "v_proj", "o_proj"),
}


class LoRAError(ValueError):
  pass


class LoRAScale(nnx.Variable):
  """Per-layer alpha / r (0 outside the adapted layer range); not trained."""


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
  rank: int = 1
  alpha: float = 16.0
  dropout: float = 0.05
  targets: tuple[str, ...] = ("up_proj",)
  layers: tuple[int, int] | None = None  # inclusive range; None = every layer
  use_rslora: bool = False  # scale alpha / sqrt(r) (PEFT's use_rslora)

  @property
  def scale(self) -> float:
    return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)


def resolve_targets(targets: str | Sequence[str]) -> tuple[str, ...]:
  """Module names from names and groups: "qkvo_mlp", "mlp", "up_proj", "q_proj,v_proj", ..."""
  if isinstance(targets, str):
    targets = [t for t in re.split(r"[,\s]+", targets) if t]
  out: list[str] = []
  for t in targets:
    names = TARGET_GROUPS.get(t, (t,))
    for n in names:
      if n not in LINEARS:
        raise LoRAError(
          f"LoRA target {t!r} matches no module; modules: {list(LINEARS)}, "
          f"groups: {sorted(TARGET_GROUPS)}"
        )
      if n not in out:
        out.append(n)
  if not out:
    raise LoRAError("LoRA targets are empty")
  return tuple(sorted(out, key=LINEARS.index))


def parse_layers(layers) -> tuple[int, int] | None:
  """(first, last) inclusive from (a, b), "a-b", "a..b" or the reference's "from16_to31"; None
  (every layer) from None, "" or "all"."""
  if layers is None or layers == "" or layers == "all":
    return None
  if isinstance(layers, str):
    m = re.fullmatch(r"(?:from)?(\d+)(?:_to|-|\.\.|:)(\d+)", layers.strip())
    if not m:
      raise LoRAError(f"LoRA layers {layers!r}: expected 'from16_to31', '16-31' or '16..31'")
    layers = (int(m.group(1)), int(m.group(2)))
  lo, hi = int(layers[0]), int(layers[1])
  if not 0 <= lo <= hi:
    raise LoRAError(f"LoRA layers {lo}..{hi}: expected 0 <= first <= last")
  return lo, hi


def resolve_layers(layers, num_layers: int) -> tuple[int, int]:
  """(first, last) inclusive (see `parse_layers`), checked against the model's layer count."""
  parsed = parse_layers(layers)
  if parsed is None:
    return 0, num_layers - 1
  lo, hi = parsed
  if not 0 <= lo <= hi < num_layers:
    raise LoRAError(f"LoRA layers {lo}..{hi} are outside the model's 0..{num_layers - 1}")
  return lo, hi


def layer_scales(cfg: LoRAConfig, num_layers: int) -> jax.Array:
  lo, hi = resolve_layers(cfg.layers, num_layers)
  idx = jnp.arange(num_layers)
  return jnp.where((idx >= lo) & (idx <= hi), cfg.scale, 0.0).astype(jnp.float32)


def apply_lora(model: Decoder, cfg: LoRAConfig, *, seed: int = 0, dtype=jnp.float32) -> Decoder:
  """Add adapters to `model` in place (and return it). Adapter params are created with the
  sharding of the kernel they adapt (the rank axis replicated)."""
  if cfg.rank < 1:
    raise LoRAError(f"LoRA rank must be >= 1, got {cfg.rank}")
  targets = resolve_targets(cfg.targets)
  L = model.config.num_layers
  scales = layer_scales(cfg, L)
  key = jax.random.key(seed)
  for i, name in enumerate(targets):
    lin = getattr(model.layers, name)
    _, dout, din = lin.kernel.shape
    out_ax, in_ax = lin.kernel.get_metadata()["axes"][1:]
    bound = 1.0 / math.sqrt(din)
    a = jax.random.uniform(jax.random.fold_in(key, i), (L, din, cfg.rank), dtype, -bound, bound)
    b = jnp.zeros((L, cfg.rank, dout), dtype)
    a, b = (
      _place(model, a, ("layers", in_ax, "lora_rank")),
      _place(model, b, ("layers", "lora_rank", out_ax)),
    )
    lin.lora_a = nnx.LoRAParam(a, axes=("layers", in_ax, "lora_rank"))
    lin.lora_b = nnx.LoRAParam(b, axes=("layers", "lora_rank", out_ax))
    lin.lora_scale = LoRAScale(_place(model, scales, ("layers",)), axes=("layers",))
  model.lora_dropout = float(cfg.dropout)
  return model


def _place(model: Decoder, x, axes):
  if model.mesh is None:
    return x
  from lora_jax.sharding import named_sharding

  return jax.device_put(x, named_sharding(model.mesh, axes, x.shape))


def adapted(model: Decoder) -> tuple[str, ...]:
  """Names of the linear modules that carry an adapter."""
  return tuple(n for n in LINEARS if getattr(getattr(model.layers, n), "lora_a", None) is not None)


def merge(model: Decoder) -> Decoder:
  """W <- W + scale * A B for every adapted module and remove the adapter (PEFT's
  `merge_and_unload`); in place, returns the model."""
  for name in adapted(model):
    lin = getattr(model.layers, name)
    w = lin.kernel[...]
    delta = lora_weight_delta(lin.lora_a[...], lin.lora_b[...], lin.lora_scale[...])
    lin.kernel.set_value((w.astype(jnp.float32) + delta).astype(w.dtype))
    del lin.lora_a, lin.lora_b, lin.lora_scale
  model.lora_dropout = 0.0
  return model
