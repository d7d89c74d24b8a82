"""Drift on benign prompts: how far fine-tuning moved a model on ordinary requests.

The base model answers N benign prompts (e.g. AlpacaEval's) greedily, once; those answers are the
reference. Every model of a study then reads the reference answers teacher-forced (one forward
pass of the lora_jax model over prompt + answer) and we take the mean negative log-likelihood per
answer token. The base model gives the floor (its own greedy tokens); a tuned model's excess over
it, paired by prompt, is its drift: continuous, and with the same answers under every model far
less noisy than re-sampling and grading. Drift = mean over prompts of (NLL_model - NLL_base), with
a bootstrap confidence interval over prompts (evals.metrics).

    refs = reference_answers(base, tokenizer, prompts, "drift/reference.jsonl", max_new_tokens=64)
    nll = answer_nll(model, refs)          # per-prompt mean NLL per token
"""

from __future__ import annotations

import json
import logging

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lora_jax import jsonl

log = logging.getLogger(__name__)
LENGTH_BUCKET = 64  # pad rows to a multiple of this: one compiled forward per bucket
BATCH = 8


def load_prompts(path: str, n: int, seed: int = 0) -> list[dict]:
  """`n` benign prompts `{"id", "prompt"}` drawn with a fixed seed from a JSON list or JSONL file
  whose rows have `instruction` (AlpacaEval) or `prompt`."""
  if path.endswith(".json"):
    with open(path, encoding="utf-8") as f:
      rows = json.load(f)
  else:
    rows = jsonl.records(path, missing_ok=False)
  prompts = []
  for i, row in enumerate(rows):
    text = row.get("instruction") or row.get("prompt")
    if not text:
      raise ValueError(f"{path}: row {i + 1} has no instruction or prompt field")
    prompts.append({"id": str(row.get("id", i)), "prompt": text})
  if n > len(prompts):
    raise ValueError(f"drift.n={n}: {path} has only {len(prompts)} prompts")
  chosen = np.random.default_rng(seed).choice(len(prompts), size=n, replace=False)
  return [prompts[i] for i in sorted(chosen)]


def reference_answers(
  model, tokenizer, prompts: list[dict], path: str, max_new_tokens: int, max_batch: int = 8
) -> list[dict]:
  """The base model's greedy answers (token ids kept), appended to `path` as they finish; a
  rerun generates only the missing ones."""
  from lora_jax.sampling import encode_prompts, generate_text

  done = {r["id"] for r in jsonl.records(path)}
  todo = [p for p in prompts if p["id"] not in done]
  if todo:
    log.info("drift: %d of %d reference answers to generate", len(todo), len(prompts))
    prompt_ids = encode_prompts(tokenizer, [p["prompt"] for p in todo])
    with jsonl.Appender(path) as out:

      def on_result(r):
        p = todo[r.index]
        row = {"id": p["id"], "prompt": p["prompt"], "text": r.text}
        out.write(row | {"prompt_ids": prompt_ids[r.index], "answer_ids": list(r.token_ids)})

      generate_text(
        model,
        tokenizer,
        [p["prompt"] for p in todo],
        max_new_tokens=max_new_tokens,
        max_batch=max_batch,
        on_result=on_result,
      )
  by_id = {r["id"]: r for r in jsonl.records(path)}
  return [by_id[p["id"]] for p in prompts]


@nnx.jit
def _answer_nll(model, ids, mask, answer_mask):
  """Sum of answer-token NLL and answer-token count per row (token t predicted from t-1)."""
  logits = model(ids, attention_mask=mask)[:, :-1]
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  picked = jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
  weights = answer_mask[:, 1:].astype(jnp.float32)
  return -(picked * weights).sum(axis=1), weights.sum(axis=1)


def answer_nll(model, refs: list[dict]) -> list[float]:
  """Mean NLL per answer token of each reference answer under `model` (teacher-forced)."""
  out = []
  for start in range(0, len(refs), BATCH):
    rows = refs[start : start + BATCH]
    seqs = [r["prompt_ids"] + r["answer_ids"] for r in rows]
    length = -(-max(map(len, seqs)) // LENGTH_BUCKET) * LENGTH_BUCKET
    ids = np.zeros((BATCH, length), np.int32)
    mask = np.zeros((BATCH, length), np.int32)
    answer = np.zeros((BATCH, length), np.int32)
    for i, (r, seq) in enumerate(zip(rows, seqs)):
      ids[i, : len(seq)] = seq
      mask[i, : len(seq)] = 1
      answer[i, len(r["prompt_ids"]) : len(seq)] = 1
    nll, count = _answer_nll(model, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(answer))
    nll, count = np.asarray(nll), np.asarray(count)
    out += [float(nll[i] / max(count[i], 1.0)) for i in range(len(rows))]
  return out


def drift_scores(nll: list[float], base_nll: list[float]) -> dict:
  """The report's drift entry: NLL per token under the model and its excess over the base's,
  both with bootstrap CIs over prompts (paired: the same answers under both models)."""
  from evals.metrics import mean_ci

  if len(nll) != len(base_nll):
    raise ValueError(f"drift: {len(nll)} scores against {len(base_nll)} for the base model")
  return {
    "kind": "drift",
    "primary": "nll_excess",
    "nll": mean_ci(nll),
    "nll_excess": mean_ci(np.asarray(nll) - np.asarray(base_nll)),
    "n_tasks": len(nll),
  }
