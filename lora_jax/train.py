"""The training loop: LoRA or full fine-tuning as one jit-compiled, sharded, donated step.

    result = train(config, workdir)        # config: the ConfigDict of configs/base.py

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
from jax.sharding import NamedSharding

from lora_jax import checkpoint as ckpt_lib
from lora_jax import lora as lora_lib
from lora_jax import ortho as ortho_lib
from lora_jax.data import DataConfig, load_examples, make_iterator, pad_token_id
from lora_jax.io import load_pretrained, load_tokenizer
from lora_jax.metrics_log import MetricsWriter, flops_per_token, peak_flops_per_device
from lora_jax.optim import make_optimizer
from lora_jax.sharding import make_mesh, named_sharding

log = logging.getLogger(__name__)
BATCH_KEYS = ("input_ids", "loss_mask", "attention_mask", "segment_ids", "positions")


class TrainingError(RuntimeError):
  pass


@dataclasses.dataclass
class TrainResult:
  status: str  # "done" | "preempted" | "nan"
  step: int
  epoch: int
  loss: float
  workdir: str


# ---- config -> objects --------------------------------------------------------------------------
def parse_mesh_shape(spec) -> dict[str, int]:
  """ "fsdp:4,tensor:2" (or a dict / ConfigDict) -> {"fsdp": 4, "tensor": 2}."""
  if not isinstance(spec, str):
    return {k: int(v) for k, v in dict(spec).items()}
  out = {}
  for part in filter(None, (p.strip() for p in spec.split(","))):
    name, _, size = part.partition(":")
    if not size:
      raise ValueError(f"mesh.shape part {part!r}: expected axis:size, e.g. 'fsdp:4,tensor:2'")
    out[name.strip()] = int(size)
  return out


def lora_config(config) -> lora_lib.LoRAConfig:
  c = config.lora
  return lora_lib.LoRAConfig(
    rank=int(c.rank),
    alpha=float(c.alpha),
    dropout=float(c.dropout),
    targets=lora_lib.resolve_targets(c.targets),
    layers=c.layers or None,
    use_rslora=bool(c.use_rslora),
  )


def ortho_config(config) -> ortho_lib.OrthoConfig | None:
  c = config.ortho
  if not c.beta:
    return None
  return ortho_lib.OrthoConfig(
    beta=float(c.beta),
    k=int(c.k),
    mode=c.mode,
    weighted=bool(c.weighted),
    normalize=bool(c.normalize),
    targets=lora_lib.resolve_targets(c.targets),
    span_dtype=c.span_dtype,
    svd=c.svd,
  )


def build_model(config, mesh):
  """The model to train (with its adapter in LoRA mode) and its tokenizer."""
  m = config.model
  model = load_pretrained(
    m.source, dtype=m.dtype, mesh=mesh, compute_dtype=m.compute_dtype or None, remat=m.remat
  )
  tokenizer = load_tokenizer(m.tokenizer or m.source)
  mode = config.train.mode
  if mode == "lora":
    lora_lib.apply_lora(model, lora_config(config), seed=config.train.seed)
  elif mode != "full":
    raise ValueError(f"train.mode={mode!r}; expected 'lora' or 'full'")
  return model, tokenizer


def split_trainable(model, mode: str):
  """(graphdef, trainable, frozen): LoRA trains only the adapters; full trains every Param."""
  return nnx.split(model, nnx.LoRAParam if mode == "lora" else nnx.Param, ...)


_identity_donated = jax.jit(lambda x: x, donate_argnums=0)


def own_buffers(tree):
  """The same arrays in buffers XLA allocated. On CPU, load_pretrained hands JAX the host buffers
  it read the checkpoint into (zero-copy); XLA cannot reuse such a buffer for a donated output, so
  the first train step would hold the trainable params twice. A donated identity copies each leaf
  into an XLA buffer and frees the original, one leaf at a time (XLA-owned leaves pass through
  without a copy)."""
  return jax.tree.map(_identity_donated, tree)


# ---- the step -----------------------------------------------------------------------------------
def token_loss(model, batch, dropout_rng, loss_chunk: int = 0):
  """(sum of completion-token NLL, number of completion tokens). Token t is predicted from t-1;
  loss_mask already excludes prompts, padding and segment starts."""
  hidden, _, _ = model.hidden(
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


def make_train_step(graphdef, tx, schedule, config, spans=None, ortho=None):
  accum = int(config.train.grad_accum)
  loss_chunk = int(config.train.loss_chunk)
  seed = int(config.train.seed)

  def loss_sum(trainable, frozen, batch, rng):
    model = nnx.merge(graphdef, trainable, frozen)
    return token_loss(model, batch, rng, loss_chunk)

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

  def step(trainable, opt_state, frozen, batch, step_index):
    rng = jax.random.fold_in(jax.random.key(seed), step_index)
    micro = jax.tree.map(lambda x: x.reshape(accum, x.shape[0] // accum, *x.shape[1:]), batch)
    grad_fn = jax.value_and_grad(loss_sum, has_aux=True)

    def one(carry, xs):
      mb, i = xs
      (nll, count), g = grad_fn(trainable, frozen, mb, jax.random.fold_in(rng, i))
      grads, nll_acc, count_acc = carry
      return (jax.tree.map(jnp.add, grads, g), nll_acc + nll, count_acc + count), None

    if accum == 1:  # no accumulation buffer: one less copy of the trainable params in memory
      (nll, count), grads = grad_fn(trainable, frozen, batch, jax.random.fold_in(rng, 0))
    else:
      zeros = jax.tree.map(jnp.zeros_like, trainable)
      (grads, nll, count), _ = jax.lax.scan(one, (zeros, 0.0, 0.0), (micro, jnp.arange(accum)))
    denom = jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda g: g / denom, grads)
    loss = nll / denom
    metrics = {"loss": loss, "tokens": count}
    if ortho is not None:
      reg, reg_grads = jax.value_and_grad(penalty)(trainable, frozen)
      grads = jax.tree.map(lambda g, r: g + ortho.beta * r, grads, reg_grads)
      metrics["ortho_penalty"] = reg
      metrics["total_loss"] = loss + ortho.beta * reg
    metrics["grad_norm"] = optax.tree.norm(grads)
    metrics["lr"] = schedule(step_index)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    return optax.apply_updates(trainable, updates), opt_state, metrics

  return step


def make_eval_step(graphdef, config):
  def step(trainable, frozen, batch):
    return token_loss(
      nnx.merge(graphdef, trainable, frozen), batch, None, int(config.train.loss_chunk)
    )

  return jax.jit(step)


# ---- the loop -----------------------------------------------------------------------------------
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


def train(config, workdir: str) -> TrainResult:
  t_setup = time.time()
  mesh = make_mesh(parse_mesh_shape(config.mesh.shape))
  model, tokenizer = build_model(config, mesh)
  mode = config.train.mode
  seed = int(config.train.seed)

  data_cfg = DataConfig.from_mapping(config.data)
  if data_cfg.seed is None:
    data_cfg = dataclasses.replace(data_cfg, seed=seed)
  examples, report = load_examples(data_cfg, tokenizer, split="train")
  log.info("data: %s", report)
  global_batch = int(config.train.batch_size)
  if global_batch % int(config.train.grad_accum):
    raise ValueError(
      f"train.batch_size={global_batch} is not a multiple of "
      f"train.grad_accum={config.train.grad_accum}"
    )
  pad = pad_token_id(tokenizer)
  it = make_iterator(
    examples,
    global_batch,
    seed=data_cfg.seed,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
    packing=data_cfg.packing,
    max_length=data_cfg.max_length,
    pad_id=pad,
    bucket=data_cfg.bucket,
    shuffle=data_cfg.shuffle,
  )
  steps_per_epoch = it.steps_per_epoch
  total_steps = int(config.train.steps) or int(config.train.epochs) * steps_per_epoch
  eval_examples = None
  if data_cfg.eval_source or data_cfg.eval_fraction:
    eval_examples, eval_report = load_examples(data_cfg, tokenizer, split="eval")
    log.info("held-out data: %s", eval_report)

  tx, schedule = make_optimizer(config.train, total_steps)
  ortho = ortho_config(config) if mode == "lora" else None
  spans = ortho_lib.compute_spans(model, ortho, seed) if ortho is not None else None
  model_cfg = model.config
  graphdef, trainable, frozen = split_trainable(model, mode)
  del model
  trainable = own_buffers(trainable)  # deletes the model's copies: `model` is gone by now
  opt_state = _replicate_unsharded(jax.jit(tx.init)(trainable), mesh)
  lcfg = lora_config(config) if mode == "lora" else None
  fingerprint = ckpt_lib.model_fingerprint(model_cfg, mode, lcfg)

  keep = int(config.checkpoint.max_to_keep) or None
  checkpointer = ckpt_lib.Checkpointer(
    f"{workdir}/checkpoints", max_to_keep=keep, async_save=bool(config.checkpoint.async_save)
  )
  ckpt_lib.write_config(workdir, config)
  step = 0
  latest = checkpointer.latest_step()
  if latest is not None:
    restored, opt_restored, meta = checkpointer.restore(
      latest, nnx.to_pure_dict(trainable), opt_state, fingerprint
    )
    nnx.replace_by_pure_dict(trainable, restored)
    opt_state = opt_restored
    it.restore(meta["data"])
    step = int(meta["step"])
    log.info("resumed from step %d (epoch %d)", step, it.epoch)

  # Outputs pinned to the inputs' shardings: the donated state keeps one layout, one compile.
  shardings = lambda tree: jax.tree.map(lambda x: x.sharding, tree)
  step_fn = jax.jit(
    make_train_step(graphdef, tx, schedule, config, spans, ortho),
    donate_argnums=(0, 1),
    out_shardings=(shardings(trainable), shardings(opt_state), None),
  )
  eval_fn = make_eval_step(graphdef, config) if eval_examples is not None else None
  writer = MetricsWriter(workdir, tensorboard=bool(config.log.tensorboard))
  peak = peak_flops_per_device(float(config.train.peak_flops)) * jax.device_count()
  preempt = _Preemption()
  bar = _progress(config, total_steps, step)
  status, last_loss = "done", float("nan")
  local_rows = global_batch // jax.process_count()
  log.info(
    "setup took %.1fs; %d steps (%d per epoch), global batch %d, mesh %s",
    time.time() - t_setup,
    total_steps,
    steps_per_epoch,
    global_batch,
    dict(mesh.shape),
  )

  def save(s: int, force: bool = False):
    meta = {
      "step": s,
      "epoch": it.epoch,
      "data": it.state(),
      "fingerprint": fingerprint,
      "config": config.to_dict() if hasattr(config, "to_dict") else dict(config),
    }
    checkpointer.save(s, nnx.to_pure_dict(trainable), opt_state, meta, force=force)

  try:
    while step < total_steps:
      batch = next(it)
      stats = it.last_stats
      t0 = time.perf_counter()
      trainable, opt_state, metrics = step_fn(
        trainable, opt_state, frozen, _to_global(batch, mesh, local_rows), step
      )
      metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
      dt = time.perf_counter() - t0
      step += 1
      last_loss = metrics["loss"]
      if not math.isfinite(last_loss) or not math.isfinite(metrics["grad_norm"]):
        status = "nan"
        log.error(
          "step %d: loss %s, grad norm %s; stopping. The last good checkpoint is step %s "
          "in %s/checkpoints",
          step,
          last_loss,
          metrics["grad_norm"],
          checkpointer.latest_step(),
          workdir,
        )
        break
      seq = batch["input_ids"].shape[1]
      flops_tok = flops_per_token(model_cfg, seq, mode == "full")
      metrics.update(
        epoch=it.epoch + (it.step / steps_per_epoch),
        step_seconds=dt,
        tokens_per_second=stats["tokens"] / dt,
        padded_tokens_per_second=stats["padded_tokens"] / dt,
      )
      if peak:
        metrics["mfu"] = flops_tok * stats["padded_tokens"] / dt / peak
      if step % int(config.log.every_steps) == 0 or step == 1:
        writer.write(step, metrics)
      bar.update(1)
      bar.set_postfix(loss=f"{last_loss:.4f}", epoch=f"{metrics['epoch']:.2f}")
      epoch_end = it.step >= steps_per_epoch
      every = int(config.checkpoint.every_steps)
      if (
        (every and step % every == 0)
        or (epoch_end and config.checkpoint.every_epoch)
        or step == total_steps
      ):
        save(step)
      if eval_fn is not None and (
        (epoch_end)
        or (int(config.log.eval_every_steps) and step % int(config.log.eval_every_steps) == 0)
      ):
        writer.write(
          step,
          {
            "loss": evaluate(
              eval_fn, trainable, frozen, eval_examples, data_cfg, global_batch, pad, mesh
            )
          },
          prefix="eval",
        )
      if preempt.agreed():
        if checkpointer.latest_step() != step:
          save(step, force=True)
        status = "preempted"
        log.warning("SIGTERM: saved step %d and stopping", step)
        break
  finally:
    bar.close()
    preempt.restore()
    checkpointer.close()
    writer.close()
  return TrainResult(status, step, it.epoch, last_loss, workdir)


def _replicate_unsharded(tree, mesh):
  """Scalars such as Adam's step count come out of jit on one device; put them on the mesh."""
  replicated = NamedSharding(mesh, jax.sharding.PartitionSpec())
  return jax.tree.map(
    lambda x: x if isinstance(x.sharding, NamedSharding) else jax.device_put(x, replicated), tree
  )


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


def _progress(config, total: int, initial: int):
  from tqdm import tqdm

  return tqdm(
    total=total,
    initial=initial,
    desc="train",
    unit="step",
    dynamic_ncols=True,
    disable=not config.log.progress or jax.process_index() != 0,
  )
