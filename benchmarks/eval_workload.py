"""An evaluation's sampling as a user runs it: lora_jax's continuous batching vs `generate`.

The workload is shaped like the eval's: real prompts (AIME 2024 problems in the DeepSeek-R1
format, tokenised with the R1 tokenizer from `../shared/tokenizers/`), several seeds per prompt,
temperature 0.6, top_p 0.95, and answers of mixed length. A random model never says EOS, so each
answer's length is drawn up front (log-uniform over `--min_len..--max_len`: many short answers, a
few long ones, as reasoning traces are) and both sides stop that answer there: ours through the
request's max_new_tokens, theirs through a per-row stopping criterion (as EOS would: the row
stops, its batch runs on until its longest row ends).

  ours:   lora_jax.sampling.Engine, every request in one stream, 8 cache rows, refilled as
          answers finish (continuous batching);
  theirs: transformers `generate` on static batches of 8 requests in order (a prompt's seeds
          together), left-padded, with the fastest cache setting that works on this CPU
          (static cache; torch.compile of the forward with --try_compile), chosen on a warm-up.

Both sides hold the same random Qwen2.5-0.5B-shaped float32 checkpoint (`--layers` decoder
layers), stay resident in their own process, and alternate `--repeats` times after a warm-up.
Target: theirs / ours wall time >= 3.5.

  python benchmarks/eval_workload.py [--prompts 6] [--seeds 4] [--layers 4] [--repeats 5]
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
import numpy as np  # noqa: E402

SHARED = os.path.join(os.path.dirname(HERE), "..", "shared")
TOKENIZER = os.path.join(SHARED, "tokenizers", "deepseek-r1-distill-qwen")
TEMPERATURE, TOP_P, BATCH, TARGET = 0.6, 0.95, 8, 3.5


def make_requests(a) -> list[dict]:
  """prompt ids, seed and answer length of each request, prompt-major (a prompt's seeds
  together), the lengths from one seeded draw."""
  import transformers

  tok = transformers.AutoTokenizer.from_pretrained(TOKENIZER)
  with open(os.path.join(SHARED, "data", "aime24", "test.jsonl")) as f:
    problems = [json.loads(line)["problem"] for line in f][: a.prompts]
  rng = np.random.default_rng(a.seed)
  lo, hi = np.log(a.min_len), np.log(a.max_len + 1)
  out = []
  for i, problem in enumerate(problems):
    text = "<｜User｜>" + problem + "\nPlease reason step by step.<｜Assistant｜><think>\n"
    ids = tok(text)["input_ids"]
    for s in range(a.seeds):
      out.append(dict(prompt=ids, index=i, sample=s, length=int(np.exp(rng.uniform(lo, hi)))))
  return out


def _load_requests(path: str) -> list[dict]:
  with open(path) as f:
    return json.load(f)


# ---- ours ---------------------------------------------------------------------------------------
def jax_worker(a) -> None:
  import lora_jax
  from lora_jax.sampling import Engine, Request

  reqs = _load_requests(a.requests_file)
  max_len = max(len(r["prompt"]) for r in reqs) + max(r["length"] for r in reqs)
  state = {}

  def requests():
    return [
      Request(
        r["prompt"],
        r["length"],
        index=r["index"],
        sample=r["sample"],
        temperature=TEMPERATURE,
        top_p=TOP_P,
        seed=0,
      )
      for r in reqs
    ]

  def setup():
    t = time.perf_counter()
    model = lora_jax.load_pretrained(a.ckpt_dir, dtype="float32")
    state["engine"] = Engine(model, max_len=max_len, max_batch=BATCH, stop_token_ids=())
    load_s = time.perf_counter() - t
    t = time.perf_counter()
    warm = run_once()  # compiles prefill/insert/decode for the shapes this workload meets
    return dict(load_s=load_s, first_run_s=time.perf_counter() - t, warmup=warm)

  def run_once():
    out = list(state["engine"].run(requests()))
    lengths = {(c.index, c.sample): c.num_tokens for c in out}
    ok = all(lengths[(r["index"], r["sample"])] == r["length"] for r in reqs)
    return dict(tokens=sum(lengths.values()), lengths_ok=ok)

  common.serve(setup, run_once)


# ---- theirs -------------------------------------------------------------------------------------
def torch_worker(a) -> None:
  import torch
  import transformers

  common.torch_threads()
  reqs = _load_requests(a.requests_file)
  max_new = max(r["length"] for r in reqs)
  state = {}

  class Budget(transformers.StoppingCriteria):
    """Row i stops after its own answer length, as if it had said EOS there."""

    def __init__(self, prompt_len: int, lengths: list[int]):
      self.prompt_len, self.lengths = prompt_len, torch.tensor(lengths)

    def __call__(self, input_ids, scores, **kwargs):
      return (input_ids.shape[1] - self.prompt_len) >= self.lengths

  def batches():
    for i in range(0, len(reqs), BATCH):
      group = reqs[i : i + BATCH]
      width = max(len(r["prompt"]) for r in group)
      ids = torch.full((len(group), width), 0, dtype=torch.long)
      mask = torch.zeros_like(ids)
      for b, r in enumerate(group):  # left padding, as decoder-only generation needs
        ids[b, width - len(r["prompt"]) :] = torch.tensor(r["prompt"])
        mask[b, width - len(r["prompt"]) :] = 1
      yield ids, mask, [r["length"] for r in group]

  def generate_all(setting: str, only_first: bool = False) -> int:
    model, tokens = state["model"], 0
    for ids, mask, lengths in batches():
      kwargs = {}
      if setting.startswith("static"):
        kwargs["cache_implementation"] = "static"
      if setting == "static+compile":
        cc = transformers.CompileConfig(fullgraph=False)
        cc._compile_all_devices = True
        kwargs["compile_config"] = cc
      with torch.inference_mode():
        out = model.generate(
          ids,
          attention_mask=mask,
          do_sample=True,
          temperature=TEMPERATURE,
          top_p=TOP_P,
          top_k=0,
          max_new_tokens=max_new,
          stopping_criteria=transformers.StoppingCriteriaList([Budget(ids.shape[1], lengths)]),
          pad_token_id=0,
          eos_token_id=None,
          **kwargs,
        )
      tokens += sum(min(n, out.shape[1] - ids.shape[1]) for n in lengths)
      if only_first:
        break
    return tokens

  def setup():
    t = time.perf_counter()
    torch.manual_seed(0)
    state["model"] = transformers.AutoModelForCausalLM.from_pretrained(
      a.ckpt_dir, dtype=torch.float32, attn_implementation="sdpa"
    ).eval()
    load_s = time.perf_counter() - t
    tried = {}
    settings = ["dynamic", "static"] + (["static+compile"] if a.try_compile else [])
    for setting in settings:  # the first batch twice: warm-up (and compile), then timed
      try:
        generate_all(setting, only_first=True)
        t = time.perf_counter()
        generate_all(setting, only_first=True)
        tried[setting] = time.perf_counter() - t
      except Exception as e:  # noqa: BLE001  (a setting that does not work here is reported)
        tried[setting] = f"{type(e).__name__}: {str(e)[:200]}"
    timed = {k: v for k, v in tried.items() if isinstance(v, float)}
    state["setting"] = min(timed, key=timed.get)
    return dict(load_s=load_s, settings_tried=tried, setting=state["setting"])

  def run_once():
    return dict(tokens=generate_all(state["setting"]))

  common.serve(setup, run_once)


# ---- the comparison -----------------------------------------------------------------------------
def _from_log(path: str):
  """(runs, our set-up, their set-up) from the log of a run that was stopped before it wrote
  its JSON: the rounds both sides finished."""
  import ast

  ((head, runs),) = common.runs_from_log(path)
  with open(path) as f:
    text = f.read()
  ours = ast.literal_eval(text.split("set up: ours ", 1)[1].split("\n", 1)[0])
  theirs = ast.literal_eval(text.split("\ntheirs ", 1)[1].split("\n", 1)[0])
  return runs, ours, theirs


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--worker", action="store_true")
  p.add_argument("--side", choices=["jax", "torch"])
  p.add_argument("--prompts", type=int, default=6)
  p.add_argument("--seeds", type=int, default=4)
  p.add_argument("--min_len", type=int, default=16)
  p.add_argument("--max_len", type=int, default=384)
  p.add_argument("--layers", type=int, default=4, help="decoder layers (24 in Qwen2.5-0.5B)")
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--try_compile", action="store_true", help="theirs: also try torch.compile")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--ckpt_dir", default=None)
  p.add_argument("--requests_file", default=None)
  p.add_argument("--out", default="benchmarks/results/eval_workload.json")
  p.add_argument("--from_log", default=None, help="the rounds an interrupted run's log shows")
  a = p.parse_args()
  if a.worker:
    return jax_worker(a) if a.side == "jax" else torch_worker(a)

  before = common.machine()
  a.ckpt_dir = common.layers_checkpoint(a.ckpt_dir, a.layers)
  reqs = make_requests(a)
  a.requests_file = a.requests_file or os.path.join(tempfile.gettempdir(), "bench_eval_reqs.json")
  with open(a.requests_file, "w") as f:
    json.dump(reqs, f)
  lengths = [r["length"] for r in reqs]
  static_steps = sum(max(lengths[i : i + BATCH]) for i in range(0, len(lengths), BATCH))
  print(
    f"{len(reqs)} requests ({a.prompts} prompts x {a.seeds} seeds), answers "
    f"{min(lengths)}..{max(lengths)} tokens ({sum(lengths)} in all); static batches of "
    f"{BATCH} take {static_steps} decode steps, a perfect continuous batch "
    f"{sum(lengths) / BATCH:.0f}",
    flush=True,
  )
  args = ["--ckpt_dir", a.ckpt_dir, "--requests_file", a.requests_file]
  if a.from_log:
    runs, ours_setup, theirs_setup = _from_log(a.from_log)
    rss, a.repeats = None, len(runs["lora_jax"])
  else:
    ours = common.Worker("lora_jax", __file__, "--side", "jax", *args)
    theirs_args = args + (["--try_compile"] if a.try_compile else [])
    theirs = common.Worker("transformers", __file__, "--side", "torch", *theirs_args)
    ours_setup, theirs_setup = ours.setup, theirs.setup
    print(f"set up: ours {ours_setup}\ntheirs {theirs_setup}", flush=True)
    runs = common.alternate([ours, theirs], a.repeats)
    rss = {"lora_jax": ours.close()["peak_rss"], "transformers": theirs.close()["peak_rss"]}
  wall = {k: common.summary([r["wall_s"] for r in v]) for k, v in runs.items()}
  cpu = {k: common.summary([r["cpu_s"] for r in v]) for k, v in runs.items()}
  pairs = zip(runs["lora_jax"], runs["transformers"])
  ratio = common.summary([t["wall_s"] / o["wall_s"] for o, t in pairs])
  med = wall["transformers"]["median"] / wall["lora_jax"]["median"]
  cpu_ratio = cpu["transformers"]["median"] / cpu["lora_jax"]["median"]
  common.write_json(
    a.out,
    dict(
      benchmark="eval_workload",
      settings={k: v for k, v in vars(a).items() if k not in ("worker", "side")},
      model=dict(common.QWEN25_05B, num_layers=a.layers),
      workload=dict(
        requests=len(reqs),
        lengths=lengths,
        tokens=sum(lengths),
        static_decode_steps=static_steps,
        prompt_tokens=[len(r["prompt"]) for r in reqs[:: a.seeds]],
      ),
      ours_setup=ours_setup,
      theirs_setup=theirs_setup,
      source=f"log of an interrupted run: {a.from_log}" if a.from_log else "this run",
      wall_s=wall,
      cpu_s=cpu,
      ratio_theirs_over_ours=ratio,
      ratio_of_medians=med,
      cpu_ratio_of_medians=cpu_ratio,
      target=TARGET,
      verdict=common.verdict(med, TARGET),
      peak_rss=rss,
      runs=runs,
    ),
    before,
  )
  common.print_table(
    f"eval workload: {len(reqs)} sampled answers (T {TEMPERATURE}, top_p {TOP_P}), "
    f"{sum(lengths)} tokens, Qwen2.5-0.5B shape with {a.layers} layers, float32; wall s median "
    f"(min-max) of {a.repeats} alternating repeats",
    ["lora_jax (continuous)", f"transformers ({theirs_setup['setting']})", "speed-up", "target"],
    [
      [
        common.fmt(wall["lora_jax"]),
        common.fmt(wall["transformers"]),
        f"{med:.2f}x (CPU {cpu_ratio:.2f}x)",
        f">= {TARGET}x {common.verdict(med, TARGET)}",
      ]
    ],
  )


if __name__ == "__main__":
  main()
