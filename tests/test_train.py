"""The training loop: sharding, accumulation, frozen params, NaN, resume and bad input."""

import jax
import numpy as np
import pytest
from flax import nnx
from helpers import read_metrics, tiny_run, tiny_run_dir, train_losses

import lora_jax
from lora_jax.checkpoint import Checkpointer, ResumeError
from lora_jax.data import DEMO_REFUSALS
from lora_jax.run import restore_model
from lora_jax.run_config import RunConfigError
from lora_jax.train import train


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  return tiny_run_dir(
    tmp_path_factory.mktemp("tiny"),
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=128,
  )


def _final_adapter(workdir):
  ckpt = Checkpointer(f"{workdir}/checkpoints", async_save=False)
  step = ckpt.latest_step()
  meta = ckpt.read_meta(step)
  ckpt.close()
  model, _, _, _ = restore_model(workdir, step)
  return step, meta, nnx.to_pure_dict(nnx.state(model, nnx.LoRAParam))


def test_lora_run_trains_only_the_adapter(run_dir, tmp_path):
  result = train(tiny_run(run_dir, **{"train.steps": 10}), str(tmp_path / "run"))
  assert result.status == "done" and result.step == 10
  losses = train_losses(tmp_path / "run")
  assert len(losses) == 10 and all(np.isfinite(losses))
  rows = [r for r in read_metrics(tmp_path / "run") if "train/loss" in r]
  assert {"train/grad_norm", "train/lr", "train/tokens_per_second", "train/mfu"} <= set(rows[0])
  # The demo rows / batch 8 = steps per epoch; the epoch counter runs on past the boundary (10
  # steps over 8 per epoch).
  with open(DEMO_REFUSALS) as f:
    per_epoch = sum(1 for line in f if line.strip()) // 8
  assert per_epoch < 10
  np.testing.assert_allclose([r["train/epoch"] for r in rows], np.arange(1, 11) / per_epoch)
  model, _, _, _ = restore_model(str(tmp_path / "run"))
  base = lora_jax.load_pretrained(run_dir)
  trained = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  frozen_before = nnx.to_pure_dict(nnx.state(base, nnx.Param))
  # Every frozen param is bitwise what was loaded; the adapter moved.
  flat_after = dict(jax.tree_util.tree_flatten_with_path(trained)[0])
  for path, before in jax.tree_util.tree_flatten_with_path(frozen_before)[0]:
    np.testing.assert_array_equal(np.asarray(flat_after[path]), np.asarray(before), str(path))
  b = np.asarray(model.layers.up_proj.lora_b[...])
  assert np.abs(b).max() > 0


@pytest.mark.slow
@pytest.mark.parametrize("shape", ["fsdp:8", "fsdp:4,tensor:2", "data:2,fsdp:2,tensor:2"])
def test_sharded_losses_equal_single_device(run_dir, tmp_path, shape):
  single = tmp_path / "single"
  train(tiny_run(run_dir, **{"train.steps": 3}), str(single))
  train(tiny_run(run_dir, **{"train.steps": 3, "mesh.shape": shape}), str(tmp_path / "mesh"))
  np.testing.assert_allclose(train_losses(tmp_path / "mesh"), train_losses(single), atol=1e-5)


def test_grad_accumulation_equals_one_big_batch(run_dir, tmp_path):
  train(tiny_run(run_dir, **{"train.steps": 2}), str(tmp_path / "one"))
  train(tiny_run(run_dir, **{"train.steps": 2, "train.grad_accum": 4}), str(tmp_path / "acc"))
  np.testing.assert_allclose(
    train_losses(tmp_path / "acc"), train_losses(tmp_path / "one"), atol=1e-5
  )
  _, _, one = _final_adapter(tmp_path / "one")
  _, _, acc = _final_adapter(tmp_path / "acc")
  for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(acc)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def test_full_finetune_with_bf16_compute(run_dir, tmp_path):
  cfg = tiny_run(
    run_dir,
    **{"train.mode": "full", "train.steps": 2, "train.lr": 1e-4, "train.precision": "mixed"},
  )
  assert train(cfg, str(tmp_path / "full")).status == "done"
  assert all(np.isfinite(train_losses(tmp_path / "full")))
  model, _, _, _ = restore_model(str(tmp_path / "full"))
  base = lora_jax.load_pretrained(run_dir)
  assert model.layers.up_proj.kernel[...].dtype == np.float32  # float32 master weights
  assert not np.array_equal(
    np.asarray(model.layers.up_proj.kernel[...]), np.asarray(base.layers.up_proj.kernel[...])
  )


def test_nan_loss_stops_and_keeps_last_good_checkpoint(run_dir, tmp_path):
  cfg = tiny_run(
    run_dir,
    **{
      "train.steps": 6,
      "train.lr": 1e30,
      "train.clip_norm": 0.0,
      "train.weight_decay": 0.0,
      "checkpoint.every_steps": 1,
      "train.schedule": "constant",
    },
  )
  result = train(cfg, str(tmp_path / "nan"))
  assert result.status == "nan" and result.step < 6
  ckpt = Checkpointer(str(tmp_path / "nan" / "checkpoints"), async_save=False)
  assert ckpt.latest_step() == result.step - 1  # the NaN step itself was never saved
  _, _, adapter = _final_adapter(tmp_path / "nan")
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(adapter))


def test_resume_continues_exactly(run_dir, tmp_path):
  full = tmp_path / "full"
  train(tiny_run(run_dir, **{"train.steps": 5, "lora.dropout": 0.1}), str(full))
  part = tmp_path / "part"
  # Train 5 steps with a checkpoint each, then drop the last two (a run stopped at step 3 with
  # the same 5-step schedule) and resume: with dropout on, the RNG must resume exactly too.
  cfg = tiny_run(run_dir, **{"train.steps": 5, "lora.dropout": 0.1, "checkpoint.every_steps": 1})
  train(cfg, str(part))
  ckpt = Checkpointer(str(part / "checkpoints"), async_save=False)
  for step in (4, 5):  # drop the last two checkpoints: the next run resumes from step 3
    ckpt.manager.delete(step)
  ckpt.close()
  result = train(cfg, str(part))
  assert result.step == 5
  _, meta_a, a = _final_adapter(full)
  _, meta_b, b = _final_adapter(part)
  assert meta_a["data"] == meta_b["data"]
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_resume_onto_another_model_is_refused(run_dir, tmp_path):
  train(tiny_run(run_dir, **{"train.steps": 1}), str(tmp_path / "run"))
  other = tiny_run_dir(tmp_path / "other", intermediate_size=64)
  with pytest.raises(ResumeError, match="another model"):
    train(tiny_run(other, **{"train.steps": 2}), str(tmp_path / "run"))
  assert Checkpointer(str(tmp_path / "run" / "checkpoints")).latest_step() == 1  # nothing lost


def test_bad_config_values_are_one_line(run_dir, tmp_path):
  with pytest.raises(lora_jax.MeshError, match="needs 6 devices, but there are 8"):
    train(tiny_run(run_dir, **{"mesh.shape": "fsdp:3,tensor:2"}), str(tmp_path / "a"))
  with pytest.raises(RunConfigError, match="config.lora.targets='attn_q': .*matches no module"):
    train(tiny_run(run_dir, **{"lora.targets": "attn_q"}), str(tmp_path / "b"))


def test_orthogonal_regulariser_in_the_loop(run_dir, tmp_path):
  cfg = tiny_run(
    run_dir,
    **{
      "train.steps": 3,
      "lora.targets": "mlp",
      "ortho.beta": 0.5,
      "ortho.k": 4,
      "ortho.normalize": True,
      "log.tensorboard": True,
    },
  )
  assert train(cfg, str(tmp_path / "ortho")).status == "done"
  rows = [r for r in read_metrics(tmp_path / "ortho") if "train/loss" in r]
  # B starts at zero, so the penalty is 0 at step 1 and positive once the adapter moved.
  assert rows[0]["train/ortho_penalty"] == 0.0 and rows[-1]["train/ortho_penalty"] > 0.0
  np.testing.assert_allclose(
    rows[-1]["train/total_loss"],
    rows[-1]["train/loss"] + 0.5 * rows[-1]["train/ortho_penalty"],
    rtol=1e-6,
  )
  assert list((tmp_path / "ortho" / "tensorboard").glob("events.out.tfevents.*"))
