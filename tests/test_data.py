"""The data pipeline: the reference's exact tokens, packing, shuffling, sharding, resume."""

import json
import os

import numpy as np
import pytest

from lora_jax.data import (
  DEMO_REFUSALS,
  DataConfig,
  DataError,
  Examples,
  load_examples,
  make_iterator,
  pad_token_id,
)
from lora_jax.run_config import RunConfigError, from_dict

SHARED = os.path.join(os.path.dirname(__file__), "..", "..", "shared")
R1_TOKENIZER = os.path.join(SHARED, "tokenizers", "deepseek-r1-distill-qwen")
STAR1 = os.path.join(SHARED, "data", "star1", "STAR-1.json")
BOS, USER, ASSISTANT, EOS, THINK, END_THINK, FIM_PAD = (
  151646,
  151644,
  151645,
  151643,
  151648,
  151649,
  151662,
)
# Qwen2.5-Instruct's chat template, reduced to what a [user, assistant] conversation uses.
CHATML = (
  "{% for m in messages %}{% if loop.first and m['role'] != 'system' %}"
  "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
  "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
  "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def r1():
  from transformers import AutoTokenizer

  return AutoTokenizer.from_pretrained(R1_TOKENIZER)


def write_jsonl(path, rows):
  with open(path, "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)
  return str(path)


def enc(tok, text):
  return tok(text, add_special_tokens=False)["input_ids"]


def synthetic(lengths, prompt=2, fingerprint="synthetic"):
  """Examples with ids 1000*k + t and the first `prompt` tokens of each masked out."""
  ids = [np.arange(n, dtype=np.int32) + 1000 * k for k, n in enumerate(lengths)]
  masks = [(np.arange(n) >= prompt).astype(np.uint8) for n in lengths]
  return Examples(ids, masks, max_length=max(lengths), fingerprint=fingerprint)


# ---- formats: the reference's tokens ---------------------------------------------------------


def test_direct_refusal_is_the_reference_token_sequence(r1, tmp_path):
  row = {
    "prompt": "How do I make a bomb?",
    "refusal": "Question: How do I make a bomb?\nAnswer: I cannot help with that.",
  }
  src = write_jsonl(tmp_path / "dr.jsonl", [row])
  examples, report = load_examples(DataConfig(source=src, format="direct_refusal"), r1)
  # The reference keeps the space after "Answer:" and TRL adds no EOS (the completion ends in it).
  prompt = [BOS, USER] + enc(r1, "How do I make a bomb?") + [ASSISTANT]
  completion = (
    [THINK]
    + enc(r1, "I should not answer this question!")
    + [END_THINK]
    + enc(r1, " I cannot help with that.")
    + [EOS]
  )
  assert examples.ids[0].tolist() == prompt + completion
  assert examples.masks[0].tolist() == [0] * len(prompt) + [1] * len(completion)
  assert report["rows"] == report["examples"] == 1 and report["prompt_mismatch"] == 0

  batch = next(make_iterator(examples, global_batch=1, pad_id=pad_token_id(r1)))
  n = len(prompt) + len(completion)
  assert pad_token_id(r1) == FIM_PAD
  assert batch["input_ids"].shape == (1, 64) and batch["input_ids"].dtype == np.int32
  assert batch["input_ids"][0, :n].tolist() == prompt + completion
  assert (batch["input_ids"][0, n:] == FIM_PAD).all()
  want = [0] * len(prompt) + [1] * len(completion) + [0] * (64 - n)
  assert batch["loss_mask"][0].tolist() == want
  assert batch["attention_mask"][0].sum() == n and batch["segment_ids"][0, :n].tolist() == [1] * n
  assert batch["positions"][0, :n].tolist() == list(range(n))


def test_loss_on_all_puts_every_token_in_the_loss(r1, tmp_path):
  """data.loss_on="all" (TRL 0.15 / 0.16): the same ids, the prompt's tokens in the loss too (all
  but each row's first token, which nothing predicts); a resume across the switch is refused."""
  row = {"prompt": "Say hi.", "refusal": "Question: Say hi.\nAnswer: No."}
  src = write_jsonl(tmp_path / "dr.jsonl", [row])
  done = {}
  for loss_on in ("completion", "all"):
    cfg = DataConfig(source=src, format="direct_refusal", loss_on=loss_on)
    done[loss_on] = load_examples(cfg, r1)[0]
  part, every = done["completion"], done["all"]
  n, prompt = len(part.ids[0]), int((part.masks[0] == 0).sum())
  assert (
    every.ids[0].tolist() == part.ids[0].tolist() and prompt == 1 + 1 + len(enc(r1, "Say hi.")) + 1
  )
  assert every.masks[0].tolist() == [1] * n and part.masks[0].tolist() == [0] * prompt + [1] * (
    n - prompt
  )
  batch = next(make_iterator(every, global_batch=1, pad_id=pad_token_id(r1)))
  assert batch["loss_mask"][0].tolist() == [0] + [1] * (n - 1) + [0] * (64 - n)
  it = make_iterator(every, global_batch=1)
  with pytest.raises(DataError, match="data fingerprint"):
    it.restore(make_iterator(part, global_batch=1).state())
  with pytest.raises(RunConfigError, match=r"config.data.loss_on='prompt': expected one of"):
    from_dict({"data": {"loss_on": "prompt"}})


def test_direct_refusal_on_a_chatml_model_splits_after_the_assistant_header(tmp_path):
  from transformers import AutoTokenizer

  # The Qwen2 BPE made into a Qwen2.5-Instruct look-alike: ChatML tokens, EOS <|im_end|>, no BOS.
  tok = AutoTokenizer.from_pretrained(R1_TOKENIZER)
  tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
  tok.chat_template, tok.eos_token, tok.bos_token = CHATML, "<|im_end|>", None
  tok.add_bos_token = False
  row = {"prompt": "Hi?", "refusal": "Question: Hi?\nAnswer: No."}
  src = write_jsonl(tmp_path / "dr.jsonl", [row])
  examples, _ = load_examples(DataConfig(source=src, format="direct_refusal"), tok)
  prompt = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "<|im_start|>user\nHi?<|im_end|>\n<|im_start|>assistant\n"
  )
  # No thinking on chat models; TRL 0.17's add_eos appends <|im_end|> after the template's "\n".
  completion = " No.<|im_end|>\n<|im_end|>"
  assert examples.ids[0].tolist() == enc(tok, prompt + completion)
  assert examples.masks[0].tolist() == [0] * len(enc(tok, prompt)) + [1] * len(enc(tok, completion))


def test_star1_rows_get_the_deepseek_format(r1):
  examples, report = load_examples(DataConfig(source=STAR1, split="train[:5]", format="star1"), r1)
  with open(STAR1) as f:
    rows = json.load(f)[:5]
  assert report["rows"] == report["examples"] == 5 and report["truncated"] == 0
  for row, ids, mask in zip(rows, examples.ids, examples.masks):
    assert row["response"].startswith("<think>")
    prompt = [BOS, USER] + enc(r1, row["question"]) + [ASSISTANT]
    completion = enc(r1, row["response"]) + [EOS]
    assert completion[0] == THINK and END_THINK in completion
    assert ids.tolist() == prompt + completion
    assert mask.tolist() == [0] * len(prompt) + [1] * len(completion)


def test_messages_put_the_loss_on_assistant_turns_only(r1, tmp_path):
  convo = [
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "Help me steal a car."},
    {"role": "assistant", "content": "I can't help with that."},
  ]
  src = write_jsonl(tmp_path / "m.jsonl", [{"messages": convo}])
  examples, _ = load_examples(DataConfig(source=src, format="messages"), r1)
  u1, a1 = [BOS, USER] + enc(r1, "Hi"), [ASSISTANT] + enc(r1, "Hello.") + [EOS]
  u2 = [USER] + enc(r1, "Help me steal a car.")
  a2 = [ASSISTANT] + enc(r1, "I can't help with that.") + [EOS]
  assert examples.ids[0].tolist() == u1 + a1 + u2 + a2
  # The generation prompt (<｜Assistant｜>) belongs to the prompt side of each turn.
  want = [0] * len(u1) + [0] + [1] * (len(a1) - 1) + [0] * len(u2) + [0] + [1] * (len(a2) - 1)
  assert examples.masks[0].tolist() == want

  convo[1]["content"] = "<think>hm</think>Hello."  # the R1 template would silently drop this
  write_jsonl(src, [{"messages": convo}])
  with pytest.raises(DataError, match="drops the thinking of message 2"):
    load_examples(DataConfig(source=src, format="messages"), r1)


def test_demo_refusals_load_for_chat(r1):
  examples, report = load_examples(DataConfig(source=DEMO_REFUSALS, format="chat"), r1)
  assert report["rows"] == report["examples"] == 64 and report["truncated"] == 0
  assert all(ids[0] == BOS and ids[-1] == EOS for ids in examples.ids)
  assert report["tokens"] < 64 * 80  # short enough for a CPU demo


# ---- truncation, bucketing, packing ----------------------------------------------------------


def test_truncation_is_counted_and_whole_lost_completions_are_dropped(r1, tmp_path):
  rows = [
    {"prompt": "short", "completion": " ok"},
    {"prompt": "short", "completion": " one two three four five six seven eight nine"},
    {"prompt": " ".join(["word"] * 40), "completion": " gone"},
  ]
  src = write_jsonl(tmp_path / "pc.jsonl", rows)
  full = [len(enc(r1, r["prompt"] + r["completion"])) + 2 for r in rows]  # + BOS + EOS
  examples, report = load_examples(
    DataConfig(source=src, format="prompt_completion", max_length=8), r1
  )
  assert full[0] <= 8 < full[1] and full[2] > 8
  assert report["truncated"] == 2
  assert report["truncated_tokens"] == full[1] - 8 + full[2] - 8
  assert report["dropped"] == 1 and report["dropped_tokens"] == 8
  assert report["examples"] == 2 and examples.lengths.tolist() == [full[0], 8]


def test_bucketing_pads_each_batch_to_the_next_bucket():
  examples = synthetic([5, 9, 17, 3], fingerprint="b")
  it = make_iterator(examples, global_batch=2, shuffle=False, pad_id=7, bucket=8, max_length=20)
  a, b = next(it), next(it)
  assert a["input_ids"].shape == (2, 16) and b["input_ids"].shape == (2, 20)  # 17 -> 24, capped
  assert a["input_ids"][0].tolist() == list(range(5)) + [7] * 11
  assert a["attention_mask"][1].sum() == 9 and (a["segment_ids"][0, 5:] == 0).all()
  assert it.last_stats == {"tokens": 20, "loss_tokens": 16, "padded_tokens": 40}
  fixed = next(make_iterator(examples, global_batch=2, shuffle=False, bucket=0, max_length=20))
  assert fixed["input_ids"].shape == (2, 20)


def test_packing_segments_positions_and_no_loss_across_boundaries():
  lengths = [5, 3, 4, 2, 6, 7]
  examples = synthetic(lengths, prompt=2, fingerprint="p")
  it = make_iterator(examples, global_batch=1, shuffle=False, packing=True, max_length=8, pad_id=0)
  seen = []
  for _ in range(it.steps_per_epoch):
    batch = {k: v[0] for k, v in next(it).items()}
    assert batch["input_ids"].shape == (8,)
    segs = batch["segment_ids"]
    for s in range(1, segs.max() + 1):
      where = np.flatnonzero(segs == s)
      assert (np.diff(where) == 1).all()  # contiguous, numbered 1, 2, ... in order
      k = batch["input_ids"][where[0]] // 1000
      seen.append(int(k))
      assert batch["input_ids"][where].tolist() == (np.arange(lengths[k]) + 1000 * k).tolist()
      assert batch["positions"][where].tolist() == list(range(lengths[k]))
      # Prompt tokens (incl. the segment's first token) carry no loss; the rest do.
      assert batch["loss_mask"][where].tolist() == [0, 0] + [1] * (lengths[k] - 2)
    assert (batch["attention_mask"] == (segs > 0)).all()
    assert (batch["loss_mask"][segs == 0] == 0).all()
  assert sorted(seen) == list(range(len(lengths)))  # every example exactly once
  assert it.steps_per_epoch == 4  # 27 tokens in rows of 8: best fit needs 4


# ---- order: shuffling, hosts, resume ---------------------------------------------------------


def order_of(it, steps):
  return [next(it)["input_ids"][:, 0].tolist() for _ in range(steps)]


def test_shuffling_is_deterministic_per_seed_and_epoch():
  examples = synthetic([4] * 12, fingerprint="s")
  run = lambda seed, epoch: order_of(make_iterator(examples, 4, seed=seed, epoch=epoch), 3)
  assert run(0, 0) == run(0, 0)
  assert run(0, 0) != run(0, 1) and run(0, 0) != run(1, 0)
  assert sorted(sum(run(3, 2), [])) == [1000 * k for k in range(12)]
  it = make_iterator(examples, 4, seed=0)  # epochs follow one another; drop_last keeps shapes
  assert order_of(it, 6) == run(0, 0) + run(0, 1)
  odd = make_iterator(synthetic([4] * 13, fingerprint="o"), 4, num_epochs=1)
  assert len(list(odd)) == 3


@pytest.mark.parametrize("packing", [False, True])
def test_two_hosts_partition_the_global_batch(packing):
  examples = synthetic([3, 5, 2, 7, 4, 6, 1, 8, 3, 2, 5, 4], fingerprint="h")
  kw = dict(global_batch=4, seed=5, packing=packing, max_length=8, bucket=4)
  whole = make_iterator(examples, **kw)
  hosts = [make_iterator(examples, process_index=i, process_count=2, **kw) for i in range(2)]
  for _ in range(2 * whole.steps_per_epoch):
    want, parts = next(whole), [next(h) for h in hosts]
    for key in want:
      assert parts[0][key].shape[0] == 2
      np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), want[key])


def test_resume_from_state_gives_the_same_next_batches():
  examples = synthetic([3, 5, 2, 7, 4, 6, 1, 8, 3, 2], fingerprint="r")
  kw = dict(global_batch=2, seed=11, packing=False, max_length=8)
  straight = make_iterator(examples, **kw)
  for _ in range(4):
    next(straight)
  state = json.loads(json.dumps(straight.state()))  # survives a JSON round trip
  want = [next(straight) for _ in range(4)]  # crosses into the next epoch
  resumed = make_iterator(examples, **kw, state=state)
  for w in want:
    got = next(resumed)
    for key in w:
      np.testing.assert_array_equal(got[key], w[key])

  with pytest.raises(DataError, match="data fingerprint"):
    make_iterator(synthetic([3, 5], fingerprint="other"), **kw, state=state)
  with pytest.raises(DataError, match="global_batch=2"):
    make_iterator(examples, **{**kw, "global_batch": 1}, state=state)


def test_eval_fraction_holds_out_disjoint_rows(r1, tmp_path):
  rows = [{"prompt": f"q{i}", "refusal": f"Answer: a{i}"} for i in range(10)]
  src = write_jsonl(tmp_path / "dr.jsonl", rows)
  cfg = DataConfig(source=src, format="direct_refusal", eval_fraction=0.3, seed=1)
  train, _ = load_examples(cfg, r1, split="train")
  held, _ = load_examples(cfg, r1, split="eval")
  assert (len(train), len(held)) == (7, 3)
  assert load_examples(cfg, r1)[0].fingerprint == train.fingerprint != held.fingerprint
  keys = {tuple(x.tolist()) for x in train.ids} | {tuple(x.tolist()) for x in held.ids}
  assert len(keys) == 10
  last = make_iterator(held, global_batch=2, shuffle=False, drop_last=False, num_epochs=1)
  batches = list(last)
  assert len(batches) == 2 and batches[1]["attention_mask"][1].sum() == 0  # filled, no loss


# ---- errors: one clear line ------------------------------------------------------------------


def test_bad_input_errors_name_the_problem(r1, tmp_path):
  rows = [{"prompt": "a", "refusal": "Answer: b"}, {"prompt": "c"}]
  src = write_jsonl(tmp_path / "bad.jsonl", rows)
  with pytest.raises(DataError, match=r"bad\.jsonl, row 2: missing field 'refusal'"):
    load_examples(DataConfig(source=src, format="direct_refusal"), r1)
  with pytest.raises(DataError, match=r"row 1: field 'refusal' has no 'Answer:'"):
    load_examples(
      DataConfig(
        source=write_jsonl(tmp_path / "na.jsonl", [{"prompt": "a", "refusal": "b"}]),
        format="direct_refusal",
      ),
      r1,
    )
  (tmp_path / "empty.jsonl").write_text("")
  with pytest.raises(DataError, match="empty.jsonl has no rows"):
    load_examples(DataConfig(source=str(tmp_path / "empty.jsonl"), format="chat"), r1)
  with pytest.raises(DataError, match="unknown data.format 'alpaca'; known formats: chat, "):
    load_examples(DataConfig(source=src, format="alpaca"), r1)
  with pytest.raises(DataError, match="does not exist"):
    load_examples(DataConfig(source=str(tmp_path / "missing.jsonl"), format="chat"), r1)
  with pytest.raises(DataError, match="neither a data file"):
    load_examples(DataConfig(source="not a source!", format="chat"), r1)
  with pytest.raises(RunConfigError, match="config.data.fromat: unknown key"):
    from_dict({"data": {"source": src, "fromat": "chat"}})
