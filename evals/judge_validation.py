"""How well a refusal judge agrees with human labels of model answers.

The labelled sets are XSTest v2 completions (Röttger et al., NAACL 2024): one model's answer to
each of the 450 XSTest prompts, labelled by two annotators `1_full_compliance`,
`2_full_refusal` or `3_partial_refusal`. The development set (GPT-4 and Llama-2-70b-chat with its
system prompt) is read from `../shared/data/xstest_labels_dev/`; the other models ship in
`benchmarks/judge_data/` (see its README) and are split (`SPLITS`) by when they were read:
`REVISED_ON` (read to revise the rules after their first measurement), `HELD_OUT_EARLIER`
(measured before `refusal_classifier` was designed) and "fresh" (added after it was frozen).
`role` says, for each judge and model, whether the judge was fitted, tuned or revised on that
model's labels. Each answer is judged with its prompt's kind (XSTest's safe/unsafe label), as the
benchmarks pass it.
"""

from __future__ import annotations

import glob
import gzip
import json
import os
from collections import Counter

from evals import metrics
from evals import refusal_judge as refusal_judge_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEV_PATH = os.path.join(
  ROOT, "..", "shared", "data", "xstest_labels_dev", "xstest_v2_completions_dev.jsonl.gz"
)
HELDOUT_DIR = os.path.join(ROOT, "benchmarks", "judge_data")

COMPLIANCE, REFUSAL, PARTIAL = "1_full_compliance", "2_full_refusal", "3_partial_refusal"
FIELDS = ("model", "id", "label", "prompt", "completion", "final_label")


def load_labelled(path: str) -> list[dict]:
  """Rows of one gzipped JSONL file of labelled completions; a missing field or an unknown label
  is a one-line error naming the file and line."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: labelled completions not found")
  rows = []
  with gzip.open(path, "rt", encoding="utf-8") as f:
    for number, line in enumerate(f, 1):
      row = json.loads(line)
      missing = [k for k in FIELDS if k not in row]
      if missing:
        raise ValueError(f"{path}:{number}: missing {', '.join(missing)}")
      if row["final_label"] not in (COMPLIANCE, REFUSAL, PARTIAL):
        raise ValueError(f"{path}:{number}: unknown label {row['final_label']!r}")
      rows.append(row)
  return rows


# Held-out models whose errors were read to revise the rules after their first measurement: their
# rows are reported apart, as "revised-on", never as held-out numbers.
REVISED_ON = ("mistralguard",)
# Held out from every judge, but measured (and its errors read) before `refusal_classifier` was
# designed; every other file in `HELDOUT_DIR` is "fresh": added after the classifier was frozen.
HELD_OUT_EARLIER = ("mistralinstruct",)
SPLITS = ("dev", "revised-on", "held-out", "fresh")
JUDGES = ("refusal_classifier", "refusal_behaviour", "gcg_keywords")  # measured side by side

# What each judge was fitted or revised on, by model (BUILD.md's table says it on every row).
_TUNED = {
  "refusal_classifier": {"gpt4", "llama2orig", "mistralguard"},  # its training data
  "refusal_behaviour": {"gpt4", "llama2orig"},  # rules decided on these
  "gcg_keywords": set(),  # a fixed published list
}


def role(judge: str, model: str) -> str:
  """How `model`'s labels relate to `judge`: fitted/tuned on, revised on, or held out."""
  if model in _TUNED.get(judge, ()):
    return "trained on" if judge == "refusal_classifier" else "tuned on"
  if judge == "refusal_behaviour" and model in REVISED_ON:
    return "revised on"
  if model in HELD_OUT_EARLIER and judge == "refusal_classifier":
    return "held out (errors of the rules read)"
  return "held out"


def load_splits(dev_path: str = DEV_PATH, heldout_dir: str = HELDOUT_DIR) -> dict[str, list]:
  """Rows by split (`SPLITS`): the development file, then every `*.jsonl.gz` in `heldout_dir`:
  `REVISED_ON` models, `HELD_OUT_EARLIER` models, and the rest ("fresh")."""
  files = sorted(glob.glob(os.path.join(heldout_dir, "*.jsonl.gz")))
  if not files:
    raise FileNotFoundError(f"{heldout_dir}: no held-out *.jsonl.gz")
  rows = [r for p in files for r in load_labelled(p)]
  return {
    "dev": load_labelled(dev_path),
    "revised-on": [r for r in rows if r["model"] in REVISED_ON],
    "held-out": [r for r in rows if r["model"] in HELD_OUT_EARLIER],
    "fresh": [r for r in rows if r["model"] not in REVISED_ON + HELD_OUT_EARLIER],
  }


def _rate(flags: list[bool]) -> float | None:
  return sum(flags) / len(flags) if flags else None


def agreement(rows: list[dict], judge: str) -> dict:
  """One judge on labelled rows: agreement on full-refusal vs full-compliance items (with a 95%
  bootstrap CI), false-refusal rate (compliance called refusal), missed-refusal rate (refusal not
  called refusal), and what the judge makes of partial refusals."""
  judge_fn = refusal_judge_lib.get(judge)
  # XSTest's prompt label says whether the prompt was a harmful request, as every benchmark knows.
  verdicts = [judge_fn.verdict(r["completion"], r["label"] == "unsafe").verdict for r in rows]
  full = [
    (r["final_label"] == REFUSAL, v == "refusal")
    for r, v in zip(rows, verdicts)
    if r["final_label"] != PARTIAL
  ]
  partial = [v for r, v in zip(rows, verdicts) if r["final_label"] == PARTIAL]
  return {
    "judge": judge,
    "n_refusal": sum(label for label, _ in full),
    "n_compliance": sum(not label for label, _ in full),
    "agreement": metrics.mean_ci(float(label == called) for label, called in full),
    "false_refusal_rate": _rate([called for label, called in full if not label]),
    "missed_refusal_rate": _rate([not called for label, called in full if label]),
    "n_partial": len(partial),
    "partial_called_refusal": _rate([v == "refusal" for v in partial]),
    "partial_verdicts": dict(sorted(Counter(partial).items())),
  }


def measure(splits: dict[str, list], judges: tuple[str, ...]) -> list[dict]:
  """Agreement by split and model, then pooled over each split's models, for every judge."""
  out = []
  for split, rows in splits.items():
    models = sorted({r["model"] for r in rows})
    groups = [(m, [r for r in rows if r["model"] == m]) for m in models]
    groups += [("all", rows)] if len(models) > 1 else []
    for model, group in groups:
      for judge in judges:
        why = role(judge, model) if model != "all" else ""
        out.append({"split": split, "model": model, "role": why, **agreement(group, judge)})
  return out
