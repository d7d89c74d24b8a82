"""Tables and the safety-vs-reasoning plot across runs and checkpoints.

python -m launch.report --runs=out/lora_r1,out/full --base=out/base --out=report/
"""

from __future__ import annotations

from absl import app, flags

from launch import common

FLAGS = flags.FLAGS

flags.DEFINE_list("runs", None, "Run directories (each holds <checkpoint>/scores.json).")
flags.DEFINE_list("names", None, "Names of the runs in the table and legend (default: dir names).")
flags.DEFINE_string("base", None, "The base model's run directory or scores JSON (a star).")
flags.DEFINE_string("out", None, "Directory for report.md and safety_vs_reasoning.png.")
flags.DEFINE_string("safety", "strongreject", "The safety benchmark on the plot's y axis.")
flags.mark_flags_as_required(["runs", "out"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  from evals import report

  paths = report.write_report(FLAGS.runs, FLAGS.out, FLAGS.base, FLAGS.names, FLAGS.safety)
  print(paths["table"])
  print(f"wrote {paths['markdown']} and {paths['plot']}")


if __name__ == "__main__":
  common.run(main)
