"""A run's state and inputs as shapes with shardings, never allocated: what the planner compiles.

Every array is a `jax.ShapeDtypeStruct` carrying the `NamedSharding` the run would give it: params
from their logical axes (`sharding.RULES`), optimizer state from `optim.init_opt_state` on the
abstract params (the function training places it with, so the plan follows training), batches and KV caches from the
same tables the trainer and the sampler use.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from lora_jax import lora as lora_lib
from lora_jax import ortho as ortho_lib
from lora_jax.config import ModelConfig
from lora_jax.model import Decoder
from lora_jax.optim import init_opt_state, make_optimizer
from lora_jax.precision import maybe_scaled, numerics
from lora_jax.run import split_trainable
from lora_jax.run_config import RunConfig
from lora_jax.sampling import steps as sampling_steps
from lora_jax.sampling.forward import cache_sharding
from lora_jax.sharding import named_sharding
from lora_jax.train import BATCH_KEYS

_PLANNED_STEPS = 1000  # the schedule's length does not change the step's shapes


class PlanError(ValueError):
  """A plan that cannot be made as asked (one line naming the value and what was expected)."""


def model_config(source: str, shapes_dir: str | None = None) -> ModelConfig:
  """The model's config.json, without its weights: a shipped shape file for a hub id
  (`shapes_dir/ORG--NAME.json`, so planning needs no hub access), else the local checkpoint's own
  config (a HF directory, a config.json, or a GGUF file's metadata)."""
  if os.path.isfile(source) and source.endswith(".json"):
    return ModelConfig.from_file(source)
  if shapes_dir is not None:
    shipped = os.path.join(shapes_dir, source.strip("/").replace("/", "--") + ".json")
    if os.path.isfile(shipped):
      return ModelConfig.from_file(shipped)
  if os.path.exists(source):
    from lora_jax.io import load_config

    return load_config(source)
  known = sorted(
    f[:-5].replace("--", "/") for f in os.listdir(shapes_dir or ".") if f.endswith(".json")
  )
  raise PlanError(
    f"model.source={source!r}: no shipped shapes for it and no such local path; expected one of "
    f"{known} or a local checkpoint directory / config.json (planning never downloads)"
  )


def shipped_shapes(shapes_dir: str) -> dict[str, dict]:
  """Hub id -> the config.json fields shipped in `shapes_dir`."""
  out = {}
  for name in sorted(os.listdir(shapes_dir)):
    if name.endswith(".json"):
      with open(os.path.join(shapes_dir, name)) as f:
        out[name[:-5].replace("--", "/")] = json.load(f)
  return out


def with_shardings(state, mesh) -> nnx.State:
  """The abstract nnx State with each leaf a ShapeDtypeStruct sharded by its logical axes."""

  def one(v):
    axes = v.get_metadata().get("axes") or (None,) * len(v.shape)
    sharding = named_sharding(mesh, axes, v.shape)
    return v.replace(jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding))

  return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def abstract_model(
  cfg: RunConfig, config: ModelConfig, mesh, *, dtype=None, adapter: bool = True
) -> Decoder:
  """The run's Decoder (with its adapter in LoRA mode) with abstract params, as `run.build_model`
  makes it; `dtype` overrides the param dtype (the sampler's)."""
  m = cfg.model

  def build():
    model = Decoder(
      config,
      param_dtype=jnp.dtype(dtype or m.dtype),
      dtype=(dtype or m.compute_dtype) or None,
      mesh=mesh,
      rngs=nnx.Rngs(0),
      remat=m.remat,
      attention=m.attention,
    )
    if dtype is None:  # the training model's residual stream (lora_jax.precision)
      model.residual_dtype = numerics(cfg.train.precision, cfg.train.mode).residual_dtype
    if adapter and cfg.adapter is not None:
      lora_lib.apply_lora(model, cfg.adapter, seed=cfg.train.seed)
    return model

  return nnx.eval_shape(build)


@dataclasses.dataclass
class TrainInputs:
  """The train step's arguments (abstract) and what builds the step."""

  graphdef: nnx.GraphDef
  trainable: nnx.State
  frozen: nnx.State
  opt_state: optax.OptState
  batch: dict
  spans: dict | None
  tx: optax.GradientTransformation
  schedule: optax.Schedule


def train_inputs(cfg: RunConfig, config: ModelConfig, mesh) -> TrainInputs:
  model = abstract_model(cfg, config, mesh)
  graphdef, trainable, frozen = split_trainable(model, cfg.train.mode)
  trainable, frozen = with_shardings(trainable, mesh), with_shardings(frozen, mesh)
  tx, schedule = make_optimizer(cfg.train, _PLANNED_STEPS)
  tx = maybe_scaled(tx, cfg.train.precision, cfg.train.mode)
  opt_state = init_opt_state(tx, trainable, mesh)
  rows, length = cfg.train.batch_size, cfg.data.max_length
  token = jax.ShapeDtypeStruct(
    (rows, length), jnp.int32, sharding=named_sharding(mesh, ("batch", "seq"), (rows, length))
  )
  spans = abstract_spans(model, cfg, mesh) if cfg.regulariser is not None else None
  return TrainInputs(
    graphdef, trainable, frozen, opt_state, {k: token for k in BATCH_KEYS}, spans, tx, schedule
  )


def abstract_spans(model: Decoder, cfg: RunConfig, mesh) -> dict:
  """The orthogonal regulariser's spans (replicated: small, computed once before training)."""
  replicated = NamedSharding(mesh, P())
  spans = {}
  for name in cfg.ortho.targets:
    kernel = getattr(model.layers, name).kernel
    shapes = jax.eval_shape(
      functools.partial(ortho_lib.module_spans, cfg=cfg.ortho),
      jax.ShapeDtypeStruct(kernel.shape, kernel.dtype),
      jax.random.key(0),
    )
    spans[name] = jax.tree.map(
      lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated), shapes
    )
  return spans


@dataclasses.dataclass
class DecodeInputs:
  """The sampler's decode step arguments (abstract), for `rows` cache rows of `length` slots."""

  graphdef: nnx.GraphDef
  model_state: nnx.State
  layers: dict
  cache: list
  row_state: dict
  stop_ids: jax.ShapeDtypeStruct
  exit_on_finish: jax.ShapeDtypeStruct


def decode_inputs(cfg: RunConfig, config: ModelConfig, mesh, rows: int, length: int, dtype):
  """The merged model (adapters folded into the weights, as evaluation samples it) in `dtype`,
  its stacked layer params (the same arrays: accelerators decode from them), the KV cache and the
  per-row numbers the engine sends each round."""
  model = abstract_model(cfg, config, mesh, dtype=dtype, adapter=False)
  graphdef, state = nnx.split(model)
  state = with_shardings(state, mesh)
  layers = nnx.to_pure_dict(state["layers"])
  shape = (rows, length, config.num_kv_heads, config.head_dim)
  kv = jax.ShapeDtypeStruct(shape, jnp.dtype(dtype), sharding=cache_sharding(mesh, shape))
  replicated = NamedSharding(mesh, P())
  vec = lambda dt, *extra: jax.ShapeDtypeStruct((rows, *extra), dt, sharding=replicated)
  key_shape = sampling_steps.key_shape()
  row_state = {
    "tok": vec(jnp.int32),
    "pos": vec(jnp.int32),
    "gen": vec(jnp.int32),
    "max_new": vec(jnp.int32),
    "active": vec(jnp.bool_),
    "key": vec(jnp.uint32, *key_shape),
    "temperature": vec(jnp.float32),
    "top_k": vec(jnp.int32),
    "top_p": vec(jnp.float32),
    "min_p": vec(jnp.float32),
  }
  stop_ids = jax.ShapeDtypeStruct((1,), jnp.int32, sharding=replicated)
  flag = jax.ShapeDtypeStruct((), jnp.bool_, sharding=replicated)
  cache = [(kv, kv) for _ in range(config.num_layers)]
  return DecodeInputs(graphdef, state, layers, cache, row_state, stop_ids, flag)


def device_bytes(tree) -> int:
  """Bytes one device holds of an abstract sharded tree (the largest shard of each leaf)."""
  total = 0
  for leaf in jax.tree.leaves(tree):
    shard = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
    total += int(np.prod(shard, dtype=np.int64)) * jnp.dtype(leaf.dtype).itemsize
  return total
