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


def _readme_commands(marker: str = "<!-- sample-then-grade -->") -> list[list[str]]:
  """The shell commands of the README block after `marker`, as argv lists."""
  import shlex

  text = (REPO / "README.md").read_text()
  assert marker in text, f"README.md lost its {marker} block"
  block = text.split(marker, 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
  return [shlex.split(cmd) for cmd in block.replace("\\\n", " ").strip().splitlines()]


def _tiny_adapter(model_dir, out) -> str:
  import jax
  import numpy as np

  import lora_jax
  from lora_jax.io.peft import save_peft_adapter
  from lora_jax.lora import LoRAConfig, apply_lora

  model = lora_jax.load_pretrained(str(model_dir))
  cfg = LoRAConfig(rank=2, targets=("q_proj", "v_proj"))
  apply_lora(model, cfg, seed=1)
  b = model.layers.q_proj.lora_b
  b.set_value(jax.random.normal(jax.random.key(0), b[...].shape) * 0.5)  # not a no-op adapter
  save_peft_adapter(model, str(out), cfg, str(model_dir))
  assert np.abs(np.asarray(b[...])).max() > 0
  return str(out)


@pytest.mark.slow
def test_readme_sample_then_grade_runs_as_written(model_dir, tmp_path):
  """The README's three commands (write prompts, sample, grade), run in a fresh directory with
  only the model, adapter and data swapped for tiny local ones and a short answer budget."""
  bench = tmp_path / "aime_tiny.jsonl"
  problems = [("t1", "What is 1 + 1?", "2"), ("t2", "What is 3 * 3?", "9")]
  bench.write_text(
    "".join(json.dumps({"id": i, "problem": p, "answer": a}) + "\n" for i, p, a in problems)
  )
  local = {
    "launch.eval": [f"--data=aime24={bench}"],
    "launch.sample": [
      f"--model={model_dir}",
      f"--adapter={_tiny_adapter(model_dir, tmp_path / 'adapter')}",
      "--max_new_tokens=6",
    ],
  }
  commands = _readme_commands()
  assert [c[:3] for c in commands] == [
    ["python", "-m", "launch.eval"],
    ["python", "-m", "launch.sample"],
    ["python", "-m", "launch.eval"],
  ]
  env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
  for cmd in commands:
    argv = [sys.executable, *cmd[1:], *local[cmd[2]]]  # later flags override earlier ones
    done = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"{' '.join(cmd)}\n{done.stderr[-3000:]}"

  answers = _rows(tmp_path / "aime24_answers.jsonl")
  assert sorted((a["id"], a["seed"], a["sample"]) for a in answers) == sorted(
    (i, s, 0) for i, _, _ in problems for s in range(8)
  )
  scores = json.loads((tmp_path / "aime24_scores.json").read_text())
  result = scores["benchmarks"]["aime24"]
  assert (result["n_samples"], result["n_tasks"]) == (16, 2)
  assert sorted(result["per_seed"]) == [str(s) for s in range(8)]
  graded = _rows(tmp_path / "aime24_scores.graded.jsonl")
  by_key = {(a["id"], a["seed"], a["sample"]): a["completion"] for a in answers}
  assert {(g["task_id"], g["seed"], g["sample"]): g["completion"] for g in graded} == by_key
  assert all(isinstance(g["correct"], bool) for g in graded)


def test_sample_file_prompt_inclusive_budget_and_two_bos(model_dir, tmp_path):
  """The reference preset's settings reach launch.sample's library call: --max_model_len caps
  prompt + answer, --add_special_tokens puts the tokenizer's BOS after the template's."""
  import lora_jax
  from lora_jax.sample_file import SampleJob, sample_file
  from lora_jax.sampling.text import encode_prompts

  question = "What is 2 + 2?"
  prompts = tmp_path / "in.jsonl"
  prompts.write_text(json.dumps({"id": "a", "prompt": question}) + "\n")
  tokenizer = lora_jax.load_tokenizer(str(model_dir))
  (ids,) = encode_prompts(tokenizer, [question], True, False)
  assert ids[0] == tokenizer.bos_token_id  # the template's own BOS
  out = tmp_path / "out.jsonl"
  sample_file(
    SampleJob(
      model=str(model_dir),
      prompts=str(prompts),
      out=str(out),
      max_new_tokens=12,
      add_special_tokens=True,
      max_model_len=len(ids) + 1 + 3,
    )
  )
  (row,) = _rows(out)
  assert row["num_prompt_tokens"] == len(ids) + 1  # a second BOS
  assert row["num_tokens"] <= 3 and (row["num_tokens"] == 3) == (row["finish_reason"] == "length")
  with pytest.raises(ValueError, match="max_model_len=1"):
    SampleJob(model="m", prompts="p", out="o", max_model_len=1)
