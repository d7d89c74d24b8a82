"""Training numerics (`train.precision`) and the reference's dynamic loss scaler.

  float32    float32 weights, compute and optimizer state (the CPU tests and the demo).
  mixed      float32 master weights and AdamW moments, bfloat16 compute (the residual stream
             in bfloat16 too).
  reference  what the reference's torch runs did (its train.py, transformers 4.47 Trainer):
    LoRA     a bfloat16 base (from_pretrained(torch_dtype=bfloat16)) with float32 adapters
             (PEFT casts bf16/fp16 adapters to float32, `autocast_adapter_dtype`), trained with
             `fp16=True`: every matmul under float16 autocast, and dynamic loss scaling by
             torch.amp.GradScaler. Under autocast the residual adds are bfloat16 + float16 and
             float32 + float16, which torch promotes to float32, so the residual stream and the
             norms run in float32 while every projection and attention run in float16; here the
             residual stream is float32 from the embedding on. Roundings we do not copy: the
             reference's first norm sees a bfloat16 input (layer 0 only), its lm_head returns
             float16 logits (ours accumulate into float32), and PEFT multiplies LoRA's float16
             product by alpha / r in float16 (ours in float32, then rounded).
    full     pure bfloat16 (`bf16=True` on a bfloat16 model): bfloat16 weights, gradients and
             AdamW moments (torch keeps optimizer state in the param dtype), no float32 master.

The loss scaler is torch's GradScaler with its defaults: the mean loss is multiplied by the scale
(init 2**16) before the backward pass; gradients are unscaled; a step whose gradients hold an inf
or NaN is skipped (params and optimizer state unchanged, so AdamW's step count and the schedule do
not advance, as the Trainer steps its scheduler only after a real optimizer step) and the scale is
halved; after 2000 finite steps in a row it doubles. Its state lives inside the optimizer state
(`ScaledState`), so checkpoints carry it and a resume continues exactly. One difference in form:
GradScaler looks for inf/NaN in the scaled gradients, we look in the unscaled ones; they differ
only if unscaling turns a finite value infinite, which needs a scale below 2**-100.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

PRECISIONS = ("reference", "mixed", "float32")
_NEVER = 2**31 - 1  # apply_if_finite's give-up count, never reached (its counter saturates)


@dataclasses.dataclass(frozen=True)
class Numerics:
  """What a precision means for one training mode."""

  param_dtype: str  # the model's weights (the frozen base in LoRA; adapters stay float32)
  compute_dtype: str
  residual_dtype: str  # the residual stream between layers
  loss_scaling: bool


def numerics(precision: str, mode: str) -> Numerics:
  if precision not in PRECISIONS:
    raise ValueError(f"train.precision={precision!r}; expected one of {PRECISIONS}")
  if precision == "float32":
    return Numerics("float32", "float32", "float32", False)
  if precision == "mixed":
    return Numerics("float32", "bfloat16", "bfloat16", False)
  if mode == "lora":
    return Numerics("bfloat16", "float16", "float32", True)
  return Numerics("bfloat16", "bfloat16", "bfloat16", False)


@dataclasses.dataclass(frozen=True)
class LossScaleConfig:
  """torch.amp.GradScaler's defaults."""

  init_scale: float = 2.0**16
  growth_factor: float = 2.0
  backoff_factor: float = 0.5
  growth_interval: int = 2000


class LossScaleState(NamedTuple):
  scale: jax.Array  # float32, as GradScaler's _scale
  growth_tracker: jax.Array  # int32: finite steps since the scale last changed


class ScaledState(NamedTuple):
  loss_scale: LossScaleState
  inner: optax.ApplyIfFiniteState  # .total_notfinite counts the skipped steps


def with_loss_scale(
  inner: optax.GradientTransformation, cfg: LossScaleConfig = LossScaleConfig()
) -> optax.GradientTransformation:
  """`inner` applied only on finite (unscaled) gradients, with the scale carried and adjusted.
  On a skipped step the updates are zeros and inner's state is kept (optax.apply_if_finite)."""
  guarded = optax.apply_if_finite(inner, max_consecutive_errors=_NEVER)

  def init(params):
    scale = LossScaleState(jnp.asarray(cfg.init_scale, jnp.float32), jnp.zeros((), jnp.int32))
    return ScaledState(scale, guarded.init(params))

  def update(grads, state, params=None):
    updates, inner_state = guarded.update(grads, state.inner, params)
    found_inf = jnp.logical_not(inner_state.last_finite)
    return updates, ScaledState(next_scale(state.loss_scale, found_inf, cfg), inner_state)

  return optax.GradientTransformation(init, update)


def next_scale(state: LossScaleState, found_inf, cfg: LossScaleConfig) -> LossScaleState:
  """GradScaler.update (torch's _amp_update_scale_): back off on inf, grow after
  `growth_interval` finite steps in a row unless the grown scale would be infinite."""
  successful = state.growth_tracker + 1
  grow = successful == cfg.growth_interval
  grown = state.scale * jnp.float32(cfg.growth_factor)
  scale = jnp.where(
    found_inf,
    state.scale * jnp.float32(cfg.backoff_factor),
    jnp.where(grow & jnp.isfinite(grown), grown, state.scale),
  )
  tracker = jnp.where(found_inf | grow, 0, successful).astype(jnp.int32)
  return LossScaleState(scale, tracker)


def maybe_scaled(tx: optax.GradientTransformation, precision: str, mode: str):
  """`tx` wrapped in the loss scaler when the precision scales the loss."""
  return with_loss_scale(tx) if numerics(precision, mode).loss_scaling else tx


def current_scale(opt_state) -> jax.Array | None:
  """The loss scale of this step (None without loss scaling)."""
  return opt_state.loss_scale.scale if isinstance(opt_state, ScaledState) else None


def skipped_steps(opt_state) -> jax.Array:
  return opt_state.inner.total_notfinite


def unscale(grads, scale: jax.Array):
  """grads * (1 / scale), GradScaler.unscale_'s product (its reciprocal is taken in float64;
  the scale is a power of two, so float32's is the same)."""
  inv = 1.0 / scale
  return jax.tree.map(lambda g: g * inv.astype(g.dtype), grads)


def schedule_step(opt_state, step_index):
  """The learning-rate schedule's position: optimizer steps taken so far (skipped ones excluded,
  as the Trainer's scheduler steps only after a real optimizer step)."""
  return step_index if current_scale(opt_state) is None else step_index - skipped_steps(opt_state)


def apply(tx: optax.GradientTransformation, grads, opt_state, params):
  """(params, opt_state, metrics) after one optimizer step. With loss scaling a step with
  non-finite gradients leaves params and state bitwise unchanged, and the metrics carry the
  step's scale, whether it was skipped and the skipped steps so far."""
  scale = current_scale(opt_state)
  updates, new_state = tx.update(grads, opt_state, params)
  new_params = optax.apply_updates(params, updates)
  if scale is None:
    return new_params, new_state, {}
  skip = jnp.logical_not(new_state.inner.last_finite)
  new_params = jax.tree.map(lambda old, new: jnp.where(skip, old, new), params, new_params)
  metrics = {"loss_scale": scale, "step_skipped": skip, "skipped_steps": skipped_steps(new_state)}
  return new_params, new_state, metrics
