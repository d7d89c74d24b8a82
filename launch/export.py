"""Export: `python -m launch.export --workdir=DIR --format=peft|merged --out=DIR [--step=N]
[--ortho=column|row|both --ortho_k=K]` (OrthoMerge: see lora_jax/orthomerge.py)."""

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
flags.DEFINE_enum(
  "ortho",
  None,
  ["column", "row", "both"],
  "OrthoMerge: remove dW's part inside W0's top-k left (column), right (row) or both subspaces.",
)
flags.DEFINE_integer("ortho_k", 16, "OrthoMerge's k.")
flags.mark_flags_as_required(["workdir", "out"])


def main(argv):
  del argv
  from lora_jax.export import export_checkpoints

  ortho = {"ortho": FLAGS.ortho, "ortho_k": FLAGS.ortho_k}
  for path in export_checkpoints(
    FLAGS.workdir, FLAGS.out, FLAGS.format, FLAGS.step, all_steps=FLAGS.all_steps, **ortho
  ):
    print(path)


if __name__ == "__main__":
  common.run(main)
