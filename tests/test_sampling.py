"""The sampler: greedy parity with transformers' generate, continuous batching, sampling filters
and distributions, seeds, sharding, LoRA, stop strings, memory planning and input errors."""

import numpy as np
import pytest
import torch
from helpers import tiny_hf_model

import lora_jax
from lora_jax.sampling import (
  Engine,
  Request,
  SamplingError,
  StopStrings,
  choose,
  generate,
  keep_threshold,
)

PROMPT_LENGTHS = (3, 11, 6, 17, 9)


def _load(tmp_path, kind="qwen2", **overrides):
  hf = tiny_hf_model(kind, **overrides)
  hf.save_pretrained(tmp_path)
  return hf, lora_jax.load_pretrained(str(tmp_path))


def _prompts(vocab, lengths=PROMPT_LENGTHS, seed=0):
  rng = np.random.RandomState(seed)
  return [rng.randint(0, vocab, n).tolist() for n in lengths]


def _hf_greedy(hf, prompts, max_new, eos_ids):
  """transformers' batched greedy generate (left padding), each answer cut after its first eos."""
  T = max(map(len, prompts))
  ids = np.zeros((len(prompts), T), np.int64)
  mask = np.zeros_like(ids)
  for i, p in enumerate(prompts):
    ids[i, T - len(p) :], mask[i, T - len(p) :] = p, 1
  with torch.no_grad():
    out = hf.generate(
      torch.tensor(ids),
      attention_mask=torch.tensor(mask),
      do_sample=False,
      max_new_tokens=max_new,
      eos_token_id=list(eos_ids),
      pad_token_id=0,
    )
  answers = []
  for row in out[:, T:].tolist():
    end = next((i + 1 for i, t in enumerate(row) if t in eos_ids), len(row))
    answers.append(row[:end])
  return answers


def _early_eos(answers):
  """A token that ends some answer at its 3rd step while another answer never emits it."""
  for a in answers:
    if len(a) > 2 and a[2] not in a[:2] and any(a[2] not in b for b in answers):
      return a[2]
  raise AssertionError(f"no usable eos in {answers}")


def test_greedy_matches_transformers_generate_tied_head(tmp_path):
  # A tiny random tied model repeats one token forever, so there is no early eos to pick here.
  hf, model = _load(tmp_path, "qwen2", tie_word_embeddings=True)
  prompts = _prompts(hf.config.vocab_size)
  assert generate(model, prompts, 12) == _hf_greedy(hf, prompts, 12, ())


@pytest.mark.parametrize(
  "kind,overrides",
  [
    ("qwen2", dict(num_key_value_heads=1)),
    ("qwen3", dict(head_dim=32)),
    ("llama", dict(num_attention_heads=8, num_key_value_heads=2, rope_theta=1e5)),
  ],
)
def test_greedy_matches_transformers_generate(tmp_path, kind, overrides):
  """A batch of prompts of different lengths; some answers hit the eos early, others go on."""
  hf, model = _load(tmp_path, kind, **overrides)
  prompts = _prompts(hf.config.vocab_size)
  free = generate(model, prompts, 12)
  assert free == _hf_greedy(hf, prompts, 12, set(model.config.eos_token_ids))
  eos = _early_eos(free)
  eos_ids = {eos} | set(model.config.eos_token_ids)
  ours = generate(model, prompts, 12, stop_token_ids=[eos])
  assert ours == _hf_greedy(hf, prompts, 12, eos_ids)
  assert any(len(a) == 3 for a in ours) and any(len(a) == 12 for a in ours)


def test_continuous_batching_equals_one_prompt_at_a_time(tmp_path):
  hf, model = _load(tmp_path, "qwen2")
  prompts = _prompts(hf.config.vocab_size, (5, 13, 2, 8, 21, 4, 9), seed=1)
  eos = _early_eos(generate(model, prompts, 10))
  alone = [generate(model, [p], 10, stop_token_ids=[eos], max_batch=1)[0] for p in prompts]
  engine = Engine(model, max_len=40, max_batch=2, stop_token_ids=[eos])
  done = {c.index: c for c in engine.run([Request(p, 10, index=i) for i, p in enumerate(prompts)])}
  assert [done[i].token_ids for i in range(len(prompts))] == alone
  assert engine.stats["prefill_calls"] >= 4  # rows were refilled while others were running
  for i, c in done.items():
    assert c.finish_reason == ("stop" if c.token_ids[-1] == eos else "length")
    assert c.num_prompt_tokens == len(prompts[i])


def test_blocked_decode_equals_full_decode(tmp_path, monkeypatch):
  """Decode attention over the cache in blocks of 24 slots (caches of 64 and 96 slots: a shifted
  last block) gives the same greedy answers as attention over the whole cache."""
  import jax

  from lora_jax import attention

  hf, model = _load(tmp_path, "qwen2", num_hidden_layers=1)
  prompts = _prompts(hf.config.vocab_size, (5, 30, 12), seed=3)
  calls = []
  blocked = attention.decode_attention
  monkeypatch.setattr(attention, "decode_attention", lambda *a: calls.append(1) or blocked(*a))
  answers = {}
  for block in (10**9, 24):
    monkeypatch.setattr(attention, "DECODE_BLOCK", block)
    monkeypatch.setattr(attention, "DECODE_WHOLE_UP_TO", min(block, 10**9 - 1))
    jax.clear_caches()  # the compiled steps do not key on the constant
    answers[block] = generate(model, prompts, 50, max_batch=3)
  assert answers[24] == answers[10**9]
  assert calls and max(map(len, answers[24])) == 50


@pytest.mark.slow
def test_long_prompts_chunked_prefill_and_growing_cache(tmp_path, monkeypatch):
  """Prompts prefilled in 64-token chunks, answers crossing cache-length buckets: still HF's."""
  from lora_jax.sampling import engine

  hf, model = _load(tmp_path, "qwen3", head_dim=16)
  prompts = _prompts(hf.config.vocab_size, (100, 70, 5), seed=2)
  monkeypatch.setattr(engine, "_PREFILL_SCORES_BYTES", 1)
  eng = Engine(model, max_len=150, max_batch=2, stop_token_ids=(), steps=16)
  done = {
    c.index: c.token_ids for c in eng.run([Request(p, 40, index=i) for i, p in enumerate(prompts)])
  }
  assert [done[i] for i in range(3)] == _hf_greedy(hf, prompts, 40, ())
  assert eng.stats["resizes"] >= 3


def test_per_request_limits_and_first_token_finishes(tmp_path):
  hf, model = _load(tmp_path, "llama")
  prompts = _prompts(hf.config.vocab_size, (4, 7, 3, 12))
  limits = (3, 9, 1, 6)
  engine = Engine(model, max_len=32, max_batch=3, stop_token_ids=())
  done = {
    c.index: c
    for c in engine.run([Request(p, n, index=i) for i, (p, n) in enumerate(zip(prompts, limits))])
  }
  full = generate(model, prompts, 9, stop_token_ids=(), max_batch=4)
  for i, n in enumerate(limits):
    assert done[i].token_ids == full[i][:n] and done[i].finish_reason == "length"


def test_answers_stop_at_max_len(tmp_path):
  hf, model = _load(tmp_path, "qwen2")
  prompts = _prompts(hf.config.vocab_size, (5, 9))
  out = generate(model, prompts, 20, max_len=14)
  assert [len(a) for a in out] == [9, 5]
  # a prompt whose length bucket (384) is longer than the whole cache (320 slots)
  long = _prompts(hf.config.vocab_size, (299,))
  assert [len(a) for a in generate(model, long, 5, max_len=300)] == [1]


@pytest.mark.parametrize(
  "probs,k,p,min_p,kept",
  [
    ([0.5, 0.3, 0.15, 0.05], 0, 0.75, 0.0, [0, 1]),
    ([0.5, 0.3, 0.15, 0.05], 0, 0.85, 0.0, [0, 1, 2]),
    ([0.5, 0.3, 0.15, 0.05], 0, 0.3, 0.0, [0]),
    ([0.05, 0.3, 0.5, 0.15], 2, 1.0, 0.0, [1, 2]),
    ([0.5, 0.3, 0.15, 0.05], 0, 1.0, 0.4, [0, 1]),
    ([0.5, 0.3, 0.15, 0.05], 0, 1.0, 0.2, [0, 1, 2]),
    ([0.5, 0.3, 0.15, 0.05], 3, 0.6, 0.0, [0, 1]),  # top-p on the renormalised top-3
    ([0.4, 0.4, 0.1, 0.1], 1, 1.0, 0.0, [0, 1]),  # ties at the k-th value are kept (as HF)
    ([0.5, 0.3, 0.15, 0.05], 0, 1.0, 0.0, [0, 1, 2, 3]),
  ],
)
def test_filters_keep_exactly_the_right_tokens(probs, k, p, min_p, kept):
  import jax.numpy as jnp

  probs = jnp.asarray([probs], jnp.float32)
  tau = keep_threshold(
    probs, jnp.array([k]), jnp.array([p], jnp.float32), jnp.array([min_p], jnp.float32)
  )
  assert np.flatnonzero(np.asarray(probs[0] >= tau[0])).tolist() == kept


def test_filters_match_transformers_warpers_on_large_vocabularies():
  """Peaked rows (kept set inside the top-k candidates) and flat rows (bisection fallback)."""
  import jax
  import jax.numpy as jnp
  from transformers.generation import logits_process as lp

  rng = np.random.RandomState(0)
  V = 3000
  logits = np.concatenate([rng.randn(3, V) * 4, rng.randn(3, V) * 0.2]).astype(np.float32)
  cases = [
    (1.0, 0, 0.9, 0.0),
    (0.7, 50, 1.0, 0.0),
    (1.0, 400, 1.0, 0.0),
    (1.3, 0, 0.5, 0.0),
    (1.0, 0, 1.0, 0.05),
    (0.8, 100, 0.8, 0.1),
    (1.0, 0, 0.97, 0.0),
    (0.6, 600, 0.9, 0.0),
  ]
  for temp, k, p, min_p in cases:
    scores = torch.tensor(logits) / temp
    for warper in (
      ([lp.TopKLogitsWarper(k)] if k else [])
      + ([lp.TopPLogitsWarper(p)] if p < 1 else [])
      + ([lp.MinPLogitsWarper(min_p)] if min_p else [])
    ):
      scores = warper(None, scores)
    expected = torch.isfinite(scores).numpy()
    probs = jax.nn.softmax(jnp.asarray(logits) / temp, -1)
    n = len(logits)
    tau = keep_threshold(
      probs, jnp.full((n,), k), jnp.full((n,), p, jnp.float32), jnp.full((n,), min_p, jnp.float32)
    )
    np.testing.assert_array_equal(
      np.asarray(probs >= tau[:, None]),
      expected,
      err_msg=f"temperature={temp} top_k={k} top_p={p} min_p={min_p}",
    )


def _draw(logits, n, **params):
  import jax
  import jax.numpy as jnp

  logits = jnp.broadcast_to(jnp.asarray(logits, jnp.float32), (n, len(logits)))
  keys = jax.random.split(jax.random.key(1), n)
  full = lambda name, v, dt=jnp.float32: jnp.full((n,), params.get(name, v), dt)
  return np.asarray(
    choose(
      logits,
      keys,
      full("temperature", 1.0),
      full("top_k", 0, jnp.int32),
      full("top_p", 1.0),
      full("min_p", 0.0),
    )
  )


def test_temperature_sampling_matches_the_softmax_distribution():
  from scipy import stats

  logits = np.array([1.0, 0.2, -0.5, 2.0, 0.0, -1.5], np.float32)
  n = 20000
  for temp in (0.7, 1.0, 1.6):
    counts = np.bincount(_draw(logits, n, temperature=temp), minlength=len(logits))
    p = np.exp(logits.astype(np.float64) / temp)
    expected = p / p.sum() * n
    assert stats.chisquare(counts, expected).pvalue > 1e-3, (temp, counts, expected)
  # top-k 3 then top-p: only the kept tokens, in proportion to their renormalised probabilities
  counts = np.bincount(_draw(logits, n, top_k=3, top_p=0.8), minlength=len(logits))
  p = np.exp(logits.astype(np.float64))
  kept = [3, 0]  # top-3 = {3, 0, 1}: renormalised 0.63, 0.23, 0.10 -> top-p 0.8 keeps {3, 0}
  assert counts[[1, 2, 4, 5]].sum() == 0
  assert stats.chisquare(counts[kept], p[kept] / p[kept].sum() * n).pvalue > 1e-3


def test_two_level_sampling_across_vocabulary_blocks():
  from scipy import stats

  V = 2500
  logits = np.full(V, -30.0, np.float32)
  hot = [5, 1023, 1024, 2400, 2499]  # in three different 1024-token blocks, at block edges
  logits[hot] = [0.5, 1.0, 0.0, 1.5, -0.5]
  n = 20000
  draws = _draw(logits, n)
  assert set(draws.tolist()) <= set(hot)
  counts = np.array([(draws == h).sum() for h in hot])
  p = np.exp(logits[hot].astype(np.float64))
  assert stats.chisquare(counts, p / p.sum() * n).pvalue > 1e-3


def test_greedy_rows_and_sampled_rows_share_a_batch():
  import jax
  import jax.numpy as jnp

  logits = jnp.asarray(np.random.RandomState(0).randn(4, 50), jnp.float32)
  temp = jnp.array([0.0, 1.0, 0.0, 1.0], jnp.float32)
  tok = np.asarray(
    choose(
      logits,
      jax.random.split(jax.random.key(0), 4),
      temp,
      jnp.zeros(4, jnp.int32),
      jnp.ones(4),
      jnp.zeros(4),
    )
  )
  assert tok[[0, 2]].tolist() == np.argmax(np.asarray(logits), -1)[[0, 2]].tolist()


def test_seeds_reproduce_and_do_not_depend_on_the_batch(tmp_path):
  hf, model = _load(tmp_path, "qwen2")
  a, b, c = _prompts(hf.config.vocab_size, (4, 9, 6), seed=3)
  kw = dict(temperature=1.0, top_p=0.9, stop_token_ids=())
  first = generate(model, [a, b], 10, seed=3, n=2, max_batch=4, **kw)
  assert first == generate(model, [a, b], 10, seed=3, n=2, max_batch=4, **kw)
  assert first != generate(model, [a, b], 10, seed=4, n=2, max_batch=4, **kw)
  assert first[0] != first[1]  # two samples of one prompt differ
  # prompt 0's samples are the same alone, one row at a time, or next to other prompts
  assert generate(model, [a], 10, seed=3, n=2, max_batch=1, **kw) == first[:2]
  assert generate(model, [a, c, b], 10, seed=3, n=2, max_batch=3, **kw)[:2] == first[:2]


@pytest.mark.parametrize(
  "shape",
  [
    {"fsdp": 4, "tensor": 2},
    pytest.param({"data": 2, "fsdp": 2, "tensor": 2}, marks=pytest.mark.slow),
  ],
)
def test_sharded_greedy_equals_one_device(tmp_path, shape):
  hf, model = _load(tmp_path, "qwen2")
  prompts = _prompts(hf.config.vocab_size, (5, 12, 3, 8))
  sharded = lora_jax.load_pretrained(str(tmp_path), mesh=lora_jax.make_mesh(shape))
  assert generate(sharded, prompts, 10, max_batch=4) == generate(model, prompts, 10, max_batch=4)


def test_unmerged_lora_equals_merged(tmp_path):
  import jax
  from flax import nnx

  from lora_jax import lora

  hf, model = _load(tmp_path, "qwen3", head_dim=16)
  prompts = _prompts(hf.config.vocab_size, (5, 12, 3))
  base = generate(model, prompts, 10)
  lora.apply_lora(model, lora.LoRAConfig(rank=2, targets=("qkvo_mlp",), layers=(1, 2)))
  for i, name in enumerate(lora.adapted(model)):
    lin = getattr(model.layers, name)
    lin.lora_b.set_value(0.3 * jax.random.normal(jax.random.key(i), lin.lora_b.shape))
  merged = nnx.clone(model)
  lora.merge(merged)
  unmerged_out = generate(model, prompts, 10)
  assert unmerged_out == generate(merged, prompts, 10)
  assert unmerged_out != base  # the adapter changes the answers


@pytest.mark.slow
def test_bfloat16_model_samples(tmp_path):
  hf, model = _load(tmp_path, "llama")
  bf16 = lora_jax.load_pretrained(str(tmp_path), dtype="bfloat16")
  prompts = _prompts(hf.config.vocab_size, (5, 12))
  out = generate(bf16, prompts, 8, stop_token_ids=())
  assert [len(a) for a in out] == [8, 8]
  assert all(0 <= t < hf.config.vocab_size for a in out for t in a)
  assert [a[0] for a in out] == [a[0] for a in generate(model, prompts, 1, stop_token_ids=())]


@pytest.fixture(scope="module")
def r1_tokenizer():
  from conftest import SHARED

  return lora_jax.load_tokenizer(str(SHARED / "tokenizers/deepseek-r1-distill-qwen"))


@pytest.mark.parametrize("stop", ["Problem:", "答案", "42.\nProb", "。问", "题："])
def test_stop_strings_across_token_boundaries(r1_tokenizer, stop):
  tok = r1_tokenizer
  text = "Let me think. 12 + 30 = 42.\nProblem: what next 答案是四十二。问题：more"
  ids = tok(text, add_special_tokens=False)["input_ids"]
  decode = lambda t: tok.decode(t, skip_special_tokens=True)
  expected = next(t for t in range(1, len(ids) + 1) if stop in decode(ids[:t]))
  assert stop not in decode(ids[expected - 1 : expected])  # the stop spans token boundaries
  for chunk in (1, 2, 3, 7, len(ids)):
    tracker, cut = StopStrings(["never", stop], decode), None
    for i in range(0, len(ids), chunk):
      cut = tracker.extend(ids[i : i + chunk])
      if cut is not None:
        break
    assert cut == expected and tracker.match == stop, chunk


def test_generate_text_with_stop_strings_and_callbacks(tmp_path, r1_tokenizer):
  from lora_jax.sampling import encode_prompts, generate_text

  tok = r1_tokenizer
  hf, model = _load(
    tmp_path, "qwen2", vocab_size=len(tok), bos_token_id=151646, eos_token_id=151643
  )
  msgs = [[{"role": "user", "content": "What is 12 + 30?"}], "Say hi."]
  free = generate_text(model, tok, msgs, max_new_tokens=12)
  assert [r.index for r in free] == [0, 1]
  prompt_ids = encode_prompts(tok, msgs)
  assert prompt_ids[0][:2] == [151646, 151644]  # one BOS (the template's), then <｜User｜>
  assert [r.num_prompt_tokens for r in free] == [len(p) for p in prompt_ids]
  ids = free[0].token_ids
  decode = lambda t: tok.decode(t, skip_special_tokens=True)
  stop = decode(ids[3:5])
  seen = []
  out = generate_text(model, tok, msgs, max_new_tokens=12, stop=(stop,), n=2, on_result=seen.append)
  assert len(seen) == 4 and sorted((r.index, r.sample) for r in seen) == [
    (0, 0),
    (0, 1),
    (1, 0),
    (1, 1),
  ]
  first = out[0]
  end = next(t for t in range(1, len(ids) + 1) if stop in decode(ids[:t]))
  assert first.finish_reason == "stop" and first.stop_reason == stop
  assert first.token_ids == ids[:end]
  assert first.text == decode(ids)[: decode(ids).index(stop)]
  assert out[0].text == out[1].text  # greedy: both samples agree


def test_prompt_longer_than_the_cache_is_refused(tmp_path):
  hf, model = _load(tmp_path, "qwen2")
  prompts = _prompts(hf.config.vocab_size, (4, 12))
  with pytest.raises(SamplingError, match=r"prompt 1 has 12 tokens .*max_len"):
    generate(model, prompts, 4, max_len=10)
  with pytest.raises(SamplingError, match="top_p=1.5"):
    generate(model, prompts, 4, top_p=1.5)
  with pytest.raises(SamplingError, match=r"prompt 1 has token id 128, outside the vocabulary"):
    generate(model, [[1, 2], [3, 128]], 4)


def test_cache_that_does_not_fit_is_refused_or_shrunk(tmp_path):
  import jax
  from flax import nnx

  from lora_jax.sampling.memory import cache_bytes

  hf, model = _load(tmp_path, "qwen2")
  per_row = cache_bytes(model.config, 1, 1024, "float32")
  copies = sum(a.nbytes for a in jax.tree.leaves(nnx.state(model.layers)))
  budget_gb = (5 * per_row + copies / 2) / (1 << 30)  # 5 rows, but not 5 rows + weight copies
  with pytest.raises(SamplingError, match=r"max_batch=64 needs a .* GiB KV cache \(64 x 1024"):
    Engine(model, max_len=1000, max_batch=64, max_cache_gb=budget_gb, unstack=False)
  assert (
    Engine(model, max_len=1000, max_batch="auto", max_cache_gb=budget_gb, unstack=False).batch == 5
  )
  # no room for per-layer weight copies: decode from the stacked weights instead
  engine = Engine(model, max_len=1000, max_batch=5, max_cache_gb=budget_gb)
  assert engine.batch == 5 and not isinstance(engine.layers, list)
