"""Export: `python -m launch.export --workdir=DIR --format=peft|merged --out=DIR [--step=N]`."""

from absl import flags

from launch import common

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "A training workdir.")
flags.DEFINE_enum("format", "peft", ["peft", "merged"], "PEFT adapter dir or merged HF model.")
flags.DEFINE_string("out", None, "Output directory.")
flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
flags.DEFINE_bool(
  "all_steps",
  False,
  "Export every checkpoint to OUT/step_N (for launch.eval --workdir --steps=all).",
)
flags.mark_flags_as_required(["workdir", "out"])


def main(argv):
  del argv
  from lora_jax.export import export_checkpoints

  for path in export_checkpoints(
    FLAGS.workdir, FLAGS.out, FLAGS.format, FLAGS.step, all_steps=FLAGS.all_steps
  ):
    print(path)


if __name__ == "__main__":
  common.run(main)
