"""The one resumable JSONL reader and writer: one JSON object per line, appended and flushed.

    for line_no, record in jsonl.read(path): ...     # bad lines: JsonlError "path:line: ..."
    with jsonl.Appender(path) as out:                # resumes an interrupted file
      out.write({"id": "a", "completion": "..."})

A run killed while writing leaves at most one torn line: the last one, without its newline and
not valid JSON. Everything here handles it one way: it is not a record. `read` skips it and
`Appender` cuts it from the file; both count it (`torn`) and log it. A last line that is valid
JSON but lacks its newline (a file written by hand) is a record, and `Appender` adds the newline
before appending. Any other line that is not a JSON object is an error naming file and line.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
from collections.abc import Iterable

log = logging.getLogger(__name__)

_CHUNK = 1 << 16


class JsonlError(ValueError):
  """A line that is not a record: `path:line: reason`."""


def bad_line(path: str, line: int, reason: str) -> JsonlError:
  return JsonlError(f"{path}:{line}: {reason}")


def _parse(text: str):
  try:
    return json.loads(text)
  except json.JSONDecodeError as e:
    return e


class Lines(list):
  """(line number, record) pairs of a file; `torn` counts a skipped torn last line (0 or 1)."""

  torn: int = 0


def read(path: str, *, missing_ok: bool = False) -> Lines:
  """Every record of a JSONL file (`.gz` too) with its 1-based line number; blank lines are
  skipped. A missing file is an error unless `missing_ok` (then no records)."""
  out = Lines()
  if missing_ok and not os.path.exists(path):
    return out
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "rb") as f:
    data = f.read()
  try:
    text = data.decode("utf-8")
  except UnicodeDecodeError as e:
    line = data[: e.start].count(b"\n") + 1
    raise bad_line(path, line, "not UTF-8 text") from None
  lines = text.split("\n")
  ends_open = not text.endswith("\n")  # the last piece had no newline (or the file is empty)
  for number, line in enumerate(lines, 1):
    if not line.strip():
      continue
    record = _parse(line)
    last = number == len(lines) and ends_open
    if isinstance(record, json.JSONDecodeError):
      if last:
        out.torn = 1
        log.warning("%s:%d: skipped a torn last line (a run stopped mid-write)", path, number)
        continue
      raise bad_line(path, number, f"not JSON ({record.msg} at column {record.colno})")
    if not isinstance(record, dict):
      raise bad_line(path, number, f"expected a JSON object, got {type(record).__name__}")
    out.append((number, record))
  return out


def records(path: str, *, missing_ok: bool = True) -> list[dict]:
  """The records of `path` without line numbers (none if it does not exist)."""
  return [r for _, r in read(path, missing_ok=missing_ok)]


class Appender:
  """Appends records to `path` (created with its directory if missing), one line each, flushed
  at once, so a killed run loses at most the line being written. Opening an interrupted file
  cuts its torn last line (`torn` = 1) and completes a last line missing its newline."""

  def __init__(self, path: str):
    self.path = path
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    self.torn = 0
    self._f = open(path, "ab+")
    self._mend()

  def _mend(self) -> None:
    f = self._f
    end = f.seek(0, os.SEEK_END)
    start = _last_line_start(f, end)
    if start == end:
      return
    f.seek(start)
    tail = f.read(end - start)
    if isinstance(_parse(tail.decode("utf-8", "replace")), json.JSONDecodeError):
      f.truncate(start)
      self.torn = 1
      log.warning(
        "%s: cut a torn last line (%d bytes) left by a stopped run", self.path, end - start
      )
    else:
      f.write(b"\n")
    f.flush()

  def write(self, record: dict) -> None:
    self._f.write((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
    self._f.flush()

  def close(self) -> None:
    self._f.close()

  def __enter__(self) -> Appender:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def _last_line_start(f, end: int) -> int:
  """Offset just past the file's last newline (0 if it has none)."""
  pos = end
  while pos > 0:
    step = min(_CHUNK, pos)
    f.seek(pos - step)
    chunk = f.read(step)
    nl = chunk.rfind(b"\n")
    if nl >= 0:
      return pos - step + nl + 1
    pos -= step
  return 0


def write_atomic(path: str, rows: Iterable[dict]) -> None:
  """Replace `path` with `rows` at once (a crash leaves the old file or the new, never half)."""
  os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
  os.replace(tmp, path)
