"""A whole study in one command: train every variant not trained yet (resuming interrupted runs),
evaluate each chosen checkpoint, analyse the weights and write one report (evals/study.py).

    python -m launch.study --config=configs/study/demo.py --workdir=workdirs/study_demo
    python -m launch.study --config=configs/study/paper_7b.py --workdir=runs/paper_7b

Rerun the same command after an interruption (even kill -9): finished work is not repeated.
"""

from absl import flags
from ml_collections import config_flags

from launch import common

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "A study config (configs/study/*.py).")
flags.DEFINE_string("workdir", None, "Where the study's runs, evaluations and report go.")
flags.mark_flags_as_required(["config", "workdir"])
common.define_distributed_flags()


def main(argv):
  del argv
  common.init_distributed()
  from evals.study import run_study
  from evals.study_config import load_study

  out = run_study(load_study(FLAGS.config), FLAGS.workdir)
  print("\n" + out["table"])
  print(f"report: {out['markdown']}")


if __name__ == "__main__":
  common.run(main)
