"""The optimizer: optax AdamW with global-norm clipping and a learning-rate schedule.

Defaults are the reference's (TRL/transformers Trainer): AdamW beta (0.9, 0.999), eps 1e-8,
weight decay 1e-4 (decoupled, on every trainable param, as torch.optim.AdamW), clipping 1.0, lr 5e-5,
cosine to 0 with no warm-up. Gradient accumulation is done by the train step itself (summing
token-weighted losses over micro-batches), not with optax.MultiSteps, so an accumulated step
equals one big batch exactly.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import optax

if TYPE_CHECKING:  # run_config imports this module's SCHEDULES
  from lora_jax.run_config import TrainConfig

SCHEDULES = ("cosine", "linear", "constant")


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


def make_optimizer(
  train: TrainConfig, total_steps: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW + clipping as the run's `train` config says."""
  schedule = learning_rate_schedule(train.lr, total_steps, train.schedule, train.warmup_steps)
  parts = []
  if train.clip_norm > 0:
    parts.append(optax.clip_by_global_norm(train.clip_norm))
  parts.append(
    optax.adamw(schedule, b1=train.b1, b2=train.b2, eps=train.eps, weight_decay=train.weight_decay)
  )
  return optax.chain(*parts), schedule
