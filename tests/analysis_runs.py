"""Tiny training runs shared by the analysis and OrthoMerge tests: a LoRA run on every linear
module and a full fine-tuning run of the same random base, two checkpoints each."""

from helpers import tiny_run, tiny_run_dir

from lora_jax.train import train


def make_runs(tmp_path_factory) -> dict[str, str]:
  base = tiny_run_dir(tmp_path_factory.mktemp("analysis_base"), seed=3)
  runs = {"base": base}
  settings = {
    "lora": {"train.lr": 2e-2, "lora.rank": 4},
    "full": {"train.mode": "full", "train.lr": 1e-3},
  }
  for name, extra in settings.items():
    workdir = str(tmp_path_factory.mktemp(f"analysis_{name}"))
    cfg = tiny_run(base, **{"train.steps": 2, "checkpoint.every_steps": 1, **extra})
    assert train(cfg, workdir).status == "done"
    runs[name] = workdir
  return runs
