"""Metrics: unbiased pass@k, bootstrap confidence intervals, per-benchmark scores."""

from math import comb

import pytest

from evals import metrics


@pytest.mark.parametrize(
  "n,c,k",
  [(8, 0, 1), (8, 3, 1), (8, 3, 2), (8, 3, 4), (8, 8, 8), (64, 5, 8), (200, 13, 100), (5, 2, 4)],
)
def test_pass_at_k_matches_the_combinatorial_formula(n, c, k):
  assert metrics.pass_at_k(n, c, k) == pytest.approx(1 - comb(n - c, k) / comb(n, k), abs=1e-12)


def test_pass_at_k_edges():
  assert metrics.pass_at_k(8, 3, 1) == pytest.approx(3 / 8)
  assert metrics.pass_at_k(4, 1, 4) == 1.0
  with pytest.raises(ValueError, match="n=4 c=5"):
    metrics.pass_at_k(4, 5, 1)
  with pytest.raises(ValueError):
    metrics.pass_at_k(4, 1, 5)


def test_mean_ci_is_deterministic_and_brackets_the_mean():
  values = [0, 1, 1, 0, 1, 1, 1, 0, 0.5, 0.25] * 3
  a, b = metrics.mean_ci(values), metrics.mean_ci(values)
  assert a == b
  assert a["ci_low"] < a["mean"] < a["ci_high"] and a["n"] == 30
  assert metrics.mean_ci([0.7] * 5) == {"mean": 0.7, "ci_low": 0.7, "ci_high": 0.7, "n": 5}
  assert metrics.mean_ci([])["mean"] is None


def _graded(outcomes):
  """outcomes: {task: [correct per seed]}."""
  return [
    {
      "task_id": t,
      "seed": s,
      "correct": ok,
      "extracted": "1" if ok else None,
      "finish_reason": "stop" if ok else "length",
    }
    for t, row in outcomes.items()
    for s, ok in enumerate(row)
  ]


def test_score_correctness():
  scores = metrics.score_correctness(
    _graded({"a": [1, 1, 0, 0], "b": [0, 0, 0, 0], "c": [1, 1, 1, 1]})
  )
  assert scores["primary"] == "pass@1"
  assert scores["pass@1"]["mean"] == pytest.approx((0.5 + 0 + 1) / 3)
  assert scores["pass@2"]["mean"] == pytest.approx((metrics.pass_at_k(4, 2, 2) + 0 + 1) / 3)
  assert "pass@4" in scores and "pass@8" not in scores
  assert scores["per_seed"] == {
    "0": pytest.approx(2 / 3),
    "1": pytest.approx(2 / 3),
    "2": pytest.approx(1 / 3),
    "3": pytest.approx(1 / 3),
  }
  assert (scores["n_tasks"], scores["n_samples"], scores["n_correct"]) == (3, 12, 6)
  assert scores["n_no_answer"] == scores["n_truncated"] == 6


def test_score_over_refusal():
  graded = [{"task_id": str(i), "label": "safe", "refusal": i < 1} for i in range(4)]
  graded += [{"task_id": f"u{i}", "label": "unsafe", "refusal": i < 3} for i in range(4)]
  scores = metrics.score_over_refusal(graded)
  assert scores["over_refusal_rate"]["mean"] == 0.25
  assert scores["unsafe_refusal_rate"]["mean"] == 0.75
  assert scores["n_tasks"] == 8
