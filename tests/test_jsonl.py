"""The one resumable JSONL reader/writer: torn last lines, hand-written files, bad lines."""

import gzip
import json

import pytest

from lora_jax import jsonl


def test_a_torn_last_line_is_skipped_by_read_and_cut_by_the_appender(tmp_path):
  path = tmp_path / "out.jsonl"
  path.write_text('{"id": "a"}\n{"id": "b"}\n{"id": "c", "comp')
  lines = jsonl.read(str(path))
  assert [(n, r["id"]) for n, r in lines] == [(1, "a"), (2, "b")] and lines.torn == 1
  with jsonl.Appender(str(path)) as out:
    assert out.torn == 1
    out.write({"id": "c", "completion": "ünïcode"})
  assert path.read_text(encoding="utf-8").splitlines() == [
    '{"id": "a"}',
    '{"id": "b"}',
    '{"id": "c", "completion": "ünïcode"}',
  ]
  assert jsonl.read(str(path)).torn == 0


def test_a_complete_last_line_without_newline_is_a_record(tmp_path):
  path = tmp_path / "hand.jsonl"
  path.write_text('{"id": "a"}\n\n{"id": "b"}')  # blank lines are skipped
  assert [r["id"] for r in jsonl.records(str(path))] == ["a", "b"]
  with jsonl.Appender(str(path)) as out:
    assert out.torn == 0
    out.write({"id": "c"})
  assert [r["id"] for r in jsonl.records(str(path))] == ["a", "b", "c"]


def test_a_long_torn_tail_is_found_across_read_chunks(tmp_path):
  path = tmp_path / "long.jsonl"
  path.write_text('{"id": "a"}\n' + '{"text": "' + "x" * 200_000)
  with jsonl.Appender(str(path)) as out:
    assert out.torn == 1
  assert path.read_text() == '{"id": "a"}\n'


def test_bad_lines_are_reported_by_file_and_line(tmp_path):
  path = tmp_path / "bad.jsonl"
  path.write_text('{"id": "a"}\n{"id": \n{"id": "c"}\n')
  with pytest.raises(jsonl.JsonlError, match=rf"^{path}:2: not JSON \(Expecting value"):
    jsonl.read(str(path))
  path.write_text('{"id": "a"}\n[1, 2]\n')
  with pytest.raises(jsonl.JsonlError, match=rf"^{path}:2: expected a JSON object, got list"):
    jsonl.read(str(path))
  path.write_bytes(b'{"id": "a"}\n{"id": "\xff"}\n')
  with pytest.raises(jsonl.JsonlError, match=rf"^{path}:2: not UTF-8 text"):
    jsonl.read(str(path))
  with pytest.raises(FileNotFoundError):
    jsonl.read(str(tmp_path / "missing.jsonl"))
  assert jsonl.records(str(tmp_path / "missing.jsonl")) == []


def test_gzip_files_and_atomic_writes(tmp_path):
  gz = tmp_path / "samples.jsonl.gz"
  with gzip.open(gz, "wt") as f:
    f.write(json.dumps({"doc_id": 0}) + "\n")
  assert jsonl.records(str(gz)) == [{"doc_id": 0}]
  out = tmp_path / "sub" / "graded.jsonl"
  jsonl.write_atomic(str(out), [{"a": 1}, {"b": "é"}])
  assert jsonl.records(str(out)) == [{"a": 1}, {"b": "é"}]
  assert not (tmp_path / "sub" / "graded.jsonl.tmp").exists()


def test_training_metrics_resume_past_a_torn_line(tmp_path):
  from lora_jax.metrics_log import MetricsWriter

  (tmp_path / "metrics.jsonl").write_text('{"step": 1, "train/loss": 2.0}\n{"step": 2, "tra')
  writer = MetricsWriter(str(tmp_path), tensorboard=False)
  writer.write(2, {"loss": 1.5})
  writer.close()
  rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [(r["step"], r["train/loss"]) for r in rows] == [(1, 2.0), (2, 1.5)]
