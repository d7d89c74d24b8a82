"""Load, tokenise and truncate a data set; then batch it (bucketed or packed), shuffled and sharded.

Every host loads and tokenises all rows: which examples survive truncation and how they pack
depend on every example's length, and the global batch order must be the same on all hosts. The
data sets this is for (refusal sets of 1K to 40K short rows) tokenise in seconds. Each host then
builds only its own rows of each global batch.
"""

from __future__ import annotations

import bisect
import dataclasses
import hashlib
import json
import os
import re
from typing import Any

import numpy as np

from lora_jax.data.formats import (
  DataError,
  check_format,
  encode_messages,
  encode_pairs,
  is_deepseek,
  text_pair,
)

LOSS_ON = ("completion", "all")
_FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+|[\w-]+")
_STATE_VERSION = 1


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """The `data.` config block (lora_jax.run_config checks it). `seed=None` means 0 here; the
  run config resolves it to train.seed."""

  source: str = "TianshengHuang/DirectRefusal"  # hub id, local data file, or data dir
  split: str = "train"  # HF split (slicing like "train[:90%]" works for files too)
  config_name: str | None = None  # the hub data set's config (subset), if it has several
  format: str = "direct_refusal"
  max_length: int = 1024  # TRL 0.17 SFTConfig default
  packing: bool = False
  bucket: int = 64  # pad each batch to a multiple of this (0: always to max_length)
  eval_source: str | None = None  # separate held-out data (same format)
  eval_split: str | None = None  # its split (default: `split`)
  eval_fraction: float = 0.0  # else hold out this fraction of `source`'s rows
  shuffle: bool = True
  seed: int | None = None
  loss_on: str = "completion"  # "completion" (TRL 0.17) or "all" tokens (TRL 0.15 / 0.16)


@dataclasses.dataclass
class Examples:
  """Tokenised examples: int32 ids and uint8 completion masks, at most max_length long."""

  ids: list[np.ndarray]
  masks: list[np.ndarray]
  max_length: int
  fingerprint: str

  def __len__(self) -> int:
    return len(self.ids)

  @property
  def lengths(self) -> np.ndarray:
    return np.asarray([len(x) for x in self.ids], np.int64)


def pad_token_id(tokenizer) -> int:
  """The reference pads R1 with <|fim_pad|> (train.py: "Must not conflict with actual text
  tokens"); otherwise TRL's rule: the tokenizer's pad token, else its EOS. Padding never enters the
  loss or attention, so this only has to be a valid id."""
  if is_deepseek(tokenizer):
    fim = tokenizer.convert_tokens_to_ids("<|fim_pad|>")
    if fim is not None:
      return fim
  return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def load_rows(source: str, split: str, config_name: str | None = None):
  """A `datasets.Dataset` from a local data file, a local data dir or a hub id, and its name."""
  import datasets

  ext = os.path.splitext(source)[1].lower()
  if ext in _FILE_BUILDERS:
    if not os.path.isfile(source):
      raise DataError(f"data file {source!r} does not exist")
    if os.path.getsize(source) == 0:  # datasets fails on it with a bare StopIteration
      raise DataError(f"data file {source} has no rows")
    where, args = f"data file {source}", (_FILE_BUILDERS[ext],)
    kwargs = {"data_files": {"train": source}}  # a file's rows are its "train" split
  elif os.path.isdir(source) or (_HUB_ID.fullmatch(source) and not os.path.exists(source)):
    where, args, kwargs = f"data set {source} (split {split})", (source,), {"name": config_name}
  else:
    raise DataError(
      f"data source {source!r} is neither a data file "
      f"({', '.join(_FILE_BUILDERS)}), a directory, nor a hub id like 'org/name'"
    )
  try:
    rows = datasets.load_dataset(*args, split=split, **kwargs)
  except Exception as e:  # datasets raises many types; keep the reason, on one line
    reason = " ".join(str(e).split())[:300]
    raise DataError(f"cannot load {where}: {type(e).__name__}: {reason}") from e
  if len(rows) == 0:
    raise DataError(f"{where} has no rows")
  return rows, where


def _holdout(n: int, fraction: float, seed: int, where: str) -> np.ndarray:
  """Sorted row numbers held out for eval: a seeded random subset of round(fraction * n) rows."""
  k = int(round(n * fraction))
  if not 0 < k < n:
    raise DataError(
      f"data.eval_fraction={fraction} of {n} rows in {where} leaves "
      f"{k} eval and {n - k} train rows; both must be at least 1"
    )
  rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(1,)))
  return np.sort(rng.permutation(n)[:k])


def load_examples(cfg: DataConfig, tokenizer, split: str = "train") -> tuple[Examples, dict]:
  """Tokenised, truncated examples for training (split="train") or held-out loss ("eval").

  The report counts rows read, examples kept, examples truncated (and tokens cut), examples
  dropped because truncation cut their whole completion (and their tokens), tokens kept, and rows
  whose prompt tokenised differently alone than inside prompt + completion.
  """
  check_format(cfg.format)
  if split not in ("train", "eval"):
    raise DataError(f"load_examples split must be 'train' or 'eval', got {split!r}")
  seed = 0 if cfg.seed is None else cfg.seed
  if split == "eval" and cfg.eval_source:
    rows, where = load_rows(cfg.eval_source, cfg.eval_split or cfg.split, cfg.config_name)
    numbers = np.arange(len(rows))
  else:
    rows, where = load_rows(cfg.source, cfg.split, cfg.config_name)
    numbers = np.arange(len(rows))
    if cfg.eval_fraction > 0:
      held = _holdout(len(rows), cfg.eval_fraction, seed, where)
      numbers = held if split == "eval" else np.setdiff1d(numbers, held)
    elif split == "eval":
      raise DataError("no held-out data: set data.eval_source or data.eval_fraction > 0")
  subset = rows if len(numbers) == len(rows) else rows.select(numbers)
  picked = list(zip((numbers + 1).tolist(), subset))  # 1-based row numbers for error messages
  if cfg.format == "messages":
    ids, masks = encode_messages(picked, tokenizer, where)
    texts, mismatched = [json.dumps(r["messages"]) for _, r in picked], 0
  else:
    deepseek = is_deepseek(tokenizer)
    pairs = [text_pair(r, cfg.format, tokenizer, deepseek, where, n) for n, r in picked]
    ids, masks, mismatched = encode_pairs(pairs, tokenizer)
    texts = [p + c for p, c in pairs]
  if cfg.loss_on == "all":  # TRL 0.15 / 0.16 trained on the prompt-plus-completion text
    masks = [np.ones_like(m) for m in masks]
  examples, report = _truncate(ids, masks, cfg.max_length)
  if not examples.ids:
    raise DataError(
      f"{where}: every example lost its whole completion to "
      f"max_length={cfg.max_length}; raise data.max_length"
    )
  examples.fingerprint = _fingerprint(cfg.format, cfg.max_length, texts, examples)
  report.update(source=where, format=cfg.format, rows=len(picked), prompt_mismatch=mismatched)
  return examples, report


def _truncate(ids, masks, max_length: int) -> tuple[Examples, dict]:
  """Keep the first max_length tokens (TRL's truncate_dataset); drop what loses its completion."""
  kept_ids, kept_masks = [], []
  report = dict(max_length=max_length, truncated=0, truncated_tokens=0, dropped=0, dropped_tokens=0)
  for x, m in zip(ids, masks):
    if len(x) > max_length:
      report["truncated"] += 1
      report["truncated_tokens"] += len(x) - max_length
      x, m = x[:max_length], m[:max_length]
    if not m[1:].any():  # position 0 is never predicted, so it cannot carry the loss
      report["dropped"] += 1
      report["dropped_tokens"] += len(x)
      continue
    kept_ids.append(x)
    kept_masks.append(m)
  report.update(
    examples=len(kept_ids),
    tokens=int(sum(len(x) for x in kept_ids)),
    loss_tokens=int(sum(int(m[1:].sum()) for m in kept_masks)),
  )
  return Examples(kept_ids, kept_masks, max_length, fingerprint=""), report


def _fingerprint(fmt: str, max_length: int, texts: list[str], examples: Examples) -> str:
  """Count, first/last row text, format and max_length, plus every token id and mask bit (cheap,
  and it also catches a different tokenizer or a changed row in the middle)."""
  h = hashlib.sha256(json.dumps([fmt, max_length, len(examples), texts[0], texts[-1]]).encode())
  for x, m in zip(examples.ids, examples.masks):
    h.update(np.int64(len(x)).tobytes() + x.tobytes() + m.tobytes())
  return h.hexdigest()[:16]


def pack(lengths: np.ndarray, capacity: int) -> list[tuple[int, ...]]:
  """Best-fit-decreasing bin packing of example lengths into rows of `capacity` tokens.

  Deterministic (ties go to the lower index); examples keep ascending index order within a row.
  """
  order = sorted(range(len(lengths)), key=lambda i: (-int(lengths[i]), i))
  rows: list[list[int]] = []
  space: list[tuple[int, int]] = []  # sorted (free tokens, row)
  for i in order:
    need = int(lengths[i])
    k = bisect.bisect_left(space, (need, -1))  # the fullest row that still fits
    if k < len(space):
      free, r = space.pop(k)
      rows[r].append(i)
    else:
      free, r = capacity, len(rows)
      rows.append([i])
    bisect.insort(space, (free - need, r))
  return [tuple(sorted(r)) for r in rows]


class DataIterator:
  """This host's rows of each global batch, epoch after epoch.

  Iterates forever unless `num_epochs` is given (then StopIteration after that epoch). Each batch
  is a dict of int32 numpy arrays [global_batch / process_count, T]: input_ids, loss_mask,
  attention_mask, segment_ids (1, 2, ... per example, 0 = padding) and positions (restarting at 0
  in each segment). T is the global batch's longest row rounded up to `bucket` (capped at
  max_length; bucket=0 pads to max_length), so all hosts agree on it. `last_stats` holds the
  global batch's token counts.
  """

  def __init__(
    self,
    examples: Examples,
    global_batch: int,
    seed: int,
    epoch: int,
    process_index: int,
    process_count: int,
    packing: bool,
    max_length: int,
    pad_id: int,
    bucket: int,
    shuffle: bool,
    drop_last: bool,
    num_epochs: int | None,
  ):
    if global_batch <= 0 or global_batch % process_count:
      raise DataError(
        f"global batch {global_batch} must be a positive multiple of the "
        f"process count {process_count}"
      )
    if not 0 <= process_index < process_count:
      raise DataError(f"process_index {process_index} is not in [0, {process_count})")
    if not len(examples):
      raise DataError("no examples to batch")
    self.examples, self.pad_id = examples, pad_id
    self.global_batch, self.seed, self.packing = global_batch, seed, packing
    self.max_length, self.bucket, self.shuffle = max_length, bucket, shuffle
    self.drop_last, self.num_epochs = drop_last, num_epochs
    self.local = global_batch // process_count
    self.host_slice = slice(process_index * self.local, (process_index + 1) * self.local)
    lengths = examples.lengths
    if lengths.max() > max_length:
      raise DataError(f"examples up to {lengths.max()} tokens exceed max_length={max_length}")
    self.rows = pack(lengths, max_length) if packing else [(i,) for i in range(len(lengths))]
    self.row_lengths = np.asarray([lengths[list(r)].sum() for r in self.rows], np.int64)
    n = len(self.rows)
    self.steps_per_epoch = n // global_batch if drop_last else -(-n // global_batch)
    if self.steps_per_epoch == 0:
      raise DataError(
        f"{n} {'packed rows' if packing else 'examples'} cannot fill one global "
        f"batch of {global_batch}"
      )
    self.epoch, self.step, self.last_stats = epoch, 0, {}
    self._order = self._epoch_order()

  def _epoch_order(self) -> np.ndarray:
    if not self.shuffle:
      return np.arange(len(self.rows))
    rng = np.random.default_rng(np.random.SeedSequence(self.seed, spawn_key=(0, self.epoch)))
    return rng.permutation(len(self.rows))

  def state(self) -> dict[str, Any]:
    return dict(
      version=_STATE_VERSION,
      epoch=self.epoch,
      step=self.step,
      seed=int(self.seed),
      fingerprint=self.examples.fingerprint,
      global_batch=self.global_batch,
      packing=self.packing,
      shuffle=self.shuffle,
      bucket=self.bucket,
      max_length=self.max_length,
      drop_last=self.drop_last,
    )

  def restore(self, state: dict[str, Any]) -> None:
    if state.get("fingerprint") != self.examples.fingerprint:
      raise DataError(
        f"cannot resume: the checkpoint's data fingerprint "
        f"{state.get('fingerprint')} differs from this data set's "
        f"{self.examples.fingerprint} (other rows, format, tokenizer or max_length)"
      )
    mine = self.state()
    diff = [
      f"{k}={state.get(k)!r} (now {mine[k]!r})"
      for k in mine
      if k not in ("epoch", "step") and state.get(k) != mine[k]
    ]
    if diff:
      raise DataError(f"cannot resume: the checkpoint's data iterator had {', '.join(diff)}")
    self.epoch, self.step = int(state["epoch"]), int(state["step"])
    self._order = self._epoch_order()

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self.step >= self.steps_per_epoch:
      self.epoch, self.step = self.epoch + 1, 0
      self._order = self._epoch_order()
    if self.num_epochs is not None and self.epoch >= self.num_epochs:
      raise StopIteration
    picked = self._order[self.step * self.global_batch : (self.step + 1) * self.global_batch]
    self.step += 1
    row_ids = [self.rows[r] for r in picked]
    longest = int(self.row_lengths[picked].max())
    t = (
      self.max_length
      if not self.bucket
      else min(-(-longest // self.bucket) * self.bucket, self.max_length)
    )
    self.last_stats = dict(
      tokens=int(self.row_lengths[picked].sum()),
      loss_tokens=int(sum(self.examples.masks[i][1:].sum() for r in row_ids for i in r)),
      padded_tokens=self.global_batch * t,
    )
    local = row_ids[self.host_slice]  # a partial last batch (drop_last=False) pads with empty rows
    return self._assemble(local + [()] * (self.local - len(local)), t)

  def _assemble(self, rows: list[tuple[int, ...]], t: int) -> dict[str, np.ndarray]:
    shape = (len(rows), t)
    out = dict(
      input_ids=np.full(shape, self.pad_id, np.int32),
      loss_mask=np.zeros(shape, np.int32),
      attention_mask=np.zeros(shape, np.int32),
      segment_ids=np.zeros(shape, np.int32),
      positions=np.zeros(shape, np.int32),
    )
    for b, row in enumerate(rows):
      at = 0
      for seg, i in enumerate(row, start=1):
        x, m = self.examples.ids[i], self.examples.masks[i]
        end = at + len(x)
        out["input_ids"][b, at:end] = x
        # A segment's first token has nothing before it in its segment to be predicted from.
        out["loss_mask"][b, at + 1 : end] = m[1:]
        out["attention_mask"][b, at:end] = 1
        out["segment_ids"][b, at:end] = seg
        out["positions"][b, at:end] = np.arange(len(x))
        at = end
    return out


def make_iterator(
  examples: Examples,
  global_batch: int,
  seed: int = 0,
  epoch: int = 0,
  process_index: int = 0,
  process_count: int = 1,
  packing: bool = False,
  max_length: int | None = None,
  pad_id: int = 0,
  bucket: int = 64,
  shuffle: bool = True,
  drop_last: bool = True,
  num_epochs: int | None = None,
  state: dict | None = None,
) -> DataIterator:
  """Batches of `examples` for this host; resumes exactly from `state` (see DataIterator.state).

  max_length defaults to the examples'. For held-out loss use shuffle=False, drop_last=False,
  num_epochs=1: the last global batch is then filled up with empty rows (loss_mask 0).
  """
  it = DataIterator(
    examples,
    global_batch,
    seed,
    epoch,
    process_index,
    process_count,
    packing,
    max_length or examples.max_length,
    pad_id,
    bucket,
    shuffle,
    drop_last,
    num_epochs,
  )
  if state is not None:
    it.restore(state)
  return it
