"""Plan memory: `python -m launch.plan --config=configs/paper/FILE.py:VARIANT --devices=N
--device_memory=80GiB [--mesh=fsdp:4,tensor:2] [--platform=gpu|tpu|cpu] [--search] [--json=F]`.

Compiles the run's train step and the sampler's decode step ahead of time for N fake CPU devices
on abstract inputs (no weights are read or allocated, no hub is contacted: the paper models'
shapes ship in configs/paper/shapes/), prints per-device memory from XLA's memory analysis,
matmul FLOPs and collective bytes per step, says whether it fits and, if not, which remat policy
or mesh would.
"""

import json
import os

from absl import flags
from ml_collections import config_flags

from launch import common

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Training config file.", lock_config=True)
flags.DEFINE_integer("devices", 1, "Accelerators the run gets (fake CPU devices are made).")
flags.DEFINE_string("device_memory", "80GiB", "Memory of one accelerator, e.g. 80GiB, 16GiB.")
flags.DEFINE_string("mesh", None, "Mesh spec, e.g. fsdp:4,tensor:2 (default: the config's).")
flags.DEFINE_enum("platform", "gpu", ["gpu", "tpu", "cpu"], "The accelerator the plan is for.")
flags.DEFINE_float("headroom", 0.9, "Fraction of device memory the run may use.")
flags.DEFINE_bool("search", False, "Try every remat policy and mesh even when the run fits.")
flags.DEFINE_integer("sample_rows", 8, "Decode step: KV-cache rows (0 skips the decode step).")
flags.DEFINE_integer("sample_length", 32768, "Decode step: cache slots per row (prompt+answer).")
flags.DEFINE_string("sample_dtype", None, "Decode step dtype (default: the run's compute dtype).")
flags.DEFINE_string("shapes_dir", None, "Shipped model shapes (default: configs/paper/shapes).")
flags.DEFINE_string("json", None, "Also write the plan as JSON to this file.")
flags.mark_flags_as_required(["config"])


def main(argv):
  del argv
  common.quiet_libraries()
  import jax

  # Before any JAX use: the plan is compiled for fake CPU devices, whatever this host has.
  jax.config.update("jax_platforms", "cpu")
  jax.config.update("jax_num_cpu_devices", FLAGS.devices)
  from lora_jax.plan import Target, format_plan, make_plan, model_config, parse_size
  from lora_jax.run_config import from_dict

  cfg = from_dict(FLAGS.config)
  shapes = FLAGS.shapes_dir or os.path.join(os.path.dirname(__file__), "..", "configs/paper/shapes")
  target = Target(
    devices=FLAGS.devices,
    device_memory=parse_size(FLAGS.device_memory),
    platform=FLAGS.platform,
    headroom=FLAGS.headroom,
    mesh=FLAGS.mesh,
    sample_rows=FLAGS.sample_rows,
    sample_length=FLAGS.sample_length,
    sample_dtype=FLAGS.sample_dtype,
    search=FLAGS.search,
  )
  plan = make_plan(cfg, model_config(cfg.model.source, shapes), target)
  name = config_flags.get_config_filename(FLAGS["config"])
  print(format_plan(plan, name))
  if FLAGS.json:
    with open(FLAGS.json, "w") as f:
      json.dump({"config": name, **plan.to_dict()}, f, indent=1)


if __name__ == "__main__":
  common.run(main)
