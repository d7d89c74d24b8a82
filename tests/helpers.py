"""Helpers shared by tests: tiny random transformers models and padded batches."""

import numpy as np


def tiny_hf_model(kind: str, seed: int = 0, **overrides):
  """A random transformers model (float32, eval mode) with non-trivial norms and biases."""
  import torch
  import transformers

  base = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
  )
  base.update(overrides)
  cfg_cls, model_cls = {
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
  }[kind]
  torch.manual_seed(seed)
  model = model_cls(cfg_cls(**base)).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name or "bias" in name:
        p.add_(torch.randn_like(p) * 0.1)
  return model


def left_padded_batch(vocab: int, batch: int = 3, length: int = 10, seed: int = 0):
  """ids, mask (1 = real token) with different amounts of left padding, and HF-style positions."""
  rng = np.random.RandomState(seed)
  ids = rng.randint(0, vocab, (batch, length))
  mask = np.ones_like(ids)
  for b in range(1, batch):
    mask[b, : (3 * b) % length] = 0
  positions = np.maximum(mask.cumsum(1) - 1, 0)
  return ids, mask, positions


def hf_logits(model, ids, mask, positions):
  import torch

  with torch.no_grad():
    out = model(
      torch.tensor(ids),
      attention_mask=torch.tensor(mask),
      position_ids=torch.tensor(positions),
      output_hidden_states=True,
    )
  return out.logits.numpy(), [h.numpy() for h in out.hidden_states]


def tiny_run_dir(path, kind: str = "qwen2", seed: int = 0, **overrides) -> str:
  """A tiny random HF model with a small byte-level BPE tokenizer in one directory, so that
  `model.source = path` gives both (the trainer's tests need a tokenizer that fits the vocab)."""
  import os

  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  from transformers import PreTrainedTokenizerFast

  from lora_jax.data import DEMO_REFUSALS

  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
    vocab_size=300,
    special_tokens=["<s>", "</s>", "<pad>"],
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
  )
  tok.train([DEMO_REFUSALS], trainer)
  fast = PreTrainedTokenizerFast(
    tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
  )
  fast.save_pretrained(path)
  vocab = max(fast.vocab_size, len(fast)) + 4
  model = tiny_hf_model(
    kind, seed=seed, vocab_size=vocab, bos_token_id=0, eos_token_id=1, pad_token_id=2, **overrides
  )
  model.save_pretrained(path)
  assert os.path.exists(os.path.join(path, "tokenizer.json"))
  return str(path)


def train_config(source: str, **dotted):
  """configs/base.py with a tiny, fast run's settings and `dotted` overrides ("train.lr"=...)."""
  import importlib

  from lora_jax.data import DEMO_REFUSALS

  c = importlib.import_module("configs.base").get_config()
  c.model.source = source
  c.data.source = DEMO_REFUSALS
  c.data.format = "prompt_completion"
  c.data.max_length = 64
  c.data.bucket = 64
  c.train.steps = 4
  c.train.batch_size = 8
  c.train.lr = 1e-3
  c.lora.rank = 4
  c.lora.dropout = 0.0
  c.lora.targets = "qkvo_mlp"
  c.mesh.shape = "fsdp:1"
  c.checkpoint.async_save = False
  c.log.every_steps = 1
  c.log.progress = False
  c.log.tensorboard = False
  c.train.peak_flops = 1e11  # for MFU only: skips timing a matmul in every process (~3 s CPU)
  for key, value in dotted.items():
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


def tiny_run(source: str, **dotted):
  """`train_config` through the typed boundary (what launch.train hands to `train`)."""
  from lora_jax.run_config import from_dict

  return from_dict(train_config(source, **dotted))


def read_metrics(workdir) -> list[dict]:
  import json
  import os

  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def train_losses(workdir) -> list[float]:
  return [r["train/loss"] for r in read_metrics(workdir) if "train/loss" in r]
