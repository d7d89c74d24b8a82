"""Tensor sources: read one checkpoint tensor (or a row range of it) at a time.

Both sources return tensors in Hugging Face layout ([out, in] for linear weights) as numpy arrays,
so the loader has one code path. Safetensors are read with `os.pread` rather than mmap: mapped pages
stay in the process's RSS until unmapped, which would make peak memory twice the model.
"""

from __future__ import annotations

import json
import os
import re
import struct
from collections.abc import Iterable

import ml_dtypes
import numpy as np

_ST_DTYPES = {
  "F64": np.float64,
  "F32": np.float32,
  "F16": np.float16,
  "BF16": ml_dtypes.bfloat16,
  "I64": np.int64,
  "I32": np.int32,
  "I16": np.int16,
  "I8": np.int8,
  "U8": np.uint8,
  "BOOL": np.bool_,
}


class CheckpointError(ValueError):
  """A checkpoint that cannot be loaded (missing file or tensor, wrong shape, unknown type)."""


class SafetensorsSource:
  """A HF directory with `model.safetensors` or sharded files plus `model.safetensors.index.json`."""

  def __init__(self, directory: str):
    self.directory = directory
    index = os.path.join(directory, "model.safetensors.index.json")
    single = os.path.join(directory, "model.safetensors")
    if os.path.exists(index):
      with open(index) as f:
        files = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.exists(single):
      files = ["model.safetensors"]
    else:
      found = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))
      if not found:
        raise CheckpointError(
          f"no model.safetensors or model.safetensors.index.json in {directory}"
        )
      files = found
    self._meta: dict[str, tuple[str, np.dtype, tuple[int, ...], int]] = {}
    self._scratch = np.empty(0, np.uint8)
    for name in files:
      path = os.path.join(directory, name)
      if not os.path.exists(path):
        raise CheckpointError(f"missing checkpoint shard {path} (listed in the index)")
      self._meta.update(_read_header(path))

  def names(self) -> Iterable[str]:
    return self._meta.keys()

  def shape(self, name: str) -> tuple[int, ...]:
    return self._meta[name][2]

  def dtype(self, name: str) -> np.dtype:
    return self._meta[name][1]

  def read(self, name: str, rows: slice | None = None) -> np.ndarray:
    """Rows of a tensor, in a scratch buffer reused across calls (valid until the next read):
    fresh allocations cost a page fault per 4 KiB, which dominated load time."""
    _, dtype, shape, _ = self._meta[name]
    start, stop, _ = (rows or slice(None)).indices(shape[0] if shape else 1)
    n = (stop - start) * (int(np.prod(shape[1:])) if len(shape) > 1 else 1)
    if self._scratch.nbytes < n * dtype.itemsize:
      self._scratch = np.empty(n * dtype.itemsize, np.uint8)
    out = self._scratch[: n * dtype.itemsize].view(dtype)
    out = out.reshape((stop - start,) + tuple(shape[1:])) if shape else out.reshape(())
    return self.read_into(name, rows, out)

  def read_into(self, name: str, rows: slice | None, out: np.ndarray) -> np.ndarray:
    """Read rows of a tensor straight into `out` (C-contiguous, the tensor's dtype)."""
    path, dtype, shape, offset = self._meta[name]
    start, _, _ = (rows or slice(None)).indices(shape[0] if shape else 1)
    row_bytes = (int(np.prod(shape[1:])) if len(shape) > 1 else 1) * dtype.itemsize
    view = memoryview(out.reshape(-1).view(np.uint8))
    nbytes, pos = view.nbytes, offset + start * row_bytes
    with open(path, "rb", buffering=0) as f:
      done = 0
      while done < nbytes:  # one read(2) moves at most ~2 GiB
        got = os.preadv(f.fileno(), [view[done : done + (1 << 30)]], pos + done)
        if got <= 0:
          raise CheckpointError(f"{path}: tensor {name} is truncated")
        done += got
    return out


def _read_header(path: str) -> dict:
  with open(path, "rb") as f:
    (n,) = struct.unpack("<Q", f.read(8))
    header = json.loads(f.read(n))
  out = {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    if info["dtype"] not in _ST_DTYPES:
      raise CheckpointError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
    out[name] = (
      path,
      np.dtype(_ST_DTYPES[info["dtype"]]),
      tuple(info["shape"]),
      8 + n + info["data_offsets"][0],
    )
  return out


class GGUFSource:
  """A llama.cpp GGUF file, dequantised tensor by tensor with the `gguf` package."""

  def __init__(self, path: str):
    import gguf  # heavy-ish import; only GGUF users pay it

    self._gguf = gguf
    self.path = path
    try:
      self.reader = gguf.GGUFReader(path)
    except ValueError as e:  # the reader maps type ids to an enum while parsing the header
      bad = re.search(r"(\d+)\)? is not a valid GGMLQuantizationType", str(e))
      if bad:
        raise CheckpointError(
          f"{path}: unknown quant type {bad.group(1)} (not a ggml type the "
          f"installed gguf package knows)"
        ) from None
      raise CheckpointError(f"{path}: not a readable GGUF file ({e})") from None
    self._tensors = {t.name: t for t in self.reader.tensors}
    self.arch = self.field("general.architecture")
    self._n_head = self.field(f"{self.arch}.attention.head_count")
    self._n_kv = self.field(f"{self.arch}.attention.head_count_kv", self._n_head)
    self._memo: dict[str, np.ndarray] = {}

  def field(self, key: str, default=None):
    f = self.reader.fields.get(key)
    return default if f is None else f.contents()

  def names(self) -> Iterable[str]:
    return self._tensors.keys()

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(int(s) for s in reversed(self._tensors[name].shape.tolist()))

  def read(self, name: str, rows: slice | None = None) -> np.ndarray:
    if name not in self._memo:
      self._memo[name] = self._dequantize(name)
    arr = self._memo[name]
    return arr if rows is None else arr[rows]

  def forget(self) -> None:
    """Drop dequantised tensors kept for the param being assembled."""
    self._memo.clear()

  def _dequantize(self, name: str) -> np.ndarray:
    t = self._tensors[name]
    qtype = t.tensor_type
    try:
      # A plain copy of the (small) quantised bytes: dequantising straight from the memmap is
      # several times slower (numpy memmap bookkeeping on every row-group view).
      arr = self._gguf.quants.dequantize(np.array(t.data), qtype)
    except NotImplementedError as e:
      raise CheckpointError(
        f"{self.path}: tensor {name} has quant type {qtype.name} that the "
        f"gguf package cannot dequantise"
      ) from e
    arr = np.asarray(arr, dtype=np.float32).reshape(self.shape(name))
    # llama.cpp's converter permutes q/k rows of Llama-family weights for its rope layout.
    if self.arch == "llama" and (".attn_q." in name or ".attn_k." in name):
      heads = self._n_head if ".attn_q." in name else self._n_kv
      arr = _unpermute(arr, heads)
    return arr


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
  rows = w.shape[0]
  rest = w.shape[1:]
  return w.reshape(n_head, rows // n_head // 2, 2, *rest).swapaxes(1, 2).reshape(w.shape)
