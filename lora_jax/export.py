"""Turn training checkpoints into what other tools load: a PEFT adapter or a merged model.

    export_checkpoint(workdir, out_dir, fmt="peft" | "merged", step=None)
    export_checkpoints(workdir, out_root, fmt, all_steps=True)   # out_root/step_N for each

The run's model is rebuilt from the workdir (`lora_jax.run.restore_model`) and written with
`save_pretrained` (merged HF safetensors, LoRA folded in) or `save_peft_adapter`. The tokenizer
is written beside a merged model.
"""

from __future__ import annotations

import os

from lora_jax.io import save_pretrained
from lora_jax.io.peft import save_peft_adapter
from lora_jax.run import checkpoint_steps, restore_model

FORMATS = ("peft", "merged")


def export_checkpoint(
  workdir: str,
  out_dir: str,
  fmt: str = "peft",
  step: int | None = None,
  mesh=None,
  ortho: str | None = None,
  ortho_k: int = 16,
) -> str:
  """Export one checkpoint (the latest unless `step` is given) to `out_dir`. `ortho` ("column",
  "row" or "both") first applies OrthoMerge with W0's top `ortho_k` subspace (lora_jax.orthomerge)."""
  if fmt not in FORMATS:
    raise ValueError(f"format={fmt!r}; expected one of {FORMATS}")
  model, tokenizer, cfg, step = restore_model(workdir, step, mesh)
  if ortho:
    from lora_jax.orthomerge import orthomerge

    orthomerge(model, cfg.model.source, ortho, ortho_k)
  if fmt == "peft":
    if cfg.adapter is None:
      raise ValueError(f"{workdir} is a full fine-tuning run: export it with --format=merged")
    save_peft_adapter(model, out_dir, cfg.adapter, cfg.model.source)
  else:
    save_pretrained(model, out_dir, dtype=cfg.model.dtype, tokenizer=tokenizer)
  return out_dir


def export_checkpoints(
  workdir: str,
  out: str,
  fmt: str = "peft",
  step: int | None = None,
  all_steps: bool = False,
  **ortho,
) -> list[str]:
  """Export one checkpoint to `out`, or with `all_steps` every checkpoint to `out/step_N` (the
  layout `launch.eval --workdir` reads). `ortho`: `ortho=` and `ortho_k=` of `export_checkpoint`."""
  if not all_steps:
    return [export_checkpoint(workdir, out, fmt, step, **ortho)]
  steps = checkpoint_steps(workdir)
  if not steps:
    raise FileNotFoundError(f"no checkpoints in {workdir}/checkpoints")
  return [
    export_checkpoint(workdir, os.path.join(out, f"step_{s}"), fmt, s, **ortho) for s in steps
  ]
