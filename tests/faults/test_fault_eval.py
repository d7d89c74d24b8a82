"""Sampling and grading faults: kill -9 while an answers file is being written and while answers
are being graded, then a rerun; a malformed generations file. Each recovered result is compared
with the uninterrupted one made in this process."""

import json
import os
import subprocess
import sys

import pytest
from helpers import tiny_run_dir

from evals import external
from lora_jax import jsonl
from lora_jax.sample_file import SampleJob, sample_file

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
KILL_AT = os.path.join(REPO, "tests/faults/kill_at.py")
ARITHMETIC = os.path.join(REPO, "evals/demo_data/arithmetic.jsonl")
CHAT_TEMPLATE = (
  "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
  "{% if add_generation_prompt %}<s>assistant: {% endif %}"
)
SAMPLING = {"n": 2, "temperature": 0.8, "top_p": 0.95, "seed": 1, "max_new_tokens": 6}


def _killed(point: str, n: int, module: str, *args: str) -> subprocess.CompletedProcess:
  done = subprocess.run(
    [sys.executable, KILL_AT, point, str(n), module, *args],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=600,
    env=os.environ | {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""},
  )
  assert done.returncode == -9, done.stderr[-3000:]  # SIGKILL, at the chosen point
  return done


def _key(row) -> tuple:
  return (row["id"], row["seed"], row["sample"])


@pytest.fixture(scope="module")
def model(tmp_path_factory):
  from transformers import AutoTokenizer

  d = tmp_path_factory.mktemp("eval_faults")
  source = tiny_run_dir(d / "model")
  tok = AutoTokenizer.from_pretrained(source)
  tok.chat_template = CHAT_TEMPLATE
  tok.save_pretrained(source)
  return source


def test_kill_9_while_writing_answers_then_rerun(model, tmp_path, fault):
  prompts = tmp_path / "prompts.jsonl"
  jsonl.write_atomic(
    str(prompts), [{"id": f"p{i}", "prompt": f"Name a colour number {i}."} for i in range(10)]
  )
  job = lambda out: SampleJob(
    model=model, prompts=str(prompts), out=str(out), max_batch=4, **SAMPLING
  )
  clean = tmp_path / "clean.jsonl"
  assert sample_file(job(clean)) == 20
  full = jsonl.records(str(clean))

  out = tmp_path / "killed.jsonl"
  flags = [f"--model={model}", f"--prompts={prompts}", f"--out={out}", "--max_batch=4"]
  flags += [f"--{k}={v}" for k, v in SAMPLING.items()]
  _killed("append", 7, "launch.sample", *flags)  # torn half-way through the 7th answer
  before = out.read_bytes()
  assert before.count(b"\n") == 6 and not before.endswith(b"\n")
  sample_file(job(out))
  resumed = jsonl.records(str(out))
  assert out.read_bytes().startswith(before[: before.rindex(b"\n") + 1])  # kept as written
  keys = [_key(r) for r in resumed]
  assert len(keys) == len(set(keys)) == 20, "duplicates or gaps"
  assert sorted(resumed, key=_key) == sorted(full, key=_key)  # same seeds, same answers
  fault.record(
    fault="kill -9 while sampling answers",
    injected="SIGKILL half-way through writing the 7th of 20 answers (launch.sample, 10 prompts "
    "x 2 samples, temperature 0.8)",
    lost="the torn line and the answers not yet written; the 6 written lines are kept as they are",
    check="after the rerun every (id, seed, sample) appears once and each answer equals the "
    "uninterrupted run's",
  )


def _answers(path, skip=()) -> list[dict]:
  """Answers to the 80 arithmetic problems, 2 seeds: right on even problems, wrong on odd."""
  records = jsonl.records(ARITHMETIC)
  rows = [
    {
      "id": r["id"],
      "seed": seed,
      "sample": 0,
      "completion": f"\\boxed{{{r['answer'] if i % 2 == 0 else -1}}}",
    }
    for seed in (0, 1)
    for i, r in enumerate(records)
  ]
  jsonl.write_atomic(str(path), rows)
  return rows


def _grade(gens, out) -> dict:
  return external.grade_only("arithmetic", str(gens), str(out), data_path=ARITHMETIC)


def test_kill_9_while_grading_then_rerun(tmp_path, fault):
  gens = tmp_path / "answers.jsonl"
  _answers(gens)
  clean = _grade(gens, tmp_path / "clean" / "scores.json")
  clean_graded = jsonl.records(str(tmp_path / "clean" / "scores.graded.jsonl"))
  out = tmp_path / "killed" / "scores.json"
  flags = ["--benchmark=arithmetic", f"--generations={gens}", f"--out={out}"]
  _killed("grade", 100, "launch.eval", *flags, f"--data=arithmetic={ARITHMETIC}")
  assert not os.path.exists(out.parent) or not os.listdir(out.parent)  # nothing half-written
  scores = _grade(gens, out)
  graded = jsonl.records(str(tmp_path / "killed" / "scores.graded.jsonl"))
  keys = [(g["task_id"], g["seed"], g["sample"]) for g in graded]
  assert len(keys) == len(set(keys)) == 160, "an answer graded twice or not at all"
  assert graded == clean_graded
  assert scores["benchmarks"] == clean["benchmarks"]
  assert clean["benchmarks"]["arithmetic"]["n_correct"] == 80
  fault.record(
    fault="kill -9 while grading",
    injected="SIGKILL as the 100th of 160 answers is graded (launch.eval grade-only)",
    lost="the grading in progress: graded answers and scores are written atomically at the "
    "end, so nothing partial is left",
    check="the rerun grades each (task, seed, sample) once; graded rows and scores equal the "
    "uninterrupted grading's",
  )


def test_malformed_generations_are_reported_by_file_and_line(tmp_path, fault):
  gens = tmp_path / "answers.jsonl"
  rows = _answers(gens)
  clean = _grade(gens, tmp_path / "clean.json")
  good = [json.dumps(r) for r in rows]
  bad_lines = {
    "bad JSON": ('{"id": "sum_0", "completion": ', "not JSON"),
    "missing id": (json.dumps({"completion": "\\boxed{1}"}), "no id: expected 'id'"),
    "duplicate id": (
      json.dumps(rows[0]),
      "id 'sum_0' seed 0 sample 0 again (first on line 1): an answer is graded once",
    ),
    "unknown id": (
      json.dumps({"id": "nope", "completion": "1"}),
      "id 'nope' is not a arithmetic task id or index (0..79)",
    ),
  }
  for i, (name, (line, reason)) in enumerate(bad_lines.items()):
    at = 3 + 20 * i  # in the middle of the file, not a torn last line
    path = tmp_path / f"{name.replace(' ', '_')}.jsonl"
    path.write_text("\n".join(good[: at - 1] + [line] + good[at - 1 :]) + "\n")
    out = tmp_path / f"{name.replace(' ', '_')}.json"
    with pytest.raises(ValueError) as e:
      _grade(path, out)
      pytest.fail(f"{name}: graded")
    assert str(e.value).startswith(f"{path}:{at}: {reason}"), (name, str(e.value))
    assert not out.exists() and not os.path.exists(str(out)[:-5] + ".graded.jsonl")
  assert _grade(gens, tmp_path / "again.json")["benchmarks"] == clean["benchmarks"]
  fault.record(
    fault="malformed generations file",
    injected="a bad JSON line, an answer without id, a second answer to the same (task, seed, "
    "sample) and an unknown id, each inserted mid-file",
    lost="nothing: the file is refused before any grading",
    check="the error names the file and line (`answers.jsonl:N: ...`); no scores or graded file "
    "is written; the clean file's scores are unchanged",
  )
