"""Evaluate models on safety and reasoning benchmarks, or grade answers made elsewhere.

Generate, grade and score (resumable: a rerun skips the (task, seed) answers already written)::

    python -m launch.eval --preset=reference --model=SOURCE [--adapter=DIR | --workdir=DIR] \\
        --benchmarks=strongreject,aime24,gpqa_diamond,humaneval_plus,mbpp_plus --out=DIR \\
        [--data_dir=DIR | --data=aime24=path/test.jsonl ...]

`--preset=reference` reproduces every evaluation setting of the paper's code (Llama-Guard-3-8B,
Qwen2.5-32B-Instruct re-checking AIME, bfloat16 merged weights, budgets that include the prompt,
its quirks); `--preset=fast` (the default) runs offline. A flag given explicitly wins over the
preset (evals/presets.py; the README's table lists the differences).

Answers made by another sampler: render the prompts, sample, grade (the answers file may also be
EvalPlus samples, lm-eval --log_samples output or an OpenAI batch output; see lora_jax/answers.py)::

    python -m launch.eval --benchmark=aime24 --write_prompts=prompts.jsonl --seeds=0-7
    python -m launch.sample --model=SOURCE --prompts=prompts.jsonl --out=answers.jsonl ...
    python -m launch.eval --benchmark=aime24 --generations=answers.jsonl --out=scores.json
"""

from __future__ import annotations

from absl import app, flags

from evals import benchmarks, external, presets, runner, sampler_fns, sandbox
from launch import common

FLAGS = flags.FLAGS

flags.DEFINE_enum("preset", "fast", list(presets.PRESETS), "Evaluation settings (see README).")
flags.DEFINE_string("model", None, "Model source: HF hub id, HF directory or GGUF file.")
flags.DEFINE_string("adapter", None, "LoRA adapter directory to load on top of --model.")
flags.DEFINE_string("workdir", None, "Training workdir: evaluate its exports/step_N checkpoints.")
flags.DEFINE_string("steps", "all", "With --workdir: 'all', 'last' or a list like 500,1000.")
flags.DEFINE_bool("include_base", False, "With --workdir: evaluate the base model too.")
flags.DEFINE_string("label", None, "Name of the results directory of a single model.")
flags.DEFINE_list(
  "benchmarks",
  ["strongreject", "aime24", "gpqa_diamond", "humaneval_plus", "mbpp_plus"],
  f"Benchmarks: {', '.join(benchmarks.REGISTRY)}.",
)
flags.DEFINE_string("out", None, "Output directory (or scores JSON file in grade-only mode).")
flags.DEFINE_string("data_dir", None, "Local data root laid out like shared/data.")
flags.DEFINE_multi_string("data", [], "Local file of one benchmark: name=path (repeatable).")
flags.DEFINE_enum("template", "reference", list(benchmarks.TEMPLATES), "Prompt templates.")
flags.DEFINE_integer("limit", None, "Only the first N problems of each benchmark.")
flags.DEFINE_integer("max_new_tokens", None, "Override every benchmark's token budget.")
flags.DEFINE_float("temperature", None, "Override every benchmark's temperature.")
flags.DEFINE_float("top_p", None, "Override every benchmark's top_p.")
flags.DEFINE_integer("max_batch", 8, "Sequences decoded together.")
flags.DEFINE_integer("code_workers", 2, "Processes running code tests.")
flags.DEFINE_enum(
  "sandbox",
  "auto",
  list(sandbox.ISOLATIONS),
  "Code sandbox isolation: auto (root: uid drop + namespaces; ordinary user: user namespaces;\n"
  "else separate processes with limits, with a warning), or one forced (BUILD.md).",
)
flags.DEFINE_string("benchmark", None, "The benchmark of --generations or --write_prompts.")
flags.DEFINE_string("generations", None, "Grade-only: JSONL of answers to grade.")
flags.DEFINE_string(
  "write_prompts", None, "Write --benchmark's prompts (one row per task and seed) to this JSONL."
)
# Settings a preset decides (None: the preset's value; given explicitly, the flag wins).
for _name in presets.FIELDS:
  _default = getattr(presets.PRESETS["fast"], _name)
  _define = {bool: flags.DEFINE_bool, int: flags.DEFINE_integer}.get(type(_default))
  (_define or flags.DEFINE_string)(_name, None, presets.flag_help(_name))


def _settings() -> presets.Settings:
  given = {name: FLAGS[name].value for name in presets.FIELDS if FLAGS[name].present}
  return presets.resolve(FLAGS.preset, **given)


def _value(result: dict, key: str) -> str:
  value = result[key]
  if value["mean"] is None:
    return f"{key} = n/a"
  return f"{key} = {value['mean']:.4f} [{value['ci_low']:.4f}, {value['ci_high']:.4f}]"


def _summary(result: dict) -> str:
  """The headline with its CI and n, the rule-based figure beside an LLM re-check's, the judge."""
  out = f"{_value(result, result['primary'])} (n={result[result['primary']]['n']})"
  if result["primary"] == "pass@1_llm":
    out += f"; rule-based {_value(result, 'pass@1')}"
  judge = result.get("judge_model") or result.get("judge")
  return out + (f"; judge: {judge}" if result["kind"] == "safety" and judge else "")


def _grade_only(settings: presets.Settings) -> None:
  if not (FLAGS.benchmark and FLAGS.generations and FLAGS.out):
    raise ValueError("grade-only needs --benchmark, --generations and --out")
  name = FLAGS.benchmark
  data = runner.parse_data(FLAGS.data)
  scores = external.grade_only(
    name,
    FLAGS.generations,
    FLAGS.out,
    data_path=benchmarks.resolve_path(name, data, FLAGS.data_dir, settings.reference_data),
    template=FLAGS.template,
    judges=sampler_fns.sampler_judges(settings, FLAGS.max_batch),
    code_workers=FLAGS.code_workers,
    code_isolation=FLAGS.sandbox,
    rules=settings.answer_rules,
    preset=settings.preset,
  )
  print(f"{name}: {_summary(scores['benchmarks'][name])} -> {FLAGS.out}")


def _write_prompts(settings: presets.Settings) -> None:
  if not FLAGS.benchmark:
    raise ValueError("--write_prompts needs --benchmark")
  cfg = _config(settings, (FLAGS.benchmark,))
  n, s = external.write_prompts(cfg, FLAGS.benchmark, FLAGS.write_prompts)
  stops = "".join(f" --stop={x}" for x in s.stop)
  # launch.sample's flags for the same settings (prompt-inclusive budget, the two-BOS quirk).
  extra = f" --max_model_len={s.max_model_len}" if s.max_model_len else ""
  extra += " --add_special_tokens" if s.add_special_tokens else ""
  print(
    f"wrote {n} prompts to {FLAGS.write_prompts}; the benchmark samples them with "
    f"--max_new_tokens={s.max_new_tokens} --temperature={s.temperature} --top_p={s.top_p}"
    f"{stops}{extra}"
  )


def _config(settings: presets.Settings, names: tuple[str, ...]) -> runner.EvalConfig:
  return presets.eval_config(
    settings,
    names,
    out_dir=FLAGS.out or "",
    template=FLAGS.template,
    data_paths=runner.parse_data(FLAGS.data),
    data_dir=FLAGS.data_dir,
    limit=FLAGS.limit,
    max_new_tokens=FLAGS.max_new_tokens,
    temperature=FLAGS.temperature,
    top_p=FLAGS.top_p,
    code_workers=FLAGS.code_workers,
    code_isolation=FLAGS.sandbox,
  )


def _evaluate(settings: presets.Settings) -> None:
  if not FLAGS.out:
    raise ValueError("--out is required")
  cfg = _config(settings, tuple(FLAGS.benchmarks))
  models = runner.resolve_models(
    model=FLAGS.model,
    adapter=FLAGS.adapter,
    workdir=FLAGS.workdir,
    steps=FLAGS.steps,
    include_base=FLAGS.include_base,
    label=FLAGS.label,
  )
  scores = runner.evaluate_models(
    cfg,
    models,
    sampler_fns.sampler_judges(settings, FLAGS.max_batch),  # a missing judge fails here
    dtype=settings.dtype,
    max_batch=FLAGS.max_batch,
    merge_dtype=settings.merge_dtype,
  )
  for label, result in scores.items():
    for name, value in result["benchmarks"].items():
      print(f"{label} {name}: {_summary(value)}")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  settings = _settings()
  sandbox.check_isolation(FLAGS.sandbox)  # before any answer is generated
  if FLAGS.write_prompts:
    _write_prompts(settings)
  elif FLAGS.generations or FLAGS.benchmark:
    _grade_only(settings)
  else:
    _evaluate(settings)


if __name__ == "__main__":
  common.run(main)
