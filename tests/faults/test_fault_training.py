"""Training faults injected in-process on a tiny model: a damaged latest checkpoint, a NaN at a
chosen step, a full disk while saving. Each run is compared with one uninterrupted run of the
same config (6 steps, a checkpoint every 2, dropout on so the RNG matters)."""

import dataclasses
import os
import resource
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import tiny_run, tiny_run_dir

from lora_jax import train as train_lib
from lora_jax.checkpoint import UNREADABLE, Checkpointer
from lora_jax.run import restore_model

OVERRIDES = {
  "train.steps": 6,
  "checkpoint.every_steps": 2,
  "lora.dropout": 0.1,
  "log.every_steps": 100,  # metrics at step 1 only: the disk-full fault hits a checkpoint
}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """The config and the uninterrupted run's final adapter."""
  d = tmp_path_factory.mktemp("faults_training")
  cfg = tiny_run(tiny_run_dir(d / "model"), **OVERRIDES)
  result = train_lib.train(cfg, str(d / "clean"))
  assert (result.status, result.step) == ("done", 6)
  return {"cfg": cfg, "clean": d / "clean", "adapter": _adapter(d / "clean")}


def _adapter(workdir) -> list[np.ndarray]:
  model, _, _, _ = restore_model(str(workdir))
  return [np.asarray(x) for x in jax.tree.leaves(nnx.to_pure_dict(nnx.state(model, nnx.LoRAParam)))]


def _assert_same_adapter(workdir, run) -> None:
  got = _adapter(workdir)
  assert len(got) == len(run["adapter"])
  for x, y in zip(got, run["adapter"]):
    np.testing.assert_array_equal(x, y)


def _steps(workdir) -> list[int]:
  return Checkpointer(str(workdir / "checkpoints"), async_save=False).all_steps()


def test_damaged_latest_checkpoint_falls_back_to_the_previous_one(run, tmp_path, caplog, fault):
  workdir = tmp_path / "damaged"
  shutil.copytree(run["clean"], workdir)
  data = workdir / "checkpoints/6/params/ocdbt.process_0/d"
  victim = max(data.iterdir(), key=lambda p: p.stat().st_size)
  with open(victim, "r+b") as f:  # a copy cut short
    f.truncate(victim.stat().st_size // 2)
  caplog.set_level("INFO", logger="lora_jax")
  result = train_lib.train(run["cfg"], str(workdir))
  assert (result.status, result.step) == ("done", 6)
  warned = [r.getMessage() for r in caplog.records if "unreadable" in r.getMessage()]
  assert len(warned) == 1 and f"{workdir}/checkpoints/6 is unreadable" in warned[0], warned
  assert "resumed from step 4" in caplog.text
  assert (workdir / f"checkpoints/6{UNREADABLE}").is_dir()  # kept for inspection
  assert _steps(workdir) == [2, 4, 6]
  _assert_same_adapter(workdir, run)
  fault.record(
    fault="damaged latest checkpoint",
    injected="truncate the largest params file of the last checkpoint (step 6) to half",
    lost="steps 5-6 (retrained from checkpoint 4); the damaged step kept as `6.unreadable`",
    check="one warning names the step; the rerun resumes from 4 and its adapter is bitwise "
    "equal to the uninterrupted run's",
  )


def test_unreadable_checkpoints_of_every_kind_are_skipped(tmp_path, caplog):
  """Damage that tensorstore, the JSON reader and the file system each report differently."""
  params = {"a": jnp.arange(4096.0).reshape(64, 64)}
  damage = {
    "meta file deleted": lambda d: os.remove(d / "meta/metadata"),
    "params manifest emptied": lambda d: (d / "params/manifest.ocdbt").write_bytes(b""),
    "opt_state directory deleted": lambda d: shutil.rmtree(d / "opt_state"),
  }
  for i, (name, hurt) in enumerate(damage.items()):
    directory = tmp_path / str(i)
    c = Checkpointer(str(directory), async_save=False)
    for step in (1, 2):
      c.save(
        step, jax.tree.map(lambda x, s=step: x * s, params), {"m": jnp.ones(3)}, {"step": step}
      )
    c.close()
    hurt(directory / "2")
    c = Checkpointer(str(directory), async_save=False)
    caplog.clear()
    step, restored, opt, meta = c.restore_latest(params, {"m": jnp.ones(3)})
    assert (step, meta["step"]) == (1, 1), name
    np.testing.assert_array_equal(restored["a"], params["a"])
    assert f"{directory}/2 is unreadable" in caplog.text, name
    assert c.latest_step() == 1 and c.restore_latest(params, {"m": jnp.ones(3)})[0] == 1
  assert Checkpointer(str(tmp_path / "empty"), async_save=False).restore_latest(params) is None


def _poison_at(step_to_poison: int):
  """make_train_step whose params turn NaN at the given (1-based) step, inside the jit: the NaN
  flows through the forward pass, the loss, the gradients and the update as a real one would."""
  make = train_lib.make_train_step

  def poisoned(*args, **kwargs):
    step = make(*args, **kwargs)

    def wrapped(trainable, opt_state, frozen, batch, step_index):
      bad = step_index == step_to_poison - 1
      trainable = jax.tree.map(lambda x: jnp.where(bad, x * jnp.nan, x), trainable)
      return step(trainable, opt_state, frozen, batch, step_index)

    return wrapped

  return poisoned


@pytest.mark.slow
def test_nan_at_a_chosen_step_stops_before_saving_it(run, tmp_path, caplog, monkeypatch, fault):
  workdir = tmp_path / "nan"
  monkeypatch.setattr(train_lib, "make_train_step", _poison_at(5))
  caplog.set_level("INFO", logger="lora_jax")
  result = train_lib.train(run["cfg"], str(workdir))
  assert (result.status, result.step) == ("nan", 5) and not np.isfinite(result.loss)
  assert _steps(workdir) == [2, 4]  # nothing written after the NaN
  assert "step 5: loss nan, grad norm nan; stopping. The last good checkpoint is step 4" in (
    caplog.text
  )
  monkeypatch.undo()
  result = train_lib.train(run["cfg"], str(workdir))
  assert (result.status, result.step) == ("done", 6)
  _assert_same_adapter(workdir, run)
  fault.record(
    fault="NaN at a chosen step",
    injected="the trainable params multiplied by NaN inside the jitted step 5",
    lost="step 5 (the run stops there, status 'nan', checkpoint 4 is the last one written)",
    check="one error line names the step and the last good checkpoint; a rerun resumes from 4 "
    "and its adapter is bitwise equal to the uninterrupted run's",
  )


@pytest.mark.slow
@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_disk_full_while_saving_fails_in_one_line_and_resumes(
  run, tmp_path, monkeypatch, fault, async_save
):
  """The file-size limit (RLIMIT_FSIZE: writes fail with EFBIG as on a full disk) is set once
  checkpoint 2 is complete, just before checkpoint 4 is written, in this process, and lifted
  after the run stops. Asynchronously, the write fails in Orbax's background thread and is
  reported at the next save or at the end."""
  workdir = tmp_path / "full"
  soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
  save = Checkpointer.save

  def save_on_a_full_disk(self, step, *args, **kwargs):
    if step == 4:
      self.wait()
      resource.setrlimit(resource.RLIMIT_FSIZE, (64, hard))
    return save(self, step, *args, **kwargs)

  cfg = run["cfg"]
  cfg = dataclasses.replace(
    cfg, checkpoint=dataclasses.replace(cfg.checkpoint, async_save=async_save)
  )
  monkeypatch.setattr(Checkpointer, "save", save_on_a_full_disk)
  try:
    with pytest.raises(OSError) as e:
      train_lib.train(cfg, str(workdir))
  finally:
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
  message = str(e.value)
  assert "\n" not in message, message
  assert message.startswith(f"could not write checkpoint step 4 to {workdir}/checkpoints")
  assert "the last complete checkpoint is step 2" in message, message
  assert "File too large (the disk is full?)" in message, message
  monkeypatch.undo()
  assert _steps(workdir) == [2]
  result = train_lib.train(cfg, str(workdir))
  assert (result.status, result.step) == ("done", 6)
  _assert_same_adapter(workdir, run)
  fault.record(
    fault="disk full while saving",
    injected="RLIMIT_FSIZE of 64 bytes set just before checkpoint 4 is written (EFBIG, as "
    "ENOSPC), with synchronous and with asynchronous (background) checkpoint writes",
    lost="steps 3-4 (checkpoint 4 never committed; Orbax's tmp directory is ignored)",
    check="the run stops with one line naming the step, the directory and the last complete "
    "checkpoint (2); a rerun with space resumes from 2, adapter bitwise equal",
  )
