"""Evaluation presets: the reference code's evaluation settings (`reference`), or an offline run
(`fast`), resolved once into `Settings`. A setting given explicitly (a flag) wins over its preset.

`reference` reproduces what the paper's code did (github.com/YihaoXue/lora-safety-reasoning:
sample_responses.py, evaluate_safety.py, utils.py, its README's lm_eval commands and
lm-evaluation-harness/math_metric_llm_eval_general.py, mcq_metric_gpqa.py), quirks included; each
setting below names where. `fast` is what runs offline on any machine: an offline refusal judge,
no LLM re-check, float32 weights with the adapter unmerged, budgets of new tokens.
Settings both presets share (seeds 0..7 for reasoning benchmarks, temperature 0.6 / top_p 0.95;
StrongREJECT temperature 1.0 / top_p 1.0, 2048 new tokens, one sample) live with the benchmarks.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from evals import benchmarks, refusal_judge, runner

LLAMA_GUARD_3 = "meta-llama/Llama-Guard-3-8B"
QWEN_MATH_JUDGE = "Qwen/Qwen2.5-32B-Instruct"
DTYPES = ("float32", "bfloat16", "float16")
MERGE_DTYPES = ("none",) + DTYPES
SAFETY_JUDGES = tuple(refusal_judge.REFUSAL_JUDGES) + ("llama_guard",)
NO_JUDGE = ("", "none")


@dataclass(frozen=True)
class Settings:
  preset: str
  seeds: str = "0-7"
  safety_seeds: str = "0"
  dtype: str = "float32"
  merge_dtype: str = "none"
  max_model_len: int = 0
  safety_double_bos: bool = False
  answer_rules: str = "extended"
  reference_data: bool = False
  safety_judge: str = refusal_judge.DEFAULT_REFUSAL_JUDGE
  judge_model: str = LLAMA_GUARD_3
  judge_dtype: str = "float32"
  math_judge_model: str = "none"
  math_judge_dtype: str = "float32"

  @property
  def math_judge(self) -> str | None:
    return None if self.math_judge_model in NO_JUDGE else self.math_judge_model

  @property
  def llama_guard(self) -> str | None:
    return self.judge_model if self.safety_judge == "llama_guard" else None


PRESETS = {
  "fast": Settings("fast"),
  "reference": Settings(
    "reference",
    dtype="bfloat16",
    merge_dtype="bfloat16",
    max_model_len=32768,
    safety_double_bos=True,
    answer_rules="reference",
    reference_data=True,
    safety_judge="llama_guard",
    judge_dtype="bfloat16",
    math_judge_model=QWEN_MATH_JUDGE,
    math_judge_dtype="float16",
  ),
}

# What each setting does, and where the reference code does it (flag help, the README's table).
ABOUT = {
  "seeds": ("Seeds of the reasoning benchmarks: 0-7 or 0,1,2.", "README: lm_eval --seed 0..7"),
  "safety_seeds": ("Seeds of the safety benchmarks (one answer each).", "sample_responses.py"),
  "dtype": (
    "Weights and compute of the evaluated model.",
    "vLLM `dtype='auto'`: the checkpoints' bfloat16",
  ),
  "merge_dtype": (
    "A LoRA adapter is merged into the weights, rounded to this dtype, before sampling "
    "(none: applied unmerged).",
    "utils.py `lora_merge`, lora_conversion.py: PEFT `merge_and_unload` on the bfloat16 base",
  ),
  "max_model_len": (
    "Reasoning benchmarks: prompt + answer at most this many tokens (0: the budget counts new "
    "tokens only, 32768 after the prompt).",
    "README's lm_eval: vLLM `max_model_len=32768`, `max_gen_toks=32768`",
  ),
  "safety_double_bos": (
    "Safety prompts start with two BOS: the tokenizer adds one before the chat template's "
    "(REFERENCE QUIRK).",
    "sample_responses.py: `apply_chat_template(tokenize=False)`, then vLLM `generate(str)`",
  ),
  "answer_rules": (
    "reference: math answers by its last-\\boxed extraction and is_equiv alone, Llama-Guard "
    "'unsafe' anywhere; extended: + integer, Minerva and math-verify equivalence, Llama-Guard's "
    "first line must read safe/unsafe.",
    "math_metric_llm_eval_general.py; evaluate_safety.py `parse_safety`",
  ),
  "reference_data": (
    "aime24 from the reference's file (Qwen2.5-Math's test.jsonl, fetched once, sha256-checked) "
    "instead of the hub's HuggingFaceH4/aime_2024.",
    "lm_eval task AIME: `math_eval_data/aime24/test.jsonl`",
  ),
  "safety_judge": (
    "Judge of harmfulness: llama_guard, or an offline refusal judge (refused = safe).",
    "evaluate_safety.py: Llama-Guard-3-8B, greedy, 512 tokens",
  ),
  "judge_model": ("Llama-Guard-3 weights: hub id or local directory.", "evaluate_safety.py"),
  "judge_dtype": ("Dtype of the Llama-Guard judge.", "vLLM `dtype='auto'`: bfloat16"),
  "math_judge_model": (
    "LLM re-judging math answers that were extracted but did not match, whose verdicts are "
    "then the headline (none: no re-check).",
    "math_metric_llm_eval_general.py: Qwen2.5-32B-Instruct, greedy, 20 tokens",
  ),
  "math_judge_dtype": ("Dtype of the math judge.", "math_metric_llm_eval_general.py: float16"),
}
FIELDS = tuple(f.name for f in dataclasses.fields(Settings) if f.name != "preset")


def _checks(s: Settings) -> list[tuple[bool, str]]:
  return [
    (s.dtype in DTYPES, f"--dtype={s.dtype}: expected one of {', '.join(DTYPES)}"),
    (s.judge_dtype in DTYPES, f"--judge_dtype={s.judge_dtype}: expected one of {DTYPES}"),
    (s.math_judge_dtype in DTYPES, f"--math_judge_dtype={s.math_judge_dtype}: expected {DTYPES}"),
    (
      s.merge_dtype in MERGE_DTYPES,
      f"--merge_dtype={s.merge_dtype}: expected one of {', '.join(MERGE_DTYPES)}",
    ),
    (s.max_model_len >= 0, f"--max_model_len={s.max_model_len}: expected >= 0 (0 = off)"),
    (
      s.answer_rules in benchmarks.ANSWER_RULES,
      f"--answer_rules={s.answer_rules}: expected one of {', '.join(benchmarks.ANSWER_RULES)}",
    ),
    (
      s.safety_judge in SAFETY_JUDGES,
      f"--safety_judge={s.safety_judge}: expected one of {', '.join(SAFETY_JUDGES)}",
    ),
  ]


def resolve(preset: str, **given) -> Settings:
  """The preset's settings with `given` ones (flags set on the command line) on top."""
  if preset not in PRESETS:
    raise ValueError(f"--preset={preset}: expected one of {', '.join(PRESETS)}")
  unknown = set(given) - set(FIELDS)
  if unknown:
    raise ValueError(f"unknown evaluation settings {sorted(unknown)}; known: {', '.join(FIELDS)}")
  settings = dataclasses.replace(PRESETS[preset], **given)
  for ok, message in _checks(settings):
    if not ok:
      raise ValueError(message)
  runner.parse_seeds(settings.seeds, "seeds")
  runner.parse_seeds(settings.safety_seeds, "safety_seeds")
  return settings


def eval_config(settings: Settings, benchmark_names: tuple[str, ...], **rest) -> runner.EvalConfig:
  """The runner's configuration for `settings`; `rest`: the fields presets leave alone."""
  return runner.EvalConfig(
    benchmarks=benchmark_names,
    seeds=runner.parse_seeds(settings.seeds, "seeds"),
    safety_seeds=runner.parse_seeds(settings.safety_seeds, "safety_seeds"),
    max_model_len=settings.max_model_len or None,
    safety_double_bos=settings.safety_double_bos,
    answer_rules=settings.answer_rules,
    reference_data=settings.reference_data,
    preset=settings.preset,
    **rest,
  )


def flag_help(name: str) -> str:
  what = ABOUT[name][0]
  values = "; ".join(f"{p}: {getattr(s, name)!r}" for p, s in PRESETS.items())
  return f"{what} Default: the preset's ({values})."


def differences_table() -> str:
  """The README's table: every setting on which the presets differ, and where the reference
  does it."""
  ref, fast = PRESETS["reference"], PRESETS["fast"]
  rows = [
    "| flag | what it does | `--preset=reference` | `--preset=fast` | the reference code |",
    "|---|---|---|---|---|",
  ]
  for name in FIELDS:
    if getattr(ref, name) != getattr(fast, name):
      a, b = (_show(getattr(s, name)) for s in (ref, fast))
      what, where = ABOUT[name]
      rows.append(f"| `--{name}` | {what} | {a} | {b} | {where} |")
  return "\n".join(rows)


def _show(value) -> str:
  if isinstance(value, bool):
    return "yes" if value else "no"
  return f"`{value}`"
