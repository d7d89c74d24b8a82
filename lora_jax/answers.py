"""Answer records: the one schema `launch.sample` and the eval runner write and the graders read.

One JSON object per line (`lora_jax.jsonl`):

  id            the prompt's id; to be graded, a benchmark task id (or its 0-based index)
  seed          the benchmark seed the prompt was rendered with (GPQA shuffles its choices by
                it); default 0
  sample        which of the prompt's answers, 0..n-1; default: how many answers to the same
                (id, seed) came before it in the file
  completion    the answer text (thinking included)
  finish_reason, stop_reason, num_prompt_tokens, num_tokens, sampling_seed, prompt: information

`read_answers` also reads what other tools write, line by line:

  EvalPlus samples     task_id -> id; solution (self-contained code) or completion (code that
                       continues the prompt) -> completion; repeated task_ids are samples 0, 1, ...
  lm-eval samples      (--log_samples, samples_<task>_*.jsonl) doc.task_id / doc.id, else doc_id
                       (the document's index) -> id; each of resps[0] (the raw answers, one per
                       repeat; filtered_resps when resps is absent) -> completion, sample = its
                       position; the rows lm-eval writes per filter for one document are one
                       answer
  OpenAI batch output  custom_id -> id; response.body.choices[i].message.content (or .text of
                       the completions API) -> completion, sample = the choice's index; a failed
                       request (error, status_code != 200) is a bad line
  older lora_jax files task_id -> id; text -> completion

A bad line (not JSON, no id, no answer text, the same (id, seed, sample) twice) is a JsonlError
naming file and line; nothing is read twice.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from lora_jax import jsonl

INFO_FIELDS = (
  "finish_reason",
  "stop_reason",
  "num_prompt_tokens",
  "num_tokens",
  "sampling_seed",
  "prompt",
)
FORMATS = ("lora_jax", "evalplus", "lm_eval", "openai_batch")


@dataclasses.dataclass(frozen=True)
class Answer:
  id: str
  seed: int
  sample: int
  completion: str
  line: int  # where it was read (for error messages)
  format: str  # one of FORMATS
  info: dict = dataclasses.field(default_factory=dict)  # INFO_FIELDS present on the line


def record(
  id: str, completion: str, *, seed: int = 0, sample: int = 0, **info: Any
) -> dict[str, Any]:
  """One answer line in the schema (info: any of INFO_FIELDS)."""
  unknown = set(info) - set(INFO_FIELDS)
  if unknown:
    raise ValueError(f"unknown answer fields {sorted(unknown)}; known: {INFO_FIELDS}")
  return {"id": str(id), "seed": int(seed), "sample": int(sample), "completion": completion, **info}


def read_answers(path: str, *, missing_ok: bool = False, keep_first: bool = False) -> list[Answer]:
  """Every answer of a file in any of FORMATS (see the module doc), in file order. With
  `keep_first`, an (id, seed, sample) seen before is skipped instead of an error (a generator
  resumed in the middle of a prompt's samples writes them again)."""
  out: list[Answer] = []
  seen: dict[tuple[str, int, int], int] = {}  # (id, seed, sample) -> line
  counts: dict[tuple[str, int], int] = {}
  lm_eval_docs: dict[str, tuple[int, list, set]] = {}  # id -> (line, raw answers, filters)
  for line, row in jsonl.read(path, missing_ok=missing_ok):
    where = lambda reason, line=line: jsonl.bad_line(path, line, reason)
    fmt, parsed = _parse_line(row, where)
    if fmt == "lm_eval" and _lm_eval_repeat(lm_eval_docs, parsed, row.get("filter"), line, where):
      continue
    for id_, seed, sample, text in parsed:
      if sample is None:
        sample = counts.get((id_, seed), 0)
      counts[(id_, seed)] = max(counts.get((id_, seed), 0), sample + 1)
      key = (id_, seed, sample)
      if key in seen and keep_first:
        continue
      if key in seen:
        raise where(
          f"id {id_!r} seed {seed} sample {sample} again (first on line {seen[key]}): "
          "an answer is graded once"
        )
      seen[key] = line
      info = {k: row[k] for k in INFO_FIELDS if k in row} if fmt == "lora_jax" else {}
      out.append(Answer(id_, seed, sample, text, line, fmt, info))
  return out


def _lm_eval_repeat(docs: dict, parsed: list, filter_name, line: int, where) -> bool:
  """lm-eval writes one row per filter for a document, with the same raw answers: those rows
  after the first are repeats (True). The same filter twice, or other answers, is an error."""
  doc, texts = parsed[0][0], [p[3] for p in parsed]
  if doc not in docs:
    docs[doc] = (line, texts, {filter_name})
    return False
  first, first_texts, filters = docs[doc]
  if filter_name in filters or first_texts != texts:
    raise where(f"doc {doc!r} again (first on line {first}): an answer is graded once")
  filters.add(filter_name)
  return True


def _parse_line(row: dict, where) -> tuple[str, list[tuple[str, int, int | None, str]]]:
  """(format, [(id, seed, sample or None, completion), ...]) of one line."""
  if "custom_id" in row and "response" in row:
    return "openai_batch", _openai(row, where)
  if "doc_id" in row:
    return "lm_eval", _lm_eval(row, where)
  id_ = row.get("id", row.get("task_id"))
  if id_ is None or isinstance(id_, (dict, list, bool)) or str(id_) == "":
    raise where("no id: expected 'id' or 'task_id' (or lm-eval's doc_id, a batch's custom_id)")
  fmt = "lora_jax"
  if "completion" in row:
    text = row["completion"]
  elif "solution" in row:
    text, fmt = row["solution"], "evalplus"
  elif "text" in row:
    text = row["text"]
  else:
    raise where("no answer: expected 'completion' (or EvalPlus's 'solution')")
  if "task_id" in row and "id" not in row and "sample" not in row and "seed" not in row:
    fmt = "evalplus"
  if not isinstance(text, str):
    raise where(f"the answer must be a string, got {type(text).__name__}")
  seed, sample = _int_field(row, "seed", 0, where), _int_field(row, "sample", None, where)
  return fmt, [(str(id_), seed, sample, text)]


def _int_field(row: dict, name: str, default, where):
  value = row.get(name, default)
  if value is default:
    return value
  if isinstance(value, bool) or not isinstance(value, int) or value < 0:
    raise where(f"'{name}' must be an integer >= 0, got {value!r}")
  return value


def _openai(row: dict, where) -> list:
  if row.get("error"):
    raise where(f"the request failed: {row['error']}")
  response = row["response"] or {}
  status = response.get("status_code", 200)
  if status != 200:
    raise where(f"the request failed with status {status}")
  choices = (response.get("body") or {}).get("choices")
  if not choices:
    raise where("no response.body.choices")
  out = []
  for i, choice in enumerate(choices):
    message = choice.get("message") or {}
    text = message.get("content", choice.get("text"))
    if not isinstance(text, str):
      raise where(f"choice {i} has no message.content (or text)")
    out.append((str(row["custom_id"]), 0, int(choice.get("index", i)), text))
  return out


def _lm_eval(row: dict, where) -> list:
  doc = row.get("doc") if isinstance(row.get("doc"), dict) else {}
  id_ = next((doc[k] for k in ("task_id", "id") if doc.get(k) not in (None, "")), row["doc_id"])
  resps = row.get("resps")
  if resps:  # one list of repeats per request; generation tasks have one request
    texts = resps[0] if isinstance(resps[0], list) else resps
  else:
    texts = row.get("filtered_resps") or []
  texts = [t[0] if isinstance(t, list) and len(t) == 1 else t for t in texts]
  if not texts or not all(isinstance(t, str) for t in texts):
    raise where("no text answers in resps (or filtered_resps)")
  return [(str(id_), 0, i, t) for i, t in enumerate(texts)]
