"""Train: `python -m launch.train --config=configs/FILE.py[:VARIANT] --workdir=DIR [--config.a.b=v]`.

On a TPU pod or a SLURM GPU cluster, pass --multihost (jax.distributed.initialize() finds the
coordinator itself); on one machine, --coordinator_address/--num_processes/--process_id start a
multi-process run by hand (this is how the tests run two hosts on 127.0.0.1).
"""

from absl import flags, logging
from ml_collections import config_flags

from launch import common

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Training config file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Checkpoints, metrics and the config go here.")
common.define_distributed_flags()
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  common.init_distributed()
  from jax import errors as jax_errors

  from lora_jax.run_config import from_dict  # after distributed init: nothing may touch jax
  from lora_jax.train import train

  cfg = from_dict(FLAGS.config)
  try:
    result = train(cfg, FLAGS.workdir)
  except jax_errors.JaxRuntimeError as e:
    common.exit_if_peer_lost(e, FLAGS.workdir)
    raise
  logging.info("finished: %s", result)
  if result.status == "nan":
    raise SystemExit(
      f"training stopped at step {result.step}: the loss is not finite "
      f"(last good checkpoint kept in {FLAGS.workdir}/checkpoints)"
    )


if __name__ == "__main__":
  common.run(main)
