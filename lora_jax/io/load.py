"""load_pretrained: a HF directory, a hub id or a GGUF file -> a sharded `Decoder`.

The model is first built abstractly (`nnx.eval_shape`, no memory), then each param is created
with `jax.make_array_from_callback`: every device shard reads only its slice of the checkpoint
tensors, one tensor at a time, so host memory never holds the model twice and each host of a pod
reads only what its devices hold.
"""

from __future__ import annotations

import logging
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from lora_jax.config import ModelConfig
from lora_jax.io.gguf_meta import config_from_gguf, tokenizer_from_gguf
from lora_jax.io.mapping import IGNORED_HF, Entry, entries
from lora_jax.io.sources import CheckpointError, GGUFSource, SafetensorsSource
from lora_jax.model import Decoder
from lora_jax.sharding import named_sharding

log = logging.getLogger(__name__)
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer*", "*.txt", "*.model"]


def resolve(source: str) -> tuple[str, str]:
  """("hf", directory) or ("gguf", file) for a local path or a hub id.

  Hub ids: "org/name" (safetensors snapshot) or "org/name/file.gguf" (one GGUF file).
  """
  source = os.fspath(source)
  if os.path.isdir(source):
    return "hf", source
  if os.path.isfile(source):
    if source.endswith(".gguf"):
      return "gguf", source
    raise CheckpointError(
      f"{source} is a file but not a .gguf; pass a HF directory, hub id or .gguf"
    )
  parts = source.split("/")
  looks_local = source.startswith((".", "/", "~")) or os.sep in source and len(parts) > 3
  if not looks_local and source.endswith(".gguf") and len(parts) >= 3:
    from huggingface_hub import hf_hub_download

    return "gguf", hf_hub_download("/".join(parts[:2]), "/".join(parts[2:]))
  if not looks_local and _HUB_ID.match(source):
    from huggingface_hub import snapshot_download

    return "hf", snapshot_download(source, allow_patterns=_HUB_PATTERNS)
  raise FileNotFoundError(f"no such file or directory: {source} (and it is not a hub id)")


def load_config(source: str) -> ModelConfig:
  kind, path = resolve(source)
  if kind == "gguf":
    return config_from_gguf(GGUFSource(path))
  return ModelConfig.from_file(os.path.join(path, "config.json"))


def load_tokenizer(source: str):
  """A transformers fast tokenizer (with its chat template) from a HF dir, hub id or GGUF."""
  kind, path = resolve(source)
  if kind == "gguf":
    return tokenizer_from_gguf(path)
  from transformers import AutoTokenizer

  return AutoTokenizer.from_pretrained(path)


def load_pretrained(
  source: str,
  dtype="float32",
  mesh: Mesh | None = None,
  *,
  compute_dtype=None,
  remat: str = "none",
  attention: str = "auto",
) -> Decoder:
  """Load a Qwen2/Qwen3/Llama-family causal LM.

  dtype: param dtype ("float32" or "bfloat16"); compute_dtype defaults to it.
  mesh: a (data, fsdp, tensor) mesh (see `lora_jax.make_mesh`); None puts it on one device.
  attention: the attention implementation (`lora_jax.attention.IMPLEMENTATIONS`).
  """
  kind, path = resolve(source)
  if kind == "gguf":
    src = GGUFSource(path)
    cfg = config_from_gguf(src)
    name_of = lambda e: e.gguf
  else:
    src = SafetensorsSource(path)
    cfg = ModelConfig.from_file(os.path.join(path, "config.json"))
    name_of = lambda e: e.hf
  dtype = jnp.dtype(dtype)
  model = nnx.eval_shape(
    lambda: Decoder(
      cfg,
      param_dtype=dtype,
      dtype=compute_dtype,
      mesh=mesh,
      rngs=nnx.Rngs(0),
      remat=remat,
      attention=attention,
    )
  )
  available = set(src.names())
  table = entries(cfg)
  for e in table:
    var = _variable(model, e.path)
    shape = tuple(var.shape)
    axes = var.get_metadata()["axes"]
    sharding = (
      named_sharding(mesh, axes, shape)
      if mesh is not None
      else NamedSharding(Mesh(np.array(jax.devices()[:1]), ("x",)), P())
    )
    names = _check_source(src, e, cfg, shape, available, name_of)
    var.set_value(
      jax.make_array_from_callback(
        shape, sharding, lambda idx, e=e, names=names: _slab(src, e, names, idx, dtype)
      )
    )
    if isinstance(src, GGUFSource):
      src.forget()
  _report_unused(available, table, cfg, name_of, path)
  return model


def _variable(model, path: str):
  obj = model
  for part in path.split("."):
    obj = getattr(obj, part)
  return obj


def _check_source(src, e: Entry, cfg: ModelConfig, shape, available, name_of) -> list[str]:
  """The source tensor names for one param, checked for presence and shape."""
  expected = tuple(shape[1:] if e.stacked else shape)
  names = [name_of(e).format(i=i) for i in range(cfg.num_layers)] if e.stacked else [name_of(e)]
  for name in names:
    if name not in available:
      raise CheckpointError(f"checkpoint is missing tensor {name}")
    got = tuple(src.shape(name))
    if got != expected:
      raise CheckpointError(
        f"tensor {name} has shape {list(got)}, expected {list(expected)} "
        f"for a {cfg.family} model with this config"
      )
  return names


def _slab(src, e: Entry, names: list[str], index: tuple[slice, ...], dtype) -> np.ndarray:
  """The piece `index` of one param, read from its source tensors into one fresh buffer."""
  per_tensor = tuple(src.shape(names[0]))
  full = (len(names),) + per_tensor if e.stacked else per_tensor
  out = _aligned_empty(tuple(len(range(*s.indices(n))) for s, n in zip(index, full)), dtype)
  if e.stacked:
    for j, layer in enumerate(range(*index[0].indices(len(names)))):
      _fill(src, names[layer], index[1:], out[j])
  else:
    _fill(src, names[0], index, out)
  return out


def _aligned_empty(shape, dtype, align: int = 64) -> np.ndarray:
  """An uninitialised array on a 64-byte boundary: JAX's CPU client then adopts the buffer
  without a copy, so the host never holds a param twice."""
  nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
  raw = np.empty(nbytes + align, np.uint8)
  start = (-raw.ctypes.data) % align
  return raw[start : start + nbytes].view(dtype).reshape(shape)


def _fill(src, name: str, idx: tuple[slice, ...], out: np.ndarray) -> None:
  if not idx:
    np.copyto(out, src.read(name), casting="unsafe")
    return
  whole_rows = all(s.indices(n) == (0, n, 1) for s, n in zip(idx[1:], src.shape(name)[1:]))
  if whole_rows and hasattr(src, "read_into") and src.dtype(name) == out.dtype:
    src.read_into(name, idx[0], out)  # straight from the file into the param's buffer
    return
  np.copyto(out, src.read(name, idx[0])[(slice(None),) + tuple(idx[1:])], casting="unsafe")


def _report_unused(available, table, cfg: ModelConfig, name_of, path: str) -> None:
  used = set()
  for e in table:
    used.update(name_of(e).format(i=i) for i in range(cfg.num_layers)) if e.stacked else used.add(
      name_of(e)
    )
  extra = sorted(
    n
    for n in available - used
    if not any(re.search(p, n) for p in IGNORED_HF)
    and not (cfg.tie_word_embeddings and n in ("lm_head.weight", "output.weight"))
  )
  if extra:
    log.warning("%s: %d checkpoint tensors were not loaded (e.g. %s)", path, len(extra), extra[:3])
