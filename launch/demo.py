"""`make demo`: the paper's study in miniature on the embedded default model, on a CPU, offline
(configs/study/demo.py, evals/demo.py). Rerun after an interruption: finished work is kept.

    python -m launch.demo --workdir=workdirs/demo [--config.eval.max_new_tokens=32]
"""

import os

from absl import flags
from ml_collections import config_flags

from launch import common

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
  "config", os.path.join(CONFIGS, "study", "demo.py"), "The demo's study config."
)
flags.DEFINE_string("workdir", "workdirs/demo", "Where the runs, evaluations and report go.")
common.define_distributed_flags()


def main(argv):
  del argv
  common.init_distributed()
  from evals.demo import run_demo
  from evals.study_config import load_study

  run_demo(load_study(FLAGS.config), FLAGS.workdir)


if __name__ == "__main__":
  common.run(main)
