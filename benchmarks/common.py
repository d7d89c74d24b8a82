"""Shared benchmark helpers: the Qwen2.5-0.5B shape, random HF checkpoints, tables, JSON."""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys

import numpy as np

# Qwen2.5-0.5B: 24 layers, hidden 896, 14 heads, 2 KV heads, FFN 4864, vocab 151936, tied head.
QWEN25_05B = dict(
  family="qwen2",
  vocab_size=151936,
  hidden_size=896,
  intermediate_size=4864,
  num_layers=24,
  num_heads=14,
  num_kv_heads=2,
  head_dim=64,
  rope_theta=1e6,
  rms_norm_eps=1e-6,
  tie_word_embeddings=True,
  qkv_bias=True,
  max_position_embeddings=32768,
  eos_token_id=151643,
  bos_token_id=151643,
)


def write_checkpoint_if_missing(path: str, dtype=np.float32, seed: int = 0, **overrides) -> str:
  """A random HF checkpoint (config.json + sharded safetensors) of the Qwen2.5-0.5B shape."""
  from safetensors.numpy import save_file

  from lora_jax.config import ModelConfig
  from lora_jax.io.mapping import entries

  cfg = ModelConfig(**{**QWEN25_05B, **overrides})
  if os.path.exists(os.path.join(path, "config.json")):
    return path
  os.makedirs(path, exist_ok=True)
  rng = np.random.default_rng(seed)
  tensors, shard, weight_map = {}, 0, {}

  def flush():
    nonlocal tensors, shard
    if tensors:
      shard += 1
      name = f"model-{shard:05d}.safetensors"
      save_file(tensors, os.path.join(path, name), metadata={"format": "pt"})
      weight_map.update({k: name for k in tensors})
      tensors = {}

  shapes = {
    "embed": (cfg.vocab_size, cfg.hidden_size),
    "final_norm": (cfg.hidden_size,),
    "lm_head": (cfg.vocab_size, cfg.hidden_size),
  }
  per_layer = {
    "attn_norm": (cfg.hidden_size,),
    "mlp_norm": (cfg.hidden_size,),
    "q_proj.kernel": (cfg.q_dim, cfg.hidden_size),
    "q_proj.bias": (cfg.q_dim,),
    "k_proj.kernel": (cfg.kv_dim, cfg.hidden_size),
    "k_proj.bias": (cfg.kv_dim,),
    "v_proj.kernel": (cfg.kv_dim, cfg.hidden_size),
    "v_proj.bias": (cfg.kv_dim,),
    "o_proj.kernel": (cfg.hidden_size, cfg.q_dim),
    "gate_proj.kernel": (cfg.intermediate_size, cfg.hidden_size),
    "up_proj.kernel": (cfg.intermediate_size, cfg.hidden_size),
    "down_proj.kernel": (cfg.hidden_size, cfg.intermediate_size),
  }
  size = 0
  for e in entries(cfg):
    names = (
      [(e.hf.format(i=i), per_layer[e.path[len("layers.") :]]) for i in range(cfg.num_layers)]
      if e.stacked
      else [(e.hf, shapes[e.path])]
    )
    for name, shape in names:
      t = (
        rng.standard_normal(shape, np.float32) * 0.02
        if len(shape) == 2
        else 1.0 + 0.1 * rng.standard_normal(shape, np.float32)
      ).astype(dtype)
      tensors[name] = t
      size += t.nbytes
      if size > 1 << 30:
        flush()
        size = 0
  flush()
  with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
    json.dump({"metadata": {}, "weight_map": weight_map}, f)
  hf_cfg = cfg.to_hf("float32" if dtype == np.float32 else "bfloat16")
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(hf_cfg, f, indent=2)
  return path


def checkpoint_bytes(path: str) -> int:
  return sum(
    os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.endswith(".safetensors")
  )


def peak_rss_bytes() -> int:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_worker(script: str, *args: str) -> dict:
  """Run `script --worker ...` in a fresh process (clean RSS) and parse its last JSON line."""
  out = subprocess.run([sys.executable, script, *args], check=True, capture_output=True, text=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


def print_table(title: str, header: list[str], rows: list[list]) -> None:
  widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
  print(f"\n{title}")
  print("| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |")
  print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
  for r in rows:
    print("| " + " | ".join(str(x).ljust(w) for x, w in zip(r, widths)) + " |")


def write_json(path: str | None, payload: dict) -> None:
  if not path:
    return
  payload = {"machine": {"python": platform.python_version(), "cpus": os.cpu_count()}, **payload}
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    json.dump(payload, f, indent=2)
  print(f"wrote {path}")
