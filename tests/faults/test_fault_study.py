"""launch.study killed with SIGKILL between variants and inside one, then rerun: no finished unit
runs again, finished files are untouched, and the interrupted evaluation, resumed, equals the
same evaluation run uninterrupted. The tiny study: tests/study_files.py (base, LoRA, full
fine-tuning, an OrthoMerge of the LoRA run; greedy answers)."""

import json
import os
import shutil
import subprocess
import sys

import pytest
from study_files import write_study_files

from lora_jax import jsonl

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
KILL_AT = os.path.join(REPO, "tests/faults/kill_at.py")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def study_files(tmp_path_factory):
  return write_study_files(tmp_path_factory.mktemp("study_faults"))


def _study(config: str, workdir, log: str, *kill: str, only: str = "") -> int:
  """launch.study (under tests/faults/kill_at.py when `kill` names a point); its exit status."""
  cmd = [KILL_AT, *kill] if kill else ["-m"]
  cmd = [sys.executable, *cmd, "launch.study", f"--config={config}", f"--workdir={workdir}"]
  env = os.environ | {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": "", "KILL_AT_PATH": only}
  with open(os.path.join(os.path.dirname(str(workdir)), log), "w") as out:
    return subprocess.run(
      cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=env, timeout=900
    ).returncode


def _stages(workdir) -> list[tuple[str, str, str]]:
  path = os.path.join(workdir, "stages.jsonl")
  rows = jsonl.records(path) if os.path.exists(path) else []
  return [(s["stage"], s["variant"], s["label"]) for s in rows]


def _mtimes(root) -> dict:
  return {
    os.path.join(d, f): os.stat(os.path.join(d, f)).st_mtime_ns
    for d, _, files in os.walk(root)
    for f in files
  }


def _graded(workdir, label_dir) -> dict:
  """Every graded answer of one evaluation, by (benchmark, task, seed, sample)."""
  out = {}
  graded = os.path.join(workdir, "evals", label_dir, "graded")
  for name in sorted(os.listdir(graded)):
    for g in jsonl.records(os.path.join(graded, name)):
      key = (name, g["task_id"], g["seed"], g["sample"])
      assert key not in out, f"graded twice: {key}"
      out[key] = g
  return out


def test_kill_9_between_and_inside_variants_then_rerun(study_files, fault):
  config, logs = study_files["config"], study_files["dir"]
  workdir = study_files["dir"] / "work"
  log = lambda name: (logs / name).read_text()[-3000:]

  # Between variants: right after the LoRA run is marked trained, before full fine-tuning starts.
  assert _study(config, workdir, "between.log", "done", "1") == -9, log("between.log")
  assert _stages(workdir) == [("train", "lora", "")]
  assert not os.path.exists(workdir / "runs" / "full")

  # Inside a variant: half-way through writing the 2nd answer of LoRA's step-2 evaluation.
  only = "evals/lora/step_2/generations/"
  assert _study(config, workdir, "inside.log", "append", "2", only=only) == -9, log("inside.log")
  finished = set(_stages(workdir))
  assert ("train", "lora", "") not in _stages(workdir)[1:], "the LoRA run was trained again"
  assert {("train", "full", ""), ("export", "ortho", "step_4")} <= finished
  assert ("evaluate", "base", "base") in finished
  assert ("evaluate", "lora", "step_2") not in finished
  torn = [p for p in (workdir / "evals/lora/step_2/generations").iterdir() if p.suffix == ".jsonl"]
  assert any(not p.read_bytes().endswith(b"\n") for p in torn), "no answer torn by the kill"
  kept = {p: t for p, t in _mtimes(workdir).items() if "/evals/base/" in p or "/runs/" in p}

  assert _study(config, workdir, "rerun.log") == 0, log("rerun.log")
  before = len(finished)
  rerun = _stages(workdir)[before:]
  assert not set(rerun) & finished, f"finished work ran again: {set(rerun) & finished}"
  assert not [r for r in rerun if r[0] in ("train", "export")]
  assert ("evaluate", "lora", "step_2") in rerun and rerun[-1] == ("report", "", "")
  changed = [p for p, t in kept.items() if _mtimes(workdir).get(p) != t]
  assert not changed, f"finished files rewritten: {changed[:5]}"
  report = (workdir / "report" / "report.md").read_text()
  table = [line.split(" | ")[:2] for line in report.splitlines() if line.startswith("| ")]
  rows = {(c[0].strip("| "), c[1]) for c in table[1:]}
  want = {("base", "base"), ("lora", "step_2"), ("lora", "step_4"), ("full", "step_4")}
  assert rows == want | {("ortho", "step_4")}
  for name in ("tradeoff_arithmetic.png", "tradeoff_drift.png"):
    assert os.path.getsize(workdir / "report" / name) > 0
  assert os.path.exists(workdir / "report" / "analysis" / "lines_stable_rank.png")
  scores = json.load(open(workdir / "evals" / "full" / "step_4" / "scores.json"))
  assert scores["benchmarks"]["drift"]["n_tasks"] == 3
  assert scores["benchmarks"]["strongreject"]["judge"] == "refusal_classifier"
  base = json.load(open(workdir / "evals" / "base" / "base" / "scores.json"))
  assert base["benchmarks"]["drift"]["nll_excess"]["mean"] == pytest.approx(0, abs=1e-5)

  # The interrupted evaluation, resumed, equals the same evaluation run without interruption.
  resumed = _graded(workdir, "lora/step_2")
  resumed_scores = json.load(open(workdir / "evals/lora/step_2/scores.json"))["benchmarks"]
  shutil.move(workdir / "evals/lora/step_2", logs / "lora_step_2_resumed")
  assert _study(config, workdir, "fresh.log") == 0, log("fresh.log")
  assert _stages(workdir)[len(_stages(workdir)) - 2 :] == [
    ("evaluate", "lora", "step_2"),
    ("report", "", ""),
  ]
  assert _graded(workdir, "lora/step_2") == resumed
  fresh_scores = json.load(open(workdir / "evals/lora/step_2/scores.json"))["benchmarks"]
  assert fresh_scores == resumed_scores
  fault.record(
    fault="kill -9 of a study (launch.study)",
    injected="SIGKILL right after the LoRA variant is marked trained (between variants), then "
    "half-way through writing an answer of its step-2 evaluation (inside a variant)",
    lost="nothing finished: the torn answer and the answers not yet written of the one "
    "evaluation under way",
    check="the rerun runs no finished unit again and rewrites none of its files; the resumed "
    "evaluation's graded answers and scores equal a fresh run of that evaluation",
  )
