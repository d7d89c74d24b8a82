"""Training in separate processes: two hosts on 127.0.0.1 equal one; kill -9 at seeded random
points (one of them inside an asynchronous checkpoint write), SIGTERM, and one of two processes
dying, each followed by a resume whose adapter is compared with one uninterrupted run.

Every run here is `launch.train` with the same config: 24 steps at a constant learning rate (so
a shorter run is the start of the uninterrupted one and compares with its checkpoint of that
step), an asynchronous checkpoint after every step, dropout on (the RNG must resume exactly), a
data x fsdp mesh of 4 devices (one process with 4, or two with 2 each)."""

import glob
import os
import random
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from flax import nnx
from helpers import tiny_run_dir, train_losses

from lora_jax.checkpoint import committed_steps
from lora_jax.run import restore_model

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STEPS = 24
OVERRIDES = {
  "train.steps": STEPS,
  "checkpoint.every_steps": 1,
  "checkpoint.async_save": True,
  "lora.dropout": 0.1,
  "train.schedule": "constant",
  "mesh.shape": "fsdp:2,data:2",
}
SHORT = 8  # the two-process runs' steps
HEARTBEAT = 20  # seconds: --heartbeat_timeout of the run whose process dies
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def config(tmp_path_factory):
  d = tmp_path_factory.mktemp("processes")
  source = tiny_run_dir(d / "model")
  path = d / "config_under_test.py"
  path.write_text(
    "import sys\n"
    f"sys.path.insert(0, {os.path.join(REPO, 'tests')!r})\n"
    "from helpers import train_config\n\n\n"
    f"def get_config():\n  return train_config({source!r}, **{OVERRIDES!r})\n"
  )
  return str(path)


@pytest.fixture(scope="module")
def clean(config, tmp_path_factory):
  """The uninterrupted run (one process, 4 devices): its workdir and adapters at SHORT and STEPS."""
  workdir = tmp_path_factory.mktemp("clean")
  _finish(_launch(config, workdir))
  step, adapter = _adapter(workdir)
  assert step == STEPS
  return {"workdir": workdir, "adapter": adapter, "short": _adapter(workdir, SHORT)[1]}


def _launch(config: str, workdir, *extra: str) -> subprocess.Popen:
  """launch.train in its own process; output goes to a file (a full pipe would block it)."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  if not any(e.startswith("--cpu_devices") for e in extra):
    extra = ("--cpu_devices=4", *extra)
  os.makedirs(workdir, exist_ok=True)
  log = open(os.path.join(workdir, f"stdout-{time.monotonic_ns()}.txt"), "w+")
  proc = subprocess.Popen(
    [sys.executable, "-m", "launch.train", f"--config={config}", f"--workdir={workdir}", *extra],
    cwd=REPO,
    env=env,
    stdout=log,
    stderr=subprocess.STDOUT,
    text=True,
  )
  proc.log = log
  return proc


def _launch_two(config: str, workdir, *extra: str) -> list[subprocess.Popen]:
  port = _free_port()
  return [
    _launch(
      config,
      workdir,
      *extra,
      f"--config.train.steps={SHORT}",
      "--cpu_devices=2",
      f"--coordinator_address=127.0.0.1:{port}",
      "--num_processes=2",
      f"--process_id={i}",
    )
    for i in range(2)
  ]


def _output(proc) -> str:
  proc.log.seek(0)
  return proc.log.read()


def _finish(proc: subprocess.Popen, timeout: float = 400) -> str:
  proc.wait(timeout=timeout)
  out = _output(proc)
  assert proc.returncode == 0, out[-3000:]
  return out


def _adapter(workdir, step=None):
  model, _, _, step = restore_model(str(workdir), step)
  leaves = jax.tree.leaves(nnx.to_pure_dict(nnx.state(model, nnx.LoRAParam)))
  return step, [np.asarray(x) for x in leaves]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _wait_for(proc, what, done, timeout: float = 300) -> None:
  deadline = time.time() + timeout
  while not done():
    assert proc.poll() is None, f"exited before {what}:\n{_output(proc)[-3000:]}"
    assert time.time() < deadline, f"no {what} after {timeout}s"
    time.sleep(0.005)


def _checkpoint(workdir, step: int) -> bool:
  return os.path.isdir(os.path.join(workdir, "checkpoints", str(step)))


def _writing(workdir, after: int) -> list[str]:
  """Orbax's in-progress (tmp) directories of steps > `after`."""
  tmp = glob.glob(os.path.join(workdir, "checkpoints", "*.orbax-checkpoint-tmp*"))
  return [p for p in tmp if int(os.path.basename(p).split(".")[0]) > after]


def _steps_run(workdir) -> int:
  """The last step a run logged (metrics.jsonl: one row per step)."""
  return max(r["step"] for r in _metrics(workdir))


def _logged(workdir, step: int) -> bool:
  return os.path.exists(os.path.join(workdir, "metrics.jsonl")) and any(
    r["step"] >= step for r in _metrics(workdir)
  )


def _metrics(workdir) -> list[dict]:
  import json

  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if line.endswith("\n")]


def _assert_same(adapter, clean_adapter, exact: bool = True) -> None:
  assert len(adapter) == len(clean_adapter)
  for x, y in zip(adapter, clean_adapter):
    if exact:
      np.testing.assert_array_equal(x, y)
    else:
      np.testing.assert_allclose(x, y, atol=1e-6)


def test_two_processes_equal_one_process_with_four_devices(config, clean, tmp_path):
  two = tmp_path / "two"
  for p in _launch_two(config, two):
    _finish(p)
  clean_losses = train_losses(clean["workdir"])[:SHORT]
  np.testing.assert_allclose(train_losses(two), clean_losses, atol=1e-5)
  step, adapter = _adapter(two)
  assert step == SHORT
  _assert_same(adapter, clean["short"], exact=False)


def test_kill_9_at_random_points_then_resume_equals_uninterrupted(config, clean, tmp_path, fault):
  """Two kills at seeded random steps: the first while Orbax is writing a checkpoint in the
  background (its tmp directory exists), the second between steps; then a run to the end."""
  rng = random.Random(13)
  workdir, lost, kills = tmp_path / "killed", [], ["inside a write", "between steps"]
  while kills:
    proc = _launch(config, workdir)
    start = max(committed_steps(str(workdir / "checkpoints")) or [0])
    point = start + rng.randint(2, 5)
    if kills[0] == "inside a write":
      _wait_for(proc, f"a checkpoint write after {point}", lambda p=point: _writing(workdir, p))
    else:
      _wait_for(proc, f"checkpoint {point}", lambda p=point: _checkpoint(workdir, p))
      time.sleep(rng.uniform(0.0, 0.2))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    committed = committed_steps(str(workdir / "checkpoints"))
    assert point <= max(committed) < STEPS - 4, committed  # really killed mid-run
    lost.append(_steps_run(workdir) - max(committed))
    assert 0 <= lost[-1] <= 2, lost  # at most the step being saved and the one after it
    # A write that committed between the check and the kill did not test the fault: kill again.
    if kills[0] != "inside a write" or _writing(workdir, max(committed)):
      kills.pop(0)
  out = _finish(_launch(config, workdir))
  assert f"resumed from step {max(committed)}" in out
  step, adapter = _adapter(workdir)
  assert step == STEPS
  _assert_same(adapter, clean["adapter"])
  fault.record(
    fault="kill -9 during training (twice)",
    injected="SIGKILL at seeded random steps: once while Orbax writes a checkpoint in the "
    "background (its tmp directory exists), once between steps",
    lost="the steps after the last committed checkpoint (at most 2 with a checkpoint every "
    "step); the half-written checkpoint is ignored",
    check="the final run resumes from the last committed step; its adapter is bitwise equal "
    "to the uninterrupted run's",
  )


def test_sigterm_saves_and_resumes_exactly(config, clean, tmp_path, fault):
  workdir = tmp_path / "run"
  proc = _launch(config, workdir)
  _wait_for(proc, "checkpoint 3", lambda: _checkpoint(workdir, 3))
  proc.send_signal(signal.SIGTERM)
  out = _finish(proc)
  last = max(committed_steps(str(workdir / "checkpoints")))
  assert 3 <= last < STEPS
  assert f"SIGTERM: saved step {last} and stopping" in out  # saved where it stopped
  assert _steps_run(workdir) == last  # nothing lost
  _finish(_launch(config, workdir))
  _, adapter = _adapter(workdir)
  _assert_same(adapter, clean["adapter"])
  fault.record(
    fault="SIGTERM (preemption)",
    injected="SIGTERM after checkpoint 3 is committed",
    lost="nothing: the run saves the step it is at and exits 0",
    check="a rerun resumes from that step; its adapter is bitwise equal to the uninterrupted run's",
  )


def test_one_of_two_processes_dying_stops_the_other(config, clean, tmp_path, fault):
  """Process 1 of a two-process run is killed between checkpoints (every 4 steps here, so no
  write is in flight); process 0 (the coordinator) must stop at its next collective with one line
  and exit status 3, not wait in JAX's shutdown barrier until the heartbeat timeout. (One blocked
  in a barrier instead, e.g. Orbax's commit of a checkpoint, is ended by JAX once the dead process
  misses its heartbeats for --heartbeat_timeout seconds.)"""
  workdir = tmp_path / "two"
  every = "--config.checkpoint.every_steps=4"
  survivor, victim = _launch_two(config, workdir, every, f"--heartbeat_timeout={HEARTBEAT}")
  _wait_for(survivor, "step 5", lambda: _checkpoint(workdir, 4) and _logged(workdir, 5))
  victim.send_signal(signal.SIGKILL)
  victim.wait()
  try:
    survivor.wait(timeout=HEARTBEAT)
  except subprocess.TimeoutExpired:
    survivor.kill()
    pytest.fail(f"the survivor still runs {HEARTBEAT}s after its peer died")
  out = _output(survivor)
  errors = [line for line in out.splitlines() if line.startswith("error: ")]
  assert survivor.returncode == 3, out[-3000:]
  assert len(errors) == 1 and "another process has most likely died" in errors[0], errors
  assert f"(step 4 in {workdir}/checkpoints)" in errors[0]
  assert committed_steps(str(workdir / "checkpoints")) == [4]
  lost = _steps_run(workdir) - 4
  assert 1 <= lost < SHORT - 4
  # Resume on one process with the same 4-device layout: the 2-process run's state carries over.
  out = _finish(_launch(config, workdir, every, f"--config.train.steps={SHORT}"))
  assert "resumed from step 4" in out
  step, adapter = _adapter(workdir)
  assert step == SHORT
  _assert_same(adapter, clean["short"], exact=False)
  fault.record(
    fault="one of two processes dies",
    injected="SIGKILL to process 1 of a two-process run (gloo on 127.0.0.1) after step 5, "
    "checkpoints every 4 steps",
    lost="the steps after the last checkpoint (4)",
    check=f"process 0 exits within {HEARTBEAT} s, status 3, with one line naming the last "
    "checkpoint; the run resumed from it on one process has the uninterrupted run's adapter "
    "(atol 1e-6: 2 processes vs 1)",
  )
