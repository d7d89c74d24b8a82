"""Training in separate processes: two hosts on 127.0.0.1, kill -9 and resume, SIGTERM."""

import os
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

from lora_jax.checkpoint import Checkpointer
from lora_jax.run import restore_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  return tiny_run_dir(tmp_path_factory.mktemp("tiny"))


def _config_file(tmp_path, source, **overrides) -> str:
  path = tmp_path / "config_under_test.py"
  path.write_text(
    "import sys\n"
    f"sys.path.insert(0, {os.path.join(REPO, 'tests')!r})\n"
    "from helpers import train_config\n\n\n"
    f"def get_config():\n  return train_config({source!r}, **{overrides!r})\n"
  )
  return str(path)


def _launch(config: str, workdir, *extra: str) -> subprocess.Popen:
  """launch.train in its own process; output goes to a file (a full pipe would block it)."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
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


def _output(proc) -> str:
  proc.log.seek(0)
  return proc.log.read()


def _finish(proc: subprocess.Popen, timeout: float = 300) -> str:
  proc.wait(timeout=timeout)
  out = _output(proc)
  assert proc.returncode == 0, out[-3000:]
  return out


def _adapter(workdir):
  model, _, _, step = restore_model(str(workdir))
  return step, jax.tree.leaves(nnx.to_pure_dict(nnx.state(model, nnx.LoRAParam)))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_equal_one_process_with_four_devices(run_dir, tmp_path):
  config = _config_file(tmp_path, run_dir, **{"train.steps": 3, "mesh.shape": "fsdp:2,data:2"})
  one = tmp_path / "one"
  _finish(_launch(config, one, "--cpu_devices=4"))
  port = _free_port()
  two = tmp_path / "two"
  procs = [
    _launch(
      config,
      two,
      "--cpu_devices=2",
      f"--coordinator_address=127.0.0.1:{port}",
      "--num_processes=2",
      f"--process_id={i}",
    )
    for i in range(2)
  ]
  for p in procs:
    _finish(p)
  np.testing.assert_allclose(train_losses(two), train_losses(one), atol=1e-5)
  step_one, a = _adapter(one)
  step_two, b = _adapter(two)
  assert step_one == step_two == 3
  for x, y in zip(a, b):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-6)


def _wait_for_checkpoint(workdir, step: int, proc, timeout: float = 240) -> None:
  deadline = time.time() + timeout
  path = os.path.join(workdir, "checkpoints", str(step))
  while not os.path.isdir(path):
    assert proc.poll() is None, _output(proc)[-3000:]
    assert time.time() < deadline, f"no checkpoint {step} after {timeout}s"
    time.sleep(0.05)


def test_kill_9_then_resume_equals_uninterrupted(run_dir, tmp_path):
  overrides = {
    "train.steps": 30,
    "checkpoint.every_steps": 1,
    "checkpoint.async_save": True,
    "lora.dropout": 0.1,
  }
  config = _config_file(tmp_path, run_dir, **overrides)
  _finish(_launch(config, tmp_path / "clean"))
  killed = tmp_path / "killed"
  proc = _launch(config, killed)
  _wait_for_checkpoint(killed, 4, proc)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  steps = Checkpointer(str(killed / "checkpoints"), async_save=False).all_steps()
  assert 4 <= max(steps) < 30, steps  # really killed mid-run
  _finish(_launch(config, killed))
  step_a, a = _adapter(tmp_path / "clean")
  step_b, b = _adapter(killed)
  assert step_a == step_b == 30
  for x, y in zip(a, b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_sigterm_saves_and_exits_cleanly(run_dir, tmp_path):
  config = _config_file(tmp_path, run_dir, **{"train.steps": 400, "checkpoint.every_steps": 20})
  proc = _launch(config, tmp_path / "run")
  _wait_for_checkpoint(tmp_path / "run", 20, proc)
  proc.send_signal(signal.SIGTERM)
  out = _finish(proc)
  last = Checkpointer(str(tmp_path / "run" / "checkpoints"), async_save=False).latest_step()
  assert 20 < last < 400
  assert f"SIGTERM: saved step {last} and stopping" in out  # saved where it stopped
