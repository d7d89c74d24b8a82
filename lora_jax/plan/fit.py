"""Does a run fit its devices, and if not, which remat policy or mesh would make it fit.

    plan = make_plan(cfg, model_config, Target(devices=8, device_memory=80 * GiB))
    plan.fits, plan.recommended, plan.attempts

The run's own mesh and remat policy are planned first. When the train step does not fit (or
`search` asks), the other remat policies are tried on that mesh in order of recompute cost
(none, dots, full), then the other meshes of the same devices (all on fsdp, or part on tensor);
the recommendation is the first that fits: the least recompute, then the run's own mesh.
"""

from __future__ import annotations

import dataclasses
import logging

import jax

from lora_jax.config import ModelConfig
from lora_jax.plan.abstract import PlanError
from lora_jax.plan.planner import (
  GiB,
  StepPlan,
  caveats,
  plan_decode_step,
  plan_train_step,
  with_remat,
)
from lora_jax.run_config import RunConfig
from lora_jax.sharding import MESH_AXES, make_mesh, parse_mesh_spec

log = logging.getLogger(__name__)
PLATFORMS = ("gpu", "tpu", "cpu")
REMAT_ORDER = ("none", "dots", "full")  # least recompute first


@dataclasses.dataclass(frozen=True)
class Target:
  """What the run will get: `devices` accelerators of `device_memory` bytes each."""

  devices: int
  device_memory: int
  platform: str = "gpu"
  headroom: float = 0.9  # the fraction of device memory a plan may use (runtime, fragmentation)
  mesh: str | None = None  # None = the run's config
  sample_rows: int = 8  # decode step: cache rows and slots per row (prompt + answer)
  sample_length: int = 32768
  sample_dtype: str | None = None  # None = the run's compute dtype
  search: bool = False  # try the alternatives even when the run fits

  @property
  def usable_bytes(self) -> float:
    return self.headroom * self.device_memory


@dataclasses.dataclass
class Attempt:
  mesh: dict[str, int]
  remat: str
  step: StepPlan

  def fits(self, target: Target) -> bool:
    return self.step.device_bytes <= target.usable_bytes

  def to_dict(self, target: Target) -> dict:
    return {
      "mesh": self.mesh,
      "remat": self.remat,
      "fits": self.fits(target),
      **self.step.to_dict(),
    }


@dataclasses.dataclass
class MemoryPlan:
  target: Target
  model: dict  # source, params, layers, hidden size
  mode: str  # lora | full
  attempts: list[Attempt]  # attempts[0] is the run as configured
  decode: StepPlan | None

  @property
  def train(self) -> Attempt:
    return self.attempts[0]

  @property
  def fits(self) -> bool:
    return self.train.fits(self.target)

  @property
  def recommended(self) -> Attempt | None:
    """The run as configured if it fits, else the cheapest alternative that fits (None: none)."""
    if self.fits:
      return self.train
    fitting = [a for a in self.attempts[1:] if a.fits(self.target)]
    return min(fitting, key=cost) if fitting else None

  @property
  def decode_fits(self) -> bool | None:
    return None if self.decode is None else self.decode.device_bytes <= self.target.usable_bytes

  def to_dict(self) -> dict:
    best = self.recommended
    return {
      "target": dataclasses.asdict(self.target),
      "model": self.model,
      "mode": self.mode,
      "fits": self.fits,
      "recommended": None if best is None else {"mesh": best.mesh, "remat": best.remat},
      "attempts": [a.to_dict(self.target) for a in self.attempts],
      "decode": None if self.decode is None else self.decode.to_dict(),
      "decode_fits": self.decode_fits,
      "caveats": list(caveats(self.target.platform)),
    }


def plan_mesh(spec: str | dict, devices: int):
  """The (data, fsdp, tensor) mesh of `spec` over the first `devices` devices."""
  if jax.device_count() < devices:
    raise PlanError(
      f"devices={devices}: only {jax.device_count()} JAX devices exist; set "
      f"jax_num_cpu_devices (launch.plan does) before JAX starts"
    )
  return make_mesh(spec, devices=jax.devices()[:devices])


def mesh_candidates(devices: int, own: dict[str, int]) -> list[dict[str, int]]:
  """The run's mesh, then all devices on fsdp, then fsdp x tensor splits (tensor 2, 4, 8)."""
  out = [own, {"fsdp": devices}]
  out += [
    {"fsdp": devices // t, "tensor": t} for t in (2, 4, 8) if t <= devices and devices % t == 0
  ]
  resolved = []
  for m in out:
    m = {a: s for a, s in m.items() if s != 1} or {"fsdp": 1}
    if m not in resolved:
      resolved.append(m)
  return resolved


def _resolved(spec, devices: int) -> dict[str, int]:
  shape = dict(plan_mesh(spec, devices).shape)
  return {a: shape[a] for a in MESH_AXES if shape[a] != 1} or {"fsdp": 1}


def make_plan(cfg: RunConfig, config: ModelConfig, target: Target) -> MemoryPlan:
  if target.platform not in PLATFORMS:
    raise PlanError(f"platform={target.platform!r}: expected one of {PLATFORMS}")
  spec = target.mesh if target.mesh is not None else cfg.mesh.axes
  if isinstance(spec, str):
    spec = parse_mesh_spec(spec)
  own = _resolved(spec, target.devices)
  attempts = [_attempt(cfg, config, own, cfg.model.remat, target)]
  if target.search or not attempts[0].fits(target):
    attempts += _alternatives(cfg, config, own, target, attempts[0])
  decode = None
  if target.sample_rows > 0:
    dtype = target.sample_dtype or cfg.model.compute_dtype or cfg.model.dtype
    mesh = plan_mesh(own, target.devices)
    decode = plan_decode_step(cfg, config, mesh, target.sample_rows, target.sample_length, dtype)
  model = {
    "source": cfg.model.source,
    "params": config.num_params(),
    "layers": config.num_layers,
    "hidden_size": config.hidden_size,
  }
  return MemoryPlan(target, model, cfg.train.mode, attempts, decode)


def _attempt(cfg: RunConfig, config: ModelConfig, mesh: dict, remat: str, target: Target):
  log.info("planning the train step: mesh %s, remat %s", mesh, remat)
  step = plan_train_step(with_remat(cfg, remat), config, plan_mesh(mesh, target.devices))
  log.info(
    "  %.2f GiB per device (%.1fs to compile)", step.device_bytes / GiB, step.compile_seconds
  )
  return Attempt(mesh, remat, step)


def _alternatives(cfg, config, own: dict, target: Target, first: Attempt) -> list[Attempt]:
  """Other remat policies on the run's mesh, then the other meshes, each from full remat down to
  none while it fits (a lighter policy never needs less memory). Stops at the first mesh where
  something fits, unless `target.search` asks for all."""
  out = []
  done = lambda: not target.search and any(a.fits(target) for a in out)
  for remat in REMAT_ORDER:
    if remat != first.remat:
      out.append(_attempt(cfg, config, own, remat, target))
  if done():
    return out
  for mesh in mesh_candidates(target.devices, own)[1:]:
    for remat in reversed(REMAT_ORDER):
      out.append(_attempt(cfg, config, mesh, remat, target))
      if not out[-1].fits(target):
        break
    if done():
      return out
  return out


def cost(a: Attempt) -> tuple:
  """Recompute first (none < dots < full), then bytes moved between devices."""
  return (REMAT_ORDER.index(a.remat), a.step.collective_bytes)
