"""launch.study: a study config with an unknown key refused in one line before any work, the drift
metric, the evaluation draws and the shipped study configs. (The study end to end, killed
between and inside variants and rerun: tests/faults/test_fault_study.py.)"""

import os
import subprocess
import sys

import pytest
from study_files import write_jsonl, write_study_files

from evals.study_config import StudyError, load_study, variant

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def study_files(tmp_path_factory):
  return write_study_files(tmp_path_factory.mktemp("study"))


def test_unknown_config_key_is_one_line_naming_variant_and_key(study_files, tmp_path):
  train = {"model": {"source": study_files["source"]}}
  bad = {"train": train, "eval": {"benchmarks": "strongreject"}}
  bad["variants"] = [variant("good"), variant("r1", overrides={"lora": {"rnak": 1}})]
  with pytest.raises(StudyError, match=r"study variant 'r1': unknown config key lora\.rnak; known"):
    load_study(bad)
  bad["variants"][1] = variant("r1", overrides={"optimizer": {"lr": 1}})
  with pytest.raises(StudyError, match=r"'r1': unknown config key optimizer\.lr; known sections"):
    load_study(bad)
  bad["variants"][1] = variant("r1", overrides={"lora": {"rank": 0}})
  with pytest.raises(StudyError, match=r"study variant 'r1': config\.lora\.rank=0"):
    load_study(bad)

  config = tmp_path / "bad_study.py"
  config.write_text(
    "from ml_collections import ConfigDict\n"
    "from evals.study_config import variant\n\n\ndef get_config():\n"
    f"  return ConfigDict(dict(train={train!r}, eval=dict(benchmarks='strongreject'),\n"
    "    variants=[variant('good'), variant('r1', overrides={'lora': {'rnak': 1}})]))\n"
  )
  workdir = tmp_path / "work"
  out = subprocess.run(
    [sys.executable, "-m", "launch.study", f"--config={config}", f"--workdir={workdir}"],
    cwd=REPO,
    capture_output=True,
    text=True,
    env=os.environ | {"JAX_PLATFORMS": "cpu"},
  )
  assert out.returncode == 2
  assert out.stderr.strip().splitlines()[-1].startswith("error: study variant 'r1': unknown")
  assert len(out.stderr.strip().splitlines()) == 1, out.stderr
  assert not workdir.exists()  # checked before any work


def test_drift_nll_matches_transformers(study_files):
  """The teacher-forced NLL per answer token equals transformers' on the same tokens."""
  import numpy as np
  import torch
  from transformers import AutoModelForCausalLM

  import lora_jax
  from evals.drift import answer_nll, drift_scores

  source = study_files["source"]
  rng = np.random.default_rng(0)
  refs = [
    {"prompt_ids": rng.integers(3, 100, p).tolist(), "answer_ids": rng.integers(3, 100, a).tolist()}
    for p, a in ((5, 7), (9, 3), (4, 70))  # the last one crosses a length bucket
  ]
  ours = answer_nll(lora_jax.load_pretrained(source), refs)
  hf = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
  for r, got in zip(refs, ours):
    ids = torch.tensor([r["prompt_ids"] + r["answer_ids"]])
    with torch.no_grad():
      logp = torch.log_softmax(hf(ids).logits[0, :-1].float(), -1)
    picked = logp.gather(1, ids[0, 1:, None])[:, 0][len(r["prompt_ids"]) - 1 :]
    assert got == pytest.approx(-picked.mean().item(), abs=1e-4)
  scores = drift_scores(ours, [x - 0.5 for x in ours])
  assert scores["nll_excess"]["mean"] == pytest.approx(0.5)


def test_eval_draws_are_seeded_filtered_and_never_training_prompts(tmp_path):
  from evals.study_data import draw, normalise

  rows = [
    {"id": str(i), "prompt": f"Prompt {i}", "label": "safe" if i % 2 else "unsafe"}
    for i in range(40)
  ]
  path = write_jsonl(tmp_path / "x.jsonl", rows)
  trained = frozenset({normalise("PROMPT  3"), normalise("prompt 5")})
  got = draw("xstest", path, {"n": 10, "label": "safe"}, trained)
  assert len(got) == 10 and all(r["label"] == "safe" for r in got)
  assert not {r["prompt"] for r in got} & {"Prompt 3", "Prompt 5"}
  assert got == draw("xstest", path, {"n": 10, "label": "safe"}, trained)  # same draw every time
  assert [int(r["id"]) for r in got] == sorted(int(r["id"]) for r in got)  # file order
  with pytest.raises(ValueError, match=r"eval.sample.xstest: n=19 but .* has 18 matching rows"):
    draw("xstest", path, {"n": 19, "label": "safe"}, trained)


def test_shipped_study_configs_load():
  from configs.study import demo, paper_7b

  paper = load_study(paper_7b.get_config())
  names = [v.name for v in paper.variants]
  for r in (1, 4, 16, 64):
    assert {f"lora_qkvo_mlp_r{r}", f"lora_mlp_r{r}", f"lora_up_r{r}"} <= set(names)
  assert paper.variant("full").run.train.mode == "full"
  assert paper.variant("lora_up_r1").run.lora.targets == ("up_proj",)
  assert any(v.run and v.run.lora.layers for v in paper.variants)  # the layer range
  assert sum(bool(v.run and v.run.ortho.beta) for v in paper.variants) == 8  # the regulariser
  assert {v.kind for v in paper.variants} == {"base", "train", "orthomerge"}
  mini = load_study(demo.get_config())
  assert [v.name for v in mini.variants] == ["base", "lora_up_r1", "lora_all_r8", "full"]
  assert mini.safety == ("strongreject", "harmbench", "advbench")


def test_demo_refusals_are_worded_in_many_ways():
  """No opening phrase dominates the demo's training refusals (a shared opening would make the
  demo's safety score partly a property of the data, not of what the model learned)."""
  from collections import Counter

  from lora_jax import jsonl
  from lora_jax.data import DEMO_REFUSALS

  rows = jsonl.records(DEMO_REFUSALS, missing_ok=False)
  refusals = [r["completion"] for r in rows[:48]]
  openings = Counter(" ".join(c.lower().replace(",", " ").split()[:2]) for c in refusals)
  assert openings.most_common(1)[0][1] <= 6, openings.most_common(3)
  assert sum(c.lower().startswith(("i'm sorry", "sorry")) for c in refusals) <= 3
