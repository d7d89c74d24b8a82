"""Training throughput, MFU and peak memory: lora_jax vs transformers + PEFT (torch, CPU).

Both train the same random Qwen2.5-0.5B-shaped float32 checkpoint (`--layers` decoder layers; 24
is the real model) on the same random batch (global batch 2, seq 512, loss on every token), with
the same optimizer (AdamW 0.9/0.999/1e-8, weight decay 1e-4, clip 1.0; torch's fused AdamW where
it works, else foreach): LoRA rank 8 (alpha 16, dropout 0.05) on all linear layers, and full
fine-tuning. Each side is a resident process (its own peak RSS); after one warm-up step
(compilation), `--repeats` rounds of `--steps` steps alternate between the two sides. MFU uses
model FLOPs (lora_jax.metrics_log) over the best float32 matmul rate of XLA, torch and numpy at
this model's shapes, measured in this run.
Targets: LoRA tokens/s >= 1.0x theirs and >= 1.3x our own full fine-tuning; full fine-tuning
peak RSS <= 1.0x theirs.

  python benchmarks/train.py [--steps 2] [--repeats 5] [--layers 24] [--out ...]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.environ.get("BENCH_LIB", os.path.dirname(HERE)))
import common  # noqa: E402  (pins thread counts before numpy/jax/torch load)

LR, B1, B2, EPS, WD, CLIP, RANK, ALPHA, DROPOUT = 5e-5, 0.9, 0.999, 1e-8, 1e-4, 1.0, 8, 16, 0.05
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _batch(vocab: int, batch: int, seq: int):
  import numpy as np

  ids = np.random.default_rng(0).integers(0, vocab, (batch, seq), dtype=np.int32)
  return ids


def worker_jax(a) -> None:
  import jax
  import numpy as np

  import lora_jax
  from lora_jax import lora
  from lora_jax.optim import make_optimizer
  from lora_jax.run import own_buffers, split_trainable
  from lora_jax.run_config import TrainConfig
  from lora_jax.train import make_train_step

  cfg = TrainConfig(
    mode=a.mode, lr=LR, b1=B1, b2=B2, eps=EPS, weight_decay=WD, clip_norm=CLIP,
    schedule="constant", grad_accum=1, loss_chunk=a.loss_chunk,
  )  # fmt: skip
  state = {}

  def setup():
    model = lora_jax.load_pretrained(a.ckpt_dir, dtype="float32", remat=a.remat)
    if a.mode == "lora":
      lora.apply_lora(
        model, lora.LoRAConfig(rank=RANK, alpha=ALPHA, dropout=DROPOUT, targets=tuple(ALL_LINEAR))
      )
    graphdef, trainable, frozen = split_trainable(model, a.mode)
    del model
    trainable = own_buffers(trainable)  # as lora_jax.train does
    tx, schedule = make_optimizer(cfg, 10**6)
    opt_state = jax.jit(tx.init)(trainable)
    step = jax.jit(make_train_step(graphdef, tx, schedule, cfg), donate_argnums=(0, 1))
    ids = _batch(151936, a.batch, a.seq)
    data = {
      "input_ids": ids,
      "loss_mask": np.ones_like(ids),
      "attention_mask": np.ones_like(ids),
      "segment_ids": np.ones_like(ids),
      "positions": np.broadcast_to(np.arange(a.seq), ids.shape),
    }
    data = {k: jax.device_put(np.ascontiguousarray(v)) for k, v in data.items()}
    t = time.perf_counter()
    trainable, opt_state, m = step(trainable, opt_state, frozen, data, 0)
    jax.block_until_ready(m)
    state.update(step=step, trainable=trainable, opt_state=opt_state, frozen=frozen, data=data, i=1)
    return {"first_step_seconds": time.perf_counter() - t, "loss": float(m["loss"])}

  def run_once():
    s, losses = state, []
    for _ in range(a.steps):
      s["trainable"], s["opt_state"], m = s["step"](
        s["trainable"], s["opt_state"], s["frozen"], s["data"], s["i"]
      )
      s["i"] += 1
      losses.append(float(m["loss"]))
    return {"losses": losses}

  common.serve(setup, run_once)


def worker_torch(a) -> None:
  import torch
  import transformers

  common.torch_threads()
  state = {}

  def setup():
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_pretrained(a.ckpt_dir, dtype=torch.float32)
    if a.remat != "none":
      model.gradient_checkpointing_enable()
    if a.mode == "lora":
      from peft import LoraConfig, get_peft_model

      model = get_peft_model(
        model,
        LoraConfig(
          r=RANK, lora_alpha=ALPHA, lora_dropout=DROPOUT, target_modules=ALL_LINEAR,
          bias="none", task_type="CAUSAL_LM",
        ),
      )  # fmt: skip
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    ids = torch.tensor(_batch(151936, a.batch, a.seq), dtype=torch.long)
    state.update(model=model, params=params, ids=ids)
    tried = {}
    for name, kw in (("fused", {"fused": True}), ("foreach", {"foreach": True})):
      try:  # the fastest AdamW this torch has on CPU
        state["opt"] = torch.optim.AdamW(
          params, lr=LR, betas=(B1, B2), eps=EPS, weight_decay=WD, **kw
        )
        t = time.perf_counter()
        loss = one()
        tried[name] = time.perf_counter() - t
        break
      except (RuntimeError, TypeError) as e:
        tried[name] = f"{type(e).__name__}: {str(e)[:200]}"
    return {"first_step_seconds": tried[name], "adamw": name, "adamw_tried": tried, "loss": loss}

  def one():
    s = state
    loss = s["model"](input_ids=s["ids"], labels=s["ids"]).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(s["params"], CLIP)
    s["opt"].step()
    s["opt"].zero_grad(set_to_none=True)
    return loss.item()

  def run_once():
    return {"losses": [one() for _ in range(a.steps)]}

  common.serve(setup, run_once)


TARGETS = {
  "lora_vs_theirs": 1.0,  # tokens/s
  "lora_vs_our_full": 1.3,  # tokens/s
  "full_peak_rss_vs_theirs": 1.0,  # at most
}


def run_mode(a, mode: str) -> dict:
  args = ["--mode", mode, "--steps", str(a.steps), "--batch", str(a.batch), "--seq", str(a.seq)]
  args += ["--remat", a.remat, "--loss_chunk", str(a.loss_chunk), "--ckpt_dir", a.ckpt_dir]
  ours = common.Worker("lora_jax", __file__, "--side", "jax", *args)
  theirs = common.Worker("transformers", __file__, "--side", "torch", *args)
  runs = common.alternate([ours, theirs], a.repeats)
  rss = {"lora_jax": ours.close()["peak_rss"], "transformers": theirs.close()["peak_rss"]}
  tokens = a.batch * a.seq * a.steps
  out = {"setup": {"lora_jax": ours.setup, "transformers": theirs.setup}, "peak_rss": rss}
  for side, rs in runs.items():
    out[side] = dict(
      tokens_per_second=common.summary([tokens / r["wall_s"] for r in rs]),
      cpu_s=common.summary([r["cpu_s"] for r in rs]),
      losses=rs[-1]["losses"],
    )
  o, t = runs["lora_jax"], runs["transformers"]
  out["ratio_per_round"] = common.summary([y["wall_s"] / x["wall_s"] for x, y in zip(o, t)])
  return out


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--worker", action="store_true")
  p.add_argument("--side", choices=["jax", "torch"])
  p.add_argument("--mode", choices=["lora", "full"], default="lora")
  p.add_argument("--modes", default="lora,full")
  p.add_argument("--steps", type=int, default=2, help="steps per timed repeat")
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--batch", type=int, default=2)
  p.add_argument("--seq", type=int, default=512)
  p.add_argument("--layers", type=int, default=24, help="decoder layers (24 in Qwen2.5-0.5B)")
  p.add_argument("--remat", default="none", help="none | full (both frameworks)")
  p.add_argument(
    "--loss_chunk", type=int, default=0, help="lora_jax only: logits this many tokens at a time"
  )
  p.add_argument("--ckpt_dir", default=None)
  p.add_argument("--out", default="benchmarks/results/train.json")
  p.add_argument(
    "--from_partial",
    default=None,
    help="finish from the partial JSON an interrupted run left (its finished modes)",
  )
  a = p.parse_args()
  if a.worker:
    return worker_jax(a) if a.side == "jax" else worker_torch(a)

  from lora_jax.config import ModelConfig
  from lora_jax.metrics_log import flops_per_token

  before = common.machine()
  a.ckpt_dir = common.layers_checkpoint(a.ckpt_dir, a.layers)
  cfg = ModelConfig.from_file(os.path.join(a.ckpt_dir, "config.json"))
  peak = common.matmul_peak(common.model_matmul_shapes(cfg, a.batch * a.seq))
  results = {}
  if a.from_partial:
    with open(a.from_partial) as f:
      partial = json.load(f)
    results, before = partial["results"], dict(partial["machine"])
    before["load_average"] = before.get("load_average_before", before["load_average"])
    a.modes = ",".join(results)
  for m in a.modes.split(","):
    if m in results:
      continue
    results[m] = run_mode(a, m)
    common.write_json(
      os.path.join(tempfile.gettempdir(), f"bench_train.{os.getpid()}.partial.json"),
      {"settings": vars(a), "results": results},
      before,
    )
  peak_after = common.matmul_peak(common.model_matmul_shapes(cfg, a.batch * a.seq))
  if peak_after["best"] > peak["best"]:  # a shared machine: the best seen is the peak
    peak = peak_after
  rows = []
  for mode, r in results.items():
    fpt = flops_per_token(cfg, a.seq, mode == "full")
    for side in ("transformers", "lora_jax"):
      tps = r[side]["tokens_per_second"]
      r[side]["mfu"] = fpt * tps["median"] / peak["best"]
      rows.append(
        [
          mode,
          side + (f" ({r['setup'][side]['adamw']} AdamW)" if side == "transformers" else ""),
          common.fmt(tps, 1),
          f"{100 * r[side]['mfu']:.0f}%",
          f"{r['peak_rss'][side] / 2**30:.2f}",
          f"{r['setup'][side]['first_step_seconds']:.1f}",
          common.fmt(r[side]["cpu_s"], 1),
        ]
      )
  common.print_table(
    f"train: Qwen2.5-0.5B shape ({a.layers} layers), float32, batch {a.batch} x seq {a.seq}, "
    f"{a.repeats} alternating repeats of {a.steps} steps; matmul peak "
    f"{peak['best'] / 1e9:.0f} GFLOP/s ({peak['best_library']})",
    ["mode", "framework", "tokens/s median (min-max)", "MFU", "peak RSS GiB", "first step s",
     "CPU s per repeat"],
    rows,
  )  # fmt: skip
  med = lambda mode, side: results[mode][side]["tokens_per_second"]["median"]
  ratios = {}
  if "lora" in results:
    ratios["lora_vs_theirs"] = med("lora", "lora_jax") / med("lora", "transformers")
  if "full" in results:
    ratios["full_vs_theirs"] = med("full", "lora_jax") / med("full", "transformers")
    rss = results["full"]["peak_rss"]
    ratios["full_peak_rss_vs_theirs"] = rss["lora_jax"] / rss["transformers"]
  if "lora" in results and "full" in results:
    ratios["lora_vs_our_full"] = med("lora", "lora_jax") / med("full", "lora_jax")
  if "lora" in results:
    rss = results["lora"]["peak_rss"]
    ratios["lora_peak_rss_vs_theirs"] = rss["lora_jax"] / rss["transformers"]
  verdicts = {}
  for k, v in ratios.items():
    if k in TARGETS:
      at_most = k.endswith("rss_vs_theirs")
      verdicts[k] = common.verdict(v, TARGETS[k], higher_is_better=not at_most)
    print(f"  {k}: {v:.2f}" + (f" (target {TARGETS[k]}: {verdicts[k]})" if k in TARGETS else ""))
  common.write_json(
    a.out,
    {
      "benchmark": "train",
      "settings": {k: v for k, v in vars(a).items() if k not in ("worker", "side", "mode")},
      "model": dict(common.QWEN25_05B, num_layers=a.layers),
      "matmul_peak": peak,
      "results": results,
      "ratios": ratios,
      "targets": TARGETS,
      "verdicts": verdicts,
    },
    before,
  )


if __name__ == "__main__":
  main()
