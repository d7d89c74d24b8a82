"""The analysis loop: every (run, step, layer, module) against the base, one module at a time.

    records = analyze_runs("path/or/hub-id", {"lora_r8": "workdirs/r8", "full": "workdirs/full"})

Modules are the outer loop: for each linear module (q_proj ... down_proj) W0's top-K spectrum of
every layer is computed once and kept while every run and step is compared with it; a run's
checkpoint is read one module (all layers, an Orbax partial restore) at a time and W0 one layer at
a time, so host memory holds one module of the model, never the whole of it.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping, Sequence

from lora_jax.analysis.spectral import (
  AnalysisError,
  base_spectrum,
  dense_metrics,
  lora_metrics,
  spectrum_key,
)
from lora_jax.analysis.weights import ModelTensors, Run, open_run, update_from_weights
from lora_jax.lora import resolve_targets
from lora_jax.model import LINEARS

log = logging.getLogger(__name__)
DEFAULT_KS = (1, 4, 16, 64, 256)


def analyze_run(base: str, workdir: str, steps="all", ks=None, **kwargs) -> list[dict]:
  """The records of one run (see `analyze_runs`)."""
  name = _run_name(workdir)
  return analyze_runs(base, {name: workdir}, steps, ks, **kwargs)[name]


def analyze_runs(
  base: str | None,
  runs: Mapping[str, str] | Sequence[str],
  steps="all",
  ks: Sequence[int] | None = None,
  *,
  modules=None,
  exact_max: int = 2048,
  seed: int = 0,
  progress: bool = True,
) -> dict[str, list[dict]]:
  """One record per (run, step, layer, module), grouped by run name.

  base: the model the runs started from (HF dir, hub id, GGUF); None = the first run's own base.
  runs: training workdirs (LoRA or full) or model directories (e.g. an OrthoMerged export), as a
    {name: path} mapping or a list of paths (named by their directory).
  steps: "all", "last", or checkpoint steps ("5,10" or [5, 10]); every run must have them.
  ks: subspace sizes; None = 1, 4, 16, 64, 256 up to the smallest analysed matrix. An explicit k
    larger than a matrix is an error.
  modules: names or groups ("mlp", "up_proj,down_proj"); None = every module a run changed.
  """
  if not isinstance(runs, Mapping):
    names = [_run_name(p) for p in runs]
    runs = {(n if names.count(n) == 1 else p): p for n, p in zip(names, runs)}
  if not runs:
    raise AnalysisError("no runs to analyse")
  base_tensors = ModelTensors(base if base is not None else _own_base(next(iter(runs.values()))))
  opened = []
  try:
    for name, path in runs.items():
      opened.append(open_run(name, path, base_tensors, steps))
    chosen = _modules(modules, opened)
    ks = _check_ks(ks, chosen, base_tensors)
    return _analyze(base_tensors, opened, chosen, ks, exact_max, seed, progress)
  finally:
    for run in opened:
      run.close()


def _analyze(base, runs: list[Run], modules, ks, exact_max, seed, progress) -> dict:
  from tqdm import tqdm

  records = {run.name: [] for run in runs}
  total = sum(
    len(run.steps) * base.config.num_layers for m in modules for run in runs if m in run.modules
  )
  bar = tqdm(total=total, desc="analyse", unit="matrix", disable=not progress)
  t0 = time.perf_counter()
  for module in modules:
    spectra = {}  # layer -> W0's top-K, shared by every run and step
    for run in runs:
      if module not in run.modules:
        continue
      for step in run.steps:
        for layer, update in run.updates(module, step):
          w0 = None
          if layer not in spectra:
            w0 = base.kernel(module, layer)
            layer_key = spectrum_key(seed, layer, module)
            spectra[layer] = base_spectrum(w0, max(ks), layer_key, exact_max)
          spec = spectra[layer]
          if update[0] == "lora":
            metrics = lora_metrics(*update[1:], spec, ks, run.settings)
          else:
            w0 = base.kernel(module, layer) if w0 is None else w0
            dw = update_from_weights(update[1], w0, update[2])
            metrics = dense_metrics(dw, spec, ks, run.settings, exact_max)
          shape = [int(spec.u.shape[0]), int(spec.v.shape[0])]
          records[run.name].append(
            dict(run=run.name, kind=run.kind, base=base.source, step=step, layer=layer)
            | dict(module=module, shape=shape)
            | metrics
          )
          bar.update(1)
  bar.close()
  log.info(
    "analysed %d matrices in %.1fs", sum(map(len, records.values())), time.perf_counter() - t0
  )
  order = {m: i for i, m in enumerate(LINEARS)}
  for recs in records.values():
    recs.sort(key=lambda r: (r["step"] or 0, r["layer"], order[r["module"]]))
  return records


def _modules(modules, runs: list[Run]) -> tuple[str, ...]:
  changed = [m for m in LINEARS if any(m in run.modules for run in runs)]
  if modules is None:
    return tuple(changed)
  chosen = resolve_targets(modules)
  unused = [m for m in chosen if m not in changed]
  if unused:
    raise AnalysisError(f"modules {unused} are not changed by any run (changed: {changed})")
  return chosen


def _check_ks(ks, modules, base: ModelTensors) -> tuple[int, ...]:
  smallest = min(modules, key=lambda m: min(base.shape(m)))
  limit = min(base.shape(smallest))
  if ks is None:
    kept = tuple(k for k in DEFAULT_KS if k <= limit)
    if len(kept) < len(DEFAULT_KS):
      log.info("k: %s (the default list up to %s's %d)", kept, smallest, limit)
    return kept
  ks = tuple(sorted({int(k) for k in (ks.split(",") if isinstance(ks, str) else ks)}))
  if not ks or ks[0] < 1:
    raise AnalysisError(f"k={list(ks)}: expected positive subspace sizes")
  if ks[-1] > limit:
    m, n = base.shape(smallest)
    raise AnalysisError(
      f"k={ks[-1]} is larger than {smallest} ({m}x{n}): k must be <= {limit} "
      f"(or leave {smallest} out with --modules)"
    )
  return ks


def _run_name(path: str) -> str:
  return os.path.basename(os.path.normpath(path))


def _own_base(path: str) -> str:
  from lora_jax.run import load_run_config

  if not os.path.isdir(os.path.join(path, "checkpoints")):
    raise AnalysisError(f"{path} is not a training workdir: pass the base model with --base")
  return load_run_config(path).model.source
