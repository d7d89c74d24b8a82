"""The training loop: LoRA or full fine-tuning as one jit-compiled, sharded, donated step.

    result = train(cfg, workdir)     # cfg: a lora_jax.run_config.RunConfig

The model is split once into trainable params (nnx.LoRAParam in LoRA mode, every nnx.Param in
full mode) and frozen ones; only the trainable part has optimizer state and is donated. A step
takes the global batch, splits it into `grad_accum` micro-batches inside the jit, sums token-
weighted losses and divides by the batch's loss-token count (as transformers does), adds the
orthogonal penalty, clips and applies AdamW. Checkpoints (Orbax) are written every N steps and at
every epoch end; a rerun with the same workdir resumes exactly.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from lora_jax import checkpoint as ckpt_lib
from lora_jax import ortho as ortho_lib
from lora_jax import precision as precision_lib
from lora_jax.data import DataIterator, Examples, load_examples, make_iterator, pad_token_id
from lora_jax.lora import resolve_layers
from lora_jax.metrics_log import MetricsWriter, flops_per_token, peak_flops_per_device
from lora_jax.optim import init_opt_state, make_optimizer
from lora_jax.ortho import OrthoConfig
from lora_jax.run import build_model, own_buffers, split_trainable
from lora_jax.run_config import RunConfig, TrainConfig
from lora_jax.sharding import make_mesh, named_sharding

log = logging.getLogger(__name__)
BATCH_KEYS = ("input_ids", "loss_mask", "attention_mask", "segment_ids", "positions")


@dataclasses.dataclass
class TrainResult:
  status: str  # "done" | "preempted" | "nan"
  step: int
  epoch: int
  loss: float
  workdir: str


# ---- the step -----------------------------------------------------------------------------------
def token_loss(model, batch, dropout_rng, loss_chunk: int = 0):
  """(sum of completion-token NLL, number of completion tokens). Token t is predicted from t-1;
  loss_mask already excludes prompts, padding and segment starts."""
  hidden = model.hidden(
    batch["input_ids"],
    batch["attention_mask"],
    batch["positions"],
    batch["segment_ids"],
    dropout_rng=dropout_rng,
  )
  h = hidden[:, :-1]
  targets = batch["input_ids"][:, 1:]
  weights = batch["loss_mask"][:, 1:].astype(jnp.float32)
  n = h.shape[1]
  chunk = loss_chunk if 0 < loss_chunk < n else n

  def chunk_nll(h_c, t_c, w_c):
    logits = model.logits(h_c)
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, t_c[..., None], axis=-1)[..., 0]
    return jnp.sum((lse - picked) * w_c)

  if chunk == n:
    total = chunk_nll(h, targets, weights)
  else:
    # Recompute each chunk's logits in the backward pass: memory O(chunk * vocab), 1 more matmul.
    chunk_nll = jax.checkpoint(chunk_nll)
    pad = -n % chunk
    padded = lambda x: jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    split = lambda x: jnp.moveaxis(padded(x).reshape(x.shape[0], -1, chunk, *x.shape[2:]), 1, 0)
    total = jax.lax.scan(
      lambda acc, xs: (acc + chunk_nll(*xs), None),
      jnp.zeros((), jnp.float32),
      (split(h), split(targets), split(weights)),
    )[0]
  return total, jnp.sum(weights)


def make_train_step(
  graphdef, tx, schedule, train: TrainConfig, spans=None, ortho: OrthoConfig | None = None
):
  """step(trainable, opt_state, frozen, batch, step_index) -> (trainable, opt_state, metrics)."""
  accum, loss_chunk, seed = train.grad_accum, train.loss_chunk, train.seed

  def objective(trainable, frozen, batch, rng, factor):
    """What is differentiated: the NLL sum, or with loss scaling (factor = scale / tokens) the
    mean NLL times the scale, as torch scales the Trainer's loss before backward. Aux: the sum."""
    nll, _ = token_loss(nnx.merge(graphdef, trainable, frozen), batch, rng, loss_chunk)
    return (nll if factor is None else nll * factor), nll

  gradients = _summed_gradients(objective, accum)

  def step(trainable, opt_state, frozen, batch, step_index):
    rng = jax.random.fold_in(jax.random.key(seed), step_index)
    count = jnp.sum(batch["loss_mask"][:, 1:].astype(jnp.float32))
    denom = jnp.maximum(count, 1.0)
    scale = precision_lib.current_scale(opt_state)
    factor = None if scale is None else scale / denom
    nll, grads = gradients(trainable, frozen, batch, rng, factor)
    if scale is None:
      grads = jax.tree.map(lambda g: g / denom, grads)
    else:
      grads = precision_lib.unscale(grads, scale)
    # In the params' dtype, as torch's .grad: pure bfloat16 keeps bfloat16 Adam moments.
    grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, trainable)
    loss = nll / denom
    metrics = {"loss": loss, "tokens": count}
    if ortho is not None:
      reg, reg_grads = jax.value_and_grad(_penalty(graphdef, spans, ortho))(trainable, frozen)
      grads = jax.tree.map(lambda g, r: g + ortho.beta * r, grads, reg_grads)
      metrics["ortho_penalty"] = reg
      metrics["total_loss"] = loss + ortho.beta * reg
    metrics["grad_norm"] = optax.tree.norm(grads)
    metrics["lr"] = schedule(precision_lib.schedule_step(opt_state, step_index))
    trainable, opt_state, scaler_metrics = precision_lib.apply(tx, grads, opt_state, trainable)
    return trainable, opt_state, metrics | scaler_metrics

  return step


def _summed_gradients(objective, accum: int):
  """gradients(trainable, frozen, batch, rng, factor) -> (NLL sum, the objective's gradients
  summed over `accum` micro-batches)."""
  grad_fn = jax.value_and_grad(objective, has_aux=True)

  def gradients(trainable, frozen, batch, rng, factor):
    if accum == 1:  # no accumulation buffer: one less copy of the trainable params in memory
      (_, nll), grads = grad_fn(trainable, frozen, batch, jax.random.fold_in(rng, 0), factor)
      return nll, grads
    micro = jax.tree.map(lambda x: x.reshape(accum, x.shape[0] // accum, *x.shape[1:]), batch)

    def one(carry, xs):
      mb, i = xs
      (_, nll), g = grad_fn(trainable, frozen, mb, jax.random.fold_in(rng, i), factor)
      grads, nll_acc = carry
      return (jax.tree.map(jnp.add, grads, g), nll_acc + nll), None

    zeros = jax.tree.map(jnp.zeros_like, trainable)
    (grads, nll), _ = jax.lax.scan(one, (zeros, 0.0), (micro, jnp.arange(accum)))
    return nll, grads

  return gradients


def _penalty(graphdef, spans, ortho: OrthoConfig):
  """penalty(trainable, frozen): the orthogonal regulariser's beta-free sum."""

  def penalty(trainable, frozen):
    model = nnx.merge(graphdef, trainable, frozen)
    params = {
      n: {
        "lora_a": getattr(model.layers, n).lora_a[...],
        "lora_b": getattr(model.layers, n).lora_b[...],
      }
      for n in spans
    }
    scales = {n: getattr(model.layers, n).lora_scale[...] for n in spans}
    return ortho_lib.total_penalty(params, spans, scales, ortho)

  return penalty


def make_eval_step(graphdef, loss_chunk: int = 0):
  def step(trainable, frozen, batch):
    return token_loss(nnx.merge(graphdef, trainable, frozen), batch, None, loss_chunk)

  return jax.jit(step)


# ---- set-up steps --------------------------------------------------------------------------------
@dataclasses.dataclass
class Data:
  """This host's training batches and the held-out examples (None without held-out data)."""

  it: DataIterator
  eval_examples: Examples | None
  pad_id: int


def load_data(cfg: RunConfig, tokenizer) -> Data:
  examples, report = load_examples(cfg.data, tokenizer, split="train")
  log.info("data: %s", report)
  pad = pad_token_id(tokenizer)
  d = cfg.data
  it = make_iterator(
    examples,
    cfg.train.batch_size,
    seed=d.seed,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
    packing=d.packing,
    max_length=d.max_length,
    pad_id=pad,
    bucket=d.bucket,
    shuffle=d.shuffle,
  )
  eval_examples = None
  if d.eval_source or d.eval_fraction:
    eval_examples, eval_report = load_examples(d, tokenizer, split="eval")
    log.info("held-out data: %s", eval_report)
  return Data(it, eval_examples, pad)


@dataclasses.dataclass
class State:
  """What the loop carries: the split model, the optimizer and its state."""

  graphdef: nnx.GraphDef
  trainable: nnx.State
  frozen: nnx.State
  opt_state: optax.OptState
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  spans: dict | None  # the orthogonal regulariser's spans (None when it is off)
  model_config: object
  fingerprint: dict


def init_state(cfg: RunConfig, model, total_steps: int, mesh) -> State:
  """Split `model` (its trainable buffers are donated: do not use `model` afterwards)."""
  tx, schedule = make_optimizer(cfg.train, total_steps)
  tx = precision_lib.maybe_scaled(tx, cfg.train.precision, cfg.train.mode)
  ortho = cfg.regulariser
  spans = None
  if ortho is not None:
    first_layer = resolve_layers(cfg.lora.layers, model.config.num_layers)[0]
    spans = ortho_lib.compute_spans(model, ortho, cfg.train.seed, first_layer)
  graphdef, trainable, frozen = split_trainable(model, cfg.train.mode)
  trainable = own_buffers(trainable)
  opt_state = init_opt_state(tx, trainable, mesh)
  fingerprint = ckpt_lib.model_fingerprint(model.config, cfg.train.mode, cfg.adapter)
  if cfg.train.precision == "reference":  # its state differs: a loss scaler, bfloat16 weights
    fingerprint["precision"] = "reference"
  return State(
    graphdef, trainable, frozen, opt_state, tx, schedule, spans, model.config, fingerprint
  )


def resume(checkpointer: ckpt_lib.Checkpointer, state: State, it: DataIterator) -> int:
  """Restore the newest readable checkpoint into `state` and `it`; the step to continue from."""
  found = checkpointer.restore_latest(
    nnx.to_pure_dict(state.trainable), state.opt_state, state.fingerprint
  )
  if found is None:
    return 0
  _, restored, opt_restored, meta = found
  nnx.replace_by_pure_dict(state.trainable, restored)
  state.opt_state = opt_restored
  it.restore(meta["data"])
  log.info("resumed from step %d (epoch %d)", meta["step"], it.epoch)
  return int(meta["step"])


def compile_step(cfg: RunConfig, state: State):
  """The jitted train step; outputs pinned to the inputs' shardings, so the donated state keeps
  one layout and the step compiles once."""
  shardings = lambda tree: jax.tree.map(lambda x: x.sharding, tree)
  return jax.jit(
    make_train_step(
      state.graphdef, state.tx, state.schedule, cfg.train, state.spans, cfg.regulariser
    ),
    donate_argnums=(0, 1),
    out_shardings=(shardings(state.trainable), shardings(state.opt_state), None),
  )


# ---- the loop -----------------------------------------------------------------------------------
def train(cfg: RunConfig, workdir: str) -> TrainResult:
  t_setup = time.time()
  mesh = make_mesh(cfg.mesh.axes)
  model, tokenizer = build_model(cfg, mesh)
  data = load_data(cfg, tokenizer)
  total_steps = cfg.train.total_steps(data.it.steps_per_epoch)
  state = init_state(cfg, model, total_steps, mesh)
  del model  # its trainable buffers now belong to `state`
  checkpointer = ckpt_lib.Checkpointer(
    f"{workdir}/checkpoints",
    max_to_keep=cfg.checkpoint.max_to_keep or None,
    async_save=cfg.checkpoint.async_save,
  )
  ckpt_lib.write_config(workdir, cfg.to_dict())
  step = resume(checkpointer, state, data.it)
  loop = _Loop(cfg, workdir, mesh, data, state, checkpointer, total_steps)
  log.info(
    "setup took %.1fs; %d steps (%d per epoch), global batch %d, mesh %s",
    time.time() - t_setup,
    total_steps,
    data.it.steps_per_epoch,
    cfg.train.batch_size,
    dict(mesh.shape),
  )
  return loop.run(step)


class _Loop:
  """Steps until done, NaN or SIGTERM; logs, checkpoints and evaluates on the way."""

  def __init__(self, cfg, workdir, mesh, data: Data, state: State, checkpointer, total_steps):
    self.cfg, self.workdir, self.mesh, self.data, self.state = cfg, workdir, mesh, data, state
    self.checkpointer, self.total_steps = checkpointer, total_steps
    self.step_fn = compile_step(cfg, state)
    self.eval_fn = None
    if data.eval_examples is not None:
      self.eval_fn = make_eval_step(state.graphdef, cfg.train.loss_chunk)
    self.peak = peak_flops_per_device(cfg.train.peak_flops) * jax.device_count()
    self.local_rows = cfg.train.batch_size // jax.process_count()

  def run(self, step: int) -> TrainResult:
    it, status, loss = self.data.it, "done", float("nan")
    writer = MetricsWriter(self.workdir, tensorboard=self.cfg.log.tensorboard)
    preempt, bar = _Preemption(), _progress(self.cfg, self.total_steps, step)
    try:
      while step < self.total_steps:
        batch = next(it)
        stats = it.last_stats
        t0 = time.perf_counter()
        metrics = self._step(batch, step)
        step, loss = step + 1, metrics["loss"]
        if metrics.get("step_skipped"):  # the loss scaler skipped it, as GradScaler does
          log.warning(
            "step %d skipped: inf/NaN gradients; loss scale now %g", step, metrics["loss_scale"] / 2
          )
        elif not math.isfinite(loss) or not math.isfinite(metrics["grad_norm"]):
          status = "nan"
          self._report_nan(step, metrics)
          break
        self._log(writer, bar, step, metrics, stats, batch, time.perf_counter() - t0)
        epoch_end = it.step >= it.steps_per_epoch
        self._maybe_save(step, epoch_end)
        self._maybe_evaluate(writer, step, epoch_end)
        if preempt.agreed():
          if self.checkpointer.latest_step() != step:
            self._save(step, force=True)
          status = "preempted"
          log.warning("SIGTERM: saved step %d and stopping", step)
          break
    finally:
      bar.close()
      preempt.restore()
      self.checkpointer.close()
      writer.close()
    return TrainResult(status, step, it.epoch, loss, self.workdir)

  def _step(self, batch, step: int) -> dict[str, float]:
    s = self.state
    s.trainable, s.opt_state, metrics = self.step_fn(
      s.trainable, s.opt_state, s.frozen, _to_global(batch, self.mesh, self.local_rows), step
    )
    return {k: float(v) for k, v in jax.device_get(metrics).items()}

  def _report_nan(self, step: int, metrics: dict) -> None:
    log.error(
      "step %d: loss %s, grad norm %s; stopping. The last good checkpoint is step %s in "
      "%s/checkpoints",
      step,
      metrics["loss"],
      metrics["grad_norm"],
      self.checkpointer.latest_step(),
      self.workdir,
    )

  def _log(self, writer, bar, step: int, metrics: dict, stats: dict, batch, dt: float) -> None:
    it = self.data.it
    seq = batch["input_ids"].shape[1]
    metrics.update(
      epoch=it.epoch + (it.step / it.steps_per_epoch),
      step_seconds=dt,
      tokens_per_second=stats["tokens"] / dt,
      padded_tokens_per_second=stats["padded_tokens"] / dt,
    )
    if self.peak:
      flops = flops_per_token(self.state.model_config, seq, self.cfg.train.mode == "full")
      metrics["mfu"] = flops * stats["padded_tokens"] / dt / self.peak
    if step % self.cfg.log.every_steps == 0 or step == 1:
      writer.write(step, metrics)
    bar.update(1)
    bar.set_postfix(loss=f"{metrics['loss']:.4f}", epoch=f"{metrics['epoch']:.2f}")

  def _maybe_save(self, step: int, epoch_end: bool) -> None:
    every = self.cfg.checkpoint.every_steps
    if (
      (every and step % every == 0)
      or (epoch_end and self.cfg.checkpoint.every_epoch)
      or step == self.total_steps
    ):
      self._save(step)

  def _save(self, step: int, force: bool = False) -> None:
    it, s = self.data.it, self.state
    meta = {
      "step": step,
      "epoch": it.epoch,
      "data": it.state(),
      "fingerprint": s.fingerprint,
      "config": self.cfg.to_dict(),
    }
    self.checkpointer.save(step, nnx.to_pure_dict(s.trainable), s.opt_state, meta, force=force)

  def _maybe_evaluate(self, writer, step: int, epoch_end: bool) -> None:
    every = self.cfg.log.eval_every_steps
    if self.eval_fn is None or not (epoch_end or (every and step % every == 0)):
      return
    loss = evaluate(
      self.eval_fn,
      self.state.trainable,
      self.state.frozen,
      self.data.eval_examples,
      self.cfg.data,
      self.cfg.train.batch_size,
      self.data.pad_id,
      self.mesh,
    )
    writer.write(step, {"loss": loss}, prefix="eval")


class _Preemption:
  """SIGTERM asks for a checkpoint and a clean exit at the next step boundary."""

  def __init__(self):
    self.requested = False
    self._old = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    self.requested = True

  def agreed(self) -> bool:
    if jax.process_count() == 1:
      return self.requested
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.int32(self.requested))))

  def restore(self):
    signal.signal(signal.SIGTERM, self._old)


def _to_global(batch: dict, mesh, local_rows: int) -> dict:
  """This host's numpy rows -> global arrays sharded over the batch axes."""
  out = {}
  for k in BATCH_KEYS:
    x = batch[k]
    shape = (local_rows * jax.process_count(), x.shape[1])
    sharding = named_sharding(mesh, ("batch", "seq"), shape)
    out[k] = jax.make_array_from_process_local_data(sharding, x, shape)
  return out


def evaluate(eval_fn, trainable, frozen, examples, data_cfg, global_batch, pad, mesh) -> float:
  """Mean held-out loss per completion token (every row exactly once)."""
  it = make_iterator(
    examples,
    global_batch,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
    packing=data_cfg.packing,
    max_length=data_cfg.max_length,
    pad_id=pad,
    bucket=data_cfg.bucket,
    shuffle=False,
    drop_last=False,
    num_epochs=1,
  )
  total = count = 0.0
  for batch in it:
    nll, n = eval_fn(
      trainable, frozen, _to_global(batch, mesh, global_batch // jax.process_count())
    )
    total, count = total + float(nll), count + float(n)
  return total / max(count, 1.0)


def _progress(cfg: RunConfig, total: int, initial: int):
  from tqdm import tqdm

  return tqdm(
    total=total,
    initial=initial,
    desc="train",
    unit="step",
    dynamic_ncols=True,
    disable=not cfg.log.progress or jax.process_index() != 0,
  )
