"""Compile a run's train step and the sampler's decode step ahead of time on abstract inputs and
read what one device needs: XLA's memory analysis, matmul FLOPs and collective bytes per call.

    step = plan_train_step(cfg, model_config, mesh)     # a StepPlan
    step.device_bytes, step.dot_flops, step.collective_bytes

Nothing is allocated: inputs are `jax.ShapeDtypeStruct`s with shardings (`abstract.py`) and the
program is only lowered and compiled (`jit(...).lower(...).compile()`). The devices are whatever
JAX has; on a CPU host, fake ones (`jax_num_cpu_devices`), so the figures are XLA:CPU's (see
`caveats`).
"""

from __future__ import annotations

import dataclasses
import logging
import time

import jax
import jax.numpy as jnp

from lora_jax.config import ModelConfig
from lora_jax.plan import abstract, hlo
from lora_jax.run_config import RunConfig
from lora_jax.sampling import steps as sampling_steps
from lora_jax.train import make_train_step

log = logging.getLogger(__name__)
GiB = 1 << 30
DECODE_STEPS = 32  # tokens per decode round, the engine's default

ACCELERATOR_CAVEATS = (
  "Compiled by XLA:CPU for fake CPU devices, not by the GPU/TPU compiler: its buffer assignment "
  "is an estimate of the accelerator's, not a measurement of it.",
  "XLA:CPU computes bfloat16 matmuls in float32, so it keeps float32 copies of their bfloat16 "
  "operands that GPUs and TPUs do not: with bfloat16 compute the temporaries are overestimated.",
  "Attention is the plain XLA path (scores materialised); cuDNN flash attention on GPU or splash "
  "attention on TPU keep one block of scores, so long sequences need less there.",
  "Not counted: the runtime's own reserve (CUDA context, XLA's allocator fragmentation), host "
  "memory, the data pipeline, checkpoint writes.",
)
CPU_CAVEATS = (
  "XLA:CPU's own buffer assignment for this program (on a tiny model it matched the measured "
  "peak within 1%); fake devices share the host's RAM, so the host needs N times the figure.",
  "Not counted: host memory of the data pipeline, the tokenizer and checkpoint writes.",
)


def caveats(platform: str) -> tuple[str, ...]:
  """What the figures do not say, for the platform the plan is for."""
  return CPU_CAVEATS if platform == "cpu" else ACCELERATOR_CAVEATS


@dataclasses.dataclass
class StepPlan:
  """One compiled program, per device. Bytes are per device; FLOPs and collective bytes per call
  (for the decode step, per decoded token: its while loop runs once per token)."""

  name: str
  argument_bytes: int  # inputs as XLA counts them
  output_bytes: int
  alias_bytes: int  # outputs written into donated inputs
  temp_bytes: int  # XLA's temporary allocation
  inputs: dict[str, int]  # argument bytes by part ("params", "optimizer", "batch", ...)
  dot_flops: float
  xla_flops: float  # cost_analysis(): counts loop bodies once
  collective_bytes: float
  collectives: dict[str, list[float]]
  compile_seconds: float

  @property
  def device_bytes(self) -> int:
    """Peak bytes one device needs: inputs + outputs not written over donated inputs + temps."""
    return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes

  def to_dict(self) -> dict:
    return {**dataclasses.asdict(self), "device_bytes": self.device_bytes}


def _analyze(name: str, lowered, inputs: dict[str, int], t0: float) -> StepPlan:
  compiled = lowered.compile()
  seconds = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  counts = hlo.analyze(compiled.as_text())
  return StepPlan(
    name=name,
    argument_bytes=int(mem.argument_size_in_bytes),
    output_bytes=int(mem.output_size_in_bytes),
    alias_bytes=int(mem.alias_size_in_bytes),
    temp_bytes=int(mem.temp_size_in_bytes),
    inputs=inputs,
    dot_flops=counts.dot_flops,
    xla_flops=float((cost or {}).get("flops", 0.0)),
    collective_bytes=counts.collective_bytes,
    collectives=counts.collectives,
    compile_seconds=seconds,
  )


def train_step_program(cfg: RunConfig, config: ModelConfig, mesh):
  """(jitted step, its abstract arguments, argument bytes per device by part): the train step as
  `train.compile_step` jits it (trainable params and optimizer state donated, outputs pinned to
  the inputs' shardings), for one global batch of `data.max_length` tokens per row, the longest
  the data pipeline makes."""
  x = abstract.train_inputs(cfg, config, mesh)

  def step(trainable, opt_state, frozen, batch, step_index, spans):
    # Spans are arguments here (training closes over them): abstract values cannot be closed over.
    fn = make_train_step(x.graphdef, x.tx, x.schedule, cfg.train, spans, cfg.regulariser)
    return fn(trainable, opt_state, frozen, batch, step_index)

  shardings = lambda tree: jax.tree.map(lambda a: a.sharding, tree)
  jitted = jax.jit(
    step,
    donate_argnums=(0, 1),
    out_shardings=(shardings(x.trainable), shardings(x.opt_state), None),
  )
  step_index = jax.ShapeDtypeStruct((), jnp.int32)
  args = (x.trainable, x.opt_state, x.frozen, x.batch, step_index, x.spans)
  inputs = {
    "trainable params": abstract.device_bytes(x.trainable),
    "frozen params": abstract.device_bytes(x.frozen),
    "optimizer state": abstract.device_bytes(x.opt_state),
    "batch": abstract.device_bytes(x.batch),
    "step index": abstract.device_bytes(step_index),
  }
  if x.spans is not None:
    inputs["orthogonal spans"] = abstract.device_bytes(x.spans)
  return jitted, args, inputs


def plan_train_step(cfg: RunConfig, config: ModelConfig, mesh) -> StepPlan:
  t0 = time.perf_counter()
  jitted, args, inputs = train_step_program(cfg, config, mesh)
  return _analyze("train step", jitted.lower(*args), inputs, t0)


def plan_decode_step(
  cfg: RunConfig, config: ModelConfig, mesh, rows: int, length: int, dtype: str
) -> StepPlan:
  """The sampler's decode round (`rows` cache rows of `length` slots, sampling with top-p) on the
  merged model in `dtype`, stacked layers as on accelerators."""
  t0 = time.perf_counter()
  x = abstract.decode_inputs(cfg, config, mesh, rows, length, dtype)
  lowered = sampling_steps.decode.lower(
    x.graphdef,
    x.model_state,
    x.layers,
    x.cache,
    x.row_state,
    x.stop_ids,
    x.exit_on_finish,
    steps=DECODE_STEPS,
    greedy=False,
  )
  inputs = {
    "params": abstract.device_bytes(x.model_state),
    "KV cache": abstract.device_bytes(x.cache),
    "row state": abstract.device_bytes(x.row_state),
  }
  # The engine passes the model state and its stacked layer params, the same buffers; jit drops
  # the state's unused copy, so XLA counts the params once.
  return _analyze("decode step", lowered, inputs, t0)


def with_remat(cfg: RunConfig, remat: str) -> RunConfig:
  return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, remat=remat))
