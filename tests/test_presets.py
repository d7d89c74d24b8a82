"""Evaluation presets: `launch.eval --preset=reference` end to end on tiny models (policy, Llama-Guard
judge, math judge: render -> sample -> parse -> score), the settings it records, flags over the
preset, the README's table, the merge into bfloat16 against PEFT, the pinned AIME file, and the
one-line error for a judge whose weights are missing.

The tiny models are "automata": attention and MLP outputs are zeroed, so a model's next token
depends on its last token only, and the embeddings and head are set so that chosen tokens lead
to chosen next tokens (the policy writes "\\boxed{1}", the judges "unsafe" and "True").
"""

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
from conftest import REPO, SHARED
from helpers import tiny_hf_model

from evals import benchmarks, presets, reference_files, runner, safety, sampler_fns

R1_TOKENIZER = SHARED / "tokenizers/deepseek-r1-distill-qwen"
AIME24 = SHARED / "data/aime24/test.jsonl"
STRONGREJECT = SHARED / "data/strongreject/strongreject_dataset.csv"
JUDGE_WORDS = ["<unk>", "<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>"]
JUDGE_WORDS += ["<|end_header_id|>", "<|im_start|>", "<|im_end|>", "unsafe", "safe", "True"]
JUDGE_WORDS += ["False", "assistant"]


@pytest.fixture(autouse=True)
def _shared_files():
  missing = [p for p in (R1_TOKENIZER, AIME24, STRONGREJECT) if not p.exists()]
  if missing:
    pytest.fail(f"shared files missing: {missing} (the ../shared checkout)")


def _automaton(model, chains: list[list[int]]):
  """Make `model` (transformers, float32) follow each chain: token i -> token i+1."""
  import torch

  steps = {a: b for chain in chains for a, b in zip(chain, chain[1:])}
  with torch.no_grad():
    for layer in model.model.layers:
      layer.self_attn.o_proj.weight.zero_()
      layer.mlp.down_proj.weight.zero_()
    model.model.norm.weight.fill_(1.0)
    embed, head = model.model.embed_tokens.weight, model.lm_head.weight
    head.zero_()
    for i, (src, dst) in enumerate(steps.items()):
      embed[src] = 0.0
      embed[src, i] = 1.0
      head[dst, i] += 50.0  # logit 400 after the RMSNorm: one-hot at any temperature
  return model


def _judge_dir(path, last_word: str, verdict: str) -> str:
  """A tiny Llama "judge" with a word-level tokenizer (BOS added like Llama-3's) and
  Llama-Guard-3's chat template, answering `verdict` to any prompt ending in `last_word`."""
  from tokenizers import Tokenizer, models, pre_tokenizers, processors
  from transformers import PreTrainedTokenizerFast

  tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(JUDGE_WORDS)}, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.add_special_tokens([w for w in JUDGE_WORDS if w.startswith("<|")])
  tok.post_processor = processors.TemplateProcessing(
    single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", 1)]
  )
  fast = PreTrainedTokenizerFast(
    tokenizer_object=tok,
    bos_token="<|begin_of_text|>",
    eos_token="<|eot_id|>",
    unk_token="<unk>",
    chat_template=safety.LLAMA_GUARD_3_TEMPLATE,
  )
  fast.save_pretrained(path)
  ids = {w: i for i, w in enumerate(JUDGE_WORDS)}
  model = tiny_hf_model(
    "llama", vocab_size=len(JUDGE_WORDS) + 4, bos_token_id=1, eos_token_id=2, num_hidden_layers=1
  )
  _automaton(model, [[ids[last_word], ids[verdict], ids["<|eot_id|>"]]]).save_pretrained(path)
  return str(path)


def _policy_dir(path) -> str:
  """A tiny Qwen2 with the DeepSeek-R1 tokenizer that answers "\\boxed{1}" to any chat prompt."""
  from transformers import AutoTokenizer

  tok = AutoTokenizer.from_pretrained(R1_TOKENIZER)
  assistant = tok.convert_tokens_to_ids("<｜Assistant｜>")
  answer = tok.encode("\\boxed{1}", add_special_tokens=False)
  model = tiny_hf_model(  # small: the vocabulary (152064) dominates its size
    "qwen2",
    vocab_size=152064,
    hidden_size=16,
    intermediate_size=24,
    num_hidden_layers=1,
    bos_token_id=tok.bos_token_id,
    eos_token_id=tok.eos_token_id,
  )
  _automaton(model, [[assistant, *answer, tok.eos_token_id]]).save_pretrained(path)
  for f in os.listdir(R1_TOKENIZER):
    if f != "README.md":
      shutil.copy(R1_TOKENIZER / f, path / f)
  return str(path)


def _adapter_dir(model_dir, path) -> str:
  """A PEFT LoRA adapter on up_proj with non-zero B (the MLP output is zeroed, so the automaton
  still holds; the merge is real)."""
  import torch
  from peft import LoraConfig, get_peft_model
  from transformers import AutoModelForCausalLM

  base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
  peft = get_peft_model(base, LoraConfig(r=2, lora_alpha=16, target_modules=["up_proj"]))
  torch.manual_seed(1)
  with torch.no_grad():
    for name, p in peft.named_parameters():
      if "lora_B" in name:
        p.normal_(0.0, 0.5)
  peft.save_pretrained(path)
  return str(path)


def _run_eval(*args, timeout=900):
  env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1"}
  return subprocess.run(
    [sys.executable, "-m", "launch.eval", *args],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=timeout,
  )


def _rows(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


def _prompt_ids(tok, text: str, two_bos: bool) -> list[int]:
  rendered = tok.apply_chat_template(
    [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
  )
  return tok(rendered, add_special_tokens=two_bos)["input_ids"]


@pytest.mark.slow
def test_reference_preset_end_to_end(tmp_path):
  from transformers import AutoTokenizer

  policy = _policy_dir(tmp_path / "policy")
  adapter = _adapter_dir(policy, tmp_path / "adapter")
  guard = _judge_dir(tmp_path / "guard", "<|end_header_id|>", "unsafe")
  math_judge = _judge_dir(tmp_path / "math_judge", "assistant", "True")
  tok = AutoTokenizer.from_pretrained(policy)
  aime = list(benchmarks.load("aime24", str(AIME24)).values())[:2]
  lengths = [len(_prompt_ids(tok, benchmarks.build_prompt("aime24", r, 0), False)) for r in aime]
  assert lengths[0] - lengths[1] >= 3, lengths  # the first prompt is the longer one
  max_model_len = lengths[0] + 3  # leaves the first problem 3 tokens, too few for "\boxed{1}"
  out = tmp_path / "out"
  done = _run_eval(
    "--preset=reference",
    f"--model={policy}",
    f"--adapter={adapter}",
    "--label=lora",
    "--benchmarks=strongreject,aime24",
    f"--data=aime24={AIME24}",
    f"--data=strongreject={STRONGREJECT}",
    "--limit=2",
    "--seeds=0-1",
    "--max_new_tokens=8",
    f"--max_model_len={max_model_len}",
    f"--judge_model={guard}",
    f"--math_judge_model={math_judge}",
    "--max_batch=4",
    f"--out={out}",
  )
  assert done.returncode == 0, done.stderr[-3000:]
  scores = json.loads((out / "lora" / "scores.json").read_text())
  assert scores["preset"] == "reference" and scores["adapter"] == adapter
  assert (scores["dtype"], scores["merge_dtype"]) == ("bfloat16", "bfloat16")
  _check_strongreject(out / "lora", scores["benchmarks"]["strongreject"], tok, guard)
  _check_aime(out / "lora", scores["benchmarks"]["aime24"], aime, lengths, max_model_len)
  assert scores["benchmarks"]["aime24"]["math_judge_model"] == math_judge
  assert re.search(
    r"lora aime24: pass@1_llm = 0\.5000 .*; rule-based pass@1 = 0\.0000", done.stdout
  )


def _check_strongreject(run, result, tok, guard):
  """Two BOS in every prompt, Llama-Guard on our sampler, its "unsafe" read as unsafe."""
  assert (result["judge"], result["judge_model"], result["n_invalid"], result["n_tasks"]) == (
    "llama_guard_3",
    guard,
    0,
    2,
  )
  assert result["safety_score"]["mean"] == 0.0
  meta = json.loads((run / "generations" / "strongreject.meta.json").read_text())
  assert meta["sampling"] == {
    "temperature": 1.0,
    "top_p": 1.0,
    "max_new_tokens": 8,
    "stop": [],
    "n": 1,
    "add_special_tokens": True,
  }
  assert meta["model"]["merge_dtype"] == "bfloat16" and meta["model"]["dtype"] == "bfloat16"
  records = benchmarks.load("strongreject", str(STRONGREJECT))
  for row in _rows(run / "generations" / "strongreject.jsonl"):
    ids = _prompt_ids(tok, records[row["id"]]["prompt"], True)
    assert ids[:2] == [tok.bos_token_id] * 2 and row["num_prompt_tokens"] == len(ids)
    assert row["completion"] == "\\boxed{1}"
  graded = _rows(run / "graded" / "strongreject.jsonl")
  assert {g["judge_output"].strip() for g in graded} == {"unsafe"}


def _check_aime(run, result, aime, lengths, max_model_len):
  """The budget includes the prompt; the rule-based match fails ("1" is wrong); the LLM re-check
  of the extracted mismatches says True and is the headline, the rule-based figure beside it."""
  assert (result["primary"], result["answer_rules"]) == ("pass@1_llm", "reference")
  assert result["pass@1"]["mean"] == 0.0 and result["pass@1_llm"]["mean"] == 0.5
  assert (result["n_llm_rechecked"], result["n_truncated"], result["n_no_answer"]) == (2, 2, 2)
  meta = json.loads((run / "generations" / "aime24.meta.json").read_text())
  assert meta["sampling"]["max_model_len"] == max_model_len
  assert meta["sampling"]["stop"] == ["Problem:"] and "add_special_tokens" not in meta["sampling"]
  ids = [r["id"] for r in aime]
  for row in _rows(run / "generations" / "aime24.jsonl"):
    assert row["num_prompt_tokens"] == lengths[ids.index(row["id"])]
    assert row["num_prompt_tokens"] + row["num_tokens"] <= max_model_len
  graded = {g["task_id"]: g for g in _rows(run / "graded" / "aime24.jsonl")}
  cut, whole = graded[ids[0]], graded[ids[1]]
  assert (cut["finish_reason"], cut["extracted"], cut["llm_correct"]) == ("length", None, False)
  assert (whole["extracted"], whole["rule"], whole["llm_correct"]) == ("1", "mismatch", True)


@pytest.mark.slow
def test_a_missing_judge_is_one_line_before_any_work(tmp_path):
  out = tmp_path / "out"
  done = _run_eval(
    "--preset=reference", "--model=org/unused", "--benchmarks=aime24", f"--out={out}"
  )
  assert done.returncode == 2, done.stderr
  line = done.stderr.strip().splitlines()[-1]
  assert line.startswith("error: the safety judge meta-llama/Llama-Guard-3-8B cannot be loaded (")
  assert line.endswith(
    "give its weights with --judge_model=/path/to/Llama-Guard-3-8B, "
    "or judge offline with --safety_judge=refusal_classifier"
  )
  assert "Traceback" not in done.stderr and not out.exists()


def test_missing_math_judge_names_its_flag(tmp_path, monkeypatch):
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  settings = presets.resolve("reference", safety_judge="refusal_behaviour")
  with pytest.raises(ValueError) as e:
    sampler_fns.sampler_judges(settings)
  assert str(e.value).startswith("the math re-check judge Qwen/Qwen2.5-32B-Instruct cannot be")
  assert "--math_judge_model=/path/to/Qwen2.5-32B-Instruct" in str(e.value)
  assert "\n" not in str(e.value)
  with pytest.raises(ValueError, match=r"no config.json in .*; give its weights with --judge_mo"):
    sampler_fns.sampler_judges(presets.resolve("fast", safety_judge="llama_guard", judge_model="/"))
  judges = sampler_fns.sampler_judges(presets.resolve("fast"))  # offline: nothing to look for
  assert (judges.llama_guard, judges.math, judges.refusal) == (None, None, "refusal_classifier")


def test_flags_win_over_the_preset():
  ref = presets.resolve("reference")
  assert (ref.safety_judge, ref.math_judge, ref.max_model_len) == (
    "llama_guard",
    "Qwen/Qwen2.5-32B-Instruct",
    32768,
  )
  mixed = presets.resolve("reference", math_judge_model="none", dtype="float32", max_model_len=0)
  assert mixed.math_judge is None and mixed.dtype == "float32" and mixed.merge_dtype == "bfloat16"
  assert presets.resolve("fast", merge_dtype="bfloat16").merge_dtype == "bfloat16"
  cfg = presets.eval_config(mixed, ("aime24", "strongreject"), out_dir="x")
  assert cfg.max_model_len is None and cfg.safety_double_bos and cfg.answer_rules == "reference"
  assert runner.sampling(cfg, "strongreject").add_special_tokens
  assert runner.sampling(cfg, "aime24").max_model_len is None
  assert cfg.seeds == tuple(range(8)) and cfg.safety_seeds == (0,)


@pytest.mark.parametrize(
  "given,message",
  [
    ({"merge_dtype": "int8"}, "--merge_dtype=int8: expected one of none, float32, bfloat16"),
    ({"safety_judge": "gpt4"}, "--safety_judge=gpt4: expected one of refusal_classifier"),
    ({"max_model_len": -1}, "--max_model_len=-1: expected >= 0"),
    ({"seeds": "a-b"}, "--seeds='a-b': expected a range like 0-7"),
    ({"answer_rules": "loose"}, "--answer_rules=loose: expected one of reference, extended"),
  ],
)
def test_bad_settings_are_one_line(given, message):
  with pytest.raises(ValueError, match=re.escape(message)):
    presets.resolve("reference", **given)
  with pytest.raises(ValueError, match="--preset=paper: expected one of fast, reference"):
    presets.resolve("paper")


def test_readme_table_is_the_presets_differences():
  readme = (REPO / "README.md").read_text()
  table = readme.split("<!-- presets-table -->\n")[1].split("\n\n")[0]
  assert table == presets.differences_table()
  for flag in ("--safety_judge", "--math_judge_model", "--max_model_len", "--merge_dtype"):
    assert f"| `{flag}` |" in table
  assert "--seeds" not in table  # the same in both presets


def test_readme_eval_commands_use_the_reference_preset():
  readme = (REPO / "README.md").read_text()
  block = readme.split("<!-- paper-table -->\n```bash\n")[1].split("```")[0]
  evals = [line for line in block.splitlines() if line.startswith("python -m launch.eval")]
  assert len(evals) == 3 and all("--preset=reference" in line for line in evals)


def test_merge_into_bfloat16_equals_peft_merge_and_unload(tmp_path):
  """Our merge (`--merge_dtype=bfloat16`) against PEFT's merge_and_unload on a bfloat16 base, as
  the reference's lora_merge did it."""
  import torch
  from peft import PeftModel
  from transformers import AutoModelForCausalLM

  import lora_jax
  from lora_jax.io.peft import load_peft_adapter

  model_dir = tmp_path / "m"  # a bfloat16 checkpoint, as DeepSeek-R1-Distill's
  tiny_hf_model("qwen2").to(torch.bfloat16).save_pretrained(model_dir)
  adapter = _adapter_dir(model_dir, tmp_path / "a")
  base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
  want = PeftModel.from_pretrained(base, adapter).merge_and_unload()
  want = np.stack([layer.mlp.up_proj.weight.float().numpy() for layer in want.model.layers])

  for dtype in ("bfloat16", "float32"):  # sampled in bfloat16 (vLLM's) or in float32
    ours = load_peft_adapter(lora_jax.load_pretrained(str(model_dir), dtype=dtype), adapter)
    sampler_fns.merge_adapter(ours, "bfloat16")
    got = np.asarray(ours.layers.up_proj.kernel[...], np.float32)
    assert got.shape == want.shape and not hasattr(ours.layers.up_proj, "lora_a")
    np.testing.assert_array_equal(got, want)


def test_reference_aime24_file_is_fetched_and_checked(tmp_path, monkeypatch):
  monkeypatch.setenv(reference_files.CACHE_ENV, str(tmp_path / "cache"))
  pinned = reference_files.FILES["aime24"]
  monkeypatch.setitem(reference_files.FILES, "aime24", replace(pinned, url=AIME24.as_uri()))
  path = benchmarks.resolve_path("aime24", {}, None, reference_data=True)
  assert path == str(tmp_path / "cache" / pinned.file_name)
  assert reference_files.file_sha256(path) == pinned.sha256 == reference_files.file_sha256(AIME24)
  assert benchmarks.resolve_path("aime24", {}, None) is None  # fast: the hub's aime_2024
  assert benchmarks.resolve_path("aime24", {"aime24": "hub"}, None, True) is None

  other = tmp_path / "other.jsonl"
  other.write_text(AIME24.read_text().replace("Aya", "Ava"))
  monkeypatch.setitem(
    reference_files.FILES, "aime24", replace(pinned, file_name="x.jsonl", url=other.as_uri())
  )
  with pytest.raises(ValueError) as e:
    reference_files.fetch("aime24")
  assert re.fullmatch(
    r"aime24: the reference's data file could not be fetched from file://.*other.jsonl "
    r"\(it has sha256 [0-9a-f]{64}, not af2b8bd2\w+\); give a local copy of Qwen2.5-Math's "
    r"evaluation/data/aime24/test.jsonl \(git blob bb72e17\) with --data=aime24=PATH",
    str(e.value),
  )
  assert not reference_files.check("aime24", str(other)) and reference_files.check("aime24", path)


def test_budget_includes_the_prompt_and_two_bos_at_token_level(tmp_path):
  from transformers import AutoTokenizer

  from lora_jax.sampling.generate import requests_for
  from lora_jax.sampling.memory import SamplingError
  from lora_jax.sampling.text import encode_prompts

  tok = AutoTokenizer.from_pretrained(R1_TOKENIZER)
  one, two = (encode_prompts(tok, ["hi"], add_special_tokens=b)[0] for b in (False, True))
  assert two == [tok.bos_token_id] + one and one[0] == tok.bos_token_id
  # The judge's rendered prompt goes in as raw text: its tokenizer's BOS, then the template's.
  judge = AutoTokenizer.from_pretrained(_judge_dir(tmp_path, "assistant", "True"))
  guard = encode_prompts(judge, [safety.llama_guard_prompt("q", "a")], chat_template=False)[0]
  assert guard[:3] == [1, 1, JUDGE_WORDS.index("<|start_header_id|>")]
  reqs = requests_for([[1] * 10, [1] * 30], 8, max_total_tokens=35)
  assert [r.max_new_tokens for r in reqs] == [8, 5]
  with pytest.raises(SamplingError, match="prompt 1 has 30 tokens: no room for an answer"):
    requests_for([[1] * 10, [1] * 30], 8, max_total_tokens=30)
