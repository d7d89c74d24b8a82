"""The main job on the embedded default model, on a CPU, offline (`make demo`): chat, LoRA-align,
export, evaluate every epoch and report (evals/demo.py).

    python -m launch.demo --workdir=workdirs/demo [--config.train.epochs=2]
"""

import os

from absl import flags
from ml_collections import config_flags

from launch import common

DEMO_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
  "config", os.path.join(DEMO_CONFIG, "demo.py"), "The demo's training config.", lock_config=True
)
flags.DEFINE_string("workdir", "workdirs/demo", "Where the run, its evals and report go.")
flags.DEFINE_integer("max_new_tokens", 96, "Answer length in the chats and evals.")
common.define_distributed_flags()


def main(argv):
  del argv
  common.init_distributed()
  from evals.demo import run_demo
  from lora_jax.run_config import from_dict

  run_demo(from_dict(FLAGS.config), FLAGS.workdir, FLAGS.max_new_tokens)


if __name__ == "__main__":
  common.run(main)
