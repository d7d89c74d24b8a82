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
  flags.DEFINE_integer(
    "heartbeat_timeout",
    100,
    "Multi-process: seconds without a heartbeat after which a process counts as dead and the "
    "others stop (JAX's coordination service; its default is 100).",
  )


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
      heartbeat_timeout_seconds=FLAGS.heartbeat_timeout,
    )
  elif FLAGS.multihost:
    jax.distributed.initialize(heartbeat_timeout_seconds=FLAGS.heartbeat_timeout)


def exit_if_peer_lost(error: Exception, workdir: str) -> None:
  """In a multi-process run, a failed collective almost always means another process died (kill,
  OOM, a lost host): say so in one line and exit at once, status 3. A normal exit would wait in
  JAX's shutdown barrier for the dead process until the heartbeat timeout and then abort. (A
  process waiting in a barrier rather than a collective, e.g. Orbax's commit of a checkpoint,
  is stopped by JAX itself once the dead one misses its heartbeats for --heartbeat_timeout s:
  "Terminating process because the JAX distributed service detected fatal errors".)"""
  import os

  import jax

  from lora_jax.checkpoint import committed_steps

  if jax.process_count() == 1:
    return
  steps = committed_steps(os.path.join(workdir, "checkpoints"))
  reason = str(error).strip().splitlines()[0][:300] if str(error).strip() else type(error).__name__
  print(
    f"error: process {jax.process_index()} of {jax.process_count()}: a collective with the other "
    f"processes failed ({reason}); another process has most likely died. Rerun every process "
    f"to resume from the last checkpoint (step {steps[-1] if steps else 'none'} in "
    f"{workdir}/checkpoints).",
    file=sys.stderr,
    flush=True,
  )
  os._exit(3)


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


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with a flag it refuses as one `error: ...` line (status 2). A config
  override of the wrong type (`--config.lora.rank=abc`, refused by ml_collections before any
  lora_jax code runs) names the key and what it accepts, as `run_config` does for the rest."""
  try:
    return FLAGS(argv)
  except flags.Error as e:
    print(f"error: {flag_error(str(e))}", file=sys.stderr)
    sys.exit(2)
  except (KeyError, AttributeError) as e:  # ml_collections: an override of an unknown key
    given = [a.split("=")[0] for a in argv if a.startswith("--config.")]
    why = str(e.args[0] if e.args else e).replace("\\n", " ")
    why = " ".join(why.replace("\\", "").replace("'", "").replace('"', "").split())
    print(f"error: unknown config key among {', '.join(given)}: {why}", file=sys.stderr)
    sys.exit(2)


def flag_error(message: str) -> str:
  import re

  m = re.match(r"flag --config\.([\w.]+)=(.*?): (.*)", " ".join(message.split()))
  if m:
    from lora_jax.run_config import RULES  # only on this error path: it imports jax

    key, value, reason = m.groups()
    if key in RULES:
      return f"config.{key}={value!r}: expected {RULES[key].expected} ({reason})"
  return " ".join(message.split())


def run(main) -> None:
  """`app.run` with one-line user errors: the end of every `launch/*.py`."""
  app.run(user_errors(main), flags_parser=parse_flags)
