"""A study's config: the variants to compare, what to measure on them, checked before any work.

A study config file (configs/study/*.py) returns a ConfigDict:

    train      the training config every variant starts from (configs/base.py keys)
    variants   a list of `variant(...)` dicts, in the order the report shows them:
                 variant("full", overrides={"train": {"mode": "full"}})      trained
                 variant("base", kind="base")                                 the base model
                 variant("ortho", kind="orthomerge", of="lora_r16", mode="column", k=16)
    checkpoints  which checkpoints of each trained variant to evaluate: "all", "last" or "5,10"
    eval       benchmarks, data files, seeds, sampling overrides (evals.runner.EvalConfig)
    safety     the safety benchmarks pooled into the report's safety axis
    drift      the base model's greedy answers to benign prompts, scored under every variant
    analysis   weight-space analysis of every trained variant (lora_jax.analysis)

`load_study` turns it into a frozen `Study` with every variant's `RunConfig` built and checked:
an unknown key or a bad value is one line naming the variant and the key.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from lora_jax.run_config import RULES, ModelSpec, RunConfig, RunConfigError, from_dict

KINDS = ("train", "base", "orthomerge")
ORTHO_MODES = ("column", "row", "both")


class StudyError(ValueError):
  """A study config that cannot be run (one line, naming the variant and key)."""


def variant(name: str, kind: str = "train", overrides=None, **fields) -> dict:
  """One variant of a study config (see the module docstring)."""
  return {"name": name, "kind": kind, "overrides": dict(overrides or {}), **fields}


@dataclasses.dataclass(frozen=True)
class Variant:
  name: str
  kind: str  # train | base | orthomerge
  run: RunConfig | None = None  # train: the variant's training config
  of: str = ""  # orthomerge: the trained variant it merges
  mode: str = "column"  # orthomerge: which subspace is removed
  k: int = 16  # orthomerge: its size
  checkpoints: str = "all"


@dataclasses.dataclass(frozen=True)
class EvalSpec:
  benchmarks: tuple[str, ...]
  data: dict
  sample: dict  # benchmark -> n or {"n": n, field: value}: seeded draws (evals.study_data)
  seeds: tuple[int, ...] | None
  safety_seeds: tuple[int, ...] | None
  template: str
  max_new_tokens: int | None
  temperature: float | None
  top_p: float | None
  limit: int | None
  max_batch: int


@dataclasses.dataclass(frozen=True)
class DriftSpec:
  prompts: str  # "" = no drift measure; else a JSON/JSONL file of benign prompts
  n: int
  max_new_tokens: int


@dataclasses.dataclass(frozen=True)
class Study:
  base: ModelSpec  # the model every variant starts from (train.model)
  variants: tuple[Variant, ...]
  eval: EvalSpec
  safety: tuple[str, ...]
  drift: DriftSpec
  analysis_ks: tuple[int, ...] | None
  analysis: bool

  def variant(self, name: str) -> Variant:
    return next(v for v in self.variants if v.name == name)

  @property
  def trained(self) -> list[Variant]:
    return [v for v in self.variants if v.kind == "train"]


def load_study(config) -> Study:
  """The checked `Study` of a study ConfigDict (or nested dict)."""
  raw = config.to_dict() if hasattr(config, "to_dict") else dict(config)
  known = {"train", "variants", "checkpoints", "eval", "safety", "drift", "analysis"}
  if unknown := sorted(set(raw) - known):
    raise StudyError(f"study config: unknown key {unknown[0]!r}; known: {', '.join(sorted(known))}")
  train = raw.get("train") or {}
  _check_keys("the study's train config", train)
  variants = [_variant(v, train, raw.get("checkpoints", "all")) for v in raw.get("variants") or []]
  if not variants:
    raise StudyError("study config: no variants")
  _check_names(variants)
  try:
    base = from_dict(train).model
  except RunConfigError as e:
    raise StudyError(f"the study's train config: {e}") from None
  for v in variants:
    if v.run is not None and v.run.model.source != base.source:
      raise StudyError(
        f"study variant {v.name!r}: model.source={v.run.model.source!r}; every variant must "
        f"start from the study's base model {base.source!r} (train.model.source)"
      )
  ev = _eval(raw.get("eval") or {})
  safety = _names(raw.get("safety") or "strongreject")
  if missing := [s for s in safety if s not in ev.benchmarks]:
    raise StudyError(f"study config: safety={missing[0]!r} is not one of eval.benchmarks")
  drift = raw.get("drift") or {}
  analysis = raw.get("analysis") or {}
  ks = analysis.get("ks")
  return Study(
    base=base,
    variants=tuple(variants),
    eval=ev,
    safety=safety,
    drift=DriftSpec(
      str(drift.get("prompts") or ""), int(drift.get("n", 50)), int(drift.get("max_new_tokens", 64))
    ),
    analysis_ks=tuple(int(k) for k in _names(ks)) if ks else None,
    analysis=bool(analysis.get("enabled", True)),
  )


def _check_keys(where: str, overrides: Mapping) -> None:
  """Every key of a (partial) training config must be a configs/base.py key."""
  for section, values in overrides.items():
    if not isinstance(values, Mapping):
      raise StudyError(f"{where}: {section!r} is not a section of configs/base.py")
    for key in values:
      if f"{section}.{key}" not in RULES:
        known = sorted({k.split(".")[0] for k in RULES})
        hint = (
          f"known {section} keys: {', '.join(k for k in RULES if k.startswith(section + '.'))}"
          if any(k.startswith(section + ".") for k in RULES)
          else f"known sections: {', '.join(known)}"
        )
        raise StudyError(f"{where}: unknown config key {section}.{key}; {hint}")


def _merge(train: Mapping, overrides: Mapping) -> dict:
  out = {section: dict(values) for section, values in train.items()}
  for section, values in overrides.items():
    out.setdefault(section, {}).update(values)
  return out


def _variant(raw: Mapping, train: Mapping, checkpoints) -> Variant:
  name = str(raw.get("name") or "")
  if not name or "/" in name or name.startswith("."):
    raise StudyError(f"study variant {name!r}: expected a name usable as a directory")
  where = f"study variant {name!r}"
  kind = raw.get("kind", "train")
  if kind not in KINDS:
    raise StudyError(f"{where}: kind={kind!r}; expected one of {', '.join(KINDS)}")
  fields = {"name", "kind", "overrides", "of", "mode", "k", "checkpoints"}
  if unknown := sorted(set(raw) - fields):
    raise StudyError(f"{where}: unknown field {unknown[0]!r}; known: {', '.join(sorted(fields))}")
  overrides = raw.get("overrides") or {}
  checkpoints = str(raw.get("checkpoints") or checkpoints)
  _check_checkpoints(where, checkpoints)
  if kind != "train":
    if overrides:
      raise StudyError(f"{where}: a {kind} variant takes no training overrides")
    if kind == "base":
      return Variant(name, kind)
    mode, k = raw.get("mode", "column"), raw.get("k", 16)
    if mode not in ORTHO_MODES:
      raise StudyError(f"{where}: mode={mode!r}; expected one of {', '.join(ORTHO_MODES)}")
    if not isinstance(k, int) or k < 1:
      raise StudyError(f"{where}: k={k!r}; expected a positive integer")
    return Variant(name, kind, of=str(raw.get("of") or ""), mode=mode, k=k, checkpoints=checkpoints)
  _check_keys(where, overrides)
  try:
    run = from_dict(_merge(train, overrides))
  except RunConfigError as e:
    raise StudyError(f"{where}: {e}") from None
  return Variant(name, kind, run=run, checkpoints=checkpoints)


def _check_names(variants: list[Variant]) -> None:
  names = [v.name for v in variants]
  if dup := sorted({n for n in names if names.count(n) > 1}):
    raise StudyError(f"study variant {dup[0]!r} is listed twice")
  trained = {v.name for v in variants if v.kind == "train"}
  for v in variants:
    if v.kind == "orthomerge" and v.of not in trained:
      raise StudyError(
        f"study variant {v.name!r}: of={v.of!r}; expected a trained variant "
        f"({', '.join(sorted(trained)) or 'none'})"
      )


def _check_checkpoints(where: str, text: str) -> None:
  if text in ("all", "last") or all(p.strip().isdigit() for p in text.split(",")):
    return
  raise StudyError(f"{where}: checkpoints={text!r}; expected all, last or steps like 5,10")


def _names(value) -> tuple[str, ...]:
  if isinstance(value, str):
    return tuple(s.strip() for s in value.split(",") if s.strip())
  return tuple(str(s) for s in value)


def _seeds(value, key: str) -> tuple[int, ...] | None:
  if value in (None, ""):
    return None
  from evals.runner import parse_seeds

  return parse_seeds(str(value), f"config.eval.{key}")


def _eval(raw: Mapping) -> EvalSpec:
  from evals import benchmarks

  fields = {f.name for f in dataclasses.fields(EvalSpec)}
  if unknown := sorted(set(raw) - fields):
    raise StudyError(f"study config: unknown key eval.{unknown[0]}; known: {', '.join(fields)}")
  names = _names(raw.get("benchmarks") or "")
  if not names:
    raise StudyError("study config: eval.benchmarks is empty")
  for name in names:
    benchmarks.get(name)
  data = dict(raw.get("data") or {})
  if extra := [k for k in data if k not in names]:
    raise StudyError(f"study config: eval.data names {extra[0]!r}, not one of eval.benchmarks")
  sample = dict(raw.get("sample") or {})
  if extra := [k for k in sample if k not in names]:
    raise StudyError(f"study config: eval.sample names {extra[0]!r}, not one of eval.benchmarks")
  return EvalSpec(
    benchmarks=names,
    data=data,
    sample=sample,
    seeds=_seeds(raw.get("seeds"), "seeds"),
    safety_seeds=_seeds(raw.get("safety_seeds"), "safety_seeds"),
    template=str(raw.get("template") or "reference"),
    max_new_tokens=raw.get("max_new_tokens"),
    temperature=raw.get("temperature"),
    top_p=raw.get("top_p"),
    limit=raw.get("limit"),
    max_batch=int(raw.get("max_batch") or 8),
  )
