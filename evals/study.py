"""One command for a whole study: train what is not trained, evaluate every chosen checkpoint,
analyse the weights, write one report (`python -m launch.study`, configs/study/*.py).

Layout of the study's workdir::

    study.json                   the variants as checked (what this workdir holds)
    stages.jsonl                 one line per stage that ran: wall and CPU seconds
    data/<benchmark>.jsonl       seeded draws from the benchmark files (eval.sample)
    runs/<variant>/              a training workdir (lora_jax.train); done.json once finished
    runs/<variant>/exports/step_N  an OrthoMerge variant's merged model of its source's step N
    evals/<variant>/<label>/     answers, grades and scores.json (evals.runner); done.json last
    drift/reference.jsonl        the base model's greedy answers to the drift prompts
    analysis/<variant>.jsonl     weight-space records (lora_jax.analysis)
    report/                      report.md, the trade-off plots, analysis/ plots

After a kill -9 a rerun repeats no finished work: each unit (a training run, an export, one
checkpoint's evaluation, one variant's analysis) writes its completion marker atomically when it
is whole, training resumes from its last checkpoint and the runner keeps the answers it wrote.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import os
import shutil
import time

from evals import drift, runner, sampler_fns, study_data, study_report
from evals.study_config import Study, StudyError, Variant
from lora_jax import jsonl

log = logging.getLogger(__name__)


def run_study(study: Study, workdir: str) -> dict:
  """Run every stage that is not done yet; returns the report's paths."""
  s = _Runner(study, workdir)
  s.check_workdir()
  for v in study.trained:
    s.train(v)
  for v in study.variants:
    if v.kind == "orthomerge":
      s.export(v)
  s.evaluate_all()
  if study.analysis:
    for v in study.variants:
      if v.kind != "base":
        s.analyse(v)
  with s.stage("report"):
    return study_report.write_study_report(study, workdir)


def read_json(path: str):
  with open(path, encoding="utf-8") as f:
    return json.load(f)


class _Runner:
  def __init__(self, study: Study, workdir: str):
    self.study, self.workdir = study, workdir
    self.judges = runner.Judges()  # offline: the default refusal judge (refusal_classifier)
    self._base = None  # (model, tokenizer) while base-model work remains
    self._refs = self._base_nll = None
    self.train_prompts = study_data.training_prompts([v.run.data.source for v in study.trained])

  # ---- bookkeeping ------------------------------------------------------------------------------
  def path(self, *parts: str) -> str:
    return os.path.join(self.workdir, *parts)

  def stage(self, name: str, variant: str = "", label: str = ""):
    return _Stage(self.path("stages.jsonl"), name, variant, label)

  def check_workdir(self) -> None:
    """Before any work: a workdir holding another study's runs under the same names is refused."""
    os.makedirs(self.workdir, exist_ok=True)
    for v in self.study.trained:
      saved = self.path("runs", v.name, "config.json")
      if os.path.exists(saved) and _comparable(read_json(saved)) != _comparable(v.run.to_dict()):
        raise StudyError(
          f"study variant {v.name!r}: {os.path.dirname(saved)} was trained with another config; "
          "use another --workdir or delete that run"
        )
    study = {
      "base": self.study.base.source,
      "variants": [_describe(v) for v in self.study.variants],
    }
    runner.write_json(self.path("study.json"), study)

  # ---- training and exports ---------------------------------------------------------------------
  def train(self, v: Variant) -> None:
    done = self.path("runs", v.name, "done.json")
    if os.path.exists(done):
      return
    from lora_jax.run import checkpoint_steps
    from lora_jax.train import train

    with self.stage("train", v.name):
      result = train(v.run, self.path("runs", v.name))
    if result.status != "done":
      raise RuntimeError(f"study variant {v.name!r}: training stopped ({result.status})")
    runner.write_json(done, {"step": result.step, "steps": checkpoint_steps(result.workdir)})

  def steps(self, v: Variant) -> list[int]:
    """The checkpoint steps of a trained (or merged) variant chosen by its `checkpoints`."""
    source = self.study.variant(v.of) if v.kind == "orthomerge" else v
    present = read_json(self.path("runs", source.name, "done.json"))["steps"]
    if v.checkpoints == "all":
      return present
    if v.checkpoints == "last":
      return present[-1:]
    wanted = [int(s) for s in v.checkpoints.split(",")]
    if missing := [s for s in wanted if s not in present]:
      raise StudyError(
        f"study variant {v.name!r}: checkpoints {missing} not saved; steps present: {present}"
      )
    return wanted

  def export(self, v: Variant) -> None:
    """OrthoMerge: the source's checkpoint with its update projected, as a merged model."""
    from lora_jax.export import export_checkpoint

    for step in self.steps(v):
      out = self.path("runs", v.name, "exports", f"step_{step}")
      if os.path.exists(out):
        continue
      tmp = out + ".partial"
      shutil.rmtree(tmp, ignore_errors=True)  # left by a killed export
      with self.stage("export", v.name, f"step_{step}"):
        source = self.path("runs", v.of)
        export_checkpoint(source, tmp, "merged", step, ortho=v.mode, ortho_k=v.k)
        os.replace(tmp, out)

  # ---- evaluation -------------------------------------------------------------------------------
  def evaluate_all(self) -> None:
    base_first = sorted(self.study.variants, key=lambda v: v.kind != "base")
    if self.study.drift.prompts:
      self.drift_reference()
    for v in base_first:
      if v.kind != "base":
        self._free_base()
      for label, load in self.checkpoints(v):
        self.evaluate(v, label, load)
    self._free_base()

  def checkpoints(self, v: Variant):
    """(label, loader) of every checkpoint of `v` to evaluate; loaders return (model, tokenizer)."""
    if v.kind == "base":
      return [("base", self.base_model)]
    if v.kind == "orthomerge":
      return [
        (f"step_{s}", _export_loader(self.path("runs", v.name, "exports", f"step_{s}")))
        for s in self.steps(v)
      ]
    return [(f"step_{s}", _run_loader(self.path("runs", v.name), s)) for s in self.steps(v)]

  def base_model(self):
    if self._base is None:
      import lora_jax

      base = self.study.base
      # In the dtypes the variants train and are evaluated in (train.precision), so the base's
      # row differs from theirs by the training only.
      model = lora_jax.load_pretrained(
        base.source, dtype=base.dtype, compute_dtype=base.compute_dtype, attention=base.attention
      )
      self._base = (
        model,
        lora_jax.load_tokenizer(base.tokenizer_source),
      )
    return self._base

  def _free_base(self) -> None:
    self._base = None
    gc.collect()

  def drift_reference(self) -> None:
    spec = self.study.drift
    ref_path, nll_path = self.path("drift", "reference.jsonl"), self.path("drift", "base_nll.json")
    if not os.path.exists(nll_path):
      with self.stage("drift_reference"):
        model, tokenizer = self.base_model()
        prompts = drift.load_prompts(spec.prompts, spec.n)
        refs = drift.reference_answers(
          model, tokenizer, prompts, ref_path, spec.max_new_tokens, self.study.eval.max_batch
        )
        runner.write_json(nll_path, drift.answer_nll(model, refs))
    self._refs = jsonl.records(ref_path, missing_ok=False)
    self._base_nll = read_json(nll_path)

  def eval_config(self, v: Variant) -> runner.EvalConfig:
    e = self.study.eval
    return runner.EvalConfig(
      benchmarks=e.benchmarks,
      out_dir=self.path("evals", v.name),
      seeds=e.seeds,
      safety_seeds=e.safety_seeds,
      template=e.template,
      data_paths=study_data.data_paths(e, self.path("data"), self.train_prompts),
      limit=e.limit,
      max_new_tokens=e.max_new_tokens,
      temperature=e.temperature,
      top_p=e.top_p,
    )

  def evaluate(self, v: Variant, label: str, load) -> None:
    done = self.path("evals", v.name, label, "done.json")
    if os.path.exists(done):
      return
    cfg = self.eval_config(v)
    info = {"model": self.study.base.source, "variant": v.name}
    with self.stage("evaluate", v.name, label):
      model, tokenizer = load()
      runner.generate_all(
        cfg, label, sampler_fns.model_generate_fn(model, tokenizer, self.study.eval.max_batch), info
      )
      scores = runner.grade_all(cfg, label, self.judges, info)
      if self._refs is not None:
        nll = drift.answer_nll(model, self._refs)
        scores["benchmarks"]["drift"] = drift.drift_scores(nll, self._base_nll)
        runner.write_json(self.path("evals", v.name, label, "scores.json"), scores)
      del model
      gc.collect()
    runner.write_json(done, {"label": label})

  # ---- analysis ---------------------------------------------------------------------------------
  def analyse(self, v: Variant) -> None:
    path = self.path("analysis", f"{v.name}.jsonl")
    if os.path.exists(path):
      return
    from lora_jax.analysis import analyze_runs

    ks, base = self.study.analysis_ks, self.study.base.source
    with self.stage("analyse", v.name):
      if v.kind == "orthomerge":
        records = []
        for step in self.steps(v):
          model_dir = self.path("runs", v.name, "exports", f"step_{step}")
          recs = analyze_runs(base, {v.name: model_dir}, "all", ks, progress=False)[v.name]
          records += [r | {"step": step} for r in recs]
      else:
        steps = ",".join(map(str, self.steps(v)))
        records = analyze_runs(
          base, {v.name: self.path("runs", v.name)}, steps, ks, progress=False
        )[v.name]
      jsonl.write_atomic(path, records)


def _run_loader(workdir: str, step: int):
  def load():
    from lora_jax.run import restore_model

    model, tokenizer, _, _ = restore_model(workdir, step)
    return model, tokenizer

  return load


def _export_loader(model_dir: str):
  def load():
    import lora_jax

    return lora_jax.load_pretrained(model_dir), lora_jax.load_tokenizer(model_dir)

  return load


def _comparable(config: dict) -> dict:
  """A saved run config without the keys that do not change what is trained."""
  out = {k: dict(v) for k, v in config.items() if isinstance(v, dict)}
  for key in ("log", "checkpoint"):
    out.pop(key, None)
  return json.loads(json.dumps(out))


def _describe(v: Variant) -> dict:
  d = {"name": v.name, "kind": v.kind, "checkpoints": v.checkpoints}
  if v.kind == "orthomerge":
    d |= {"of": v.of, "mode": v.mode, "k": v.k}
  if v.run is not None:
    d["config"] = v.run.to_dict()
  return d


@dataclasses.dataclass
class _Stage:
  """Times a stage and appends it to stages.jsonl when it finishes (not when it fails)."""

  path: str
  name: str
  variant: str
  label: str

  def __enter__(self):
    log.info("study: %s %s %s", self.name, self.variant, self.label)
    self.t0, self.c0 = time.perf_counter(), time.process_time()
    return self

  def __exit__(self, exc_type, *exc) -> None:
    if exc_type is not None:
      return
    row = {"stage": self.name, "variant": self.variant, "label": self.label}
    row |= {
      "seconds": round(time.perf_counter() - self.t0, 2),
      "cpu_seconds": round(time.process_time() - self.c0, 2),
      "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    with jsonl.Appender(self.path) as out:
      out.write(row)
