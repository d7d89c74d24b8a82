"""Under CI a skipped test fails the run, saying why it skipped (tests/ci_skips.py)."""

import os
import subprocess
import sys

TESTS = os.path.dirname(os.path.abspath(__file__))
SKIPPING = """import pytest

def test_needs_data():
  pytest.skip("data missing: /nowhere/aime24.jsonl")

def test_fine():
  pass
"""


def _pytest(tmp_path, ci):
  env = {k: v for k, v in os.environ.items() if k != "CI"}
  if ci is not None:
    env["CI"] = ci
  env["PYTHONPATH"] = os.pathsep.join([TESTS, env.get("PYTHONPATH", "")])
  cmd = [sys.executable, "-m", "pytest", "-q", "-p", "ci_skips", "-p", "no:cacheprovider", "-rA"]
  return subprocess.run(
    [*cmd, "test_skipping.py"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
  )


def test_a_skip_fails_under_ci_and_says_why(tmp_path):
  (tmp_path / "test_skipping.py").write_text(SKIPPING)
  ci = _pytest(tmp_path, "true")
  assert ci.returncode == 1, ci.stdout
  assert "1 failed, 1 passed" in ci.stdout
  assert "skipped under CI='true'" in ci.stdout and "data missing: /nowhere" in ci.stdout
  local = _pytest(tmp_path, None)
  assert local.returncode == 0 and "1 passed, 1 skipped" in local.stdout, local.stdout
