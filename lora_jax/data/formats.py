"""Data formats: one data row -> token ids and a completion mask, as the reference trains on them.

The reference (github.com/YihaoXue/lora-safety-reasoning, train.py, `get_preprocess`) turns each row
into a (prompt, completion) pair of strings and hands them to TRL's SFTTrainer. Its
environment.yml pins transformers==4.47.1 and no TRL version; TRL 0.18 needs transformers>=4.50, so
the newest TRL it can have run is 0.17.0, whose tokenisation we copy (trl/trainer/sft_trainer.py,
`_prepare_dataset`):
  * `add_eos`: the completion gets `tokenizer.eos_token` appended unless it already ends with it;
  * `tokenize`: the prompt and prompt + completion are tokenised separately with
    add_special_tokens=True (so the tokenizer's BOS comes first), and the completion mask is
    [0] * len(prompt_ids) + [1] * (len(full_ids) - len(prompt_ids)), even when the prompt's ids are
    not a prefix of the full ids (TRL only warns; we count those rows).
`data.loss_on="all"` sets the whole mask instead (TRL 0.15 / 0.16 trained on the concatenated
prompt + completion: the same ids). Conversations (`messages`) follow TRL's conversational path instead: the chat template renders the
text, it is tokenised without added special tokens, and no EOS is appended.
"""

from __future__ import annotations

import json

import numpy as np

# format -> the fields each row must have.
FORMATS = {
  "direct_refusal": ("prompt", "refusal"),  # TianshengHuang/DirectRefusal
  "star1": ("question", "response"),  # UCSC-VLAA/STAR-1 (response holds <think>...</think>)
  "chat": ("prompt", "completion"),  # plain pair, formatted for the model like star1
  "prompt_completion": ("prompt", "completion"),  # plain text, no template (TRL's default)
  "messages": ("messages",),  # [{role, content}, ...]; loss on assistant turns
}

# DeepSeek-R1 hand format (reference train.py, get_preprocess, model_family == "DeepSeek").
USER, ASSISTANT, EOS = "<｜User｜>", "<｜Assistant｜>", "<｜end▁of▁sentence｜>"
REFUSAL_THINKING = "<think>I should not answer this question!</think>"


class DataError(ValueError):
  """Bad training data or data settings; the message is one line naming the bad value."""


def check_format(fmt: str) -> None:
  if fmt not in FORMATS:
    raise DataError(f"unknown data.format {fmt!r}; known formats: {', '.join(sorted(FORMATS))}")


def is_deepseek(tokenizer) -> bool:
  """R1 models get the hand-built DeepSeek text: their chat template drops the thinking."""
  template = getattr(tokenizer, "chat_template", None)
  if template:
    return ASSISTANT in template
  vocab = tokenizer.get_vocab()
  return USER in vocab and ASSISTANT in vocab


def row_fields(row: dict, fmt: str, where: str, number: int) -> tuple:
  """The format's fields of one row; a missing or non-string field is an error naming the row."""
  values = []
  for field in FORMATS[fmt]:
    value = row.get(field)
    if value is None:
      raise DataError(
        f"{where}, row {number}: missing field {field!r} "
        f"(format {fmt} needs {', '.join(FORMATS[fmt])})"
      )
    if field != "messages" and not isinstance(value, str):
      raise DataError(
        f"{where}, row {number}: field {field!r} is {type(value).__name__}, expected a string"
      )
    values.append(value)
  return tuple(values)


def _direct_refusal_response(refusal: str, where: str, number: int) -> str:
  # The text after the FIRST "Answer:", not stripped: `text.split("Answer:", 1)[1]` in the
  # reference's train.py (get_preprocess); it raises on rows without "Answer:", so do we.
  if "Answer:" not in refusal:
    raise DataError(
      f"{where}, row {number}: field 'refusal' has no 'Answer:' "
      f"(expected 'Question: ...\\nAnswer: ...')"
    )
  return refusal.split("Answer:", 1)[1]


def _chat_pair(tokenizer, user: str, answer: str, where: str, number: int) -> tuple[str, str]:
  """[user, assistant] through the chat template, split where the assistant's text starts.

  The reference (train.py, get_preprocess, model_family == "Qwen") splits the rendered text after
  the first "<|im_start|>assistant\\n"; rendering [user] with the generation prompt gives that same
  prefix for ChatML and generalises to other templates.
  """
  if not getattr(tokenizer, "chat_template", None):
    raise DataError(
      f"{where}: the tokenizer has no chat template and no DeepSeek tokens; "
      f"use format=prompt_completion for plain text"
    )
  user_msg = {"role": "user", "content": user}
  full = tokenizer.apply_chat_template(
    [user_msg, {"role": "assistant", "content": answer}],
    tokenize=False,
    add_generation_prompt=False,
  )
  prefix = tokenizer.apply_chat_template([user_msg], tokenize=False, add_generation_prompt=True)
  if not full.startswith(prefix):
    raise DataError(
      f"{where}, row {number}: the chat template's generation prompt is not a "
      f"prefix of the rendered conversation; cannot split prompt and completion"
    )
  completion = full[len(prefix) :]
  if "</think>" in answer and "</think>" not in completion:
    raise DataError(
      f"{where}, row {number}: the chat template drops the thinking of the assistant turn"
    )
  return prefix, completion


def text_pair(
  row: dict, fmt: str, tokenizer, deepseek: bool, where: str, number: int
) -> tuple[str, str]:
  """(prompt, completion) strings of one row for the pair formats, before TRL's EOS rule."""
  if fmt == "prompt_completion":
    return row_fields(row, fmt, where, number)
  user, answer = row_fields(row, fmt, where, number)
  if fmt == "direct_refusal":
    answer = _direct_refusal_response(answer, where, number)
    if deepseek:  # the reference's thinking is added only in the DeepSeek format
      return USER + user + ASSISTANT, REFUSAL_THINKING + answer + EOS
  elif deepseek:
    return USER + user + ASSISTANT, answer + EOS
  return _chat_pair(tokenizer, user, answer, where, number)


def encode_pairs(pairs: list[tuple[str, str]], tokenizer) -> tuple[list, list, int]:
  """TRL 0.17's add_eos + tokenize on (prompt, completion) strings.

  Returns int32 ids, uint8 completion masks and the number of rows whose prompt ids are not a
  prefix of the full ids (TRL warns and masks by length; so do we).
  """
  eos = tokenizer.eos_token
  prompts = [p for p, _ in pairs]
  fulls = [p + (c if c.endswith(eos) else c + eos) for p, c in pairs]
  # A chat template that already writes BOS must not get a second one from the tokenizer.
  special = not (tokenizer.bos_token and prompts and prompts[0].startswith(tokenizer.bos_token))
  prompt_ids = tokenizer(prompts, add_special_tokens=special)["input_ids"]
  full_ids = tokenizer(fulls, add_special_tokens=special)["input_ids"]
  ids, masks, mismatched = [], [], 0
  for p, f in zip(prompt_ids, full_ids):
    mismatched += f[: len(p)] != p
    mask = np.zeros(len(f), np.uint8)
    mask[len(p) :] = 1
    ids.append(np.asarray(f, np.int32))
    masks.append(mask)
  return ids, masks, mismatched


def encode_messages(rows: list[tuple[int, dict]], tokenizer, where: str) -> tuple[list, list]:
  """Conversations: the whole text through the chat template, loss on assistant turns only.

  Each assistant turn's text is found by rendering the conversation up to it twice (with the
  generation prompt before it, and with it); the tokens inside those character spans get mask 1.
  """
  texts, spans = [], []
  for number, row in rows:
    (messages,) = row_fields(row, "messages", where, number)
    texts_i, spans_i = _message_spans(messages, tokenizer, where, number)
    texts.append(texts_i)
    spans.append(spans_i)
  enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
  ids, masks = [], []
  for row_ids, offsets, row_spans in zip(enc["input_ids"], enc["offset_mapping"], spans):
    starts = np.asarray([o[0] for o in offsets], np.int64)
    ends = np.asarray([o[1] for o in offsets], np.int64)
    mask = np.zeros(len(row_ids), np.uint8)
    for lo, hi in row_spans:
      mask[(starts >= lo) & (ends <= hi) & (ends > starts)] = 1
    ids.append(np.asarray(row_ids, np.int32))
    masks.append(mask)
  return ids, masks


def _message_spans(messages, tokenizer, where: str, number: int):
  if not isinstance(messages, list) or not all(
    isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
    for m in messages
  ):
    raise DataError(
      f"{where}, row {number}: field 'messages' must be a list of "
      f"{{'role': str, 'content': str}}, got {json.dumps(messages)[:80]}"
    )
  render = lambda msgs, gen: tokenizer.apply_chat_template(
    msgs, tokenize=False, add_generation_prompt=gen
  )
  full = render(messages, False)
  spans = []
  for i, m in enumerate(messages):
    if m["role"] != "assistant":
      continue
    before, upto = render(messages[:i], True), render(messages[: i + 1], False)
    if not (upto.startswith(before) and full.startswith(upto)):
      raise DataError(
        f"{where}, row {number}: the chat template does not render message {i + 1} "
        f"as an extension of the earlier ones; cannot find the assistant's text"
      )
    if "</think>" in m["content"] and "</think>" not in upto[len(before) :]:
      raise DataError(
        f"{where}, row {number}: the chat template drops the thinking of message "
        f"{i + 1}; use format=star1 or chat for R1 models"
      )
    spans.append((len(before), len(upto)))
  if not spans:
    raise DataError(f"{where}, row {number}: no assistant message, so nothing to learn")
  return full, spans
