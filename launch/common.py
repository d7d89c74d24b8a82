"""What every entry point shares: distributed start-up flags and one-line user errors."""

import functools
import sys

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_bool("traceback", False, "Show the whole traceback of a user error, not one line.")


def define_distributed_flags() -> None:
  flags.DEFINE_bool(
    "multihost",
    False,
    "Call jax.distributed.initialize() with auto-detection (TPU pods, SLURM, Open MPI, ...).",
  )
  flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for a manual start.")
  flags.DEFINE_integer("num_processes", None, "Processes in a manual multi-process start.")
  flags.DEFINE_integer("process_id", None, "This process's index in a manual start.")
  flags.DEFINE_integer("cpu_devices", None, "Fake CPU devices per process (tests, debugging).")


def init_distributed() -> None:
  quiet_libraries()
  import jax

  if FLAGS.cpu_devices:
    jax.config.update("jax_num_cpu_devices", FLAGS.cpu_devices)
  if FLAGS.coordinator_address:
    jax.distributed.initialize(
      coordinator_address=FLAGS.coordinator_address,
      num_processes=FLAGS.num_processes,
      process_id=FLAGS.process_id,
    )
  elif FLAGS.multihost:
    jax.distributed.initialize()


def quiet_libraries() -> None:
  """Orbax and JAX log every checkpoint step at INFO through absl; keep those at WARNING (-v 0
  or higher brings them back) while lora_jax's own progress lines stay visible."""
  import logging

  from absl import logging as absl_logging

  if FLAGS["verbosity"].present:
    return
  absl_logging.set_verbosity(absl_logging.WARNING)
  logging.getLogger("lora_jax").setLevel(logging.INFO)


def user_errors(main):
  """User errors end the run with one line, `error: ...` on stderr, and exit status 2; every
  launcher runs its main through this. A user error is a ValueError (every lora_jax and evals
  error about a config, data, path, model or flag value is one) or a file that cannot be opened.
  --traceback shows the whole stack instead."""

  @functools.wraps(main)
  def wrapped(argv):
    try:
      return main(argv)
    except (ValueError, OSError) as e:
      if FLAGS.traceback:
        raise
      message = " ".join(str(e).split("\n"))
      print(f"error: {message}", file=sys.stderr)
      sys.exit(2)

  return wrapped


def run(main) -> None:
  """`app.run` with one-line user errors: the end of every `launch/*.py`."""
  app.run(user_errors(main))
