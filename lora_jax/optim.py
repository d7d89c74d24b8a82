"""The optimizer: optax AdamW with global-norm clipping and a learning-rate schedule.

Defaults are the reference's (TRL/transformers Trainer): AdamW beta (0.9, 0.999), eps 1e-8,
weight decay 1e-4 (decoupled, as torch.optim.AdamW; not on biases and norm weights, as the Trainer's
`get_decay_parameter_names`: `decays`), clipping 1.0, lr 5e-5, cosine to 0 with no warm-up. Gradient accumulation is done by the train step itself (summing
token-weighted losses over micro-batches), not with optax.MultiSteps, so an accumulated step
equals one big batch exactly.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import jax
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

if TYPE_CHECKING:  # run_config imports this module's SCHEDULES
  from lora_jax.run_config import TrainConfig

SCHEDULES = ("cosine", "linear", "constant")
# transformers.Trainer.get_decay_parameter_names (5.x): no weight decay for a param whose
# lower-cased dotted name matches one of these. Our names ("layers.attn_norm", "final_norm",
# "layers.q_proj.bias") match them as the HF names they map to do; embeddings, the LM head,
# kernels and LoRA's A and B (PEFT's lora_A/lora_B) decay.
NO_DECAY = re.compile(r"bias|layernorm|rmsnorm|(?:^|\.)norm(?:$|\.)|_norm(?:$|\.)")


def param_name(path) -> str:
  """The dotted name of a param from its key path in an nnx.State or a pure dict."""
  return ".".join(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))


def decays(name: str) -> bool:
  """Whether weight decay applies to the param with this dotted name (see NO_DECAY)."""
  return not NO_DECAY.search(name.lower())


def decay_mask(params):
  """A tree of bools like `params`: True where weight decay applies."""
  return jax.tree_util.tree_map_with_path(lambda p, _: decays(param_name(p)), params)


def learning_rate_schedule(
  lr: float, total_steps: int, schedule: str = "cosine", warmup_steps: int = 0
) -> optax.Schedule:
  """transformers' schedules: linear warm-up from 0, then cosine / linear decay to 0 or constant."""
  if schedule not in SCHEDULES:
    raise ValueError(f"train.schedule={schedule!r}; expected one of {SCHEDULES}")
  if total_steps <= 0:
    raise ValueError(f"total steps must be positive, got {total_steps}")
  warmup_steps = min(warmup_steps, total_steps)
  decay_steps = max(total_steps - warmup_steps, 1)
  if schedule == "cosine":
    main = optax.cosine_decay_schedule(lr, decay_steps)
  elif schedule == "linear":
    main = optax.linear_schedule(lr, 0.0, decay_steps)
  else:
    main = optax.constant_schedule(lr)
  if not warmup_steps:
    return main
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup_steps), main], [warmup_steps])


def masked_weight_decay(weight_decay: float) -> optax.GradientTransformation:
  """optax.add_decayed_weights on the params `decay_mask` selects. Its own `mask=` would wrap the
  (empty) state in a MaskedState: a new optimizer-state tree, on which the checkpoints written
  before the mask existed no longer restore. This keeps add_decayed_weights' EmptyState."""

  def update(updates, state, params=None):
    if params is None:
      raise ValueError("weight decay needs the params: pass them to update()")
    decay = lambda g, p, m: g + weight_decay * p if m else g
    return jax.tree.map(decay, updates, params, decay_mask(params)), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_optimizer(
  train: TrainConfig, total_steps: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW + clipping as the run's `train` config says."""
  schedule = learning_rate_schedule(train.lr, total_steps, train.schedule, train.warmup_steps)
  parts = []
  if train.clip_norm > 0:
    parts.append(optax.clip_by_global_norm(train.clip_norm))
  # optax.adamw, with the decay masked.
  adamw = optax.chain(
    optax.scale_by_adam(b1=train.b1, b2=train.b2, eps=train.eps),
    masked_weight_decay(train.weight_decay),
    optax.scale_by_learning_rate(schedule),
  )
  return optax.chain(*parts, adamw), schedule


def init_opt_state(tx: optax.GradientTransformation, params, mesh):
  """`tx.init(params)` with every state leaf created where it belongs: a leaf shaped like a
  parameter (Adam's moments, ...) gets that parameter's sharding, scalars (step counts) are
  replicated. Left to itself, `jax.jit(tx.init)` returns the moments unsharded (zeros carry no
  sharding for propagation to follow), i.e. a full copy of every trainable param per device.

  `params` may be abstract (ShapeDtypeStructs with shardings, as `lora_jax.plan` builds them):
  the state is then abstract too, placed the same way. Call it directly, not under
  `jax.eval_shape` (a traced array has no sharding to copy)."""
  abstract = jax.eval_shape(tx.init, params)
  shardings = opt_state_shardings(abstract, params, mesh)
  if all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(params)):
    return jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
    )
  return jax.jit(tx.init, out_shardings=shardings)(params)


def opt_state_shardings(state, params, mesh):
  """A NamedSharding per leaf of `state` (arrays or ShapeDtypeStructs): the sharding of the
  parameter at the same path (an optimizer keeps its per-param trees under the params' own key
  paths, e.g. `mu/layers/up_proj/lora_a`), replicated for scalars."""
  by_path = {
    tuple(path): (x.shape, x.sharding)
    for path, x in jax.tree_util.tree_flatten_with_path(params)[0]
  }
  replicated = NamedSharding(mesh, P())

  def one(path, leaf):
    for start in range(len(path)):
      shape, sharding = by_path.get(tuple(path[start:]), (None, None))
      if shape == tuple(leaf.shape):
        return sharding
    if leaf.ndim == 0:
      return replicated
    raise ValueError(
      f"optimizer state leaf {jax.tree_util.keystr(tuple(path))} {tuple(leaf.shape)} matches no "
      "parameter: cannot shard it like one"
    )

  return jax.tree_util.tree_map_with_path(one, state)
