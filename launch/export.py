"""Export: `python -m launch.export --workdir=DIR --format=peft|merged --out=DIR [--step=N]`."""

from absl import app, flags

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
  from lora_jax.checkpoint import Checkpointer
  from lora_jax.export import export_checkpoint

  if FLAGS.all_steps:
    steps = Checkpointer(f"{FLAGS.workdir}/checkpoints", async_save=False).all_steps()
    for step in steps:
      print(export_checkpoint(FLAGS.workdir, f"{FLAGS.out}/step_{step}", FLAGS.format, step))
  else:
    print(export_checkpoint(FLAGS.workdir, FLAGS.out, FLAGS.format, FLAGS.step))


if __name__ == "__main__":
  app.run(common.one_line_errors(main))
