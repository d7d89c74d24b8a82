"""Evaluate models on safety and reasoning benchmarks, or grade answers made elsewhere.

Generate, grade and score (resumable: a rerun skips the (task, seed) answers already written)::

    python -m launch.eval --model=SOURCE [--adapter=DIR | --workdir=DIR --steps=all] \\
        --benchmarks=strongreject,aime24,gpqa_diamond,humaneval_plus,mbpp_plus --seeds=0-7 \\
        --out=DIR [--data_dir=DIR | --data=aime24=path/test.jsonl ...]

Answers made by another sampler: render the prompts, sample, grade (the answers file may also be
EvalPlus samples, lm-eval --log_samples output or an OpenAI batch output; see lora_jax/answers.py)::

    python -m launch.eval --benchmark=aime24 --write_prompts=prompts.jsonl --seeds=0-7
    python -m launch.sample --model=SOURCE --prompts=prompts.jsonl --out=answers.jsonl ...
    python -m launch.eval --benchmark=aime24 --generations=answers.jsonl --out=scores.json
"""

from __future__ import annotations

from absl import app, flags

from evals import benchmarks, external, runner
from launch import common

FLAGS = flags.FLAGS

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
flags.DEFINE_string("seeds", "0-7", "Seeds of the reasoning benchmarks: 0-7 or 0,1,2.")
flags.DEFINE_string("safety_seeds", "0", "Seeds of the safety benchmarks (one answer each).")
flags.DEFINE_string("out", None, "Output directory (or scores JSON file in grade-only mode).")
flags.DEFINE_string("data_dir", None, "Local data root laid out like shared/data.")
flags.DEFINE_multi_string("data", [], "Local file of one benchmark: name=path (repeatable).")
flags.DEFINE_enum("template", "reference", list(benchmarks.TEMPLATES), "Prompt templates.")
flags.DEFINE_integer("limit", None, "Only the first N problems of each benchmark.")
flags.DEFINE_integer("max_new_tokens", None, "Override every benchmark's token budget.")
flags.DEFINE_float("temperature", None, "Override every benchmark's temperature.")
flags.DEFINE_float("top_p", None, "Override every benchmark's top_p.")
flags.DEFINE_enum(
  "safety_judge",
  "refusal_classifier",
  ["refusal_classifier", "refusal_behaviour", "gcg_keywords", "llama_guard"],
  "Judge of harmfulness: an offline refusal judge (refused = safe; evals/refusal_judge.py) or "
  "Llama-Guard-3. Refusal rates use the refusal judge (refusal_classifier with llama_guard).",
)
flags.DEFINE_string("judge_model", "meta-llama/Llama-Guard-3-8B", "Llama-Guard-3 source.")
flags.DEFINE_string(
  "math_judge_model",
  None,
  "LLM re-checking math mismatches (the reference: Qwen/Qwen2.5-32B-Instruct).",
)
flags.DEFINE_string("dtype", "float32", "Parameter dtype of the evaluated and judge models.")
flags.DEFINE_integer("max_batch", 8, "Sequences decoded together.")
flags.DEFINE_integer("code_workers", 2, "Processes running code tests.")
flags.DEFINE_string("benchmark", None, "The benchmark of --generations or --write_prompts.")
flags.DEFINE_string("generations", None, "Grade-only: JSONL of answers to grade.")
flags.DEFINE_string(
  "write_prompts", None, "Write --benchmark's prompts (one row per task and seed) to this JSONL."
)


def _summary(result: dict) -> str:
  value = result[result["primary"]]
  if value["mean"] is None:
    return f"{result['primary']} = n/a"
  return (
    f"{result['primary']} = {value['mean']:.4f} "
    f"[{value['ci_low']:.4f}, {value['ci_high']:.4f}] (n={value['n']})"
  )


def _judges() -> runner.Judges:
  guard = FLAGS.judge_model if FLAGS.safety_judge == "llama_guard" else None
  judges = runner.sampler_judges(guard, FLAGS.math_judge_model, FLAGS.dtype, FLAGS.max_batch)
  if not guard:
    judges.refusal = FLAGS.safety_judge
  return judges


def _grade_only() -> None:
  if not (FLAGS.benchmark and FLAGS.generations and FLAGS.out):
    raise ValueError("grade-only needs --benchmark, --generations and --out")
  name = FLAGS.benchmark
  scores = external.grade_only(
    name,
    FLAGS.generations,
    FLAGS.out,
    data_path=benchmarks.resolve_path(name, runner.parse_data(FLAGS.data), FLAGS.data_dir),
    template=FLAGS.template,
    judges=_judges(),
    code_workers=FLAGS.code_workers,
  )
  print(f"{name}: {_summary(scores['benchmarks'][name])} -> {FLAGS.out}")


def _write_prompts() -> None:
  if not FLAGS.benchmark:
    raise ValueError("--write_prompts needs --benchmark")
  n, s = external.write_prompts(_config((FLAGS.benchmark,)), FLAGS.benchmark, FLAGS.write_prompts)
  stops = "".join(f" --stop={x}" for x in s.stop)
  print(
    f"wrote {n} prompts to {FLAGS.write_prompts}; the benchmark samples them with "
    f"--max_new_tokens={s.max_new_tokens} --temperature={s.temperature} --top_p={s.top_p}{stops}"
  )


def _config(names: tuple[str, ...]) -> runner.EvalConfig:
  return runner.EvalConfig(
    benchmarks=names,
    out_dir=FLAGS.out or "",
    seeds=runner.parse_seeds(FLAGS.seeds, "seeds"),
    safety_seeds=runner.parse_seeds(FLAGS.safety_seeds, "safety_seeds"),
    template=FLAGS.template,
    data_paths=runner.parse_data(FLAGS.data),
    data_dir=FLAGS.data_dir,
    limit=FLAGS.limit,
    max_new_tokens=FLAGS.max_new_tokens,
    temperature=FLAGS.temperature,
    top_p=FLAGS.top_p,
    code_workers=FLAGS.code_workers,
  )


def _evaluate() -> None:
  if not FLAGS.out:
    raise ValueError("--out is required")
  cfg = _config(tuple(FLAGS.benchmarks))
  models = runner.resolve_models(
    model=FLAGS.model,
    adapter=FLAGS.adapter,
    workdir=FLAGS.workdir,
    steps=FLAGS.steps,
    include_base=FLAGS.include_base,
    label=FLAGS.label,
  )
  scores = runner.evaluate_models(
    cfg, models, _judges, dtype=FLAGS.dtype, max_batch=FLAGS.max_batch
  )
  for label, result in scores.items():
    for name, value in result["benchmarks"].items():
      print(f"{label} {name}: {_summary(value)}")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if FLAGS.write_prompts:
    _write_prompts()
  elif FLAGS.generations or FLAGS.benchmark:
    _grade_only()
  else:
    _evaluate()


if __name__ == "__main__":
  common.run(main)
