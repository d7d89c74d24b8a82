"""The typed boundary: a run's ConfigDict (configs/*.py) becomes one frozen `RunConfig`, checked once.

    cfg = run_config.from_dict(config)   # launch.train does this; the library takes `cfg`
    cfg.train.lr, cfg.lora.targets, cfg.mesh.axes   # typed, validated, never cast again

Every key of configs/base.py has one rule in `RULES` (its type and its range or choices). A wrong
value is one line naming the key and what it accepts, e.g.
`config.train.lr=-1.0: expected a number > 0`. `Rule.invalid_values()` gives values a rule must
refuse, so a test can walk every key. `RunConfig.to_dict()` has the ConfigDict's layout (what
is saved as workdir/config.json) and `from_dict` reads it back, old workdirs' files included.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Mapping
from typing import Any

from lora_jax.attention import IMPLEMENTATIONS as ATTENTION
from lora_jax.data import FORMATS, LOSS_ON, DataConfig
from lora_jax.lora import LoRAConfig, LoRAError, parse_layers, resolve_targets
from lora_jax.optim import SCHEDULES
from lora_jax.ortho import K_MODES, OrthoConfig
from lora_jax.ortho import MODES as ORTHO_MODES
from lora_jax.precision import PRECISIONS, numerics
from lora_jax.sharding import MeshError, parse_mesh_spec

log = logging.getLogger(__name__)

DTYPES = ("float32", "bfloat16", "float16")
REMAT = ("none", "full", "dots")
TRAIN_MODES = ("lora", "full")


class RunConfigError(ValueError):
  """A config value outside what its key accepts."""


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  source: str = "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B"  # HF dir, hub id or .gguf
  tokenizer: str = ""  # "" = source
  dtype: str = "float32"  # param (master) dtype; set by train.precision
  compute_dtype: str = "float32"  # set by train.precision
  remat: str = "none"
  attention: str = "auto"  # auto | xla | cudnn | splash (lora_jax/attention.py)

  @property
  def tokenizer_source(self) -> str:
    return self.tokenizer or self.source


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  mode: str = "lora"
  epochs: int = 10
  steps: int = 0  # > 0 overrides epochs
  batch_size: int = 2  # global batch
  grad_accum: int = 1
  lr: float = 5e-5
  schedule: str = "cosine"
  warmup_steps: int = 0
  weight_decay: float = 1e-4
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  clip_norm: float = 1.0  # 0 = no clipping
  seed: int = 0
  loss_chunk: int = 0  # > 0: logits this many tokens at a time
  peak_flops: float = 0.0  # per-device peak for MFU; 0 = known table / measured on CPU
  precision: str = "float32"  # reference | mixed | float32 (lora_jax.precision)

  def total_steps(self, steps_per_epoch: int) -> int:
    return self.steps or self.epochs * steps_per_epoch


@dataclasses.dataclass(frozen=True)
class MeshSpec:
  shape: tuple[tuple[str, int], ...] = (("fsdp", -1),)

  @property
  def axes(self) -> dict[str, int]:
    return dict(self.shape)


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
  every_steps: int = 0  # 0 = only at epoch ends
  every_epoch: bool = True
  max_to_keep: int = 0  # 0 = keep all
  async_save: bool = True


@dataclasses.dataclass(frozen=True)
class LogConfig:
  every_steps: int = 10
  tensorboard: bool = True
  eval_every_steps: int = 0  # held-out loss every N steps (and at every epoch end)
  progress: bool = True


@dataclasses.dataclass(frozen=True)
class RunConfig:
  model: ModelSpec = ModelSpec()
  data: DataConfig = DataConfig(seed=0)
  train: TrainConfig = TrainConfig()
  lora: LoRAConfig = LoRAConfig()
  ortho: OrthoConfig = OrthoConfig()
  mesh: MeshSpec = MeshSpec()
  checkpoint: CheckpointConfig = CheckpointConfig()
  log: LogConfig = LogConfig()

  @property
  def adapter(self) -> LoRAConfig | None:
    """The LoRA config in LoRA mode, None in full fine-tuning."""
    return self.lora if self.train.mode == "lora" else None

  @property
  def regulariser(self) -> OrthoConfig | None:
    """The orthogonal regulariser when it is on (beta > 0, LoRA mode)."""
    return self.ortho if self.ortho.beta and self.train.mode == "lora" else None

  def to_dict(self) -> dict[str, dict[str, Any]]:
    """The ConfigDict layout with plain JSON values (what `from_dict` reads)."""
    return {
      section: {k: RULES[f"{section}.{k}"].to_plain(v) for k, v in _fields(getattr(self, section))}
      for section in SECTIONS
    }


SECTIONS: dict[str, type] = {
  "model": ModelSpec,
  "data": DataConfig,
  "train": TrainConfig,
  "lora": LoRAConfig,
  "ortho": OrthoConfig,
  "mesh": MeshSpec,
  "checkpoint": CheckpointConfig,
  "log": LogConfig,
}


def _fields(obj) -> list[tuple[str, Any]]:
  return [(f.name, getattr(obj, f.name)) for f in dataclasses.fields(obj)]


# ---- rules --------------------------------------------------------------------------------------
class _Refused(Exception):
  """Raised by a rule's check with the reason, turned into one RunConfigError line."""


@dataclasses.dataclass(frozen=True)
class Rule:
  """What one key accepts. `check(value)` returns the typed value or raises _Refused."""

  expected: str
  check: Callable[[Any], Any]
  wrong_type: tuple = ()  # values of another type (for tests that inject faults)
  out_of_range: tuple = ()  # values of the right type outside what is accepted
  to_plain: Callable[[Any], Any] = lambda v: v
  optional: bool = False  # None is accepted too

  def convert(self, key: str, value):
    if value is None and self.optional:
      return None
    try:
      return self.check(value)
    except _Refused as e:
      shown = repr(value)
      shown = shown if len(shown) <= 80 else shown[:77] + "..."
      why = str(e)  # a parser's reason that says what it expects stands alone
      why = why if "expected" in why else f"expected {self.expected}" + (f" ({why})" if why else "")
      raise RunConfigError(f"config.{key}={shown}: {why}".replace("\n", " ")) from None

  def invalid_values(self) -> tuple:
    return self.wrong_type + self.out_of_range


def _is_int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def _int(low: int, high: int | None = None) -> Rule:
  text = f"an integer >= {low}" if high is None else f"an integer in [{low}, {high}]"

  def check(v):
    if not _is_int(v) or v < low or (high is not None and v > high):
      raise _Refused()
    return v

  bad = (low - 1,) + (() if high is None else (high + 1,))
  return Rule(text, check, wrong_type=("1", 1.5, True), out_of_range=bad)


def _float(low: float, high: float | None = None, low_open=False, high_open=False) -> Rule:
  lo = f"{'>' if low_open else '>='} {low:g}"
  text = f"a number {lo}" if high is None else f"a number in {'(['[not low_open]}{low:g}, "
  if high is not None:
    text += f"{high:g}{')]'[not high_open]}"

  def check(v):
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
      raise _Refused()
    if v < low or (low_open and v == low):
      raise _Refused()
    if high is not None and (v > high or (high_open and v == high)):
      raise _Refused()
    return float(v)

  bad = (low if low_open else low - 1, float("nan"))
  bad += () if high is None else ((high if high_open else high + 1),)
  return Rule(text, check, wrong_type=("0.1", True), out_of_range=bad)


def _bool() -> Rule:
  def check(v):
    if not isinstance(v, bool):
      raise _Refused()
    return v

  return Rule("true or false", check, wrong_type=(1, "yes"))


def _choice(values: tuple[str, ...]) -> Rule:
  def check(v):
    if v not in values or not isinstance(v, str):
      raise _Refused()
    return v

  text = "one of " + ", ".join(repr(x) for x in values)
  return Rule(text, check, wrong_type=(1,), out_of_range=("nonsense",))


def _text(nonempty: bool = False, optional: bool = False) -> Rule:
  def check(v):
    if not isinstance(v, str) or (nonempty and not v.strip()):
      raise _Refused()
    return v

  text = "a non-empty string" if nonempty else "a string"
  return Rule(
    text + (" or None" if optional else ""),
    check,
    wrong_type=(1, ["a"]),
    out_of_range=("",) if nonempty else (),
    optional=optional,
  )


def _parsed(expected: str, parse, to_plain, bad: tuple, errors=(ValueError,)) -> Rule:
  """A string (or its already-parsed form) that `parse` turns into the typed value."""

  def check(v):
    if not isinstance(v, (str, list, tuple)):
      raise _Refused()
    try:
      return parse(v)
    except errors as e:
      raise _Refused(str(e)) from None

  return Rule(expected, check, wrong_type=(1, None), out_of_range=bad, to_plain=to_plain)


def _targets(v) -> tuple[str, ...]:
  return resolve_targets(list(v) if isinstance(v, (list, tuple)) else v)


def _layers(v) -> tuple[int, int] | None:
  return parse_layers(tuple(v) if isinstance(v, list) else v)


def _mesh(v) -> tuple[tuple[str, int], ...]:
  if isinstance(v, (list, tuple)):  # the parsed form read back: ((axis, size), ...)
    v = ",".join(f"{a}:{s}" for a, s in v)
  return tuple(parse_mesh_spec(v).items())


_TARGETS = _parsed(
  "module names or groups, e.g. 'up_proj' or 'qkvo_mlp'", _targets, ",".join, ("attn_q", "")
)

RULES: dict[str, Rule] = {
  "model.source": _text(nonempty=True),
  "model.tokenizer": _text(),
  "model.dtype": _choice(("",) + DTYPES),
  "model.compute_dtype": _choice(("",) + DTYPES),
  "model.remat": _choice(REMAT),
  "model.attention": _choice(ATTENTION),
  "data.source": _text(nonempty=True),
  "data.split": _text(nonempty=True),
  "data.config_name": _text(nonempty=True, optional=True),
  "data.format": _choice(FORMATS),
  "data.max_length": _int(2),
  "data.packing": _bool(),
  "data.bucket": _int(0),
  "data.eval_source": _text(nonempty=True, optional=True),
  "data.eval_split": _text(nonempty=True, optional=True),
  "data.eval_fraction": _float(0.0, 1.0, high_open=True),
  "data.shuffle": _bool(),
  "data.seed": dataclasses.replace(_int(0), expected="an integer >= 0 or None", optional=True),
  "data.loss_on": _choice(LOSS_ON),
  "train.mode": _choice(TRAIN_MODES),
  "train.epochs": _int(0),
  "train.steps": _int(0),
  "train.batch_size": _int(1),
  "train.grad_accum": _int(1),
  "train.lr": _float(0.0, low_open=True),
  "train.schedule": _choice(SCHEDULES),
  "train.warmup_steps": _int(0),
  "train.weight_decay": _float(0.0),
  "train.b1": _float(0.0, 1.0, high_open=True),
  "train.b2": _float(0.0, 1.0, high_open=True),
  "train.eps": _float(0.0, low_open=True),
  "train.clip_norm": _float(0.0),
  "train.seed": _int(0),
  "train.loss_chunk": _int(0),
  "train.peak_flops": _float(0.0),
  "train.precision": _choice(PRECISIONS),
  "lora.rank": _int(1),
  "lora.alpha": _float(0.0, low_open=True),
  "lora.dropout": _float(0.0, 1.0, high_open=True),
  "lora.targets": _TARGETS,
  "lora.layers": _parsed(
    "'' (every layer), 'a-b' or 'from{a}_to{b}' (inclusive)",
    _layers,
    lambda v: "" if v is None else f"{v[0]}-{v[1]}",
    ("16", "9-3"),
    errors=(LoRAError,),
  ),
  "lora.use_rslora": _bool(),
  "ortho.beta": _float(0.0),
  "ortho.k": _int(1),
  "ortho.mode": _choice(ORTHO_MODES),
  "ortho.weighted": _bool(),
  "ortho.normalize": _bool(),
  "ortho.targets": _TARGETS,
  "ortho.span_dtype": _choice(DTYPES),
  "ortho.svd": _choice(("randomized", "exact")),
  "ortho.k_mode": _choice(K_MODES),
  "mesh.shape": _parsed(
    "axis:size pairs over data/fsdp/tensor, e.g. 'fsdp:4,tensor:2' (one size may be -1)",
    _mesh,
    lambda v: ",".join(f"{a}:{s}" for a, s in v),
    ("fsdp", "fsdp:0", "model:2", "fsdp:-1,tensor:-1"),
    errors=(MeshError,),
  ),
  "checkpoint.every_steps": _int(0),
  "checkpoint.every_epoch": _bool(),
  "checkpoint.max_to_keep": _int(0),
  "checkpoint.async_save": _bool(),
  "log.every_steps": _int(1),
  "log.tensorboard": _bool(),
  "log.eval_every_steps": _int(0),
  "log.progress": _bool(),
}


# ---- the conversion -----------------------------------------------------------------------------
def from_dict(config, *, strict: bool = True) -> RunConfig:
  """A checked RunConfig from a ConfigDict or a nested dict (a saved config.json). Missing keys
  take their defaults (those of configs/base.py); unknown keys are an error, or with
  strict=False (reading an old workdir's config.json) logged and ignored."""
  raw = config.to_dict() if hasattr(config, "to_dict") else dict(config)
  _check_known(raw, strict)
  sections = {}
  for name, cls in SECTIONS.items():
    given = raw.get(name) or {}
    defaults = dict(_fields(getattr(RunConfig(), name)))
    kwargs = {}
    for field, default in defaults.items():
      key = f"{name}.{field}"
      kwargs[field] = RULES[key].convert(key, given[field]) if field in given else default
    sections[name] = cls(**kwargs)
  sections["data"] = _resolve_data_seed(sections["data"], sections["train"], raw)
  sections["model"], sections["train"] = _resolve_dtypes(sections["model"], sections["train"], raw)
  cfg = RunConfig(**sections)
  _check_together(cfg)
  return cfg


def _check_known(raw: Mapping, strict: bool) -> None:
  unknown = [s for s in raw if s not in SECTIONS]
  for s in SECTIONS:
    if isinstance(raw.get(s), Mapping):
      unknown += [f"{s}.{k}" for k in raw[s] if f"{s}.{k}" not in RULES]
    elif s in raw and raw[s] is not None:
      unknown.append(s)  # a section given as a plain value
  if not unknown:
    return
  if strict:
    first = unknown[0]
    section = first.split(".")[0]
    known = [k for k in RULES if k.startswith(section + ".")] if section in SECTIONS else SECTIONS
    raise RunConfigError(f"config.{first}: unknown key; known: {', '.join(known)}")
  log.warning("ignoring config keys this version does not know: %s", ", ".join(unknown))


def _resolve_data_seed(data: DataConfig, train: TrainConfig, raw: Mapping) -> DataConfig:
  """data.seed None (the default) means train.seed."""
  given = (raw.get("data") or {}).get("seed")
  return dataclasses.replace(data, seed=train.seed if given is None else data.seed)


def _resolve_dtypes(model: ModelSpec, train: TrainConfig, raw: Mapping):
  """model.dtype / compute_dtype are what train.precision says ("" = that; another value is an
  error). A config.json from before train.precision had only the dtypes ("" compute = dtype):
  the precision that trains with them is read from them."""
  if "precision" not in (raw.get("train") or {}):
    have = (model.dtype or "float32", model.compute_dtype or model.dtype or "float32")
    known = [p for p in PRECISIONS if have == _dtypes(p, train.mode)]
    if not known:
      raise RunConfigError(
        f"config.model.dtype={model.dtype!r}, model.compute_dtype={model.compute_dtype!r}: "
        f"expected dtypes one of train.precision={', '.join(PRECISIONS)} gives in train.mode="
        f"{train.mode!r}; set train.precision"
      )
    train = dataclasses.replace(train, precision=known[0])
  want = _dtypes(train.precision, train.mode)
  for field, value in zip(("dtype", "compute_dtype"), want):
    if getattr(model, field) not in ("", value):
      raise RunConfigError(
        f"config.model.{field}={getattr(model, field)!r}: expected '' or {value!r} "
        f"(train.precision={train.precision!r} sets it in train.mode={train.mode!r})"
      )
  return dataclasses.replace(model, dtype=want[0], compute_dtype=want[1]), train


def _dtypes(precision: str, mode: str) -> tuple[str, str]:
  n = numerics(precision, mode)
  return n.param_dtype, n.compute_dtype


def _check_together(cfg: RunConfig) -> None:
  """Rules that span keys."""
  t = cfg.train
  if t.batch_size % t.grad_accum:
    raise RunConfigError(
      f"config.train.grad_accum={t.grad_accum}: expected a divisor of "
      f"train.batch_size={t.batch_size}"
    )
  if not t.steps and not t.epochs:
    raise RunConfigError("config.train.epochs=0: expected >= 1 when train.steps is 0")
  if cfg.ortho.beta and t.mode != "lora":
    raise RunConfigError(
      f"config.ortho.beta={cfg.ortho.beta}: expected 0 with train.mode='{t.mode}' "
      "(the regulariser acts on LoRA adapters)"
    )
  missing = [m for m in cfg.ortho.targets if m not in cfg.lora.targets]
  if cfg.ortho.beta and missing:
    raise RunConfigError(
      f"config.ortho.targets={','.join(cfg.ortho.targets)!r}: expected modules LoRA adapts "
      f"(lora.targets={','.join(cfg.lora.targets)!r} lacks {','.join(missing)})"
    )
