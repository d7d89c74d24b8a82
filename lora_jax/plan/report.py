"""A memory plan as text for people (and sizes such as "80GiB" read from flags)."""

from __future__ import annotations

import re

from lora_jax.plan.abstract import PlanError
from lora_jax.plan.fit import MemoryPlan
from lora_jax.plan.planner import GiB, StepPlan, caveats

_UNITS = {"": 1, "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12}
_UNITS.update({"kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40})


def parse_size(text: str) -> int:
  """ "80GiB" -> 85899345920, "16GB" -> 16e9, "1024" -> 1024 bytes."""
  m = re.fullmatch(r"\s*([\d.]+)\s*([a-zA-Z]*)\s*", str(text))
  if not m or m.group(2).lower() not in _UNITS:
    raise PlanError(f"size {text!r}: expected a number with a unit, e.g. 80GiB or 16GB")
  return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def gib(n: float) -> str:
  return f"{n / GiB:.2f} GiB"


def _rate(n: float, unit: str) -> str:
  for scale, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
    if n >= scale:
      return f"{n / scale:.2f} {prefix}{unit}"
  return f"{n:.0f} {unit}"


def mesh_text(mesh: dict[str, int]) -> str:
  return ",".join(f"{a}:{s}" for a, s in mesh.items())


def step_lines(step: StepPlan, usable: float) -> list[str]:
  parts = ", ".join(f"{k} {v / GiB:.2f}" for k, v in step.inputs.items())
  verdict = "fits" if step.device_bytes <= usable else "does NOT fit"
  lines = [
    f"  inputs       {gib(step.argument_bytes)}  ({parts} GiB)",
    f"  outputs      {gib(step.output_bytes)}  ({gib(step.alias_bytes)} of it written over "
    "donated inputs)",
    f"  temporaries  {gib(step.temp_bytes)}",
    f"  total        {gib(step.device_bytes)}  -> {verdict} ({gib(usable)} usable)",
    f"  matmul FLOPs {_rate(step.dot_flops, 'FLOP')} (XLA cost_analysis, loop bodies once: "
    f"{_rate(step.xla_flops, 'FLOP')})",
  ]
  moved = ", ".join(
    f"{op} x{n:.0f} {_rate(b, 'B')}" for op, (n, b) in sorted(step.collectives.items())
  )
  lines.append(
    f"  collectives  {_rate(step.collective_bytes, 'B')}" + (f" ({moved})" if moved else "")
  )
  lines.append(f"  compiled in  {step.compile_seconds:.1f} s")
  return lines


def format_plan(plan: MemoryPlan, name: str = "") -> str:
  t = plan.target
  m = plan.model
  first = plan.train
  out = [
    f"Memory plan{': ' + name if name else ''}",
    f"model {m['source']} ({m['params'] / 1e9:.2f}B params, {m['layers']} layers), "
    f"{'LoRA' if plan.mode == 'lora' else 'full fine-tuning'}",
    f"target {t.devices} {t.platform.upper()} device(s) x {gib(t.device_memory)}, "
    f"{gib(t.usable_bytes)} usable (headroom {t.headroom:.2f})",
    "",
    f"train step, mesh {mesh_text(first.mesh)}, remat {first.remat}, per device:",
    *step_lines(first.step, t.usable_bytes),
  ]
  if len(plan.attempts) > 1:
    out += ["", "alternatives (train step, per device):"]
    out.append(f"  {'mesh':<22} {'remat':<6} {'GiB':>8}  {'fits':<4}  {'FLOPs':>11}  collectives")
    for a in plan.attempts:
      s = a.step
      out.append(
        f"  {mesh_text(a.mesh):<22} {a.remat:<6} {s.device_bytes / GiB:>8.2f}  "
        f"{'yes' if a.fits(t) else 'no':<4}  {_rate(s.dot_flops, 'FLOP'):>11}  "
        f"{_rate(s.collective_bytes, 'B')}"
      )
  best = plan.recommended
  out.append("")
  if plan.fits:
    out.append("verdict: the run fits as configured.")
  elif best is not None:
    out.append(
      f"verdict: does not fit as configured; fits with --config.model.remat={best.remat} "
      f"--config.mesh.shape={mesh_text(best.mesh)} ({gib(best.step.device_bytes)} per device)."
    )
  else:
    out.append(
      f"verdict: does not fit on {t.devices} device(s) of {gib(t.device_memory)} with any "
      "remat policy or mesh tried: use more devices or devices with more memory."
    )
  if plan.decode is not None:
    d = plan.decode
    out += [
      "",
      f"decode step ({t.sample_rows} rows x {t.sample_length} cache slots, sampling; FLOPs and "
      "collectives per token), per device:",
      *step_lines(d, t.usable_bytes),
    ]
  out += ["", "caveats:"] + [f"  - {c}" for c in caveats(t.platform)]
  return "\n".join(out)
