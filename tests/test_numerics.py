"""Numbers that must equal the reference's (issue 10, item 6): full fine-tuning gradients against
torch autograd on a model with no square shape, every remat policy and `loss_chunk` against
neither, the weight-decay mask against the transformers Trainer's, and 20 steps of `train()`
(AdamW, warm-up + cosine, clipping, masked decay) against the Trainer's, full and LoRA (PEFT).

TRL's SFTTrainer is not compared: trl is not installed here. It subclasses the Trainer; what it
adds is data preparation (tokenising, completion masks, collation), which `_rows` replaces with our
own batches."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import transformers
from flax import nnx
from helpers import read_metrics, tiny_hf_model, tiny_run, tiny_run_dir

from lora_jax import lora
from lora_jax.config import ModelConfig
from lora_jax.io import load_tokenizer
from lora_jax.io.mapping import entries
from lora_jax.model import Decoder
from lora_jax.optim import decay_mask, make_optimizer
from lora_jax.run import build_model, split_trainable
from lora_jax.run_config import REMAT
from lora_jax.train import load_data, make_train_step, train

# Nothing square: hidden 48 != intermediate 80 != q heads * head_dim 96 (6 x 16), 2 KV heads
# (groups of 3), QKV biases, untied head.
SHAPES = dict(
  hidden_size=48,
  intermediate_size=80,
  num_attention_heads=6,
  head_dim=16,
  num_key_value_heads=2,
  num_hidden_layers=2,
  tie_word_embeddings=False,
)


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
  """torch's intra-op threads spin while they wait on a busy 2-core machine: the Trainer's 20 tiny
  steps cost 15 s of CPU with two threads, 0.8 s with one."""
  threads = torch.get_num_threads()
  torch.set_num_threads(1)
  yield
  torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  return tiny_run_dir(tmp_path_factory.mktemp("nonsquare"), "qwen2", **SHAPES)


@pytest.fixture(scope="module")
def batch(run_dir):
  """The first training batch (8 rows of prompt + completion, right-padded to 64)."""
  cfg = tiny_run(run_dir, **{"train.mode": "full", "data.shuffle": False})
  return next(load_data(cfg, load_tokenizer(run_dir)).it)


def _capture() -> optax.GradientTransformation:
  """An 'optimizer' that leaves the params alone and keeps the step's gradients as its state."""
  return optax.GradientTransformation(
    lambda params: jax.tree.map(jnp.zeros_like, params),
    lambda grads, state, params=None: (jax.tree.map(jnp.zeros_like, grads), grads),
  )


def _our_grads(run_dir, batch, **dotted) -> tuple[float, dict]:
  """(loss, gradients as a pure dict) of one full fine-tuning train step (`make_train_step`)."""
  cfg = tiny_run(run_dir, **{"train.mode": "full", **dotted})
  model, _ = build_model(cfg)
  graphdef, trainable, frozen = split_trainable(model, "full")
  tx = _capture()
  step = jax.jit(make_train_step(graphdef, tx, optax.constant_schedule(0.0), cfg.train))
  _, grads, metrics = step(trainable, tx.init(trainable), frozen, batch, 0)
  return float(metrics["loss"]), nnx.to_pure_dict(grads)


@pytest.fixture(scope="module")
def reference_grads(run_dir, batch):
  return _our_grads(run_dir, batch)


def _at(tree: dict, path: str):
  for key in path.split("."):
    tree = tree[key]
  return np.asarray(tree)


def _torch_grads(run_dir, batch) -> tuple[float, dict]:
  hf = transformers.AutoModelForCausalLM.from_pretrained(run_dir, dtype=torch.float32)
  ids = torch.tensor(batch["input_ids"], dtype=torch.long)
  labels = torch.where(torch.tensor(batch["loss_mask"]) > 0, ids, -100)
  out = hf(input_ids=ids, attention_mask=torch.tensor(batch["attention_mask"]), labels=labels)
  out.loss.backward()
  return out.loss.item(), {n: p.grad.numpy() for n, p in hf.named_parameters()}


def test_full_fine_tuning_gradients_equal_torch_autograd(run_dir, batch, reference_grads):
  loss, grads = reference_grads
  ref_loss, ref = _torch_grads(run_dir, batch)
  assert abs(loss - ref_loss) < 1e-5
  cfg = ModelConfig.from_file(f"{run_dir}/config.json")
  checked = set()
  for e in entries(cfg):
    ours = _at(grads, e.path)
    for i in range(cfg.num_layers) if e.stacked else [None]:
      name = e.hf.format(i=i)
      theirs = ref[name]
      mine = ours[i] if e.stacked else ours
      assert mine.shape == theirs.shape, name
      scale = np.abs(theirs).max()
      err = np.abs(mine - theirs).max()
      assert scale > 1e-7, f"{name}: no gradient to compare"
      assert err <= 1e-5 * scale, name
      checked.add(name)
  assert checked == set(ref), "every torch parameter is compared"


# Each costs a compilation (~4 s CPU): every remat policy, and chunked logits (63 predicted
# positions in chunks of 16: the last one padded) with accumulation over two micro-batches.
VARIANTS = [{"model.remat": r} for r in REMAT if r != "none"] + [
  {"train.loss_chunk": 16, "train.grad_accum": 2}
]


@pytest.mark.parametrize(
  "dotted", VARIANTS, ids=lambda d: ",".join(f"{k}={v}" for k, v in d.items())
)
def test_remat_and_loss_chunk_give_the_same_gradients(run_dir, batch, reference_grads, dotted):
  loss, grads = _our_grads(run_dir, batch, **dotted)
  ref_loss, ref = reference_grads
  assert abs(loss - ref_loss) <= 1e-6 * abs(ref_loss)
  flat, ref_flat = jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(ref)
  for (path, g), r in zip(flat, ref_flat):
    scale = np.abs(r).max()
    assert np.abs(np.asarray(g) - r).max() <= 1e-6 * scale, jax.tree_util.keystr(path)


# ---- weight decay as the Trainer applies it ---------------------------------------------------
def _abstract_params(kind, tmp_path, **overrides):
  """(HF model, our config, our full fine-tuning params as ShapeDtypeStructs) for one layer."""
  hf = tiny_hf_model(kind, num_hidden_layers=1, **overrides)
  hf.config.save_pretrained(tmp_path)
  cfg = ModelConfig.from_file(str(tmp_path / "config.json"))
  _, params, _ = split_trainable(nnx.eval_shape(lambda: Decoder(cfg)), "full")
  return hf, cfg, params


@pytest.mark.parametrize(
  "kind,overrides",
  [("qwen2", {}), ("qwen3", {"tie_word_embeddings": True}), ("llama", {})],
)
def test_weight_decay_skips_what_the_trainer_skips(tmp_path, kind, overrides):
  """Biases and norm weights get no decay; embeddings, head and kernels do: our mask on every
  param equals `Trainer.get_decay_parameter_names` on the same HF model."""
  hf, cfg, params = _abstract_params(kind, tmp_path, **overrides)
  decayed = set(transformers.Trainer.get_decay_parameter_names(None, hf))
  assert decayed and decayed != {n for n, _ in hf.named_parameters()}
  mask = nnx.to_pure_dict(decay_mask(params))
  names = {e.hf.format(i=0): e.path for e in entries(cfg)}
  assert set(names) == {n for n, _ in hf.named_parameters()}
  for hf_name, path in names.items():
    assert bool(_at(mask, path)) == (hf_name in decayed), hf_name


def test_make_optimizer_applies_the_decay_mask(tmp_path):
  """With zero gradients only decay moves a param: kernels, embeddings and head shrink by
  lr * weight_decay, biases and norms stay; the optimizer state keeps its old layout."""
  hf, cfg, abstract = _abstract_params("qwen2", tmp_path)
  decayed = set(transformers.Trainer.get_decay_parameter_names(None, hf))
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape), s.dtype), abstract)
  run = tiny_run("unused", **{"train.lr": 0.1, "train.weight_decay": 0.5})
  tx, schedule = make_optimizer(run.train, total_steps=1)

  @jax.jit
  def step(params):
    zeros = jax.tree.map(jnp.zeros_like, params)
    return optax.apply_updates(params, tx.update(zeros, tx.init(params), params)[0])

  new, old = nnx.to_pure_dict(step(params)), nnx.to_pure_dict(params)
  # The state's tree is optax.adamw's without a mask: checkpoints from before the mask restore.
  unmasked = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.5))
  assert jax.tree.structure(tx.init(params)) == jax.tree.structure(unmasked.init(params))
  for e in entries(cfg):
    shrink = 1 - 0.1 * 0.5 if e.hf.format(i=0) in decayed else 1.0
    np.testing.assert_allclose(
      _at(new, e.path), shrink * _at(old, e.path), rtol=1e-6, err_msg=e.path
    )


def test_lora_adapters_decay_as_under_peft(tmp_path):
  """Under PEFT the Trainer decays every trainable param (lora_A, lora_B); so does our mask."""
  from peft import LoraConfig, get_peft_model

  hf = tiny_hf_model("qwen2", num_hidden_layers=1)
  hf.config.save_pretrained(tmp_path)
  pm = get_peft_model(hf, LoraConfig(r=2, target_modules=list(lora.LINEARS), bias="none"))
  trainable = {n for n, p in pm.named_parameters() if p.requires_grad}
  assert len(trainable) == 2 * len(lora.LINEARS)
  assert trainable <= set(transformers.Trainer.get_decay_parameter_names(None, pm))
  model = nnx.eval_shape(lambda: Decoder(ModelConfig.from_file(str(tmp_path / "config.json"))))
  lora.apply_lora(model, lora.LoRAConfig(rank=2, targets=lora.LINEARS))
  _, adapters, _ = split_trainable(model, "lora")
  mask = jax.tree.leaves(decay_mask(adapters))
  assert len(mask) == 2 * len(lora.LINEARS) and all(mask)


# ---- 20 steps against the transformers Trainer ------------------------------------------------
STEPS = 20
HYPER = {
  "train.steps": STEPS,
  "train.batch_size": 8,  # 64 rows: 8 steps an epoch, the same order every epoch
  "data.shuffle": False,
  "train.lr": 2e-3,
  "train.schedule": "cosine",
  "train.warmup_steps": 3,
  "train.weight_decay": 0.1,
  "train.b1": 0.8,
  "train.b2": 0.95,
  "train.eps": 1e-6,
  "checkpoint.every_epoch": False,
  "train.peak_flops": 1e12,  # for MFU only: skips measuring this CPU's matmul speed (3 s)
}


def _trainer_log(model, cfg, rows, outdir) -> list[dict]:
  """transformers.Trainer with `cfg.train`'s hyper-parameters on `rows` in order: its per-step
  log (loss, grad_norm, learning_rate)."""
  t = cfg.train
  args = transformers.TrainingArguments(
    output_dir=str(outdir),
    per_device_train_batch_size=t.batch_size,
    max_steps=t.steps,
    learning_rate=t.lr,
    lr_scheduler_type=t.schedule,
    warmup_steps=t.warmup_steps,
    weight_decay=t.weight_decay,
    adam_beta1=t.b1,
    adam_beta2=t.b2,
    adam_epsilon=t.eps,
    max_grad_norm=t.clip_norm,
    train_sampling_strategy="sequential",
    logging_steps=1,
    save_strategy="no",
    report_to="none",
    use_cpu=True,
    disable_tqdm=True,
    dataloader_num_workers=0,
  )
  trainer = transformers.Trainer(model=model, args=args, train_dataset=rows)
  trainer.train()
  return [r for r in trainer.state.log_history if "loss" in r]


def _rows(cfg, run_dir) -> list[dict]:
  """One epoch of our iterator's batches as the Trainer's rows (labels -100 off the loss)."""
  it = load_data(cfg, load_tokenizer(run_dir)).it
  rows = []
  for _ in range(it.steps_per_epoch):
    b = next(it)
    ids = torch.tensor(b["input_ids"], dtype=torch.long)
    labels = torch.where(torch.tensor(b["loss_mask"]) > 0, ids, -100)
    mask = torch.tensor(b["attention_mask"], dtype=torch.long)
    rows += [
      {"input_ids": i, "attention_mask": m, "labels": y} for i, m, y in zip(ids, mask, labels)
    ]
  return rows


def _peft_with_our_init(run_dir, cfg, outdir):
  """PEFT's model holding our run's initial adapter (A as `build_model` draws it, B zero)."""
  from peft import PeftModel

  from lora_jax.io.peft import save_peft_adapter

  ours, _ = build_model(cfg)
  save_peft_adapter(ours, str(outdir), cfg.adapter)
  hf = transformers.AutoModelForCausalLM.from_pretrained(run_dir, dtype=torch.float32)
  return PeftModel.from_pretrained(hf, str(outdir), is_trainable=True)


# Clipping on some steps only (gradient norms: 1.8 falling to 1.0 full, 0.3 to 0.7 LoRA): clipping
# every step would only rescale what Adam normalises away.
@pytest.mark.parametrize("mode,clip", [("full", 1.2), ("lora", 0.5)])
def test_twenty_steps_equal_the_transformers_trainer(run_dir, tmp_path, mode, clip):
  """Same start, data and order: AdamW (betas, eps, decoupled decay masked as the Trainer masks
  it), warm-up + cosine, clipping. float32 on both sides: the losses agree to ~1e-6."""
  cfg = tiny_run(
    run_dir,
    **{**HYPER, "train.mode": mode, "train.clip_norm": clip, "lora.rank": 4, "lora.dropout": 0.0},
  )
  if mode == "full":
    model = transformers.AutoModelForCausalLM.from_pretrained(run_dir, dtype=torch.float32)
  else:
    model = _peft_with_our_init(run_dir, cfg, tmp_path / "init_adapter")
  theirs = _trainer_log(model, cfg, _rows(cfg, run_dir), tmp_path / "trainer")
  train(cfg, str(tmp_path / "ours"))
  ours = [r for r in read_metrics(tmp_path / "ours") if "train/loss" in r]
  assert len(ours) == len(theirs) == STEPS
  col = lambda rows, key: np.array([r[key] for r in rows])
  np.testing.assert_allclose(col(ours, "train/lr"), col(theirs, "learning_rate"), rtol=1e-6)
  grad_norm = col(theirs, "grad_norm")  # before clipping, on both sides
  assert (grad_norm > clip).any() and (grad_norm < clip).any(), "clipped on some steps only"
  np.testing.assert_allclose(col(ours, "train/grad_norm"), grad_norm, rtol=1e-5)
  # float32 on both sides, summed in different orders: ~20 ulps of a loss of 5.6 (measured:
  # 1.9e-6 full, 3.3e-6 LoRA).
  np.testing.assert_allclose(col(ours, "train/loss"), col(theirs, "loss"), rtol=0, atol=1e-5)
