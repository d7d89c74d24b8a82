"""An epoch of refusal data as a user trains it: lora_jax vs transformers Trainer + PEFT.

Both sides train the same STAR-1 rows (`../shared/data/star1`, formatted in the DeepSeek-R1 hand
format with the real R1 tokenizer from `../shared/tokenizers/`, max_length 1024, loss on the
completion), in the same order, batch 2 as the reference trains, on the same random
Qwen2.5-0.5B-shaped float32 checkpoint (`--layers` decoder layers of it: fewer than 24 keeps a run
within minutes on two cores; the embedding and the 152k-word head stay full size), AdamW 5e-5
(0.9, 0.999, 1e-8), weight decay 1e-4, clip 1.0, constant learning rate:
  * lora: LoRA r1, alpha 16, dropout 0.05 on up_proj (the paper's best), and
  * full: full fine-tuning.
Theirs: `transformers.Trainer` + PEFT with dynamic padding (DataCollatorForSeq2Seq pads each
batch to its longest row; TRL is not installed), a sequential sampler (the same batches as ours),
the fastest CPU AdamW that works (fused, else foreach), optionally `torch_compile`.
Ours: lora_jax's data pipeline (each batch padded to a multiple of `--bucket`), one jitted train
step per padded length, compiled ahead of time (compile reported separately), the metrics
fetched every step as lora_jax.train does.

Both sides stay resident in their own process; after a warm-up epoch, `--repeats` epochs
alternate (ours, theirs, theirs, ours, ...). Target: epoch wall time >= 1.5x faster than theirs.

  python benchmarks/train_epoch.py [--rows 16] [--layers 4] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402  (pins thread counts before numpy/jax/torch load)
import numpy as np  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
SHARED = os.path.join(os.path.dirname(HERE), "..", "shared")
LR, B1, B2, EPS, WD, CLIP = 5e-5, 0.9, 0.999, 1e-8, 1e-4, 1.0
RANK, ALPHA, DROPOUT, TARGETS, BATCH, MAX_LENGTH = 1, 16.0, 0.05, ("up_proj",), 2, 1024
TARGET = 1.5


def prepare_rows(rows: int, seed: int, path: str) -> dict:
  """The first `rows` of a seeded shuffle of STAR-1, tokenised by lora_jax's pipeline (TRL 0.17's
  rule, as the reference); saved for both workers."""
  import transformers

  from lora_jax.data.pipeline import DataConfig, load_examples, pad_token_id

  tok = transformers.AutoTokenizer.from_pretrained(
    os.path.join(SHARED, "tokenizers", "deepseek-r1-distill-qwen")
  )
  cfg = DataConfig(
    source=os.path.join(SHARED, "data", "star1", "STAR-1.json"),
    format="star1",
    max_length=MAX_LENGTH,
    shuffle=False,
  )
  examples, report = load_examples(cfg, tok)
  order = np.random.default_rng(seed).permutation(len(examples))[:rows]
  ids = [examples.ids[i].tolist() for i in order]
  masks = [examples.masks[i].tolist() for i in order]
  with open(path, "w") as f:
    json.dump({"ids": ids, "masks": masks, "pad_id": pad_token_id(tok)}, f)
  lengths = [len(x) for x in ids]
  return dict(
    rows=rows,
    tokens=sum(lengths),
    loss_tokens=int(sum(sum(m[1:]) for m in masks)),
    lengths=lengths,
    truncated=report["truncated"],
  )


def _rows(path: str):
  with open(path) as f:
    return json.load(f)


# ---- ours ---------------------------------------------------------------------------------------
def jax_worker(a) -> None:
  import jax

  import lora_jax
  from lora_jax import lora
  from lora_jax.data.pipeline import Examples, make_iterator
  from lora_jax.optim import make_optimizer
  from lora_jax.run import own_buffers, split_trainable
  from lora_jax.run_config import TrainConfig
  from lora_jax.train import make_train_step

  data = _rows(a.rows_file)
  examples = Examples(
    [np.asarray(x, np.int32) for x in data["ids"]],
    [np.asarray(m, np.uint8) for m in data["masks"]],
    MAX_LENGTH,
    fingerprint="bench",
  )
  it = make_iterator(
    examples,
    BATCH,
    pad_id=data["pad_id"],
    bucket=a.bucket,
    shuffle=False,
    packing=a.packing,
    max_length=MAX_LENGTH,
  )
  cfg = TrainConfig(
    mode=a.mode, lr=LR, b1=B1, b2=B2, eps=EPS, weight_decay=WD, clip_norm=CLIP, schedule="constant"
  )
  state = {}

  def setup():
    t = time.perf_counter()
    model = lora_jax.load_pretrained(a.ckpt_dir, dtype="float32", remat=a.remat)
    if a.mode == "lora":
      lora.apply_lora(
        model, lora.LoRAConfig(rank=RANK, alpha=ALPHA, dropout=DROPOUT, targets=TARGETS)
      )
    graphdef, trainable, frozen = split_trainable(model, a.mode)
    del model
    trainable = own_buffers(trainable)
    tx, schedule = make_optimizer(cfg, 10**6)
    opt_state = jax.jit(tx.init)(trainable)
    load_s = time.perf_counter() - t
    step = jax.jit(make_train_step(graphdef, tx, schedule, cfg), donate_argnums=(0, 1))
    # One executable per padded length of the epoch, compiled ahead of time and timed.
    batches = [next(it) for _ in range(it.steps_per_epoch)]
    t, compiled = time.perf_counter(), {}
    for b in batches:
      T = b["input_ids"].shape[1]
      if T not in compiled:
        compiled[T] = step.lower(trainable, opt_state, frozen, b, 0).compile()
    compile_s = time.perf_counter() - t
    state.update(trainable=trainable, opt_state=opt_state, frozen=frozen, compiled=compiled, i=0)
    warm = run_once()  # first execution of each executable (allocations, caches)
    return dict(load_s=load_s, compile_s=compile_s, shapes=sorted(compiled), warmup=warm)

  def run_once():
    s, losses, data_s, tokens, padded = state, [], 0.0, 0, 0
    for _ in range(it.steps_per_epoch):
      t = time.perf_counter()
      batch = next(it)
      data_s += time.perf_counter() - t
      tokens += it.last_stats["tokens"]
      padded += it.last_stats["padded_tokens"]
      fn = s["compiled"][batch["input_ids"].shape[1]]
      s["trainable"], s["opt_state"], m = fn(
        s["trainable"], s["opt_state"], s["frozen"], batch, s["i"]
      )
      s["i"] += 1
      losses.append(float(jax.device_get(m["loss"])))
    return dict(
      steps=it.steps_per_epoch, tokens=tokens, padded_tokens=padded, data_s=data_s, losses=losses
    )

  common.serve(setup, run_once)


# ---- theirs -------------------------------------------------------------------------------------
def torch_worker(a) -> None:
  import datasets
  import torch
  import transformers
  from torch.utils.data import SequentialSampler

  common.torch_threads()
  data = _rows(a.rows_file)
  labels = [
    [x if m else -100 for x, m in zip(ids, mask)] for ids, mask in zip(data["ids"], data["masks"])
  ]
  rows = datasets.Dataset.from_dict({"input_ids": data["ids"], "labels": labels})
  tok = transformers.AutoTokenizer.from_pretrained(
    os.path.join(SHARED, "tokenizers", "deepseek-r1-distill-qwen")
  )
  tok.pad_token_id = data["pad_id"]
  collator = transformers.DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100)

  class Sequential(transformers.Trainer):
    def _get_train_sampler(self, *args, **kwargs):  # the same batches as ours
      return SequentialSampler(self.train_dataset)

  state = {}

  def setup():
    t = time.perf_counter()
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_pretrained(
      a.ckpt_dir, dtype=torch.float32, attn_implementation="sdpa"
    )
    if a.remat != "none":
      model.gradient_checkpointing_enable()
    if a.mode == "lora":
      from peft import LoraConfig, get_peft_model

      model = get_peft_model(
        model,
        LoraConfig(
          r=RANK,
          lora_alpha=ALPHA,
          lora_dropout=DROPOUT,
          target_modules=list(TARGETS),
          bias="none",
          task_type="CAUSAL_LM",
        ),
      )
    load_s = time.perf_counter() - t
    used = None
    for optim in ("adamw_torch_fused", "adamw_torch"):  # adamw_torch uses foreach on CPU
      args = transformers.TrainingArguments(
        output_dir=tempfile.mkdtemp(prefix="bench_trainer_"),
        per_device_train_batch_size=BATCH,
        num_train_epochs=1,
        learning_rate=LR,
        adam_beta1=B1,
        adam_beta2=B2,
        adam_epsilon=EPS,
        weight_decay=WD,
        max_grad_norm=CLIP,
        lr_scheduler_type="constant",
        optim=optim,
        torch_compile=a.torch_compile,
        logging_strategy="no",
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        use_cpu=True,
        dataloader_num_workers=0,
        seed=0,
      )
      trainer = Sequential(
        model=model, args=args, train_dataset=rows, data_collator=collator, processing_class=tok
      )
      try:
        state["trainer"] = trainer
        warm = run_once()
        used = optim
        break
      except Exception as e:  # noqa: BLE001  (fused AdamW may not exist for this build)
        print(f"{optim} failed: {type(e).__name__}: {e}", file=sys.stderr)
    return dict(load_s=load_s, optim=used, torch_compile=a.torch_compile, warmup=warm)

  def run_once():
    out = state["trainer"].train()
    return dict(train_loss=out.training_loss, steps=out.global_step)

  common.serve(setup, run_once)


# ---- the comparison -----------------------------------------------------------------------------
def compare(a, mode: str, rows_info: dict, peak: float, cfg) -> dict:
  from lora_jax.metrics_log import flops_per_token

  args = [
    "--mode", mode, "--ckpt_dir", a.ckpt_dir, "--rows_file", a.rows_file, "--remat", a.remat,
    "--bucket", str(a.bucket),
  ]  # fmt: skip
  if a.packing:
    args.append("--packing")
  theirs_args = args + (["--torch_compile"] if a.torch_compile else [])
  ours = common.Worker("lora_jax", __file__, "--side", "jax", *args)
  theirs = common.Worker("transformers", __file__, "--side", "torch", *theirs_args)
  print(f"{mode}: set up; ours compiled {ours.setup['compile_s']:.1f} s", flush=True)
  runs = common.alternate([ours, theirs], a.repeats)
  rss = {"lora_jax": ours.close()["peak_rss"], "transformers": theirs.close()["peak_rss"]}
  o, t = runs["lora_jax"], runs["transformers"]
  wall = {k: common.summary([r["wall_s"] for r in v]) for k, v in runs.items()}
  cpu = {k: common.summary([r["cpu_s"] for r in v]) for k, v in runs.items()}
  ratio = common.summary([y["wall_s"] / x["wall_s"] for x, y in zip(o, t)])
  mean_len = rows_info["tokens"] / rows_info["rows"]
  model_flops = flops_per_token(cfg, int(mean_len), mode == "full") * rows_info["tokens"]
  padded = o[0]["padded_tokens"]
  return dict(
    mode=mode,
    wall_s=wall,
    cpu_s=cpu,
    ratio_theirs_over_ours=ratio,
    ratio_of_medians=wall["transformers"]["median"] / wall["lora_jax"]["median"],
    target=TARGET,
    verdict=common.verdict(wall["transformers"]["median"] / wall["lora_jax"]["median"], TARGET),
    ours_setup=ours.setup,
    theirs_setup=theirs.setup,
    peak_rss=rss,
    ours_padding_fraction=1 - o[0]["tokens"] / padded,
    theirs_padding_fraction=1 - rows_info["tokens"] / _hf_padded(a.rows_file),
    ours_data_s=common.summary([r["data_s"] for r in o]),
    ours_steps=o[0]["steps"],
    mfu={k: model_flops / (wall[k]["median"] * peak) for k in ("lora_jax", "transformers")},
    losses_last_epoch=o[-1]["losses"],
    runs=runs,
  )


def _hf_padded(rows_file: str) -> int:
  """Tokens after dynamic padding: each consecutive pair padded to its longer row."""
  lengths = [len(x) for x in _rows(rows_file)["ids"]]
  pairs = [lengths[i : i + BATCH] for i in range(0, len(lengths) - BATCH + 1, BATCH)]
  return sum(BATCH * max(p) for p in pairs)


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--worker", action="store_true")
  p.add_argument("--side", choices=["jax", "torch"])
  p.add_argument("--mode", default="lora")
  p.add_argument("--modes", default="lora,full")
  p.add_argument("--rows", type=int, default=16)
  p.add_argument("--layers", type=int, default=4, help="decoder layers (24 in Qwen2.5-0.5B)")
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--bucket", type=int, default=64, help="ours: pad batches to a multiple of this")
  p.add_argument("--packing", action="store_true", help="ours: pack rows (fewer, fuller steps)")
  p.add_argument(
    "--remat", default="none", help="none | full | dots (theirs: full = checkpointing)"
  )
  p.add_argument(
    "--torch_compile", action="store_true", help="theirs: TrainingArguments.torch_compile"
  )
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--ckpt_dir", default=None)
  p.add_argument("--rows_file", default=None)
  p.add_argument("--out", default="benchmarks/results/train_epoch.json")
  a = p.parse_args()
  if a.worker:
    return jax_worker(a) if a.side == "jax" else torch_worker(a)

  from lora_jax.config import ModelConfig

  before = common.machine()
  a.ckpt_dir = common.layers_checkpoint(a.ckpt_dir, a.layers)
  a.rows_file = a.rows_file or os.path.join(tempfile.gettempdir(), "lora_jax_bench_star1.json")
  rows_info = prepare_rows(a.rows, a.seed, a.rows_file)
  cfg = ModelConfig.from_file(os.path.join(a.ckpt_dir, "config.json"))
  mean_len = rows_info["tokens"] // rows_info["rows"]
  peak = common.matmul_peak(common.model_matmul_shapes(cfg, BATCH * mean_len))
  print(
    f"{a.rows} STAR-1 rows, {rows_info['tokens']} tokens ({min(rows_info['lengths'])}.."
    f"{max(rows_info['lengths'])} per row); matmul peak {peak['best'] / 1e9:.0f} GFLOP/s "
    f"({peak['best_library']})",
    flush=True,
  )
  results = {}
  for mode in a.modes.split(","):
    results[mode] = compare(a, mode, rows_info, peak["best"], cfg)
  report(a, results, rows_info, peak)
  common.write_json(
    a.out,
    dict(
      benchmark="train_epoch",
      settings={k: v for k, v in vars(a).items() if k not in ("worker", "side", "mode")},
      model=dict(common.QWEN25_05B, num_layers=a.layers),
      data=rows_info,
      matmul_peak=peak,
      results=results,
    ),
    before,
  )


def report(a, results: dict, rows_info: dict, peak: dict) -> None:
  rows = []
  for mode, r in results.items():
    w = r["wall_s"]
    rows.append(
      [
        mode,
        common.fmt(w["lora_jax"]),
        common.fmt(w["transformers"]),
        f"{r['ratio_of_medians']:.2f}x",
        f">= {TARGET}x {r['verdict']}",
        f"{r['ours_setup']['compile_s']:.1f}",
        f"{100 * r['ours_padding_fraction']:.0f}% / {100 * r['theirs_padding_fraction']:.0f}%",
        f"{100 * r['mfu']['lora_jax']:.0f}% / {100 * r['mfu']['transformers']:.0f}%",
        f"{common.fmt(r['cpu_s']['lora_jax'], 1)} / {common.fmt(r['cpu_s']['transformers'], 1)}",
      ]
    )
  common.print_table(
    f"epoch of {a.rows} STAR-1 rows ({rows_info['tokens']} tokens), batch 2, "
    f"Qwen2.5-0.5B shape with {a.layers} layers, float32; wall s median (min-max) of "
    f"{a.repeats} alternating repeats; theirs: Trainer + PEFT, "
    f"{results[next(iter(results))]['theirs_setup']['optim']}",
    [
      "mode", "lora_jax s", "transformers s", "speed-up", "target", "our compile s",
      "padding ours/theirs", "MFU ours/theirs", "CPU s ours / theirs",
    ],
    rows,
  )  # fmt: skip
  print(f"matmul peak: {json.dumps({k: v for k, v in peak.items() if k != 'shapes'})}")


if __name__ == "__main__":
  main()
