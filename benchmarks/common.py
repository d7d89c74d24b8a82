"""Shared benchmark helpers: the Qwen2.5-0.5B shape, random HF checkpoints, pinned threads, the
measured matmul peak, alternating repeats in resident worker processes, tables and JSON.

Importing this module pins the thread count of every numerical library (numpy's BLAS, torch,
XLA) to `BENCH_THREADS` (default: the CPUs this process may use), before any of them is loaded;
worker processes inherit it through the environment, so both sides of a comparison use the same
count, and `machine()` records it.
"""

from __future__ import annotations

import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time

THREADS = int(os.environ.get("BENCH_THREADS") or len(os.sched_getaffinity(0)))
os.environ["BENCH_THREADS"] = str(THREADS)
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
  os.environ[_var] = str(THREADS)
# XLA's CPU client sizes its Eigen pool from this flag (default: all cores).
if "intra_op_parallelism_threads" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + f" --xla_cpu_multi_thread_eigen=true intra_op_parallelism_threads={THREADS}"
  ).strip()

import numpy as np  # noqa: E402

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


def layers_checkpoint(ckpt_dir: str | None, layers: int) -> str:
  """`ckpt_dir`, or a temp dir named by the layer count, holding a Qwen2.5-0.5B-shaped random
  checkpoint cut to `layers` decoder layers (written once, shared by the benchmarks)."""
  path = ckpt_dir or os.path.join(tempfile.gettempdir(), f"lora_jax_bench_qwen05b_{layers}l")
  return write_checkpoint_if_missing(path, num_layers=layers)


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


def torch_threads() -> int:
  """Pin torch to THREADS (intra-op) and one inter-op thread, as XLA runs one op at a time."""
  import torch

  torch.set_num_threads(THREADS)
  try:
    torch.set_num_interop_threads(1)
  except RuntimeError:  # already set in this process
    pass
  return torch.get_num_threads()


def cpu_seconds() -> float:
  """CPU seconds of this process, all threads (user + system)."""
  t = os.times()
  return t.user + t.system


_TAG = "@@bench "


def _answer(payload: dict) -> None:
  print(_TAG + json.dumps(payload), flush=True)


class Worker:
  """A resident worker process: `script --worker ...` sets up (load, compile), prints one JSON
  line, then runs one repeat per "run" line on its stdin and prints one JSON line per repeat.
  Keeping both sides resident lets repeats alternate without re-loading or re-compiling."""

  def __init__(self, name: str, script: str, *args: str, env: dict | None = None):
    self.name = name
    self.proc = subprocess.Popen(
      [sys.executable, script, "--worker", *args],
      stdin=subprocess.PIPE,
      stdout=subprocess.PIPE,
      text=True,
      bufsize=1,
      env={**os.environ, **(env or {})},
    )
    self.setup = self._read()

  def _read(self) -> dict:
    for line in self.proc.stdout:
      if line.startswith(_TAG):  # libraries print their own lines (Trainer prints dicts)
        return json.loads(line[len(_TAG) :])
    raise RuntimeError(f"worker {self.name} exited with {self.proc.wait()} before answering")

  def run(self, **kw) -> dict:
    self.proc.stdin.write(json.dumps({"cmd": "run", **kw}) + "\n")
    return self._read()

  def close(self) -> dict:
    self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
    out = self._read()
    self.proc.stdin.close()
    self.proc.wait()
    return out


def serve(setup, run_once) -> None:
  """The worker side of `Worker`: `setup()` -> dict, then `run_once(**kw)` -> dict per request.
  Each run reports wall and CPU seconds measured around the same call; quit reports peak RSS."""
  _answer({"threads": THREADS, **(setup() or {})})
  for line in sys.stdin:
    msg = json.loads(line)
    if msg.pop("cmd") == "quit":
      _answer({"peak_rss": peak_rss_bytes()})
      return
    c, t = cpu_seconds(), time.perf_counter()
    out = run_once(**msg) or {}
    out.update(wall_s=time.perf_counter() - t, cpu_s=cpu_seconds() - c)
    _answer(out)


def alternate(workers: list[Worker], repeats: int, **kw) -> dict[str, list[dict]]:
  """`repeats` rounds of one run per worker, the order reversed every other round (A B, B A,
  ...) so slow drifts of a shared machine hit both sides alike."""
  runs = {w.name: [] for w in workers}
  for r in range(repeats):
    for w in workers if r % 2 == 0 else workers[::-1]:
      runs[w.name].append(w.run(**kw))
      last = runs[w.name][-1]
      print(
        f"  repeat {r + 1}/{repeats} {w.name}: {last['wall_s']:.2f} s wall, "
        f"{last['cpu_s']:.2f} s CPU",
        flush=True,
      )
  return runs


_REPEAT = re.compile(r"^  repeat (\d+)/(\d+) (\S+): ([\d.]+) s wall, ([\d.]+) s CPU$")


def runs_from_log(path: str) -> list[tuple[str, dict[str, list[dict]]]]:
  """The repeats an interrupted run printed (`alternate`'s lines), per case: [(the case's set-up
  line, {side: [{"wall_s", "cpu_s"}, ...]})]. Only rounds both sides finished are kept."""
  cases: list[tuple[str, dict[str, list[dict]]]] = []
  with open(path) as f:
    for line in f:
      m = _REPEAT.match(line.rstrip("\n"))
      if "set up" in line and not m:
        cases.append((line.strip(), {}))
      elif m and cases:
        side = cases[-1][1].setdefault(m[3], [])
        side.append({"wall_s": float(m[4]), "cpu_s": float(m[5])})
  out = []
  for head, runs in cases:
    n = min((len(v) for v in runs.values()), default=0)
    if n:
      out.append((head, {k: v[:n] for k, v in runs.items()}))
  return out


def summary(values: list[float]) -> dict:
  """Median, min, max and spread ((max - min) / median) of repeated measurements."""
  med = statistics.median(values)
  return dict(
    median=med,
    min=min(values),
    max=max(values),
    spread=(max(values) - min(values)) / med if med else 0.0,
    n=len(values),
    values=values,
  )


def fmt(s: dict, digits: int = 2) -> str:
  return f"{s['median']:.{digits}f} ({s['min']:.{digits}f}-{s['max']:.{digits}f})"


def verdict(value: float, target: float, higher_is_better: bool = True) -> str:
  ok = value >= target if higher_is_better else value <= target
  return "met" if ok else "MISSED"


def matmul_peak(shapes: list[tuple[int, int, int]], repeats: int = 5) -> dict:
  """float32 FLOP/s of XLA, torch and numpy on the benchmark's own [m, k] @ [k, n] shapes (all
  shapes in turn, best of `repeats`), and the best of the three: the peak MFU is quoted
  against, so no library's own kernel flatters it."""
  import jax
  import jax.numpy as jnp
  import torch

  torch_threads()
  rng = np.random.default_rng(0)
  pairs = [
    (rng.standard_normal((m, k), np.float32), rng.standard_normal((k, n), np.float32))
    for m, k, n in shapes
  ]
  flops = sum(2 * m * k * n for m, k, n in shapes)
  jpairs = [(jnp.asarray(a), jnp.asarray(b)) for a, b in pairs]
  tpairs = [(torch.from_numpy(a), torch.from_numpy(b)) for a, b in pairs]
  jmm = jax.jit(jnp.matmul)
  libs = {
    "xla": lambda: [jmm(a, b).block_until_ready() for a, b in jpairs],
    "torch": lambda: [torch.mm(a, b) for a, b in tpairs],
    "numpy": lambda: [a @ b for a, b in pairs],
  }
  out, per_cpu = {}, {}
  for name, f in libs.items():
    f()
    best, c = float("inf"), cpu_seconds()
    for _ in range(repeats):
      t = time.perf_counter()
      f()
      best = min(best, time.perf_counter() - t)
    out[name] = flops / best
    # FLOPs per CPU second: what time slicing by other processes does not change.
    per_cpu[name] = repeats * flops / max(cpu_seconds() - c, 1e-9)
  out["best"] = max(out.values())
  out["best_library"] = max(libs, key=out.get)
  out["per_cpu_second"] = per_cpu
  out["shapes"] = [list(s) for s in shapes]
  return out


def model_matmul_shapes(cfg, tokens: int) -> list[tuple[int, int, int]]:
  """The forward matmuls of one decoder layer and the LM head for `tokens` rows."""
  d, f = cfg.hidden_size, cfg.intermediate_size
  return [
    (tokens, d, cfg.q_dim),
    (tokens, d, cfg.kv_dim),
    (tokens, cfg.q_dim, d),
    (tokens, d, f),
    (tokens, f, d),
    (tokens, d, min(cfg.vocab_size, 32768)),  # a slice of the head: 152k columns is 0.6 GB
  ]


def _cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor()


def _version(module: str) -> str | None:
  from importlib import metadata

  try:
    return metadata.version(module)
  except metadata.PackageNotFoundError:
    return None


def _git_commit() -> str | None:
  here = os.path.dirname(os.path.abspath(__file__))
  try:
    out = subprocess.run(
      ["git", "-C", here, "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    )
    return out.stdout.strip() or None
  except OSError:
    return None


def machine() -> dict:
  """What the numbers were measured on: CPU, cores, threads, versions, load, commit."""
  return dict(
    cpu_model=_cpu_model(),
    cores=os.cpu_count(),
    usable_cores=len(os.sched_getaffinity(0)),
    threads=THREADS,
    memory_gib=round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
    python=platform.python_version(),
    platform=platform.platform(),
    versions={
      m: _version(m)
      for m in ("jax", "jaxlib", "flax", "optax", "numpy", "torch", "transformers", "peft", "trl")
    },
    load_average=os.getloadavg(),
    commit=_git_commit(),
    time_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
  )


def print_table(title: str, header: list[str], rows: list[list]) -> None:
  widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
  print(f"\n{title}")
  print("| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |")
  print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
  for r in rows:
    print("| " + " | ".join(str(x).ljust(w) for x, w in zip(r, widths)) + " |")


def write_json(path: str | None, payload: dict, machine_before: dict | None = None) -> None:
  """The payload with the machine's description (load average before and after the run)."""
  if not path:
    return
  after = machine()
  if machine_before:
    after["load_average_before"] = machine_before["load_average"]
  payload = {"machine": after, **payload}
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    json.dump(payload, f, indent=2)
  print(f"wrote {path}")


def main() -> None:
  """`python benchmarks/common.py --tokens 534 --layers 1`: the matmul peak alone, per wall and
  per CPU second (the latter is what a shared machine does not move), as JSON."""
  import argparse

  from lora_jax.config import ModelConfig

  p = argparse.ArgumentParser()
  p.add_argument("--tokens", type=int, default=1024)
  p.add_argument("--layers", type=int, default=24)
  p.add_argument("--out", default="benchmarks/results/matmul_peak.json")
  a = p.parse_args()
  before = machine()
  cfg = ModelConfig(**dict(QWEN25_05B, num_layers=a.layers))
  peak = matmul_peak(model_matmul_shapes(cfg, a.tokens))
  print(json.dumps({k: v for k, v in peak.items() if k != "shapes"}, indent=1))
  write_json(a.out, {"benchmark": "matmul_peak", "tokens": a.tokens, "peak": peak}, before)


if __name__ == "__main__":
  main()
