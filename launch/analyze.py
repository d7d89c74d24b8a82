"""Weight-space analysis: `python -m launch.analyze --base=SOURCE --run=WORKDIR [--run=...]
[--steps=all|last|5,10] [--k=1,4,16,64,256] [--modules=mlp] --out=DIR`.

Writes DIR/records.jsonl (one record per run, step, layer and module), heatmaps and line plots
(runs side by side) as PNG, and DIR/summary.md; see lora_jax/analysis.
"""

from absl import flags

from launch import common

FLAGS = flags.FLAGS
flags.DEFINE_string("base", None, "The base model (HF dir, hub id, GGUF); default: the run's own.")
flags.DEFINE_multi_string(
  "run", None, "A training workdir or a model dir (e.g. an OrthoMerged export); repeatable."
)
flags.DEFINE_string("steps", "all", "Checkpoint steps: all, last, or a list such as 5,10.")
flags.DEFINE_string(
  "k", None, "Subspace sizes, e.g. 1,4,16,64,256 (default: those up to the smallest matrix)."
)
flags.DEFINE_string("modules", None, "Modules or groups to analyse (default: all that changed).")
flags.DEFINE_integer("exact_max", 2048, "Exact SVD up to this smaller side; randomized above.")
flags.DEFINE_string("out", None, "Output directory.")
flags.mark_flags_as_required(["run", "out"])


def main(argv):
  del argv
  common.quiet_libraries()
  from lora_jax.analysis import analyze_runs, write_report

  records = analyze_runs(
    FLAGS.base,
    FLAGS.run,
    FLAGS.steps,
    FLAGS.k,
    modules=FLAGS.modules,
    exact_max=FLAGS.exact_max,
  )
  paths = write_report(records, FLAGS.out)
  print(paths["summary"])


if __name__ == "__main__":
  common.run(main)
