"""Weight-space analysis of fine-tuning updates: how large dW is, its stable rank, and how much
of it lies in W0's top singular subspaces (the paper's explanation of LoRA's lower safety tax).

    records = analyze_runs(base, {"lora": "workdirs/lora", "full": "workdirs/full"}, steps="all")
    write_report(records, "out/analysis")    # records.jsonl, heatmaps, line plots, summary.md

`spectral` holds the math (one matrix), `weights` reads base and run tensors one module at a time,
`run` loops over runs, steps, layers and modules, `report` writes records, plots and the summary.
"""

from lora_jax.analysis.report import plot_runs, read_records, write_records, write_report
from lora_jax.analysis.run import DEFAULT_KS, analyze_run, analyze_runs
from lora_jax.analysis.spectral import (
  RANDOMIZED_ERROR,
  AnalysisError,
  PenaltySettings,
  Spectrum,
  base_spectrum,
  dense_metrics,
  lora_metrics,
)

__all__ = [
  "DEFAULT_KS",
  "RANDOMIZED_ERROR",
  "AnalysisError",
  "PenaltySettings",
  "Spectrum",
  "analyze_run",
  "analyze_runs",
  "base_spectrum",
  "dense_metrics",
  "lora_metrics",
  "plot_runs",
  "read_records",
  "write_records",
  "write_report",
]
