"""Weight-space analysis speed: every module of a Qwen2.5-0.5B-shaped pair of checkpoints.

Builds (once, under --dir) a random Qwen2.5-0.5B-shaped float32 base (benchmarks/common.py), a
"full fine-tuning" checkpoint whose every linear kernel is W0 + a dense update with a decaying
spectrum (a rank-64 part plus full-rank noise), and a LoRA r8 checkpoint on every linear module
(random A and B). Then, each in a fresh process: the analysis of the full run, of the LoRA run, and
of both in one call (W0's spectra shared), all 24 layers x 7 modules at the default k (1, 4, 16,
64: k_proj is 128 x 896). Target: the pair in under 60 s on 2 cores. The peer is what one would
write by hand: torch's exact SVD of W0 and of dW per matrix, timed on --peer_layers layers and
scaled to 24.

  python benchmarks/analyze.py [--dir DIR] [--peer_layers 1] [--out benchmarks/results/analyze.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout
from common import (  # noqa: E402
  QWEN25_05B,
  peak_rss_bytes,
  print_table,
  run_worker,
  write_checkpoint_if_missing,
  write_json,
)

RANK = 8


def build_runs(root: str) -> dict[str, str]:
  base = write_checkpoint_if_missing(os.path.join(root, "base"))
  runs = {"full": os.path.join(root, "full"), "lora": os.path.join(root, "lora_r8")}
  for kind, workdir in runs.items():
    if not os.path.exists(os.path.join(workdir, "checkpoints", "1")):
      _write_run(base, workdir, kind)
  return {"base": base, **runs}


def _write_run(base: str, workdir: str, kind: str) -> None:
  """A training workdir (config.json + one Orbax checkpoint) holding only what the analysis reads:
  the linear kernels (full) or the adapters (LoRA)."""
  import importlib

  from lora_jax import checkpoint as ckpt_lib
  from lora_jax.analysis.weights import ModelTensors
  from lora_jax.model import LINEARS
  from lora_jax.run_config import from_dict

  tensors = ModelTensors(base)
  rng = np.random.default_rng(1)
  params = {}
  for module in LINEARS:
    m, n = tensors.shape(module)
    L = tensors.config.num_layers
    if kind == "lora":
      a = rng.uniform(-(n**-0.5), n**-0.5, (L, n, RANK)).astype(np.float32)
      params[module] = {"lora_a": a, "lora_b": 1e-3 * rng.standard_normal((L, RANK, m), np.float32)}
      continue
    stacked = np.empty((L, m, n), np.float32)
    for layer in range(L):
      signal = rng.standard_normal((m, 64), np.float32) @ (
        rng.standard_normal((64, n), np.float32) / np.arange(1, 65, dtype=np.float32)[:, None]
      )
      noise = rng.standard_normal((m, n), np.float32)
      stacked[layer] = tensors.kernel(module, layer) + 1e-4 * signal + 1e-5 * noise
    params[module] = {"kernel": stacked}
  config = importlib.import_module("configs.base").get_config()
  config.model.source = base
  config.train.mode = kind
  config.lora.rank, config.lora.alpha, config.lora.targets = RANK, 16.0, "qkvo_mlp"
  cfg = from_dict(config)
  meta = {"step": 1, "fingerprint": ckpt_lib.model_fingerprint(tensors.config, kind, cfg.adapter)}
  ckpt_lib.write_config(workdir, cfg.to_dict())
  checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
  checkpointer.save(1, {"layers": params}, {"count": np.zeros((), np.int32)}, meta)
  checkpointer.close()


def worker(which: str, root: str) -> None:
  runs = build_runs(root)
  if which == "peer":
    print(json.dumps(_peer(runs, int(os.environ.get("PEER_LAYERS", "1")))))
    return
  import jax

  from lora_jax.analysis import analyze_runs

  jax.devices()  # backend start-up is not analysis time
  chosen = {"pair": ["full", "lora"], "full": ["full"], "lora": ["lora"]}[which]
  t = time.perf_counter()
  records = analyze_runs(runs["base"], {n: runs[n] for n in chosen}, progress=False)
  seconds = time.perf_counter() - t
  count = sum(map(len, records.values()))
  stable = [r["stable_rank"] for r in records.get("full", [])]
  print(
    json.dumps(
      {
        "seconds": seconds,
        "matrices": count,
        "peak_rss": peak_rss_bytes(),
        "full_stable_rank_median": float(np.median(stable)) if stable else None,
      }
    )
  )


def _peer(runs: dict, layers: int) -> dict:
  """torch: exact SVD of W0 (top-k vectors) and singular values of dW, per matrix."""
  import torch

  from lora_jax import checkpoint as ckpt_lib
  from lora_jax.analysis.weights import ModelTensors
  from lora_jax.model import LINEARS

  torch.set_num_threads(os.cpu_count() or 1)
  base = ModelTensors(runs["base"])
  ckpt = ckpt_lib.Checkpointer(os.path.join(runs["full"], "checkpoints"), async_save=False)
  t = time.perf_counter()
  for module in LINEARS:
    stacked = ckpt.read_params(1, [("layers", module, "kernel")])[("layers", module, "kernel")]
    for layer in range(layers):
      w0 = torch.from_numpy(base.kernel(module, layer))
      u, s, vh = torch.linalg.svd(w0, full_matrices=False)
      dw = torch.from_numpy(stacked[layer]) - w0
      sig = torch.linalg.svdvals(dw)
      for k in (1, 4, 16, 64):
        (u[:, :k].T @ dw).square().sum() / dw.square().sum()
      del sig
  seconds = (time.perf_counter() - t) * QWEN25_05B["num_layers"] / layers
  ckpt.close()
  return {"seconds": seconds, "layers_timed": layers}


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--worker", choices=["pair", "full", "lora", "peer"])
  p.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "lora_jax_bench_analyze"))
  p.add_argument("--peer_layers", type=int, default=1)
  p.add_argument("--out", default="benchmarks/results/analyze.json")
  a = p.parse_args()
  if a.worker:
    worker(a.worker, a.dir)
    return
  t = time.perf_counter()
  build_runs(a.dir)
  print(f"checkpoints ready in {time.perf_counter() - t:.0f}s under {a.dir}")
  os.environ["PEER_LAYERS"] = str(a.peer_layers)
  results = {
    w: run_worker(__file__, "--worker", w, "--dir", a.dir) for w in ("pair", "full", "lora")
  }
  results["peer_full"] = run_worker(__file__, "--worker", "peer", "--dir", a.dir)
  rows = [
    [w, f"{r['seconds']:.1f}", r.get("matrices", "-"), f"{r.get('peak_rss', 0) / 2**30:.2f}"]
    for w, r in results.items()
  ]
  print_table(
    "analysis of a Qwen2.5-0.5B-shaped run (24 layers x 7 modules)",
    ["what", "s", "matrices", "peak RSS GiB"],
    rows,
  )
  ratio = results["peer_full"]["seconds"] / results["full"]["seconds"]
  print(
    f"\npair: {results['pair']['seconds']:.1f} s (target < 60 s); full: {ratio:.1f}x faster than per-matrix torch SVD"
  )
  write_json(a.out, {"results": results, "peer_over_lora_jax_full": ratio, "target_seconds": 60})


if __name__ == "__main__":
  main()
