"""Data files the reference evaluated on, pinned by checksum and fetched once into a local cache.

The reference's AIME 2024 is Qwen2.5-Math's `evaluation/data/aime24/test.jsonl`: its lm-eval task
(`lm_eval/tasks/AIME/AIME.yaml` of Small-Model-Learnability-Gap, which the reference adapted) reads
`lm-evaluation-harness/math_eval_data/aime24/test.jsonl`, the same blob. The hub's
HuggingFaceH4/aime_2024 words some problems differently. The file is downloaded from Qwen2.5-Math
(never copied into this repository) and checked against its sha256.
"""

from __future__ import annotations

import hashlib
import logging
import os
import urllib.request
from dataclasses import dataclass

log = logging.getLogger(__name__)
CACHE_ENV = "LORA_JAX_DATA_CACHE"  # where fetched files are kept (default ~/.cache/lora_jax/data)
FETCH_TIMEOUT_S = 60


@dataclass(frozen=True)
class PinnedFile:
  file_name: str  # name in the cache
  url: str
  sha256: str
  origin: str  # where it comes from, for messages


FILES = {
  "aime24": PinnedFile(
    "aime24-qwen2.5-math-test.jsonl",
    "https://raw.githubusercontent.com/QwenLM/Qwen2.5-Math/main/evaluation/data/aime24/test.jsonl",
    "af2b8bd2aa911b6333ad0df32f3ca05c7ae8ed10f1731f4372c8ae26990bf7ac",
    "Qwen2.5-Math's evaluation/data/aime24/test.jsonl (git blob bb72e17)",
  ),
}


def file_sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def cache_dir() -> str:
  default = os.path.join(os.path.expanduser("~"), ".cache", "lora_jax", "data")
  return os.environ.get(CACHE_ENV) or default


def fetch(benchmark: str) -> str:
  """The local path of `benchmark`'s reference file, downloaded and checked on first use."""
  pinned = FILES[benchmark]
  path = os.path.join(cache_dir(), pinned.file_name)
  if os.path.exists(path) and file_sha256(path) == pinned.sha256:
    return path
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = f"{path}.{os.getpid()}.tmp"
  try:
    with urllib.request.urlopen(pinned.url, timeout=FETCH_TIMEOUT_S) as r, open(tmp, "wb") as f:
      f.write(r.read())
    got = file_sha256(tmp)
    if got != pinned.sha256:
      raise ValueError(f"it has sha256 {got}, not {pinned.sha256}")
    os.replace(tmp, path)
  except (OSError, ValueError) as e:
    raise ValueError(
      f"{benchmark}: the reference's data file could not be fetched from {pinned.url} ({e}); "
      f"give a local copy of {pinned.origin} with --data={benchmark}=PATH"
    ) from None
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  log.info("%s: fetched the reference's file %s", benchmark, path)
  return path


def check(benchmark: str, path: str) -> bool:
  """Whether `path` is `benchmark`'s reference file (True when the reference pins none); a
  different file is logged, since its scores are not the reference's."""
  pinned = FILES.get(benchmark)
  if pinned is None or not os.path.isfile(path):
    return True
  got = file_sha256(path)
  if got != pinned.sha256:
    log.warning(
      "%s: %s is not the reference's file (%s, sha256 %s; this one has %s)",
      benchmark,
      path,
      pinned.origin,
      pinned.sha256[:12],
      got[:12],
    )
  return got == pinned.sha256
