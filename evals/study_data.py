"""A study's evaluation files: seeded draws from benchmark files, never a prompt seen in training.

`eval.sample = {"strongreject": 40, "xstest": {"n": 100, "label": "safe"}}` draws 40 rows of
StrongREJECT's file (eval.data) and 100 of XSTest's rows whose `label` is "safe", with a fixed
seed, into the study's data/ directory (written once, atomically, so reruns grade the same
prompts). Rows whose prompt is also a prompt of a variant's training file are left out first
(counted in the log): the study measures on prompts never used in training.
"""

from __future__ import annotations

import logging
import os

import numpy as np

from evals import benchmarks
from lora_jax import jsonl

log = logging.getLogger(__name__)
SAMPLE_SEED = 0


def data_paths(spec, data_dir: str, training_prompts: frozenset[str] = frozenset()) -> dict:
  """The runner's data_paths: eval.data, with each sampled benchmark's draw in its place."""
  paths = dict(spec.data)
  for name, how in spec.sample.items():
    out = os.path.join(data_dir, f"{name}.jsonl")
    if not os.path.exists(out):
      jsonl.write_atomic(out, draw(name, spec.data.get(name), how, training_prompts))
    paths[name] = out
  return paths


def draw(name: str, path: str | None, how, training_prompts=frozenset()) -> list[dict]:
  """`how["n"]` rows of benchmark `name`'s file matching `how`'s other fields, drawn with a fixed
  seed, in file order; each keeps its record id (as `id`) so answers stay traceable."""
  how = {"n": how} if isinstance(how, int) else dict(how)
  n = int(how.pop("n"))
  if not path:
    raise ValueError(f"eval.sample.{name}: needs the benchmark's file in eval.data.{name}")
  bench = benchmarks.get(name)
  rows, seen = [], 0
  for i, row in enumerate(benchmarks.read_rows(path)):
    record = bench.to_record(row, i, f"{name}: row {i + 1} of {path}")
    if record is None or any(str(row.get(k)) != str(v) for k, v in how.items()):
      continue
    if normalise(record.get("prompt", "")) in training_prompts:
      seen += 1
      continue
    rows.append(row | {"id": record["id"]})
  if seen:
    log.info("%s: left out %d prompts that are also training prompts", name, seen)
  if n > len(rows):
    raise ValueError(f"eval.sample.{name}: n={n} but {path} has {len(rows)} matching rows")
  chosen = np.random.default_rng(SAMPLE_SEED).choice(len(rows), size=n, replace=False)
  return [rows[i] for i in sorted(chosen)]


def normalise(text: str) -> str:
  return " ".join(str(text).lower().split())


def training_prompts(sources: list[str]) -> frozenset[str]:
  """The prompts of local JSON/JSONL training files (`prompt` or `question` fields); hub
  datasets are not read."""
  out = set()
  for source in sources:
    if not os.path.isfile(source) or not source.endswith((".jsonl", ".json")):
      continue
    if source.endswith(".jsonl"):
      rows = jsonl.records(source, missing_ok=False)
    else:
      import json

      with open(source, encoding="utf-8") as f:
        rows = json.load(f)
    for row in rows:
      for key in ("prompt", "question"):
        if isinstance(row.get(key), str):
          out.add(normalise(row[key]))
  return frozenset(out)
