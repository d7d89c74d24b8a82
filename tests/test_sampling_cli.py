"""`python -m launch.sample`: JSONL in and out, resume after a kill, one-line input errors; and the
demo's `chat` on the real SmolLM2-135M-Instruct."""

import json
import os
import shutil
import subprocess
import sys

import pytest
from conftest import REPO, SHARED
from helpers import tiny_hf_model

R1_TOKENIZER = SHARED / "tokenizers/deepseek-r1-distill-qwen"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
  """A tiny random Qwen2 model with the DeepSeek-R1 tokenizer and chat template beside it."""
  d = tmp_path_factory.mktemp("tiny_r1")
  tiny_hf_model(
    "qwen2", vocab_size=152064, bos_token_id=151646, eos_token_id=151643
  ).save_pretrained(d)
  for f in os.listdir(R1_TOKENIZER):
    if f != "README.md":
      shutil.copy(R1_TOKENIZER / f, d / f)
  return d


def _run(*args):
  env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
  return subprocess.run(
    [sys.executable, "-m", "launch.sample", *args],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )


def _rows(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


@pytest.mark.slow
def test_cli_writes_answers_and_resumes_after_a_kill(model_dir, tmp_path):
  prompts = tmp_path / "in.jsonl"
  prompts.write_text(
    "\n".join(
      json.dumps(r)
      for r in [
        {"id": "a", "prompt": "What is 2 + 2?"},
        {"messages": [{"role": "user", "content": "Say hi."}]},
        {"id": "c", "prompt": "Name a colour."},
      ]
    )
    + "\n"
  )
  out = tmp_path / "out.jsonl"
  args = [
    f"--model={model_dir}",
    f"--prompts={prompts}",
    f"--out={out}",
    "--max_new_tokens=6",
    "--n=2",
    "--temperature=0.8",
    "--top_p=0.95",
    "--seed=1",
    "--max_batch=2",
  ]
  r = _run(*args)
  assert r.returncode == 0, r.stderr
  full = _rows(out)
  assert sorted((row["id"], row["sample"]) for row in full) == [
    ("1", 0),
    ("1", 1),
    ("a", 0),
    ("a", 1),
    ("c", 0),
    ("c", 1),
  ]
  assert all(
    row["finish_reason"] in ("stop", "length") and 1 <= row["num_tokens"] <= 6 for row in full
  )

  # A killed run: three answers written, the fourth torn mid-line.
  lines = out.read_text().splitlines(keepends=True)
  out.write_text("".join(lines[:3]) + lines[3][:10])
  r = _run(*args)
  assert r.returncode == 0, r.stderr
  resumed = _rows(out)
  assert len(resumed) == 6
  key = lambda row: (row["id"], row["sample"])
  assert sorted(resumed, key=key) == sorted(full, key=key)  # same seeds, same answers

  r = _run(*args)  # nothing left to do
  assert r.returncode == 0 and len(_rows(out)) == 6


@pytest.mark.slow
def test_cli_bad_input_is_one_line(model_dir, tmp_path):
  prompts = tmp_path / "in.jsonl"
  prompts.write_text('{"prompt": "ok"}\n{"text": "no prompt"}\n')
  r = _run(f"--model={model_dir}", f"--prompts={prompts}", f"--out={tmp_path / 'o.jsonl'}")
  assert r.returncode == 2
  assert r.stderr.strip().splitlines()[-1] == (
    f"error: {prompts}:2: expected an object with 'prompt' or 'messages'"
  )


@pytest.mark.slow
def test_chat_with_smollm2(smollm2_gguf):
  import lora_jax
  from lora_jax.sampling import chat

  model = lora_jax.load_pretrained(smollm2_gguf)
  tokenizer = lora_jax.load_tokenizer(smollm2_gguf)
  answer = chat(model, tokenizer, "What is the capital of France?", max_new_tokens=24)
  assert "Paris" in answer
