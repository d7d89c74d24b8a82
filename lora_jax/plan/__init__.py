"""Memory plans: compile a run's steps ahead of time on abstract inputs and read what fits.

python -m launch.plan --config=configs/paper/full.py:32b --devices=8 --device_memory=80GiB
"""

from lora_jax.plan.abstract import PlanError, model_config, shipped_shapes
from lora_jax.plan.fit import MemoryPlan, Target, make_plan
from lora_jax.plan.planner import StepPlan, caveats, plan_decode_step, plan_train_step
from lora_jax.plan.report import format_plan, parse_size

__all__ = [
  "MemoryPlan",
  "PlanError",
  "StepPlan",
  "Target",
  "caveats",
  "format_plan",
  "make_plan",
  "model_config",
  "parse_size",
  "plan_decode_step",
  "plan_train_step",
  "shipped_shapes",
]
