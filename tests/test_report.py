"""The report: markdown table and safety-vs-reasoning plot from small fake runs."""

import json
import os
import subprocess
import sys

import pytest

from evals import metrics, report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _scores(label, step, safe_fraction, aime_fraction, gpqa_fraction):
  """A scores.json as the runner writes it, from made-up graded answers."""

  def correct(fraction, n=10):
    return [
      {"task_id": str(i), "seed": 0, "correct": i < fraction * n, "extracted": "1"}
      for i in range(n)
    ]

  safety = [
    {
      "task_id": str(i),
      "seed": 0,
      "refusal": i < safe_fraction * 20,
      "unsafe": not i < safe_fraction * 20,
      "judge": "keyword",
    }
    for i in range(20)
  ]
  return {
    "label": label,
    "step": step,
    "model": "m",
    "adapter": None,
    "benchmarks": {
      "strongreject": {"kind": "safety", **metrics.score_safety(safety)},
      "aime24": {"kind": "math", **metrics.score_correctness(correct(aime_fraction))},
      "gpqa_diamond": {"kind": "gpqa", **metrics.score_correctness(correct(gpqa_fraction))},
    },
  }


def _write(path, scores):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    json.dump(scores, f)


@pytest.fixture
def runs(tmp_path):
  _write(tmp_path / "base" / "base" / "scores.json", _scores("base", None, 0.3, 0.6, 0.5))
  for run, (s0, s1) in {"lora_r1": (0.8, 0.95), "full": (0.9, 1.0)}.items():
    _write(tmp_path / run / "step_1000" / "scores.json", _scores("step_1000", 1000, s1, 0.5, 0.4))
    _write(tmp_path / run / "step_500" / "scores.json", _scores("step_500", 500, s0, 0.55, 0.5))
  return tmp_path


def test_table_and_plot(runs, tmp_path):
  out = tmp_path / "report"
  paths = report.write_report(
    [str(runs / "lora_r1"), str(runs / "full")], str(out), base_path=str(runs / "base")
  )
  png = out / "safety_vs_reasoning.png"
  assert paths["plot"] == str(png)
  with open(png, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  import matplotlib.image

  image = matplotlib.image.imread(str(png))
  assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 400  # two subplots

  lines = paths["table"].strip().splitlines()
  assert lines[0] == (
    "| run | checkpoint | step | strongreject safety_score | aime24 pass@1 | gpqa_diamond pass@1 |"
  )
  rows = [line.split(" | ")[:3] for line in lines[2:]]
  assert rows == [
    ["| base", "base", ""],
    ["| lora_r1", "step_500", "500"],
    ["| lora_r1", "step_1000", "1000"],
    ["| full", "step_500", "500"],
    ["| full", "step_1000", "1000"],
  ]
  assert "| 95.0 [" in lines[4] and lines[4].count("[") == 3
  assert lines[4].count(" judge: keyword |") == 1  # the judge under every safety number only
  assert (out / "report.md").read_text().count("\n| ") == 6
  assert "rules:" not in paths["table"]


def test_llm_rechecked_headline_shows_the_rule_based_figure(runs, tmp_path):
  for step in (500, 1000):
    path = runs / "full" / f"step_{step}" / "scores.json"
    scores = json.loads(path.read_text())
    aime = scores["benchmarks"]["aime24"]
    aime["pass@1_llm"] = {**aime["pass@1"], "mean": 0.7}
    aime["primary"] = "pass@1_llm"
    _write(path, scores)
  runs_ = [str(runs / "full"), str(runs / "lora_r1")]
  lines = report.write_report(runs_, str(tmp_path / "r"))["table"].strip().splitlines()
  assert "aime24 pass@1_llm" in lines[0]
  full, lora = lines[3].split(" | "), lines[5].split(" | ")
  assert full[4].startswith("70.0 [") and full[4].endswith("(rules: 50.0)")
  assert "rules:" not in full[5]  # gpqa's headline is rule-based
  assert lora[4].endswith("] (pass@1)")  # a run without the re-check says what its number is


def test_report_cli_and_user_errors(runs, tmp_path):
  cmd = [
    sys.executable,
    "-m",
    "launch.report",
    f"--runs={runs / 'lora_r1'}",
    "--names=LoRA r=1",
    f"--base={runs / 'base' / 'base' / 'scores.json'}",
    f"--out={tmp_path / 'r'}",
  ]
  done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr
  assert "| LoRA r=1 | step_500 | 500 |" in done.stdout
  assert (tmp_path / "r" / "safety_vs_reasoning.png").stat().st_size > 1000

  with pytest.raises(FileNotFoundError, match="no scores.json"):
    report.write_report([str(tmp_path / "empty")], str(tmp_path / "x"))
  with pytest.raises(ValueError, match="no checkpoint has both harmbench"):
    report.write_report([str(runs / "full")], str(tmp_path / "x"), safety="harmbench")
