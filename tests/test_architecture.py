"""The code's shape, checked: data flows one way between packages, and files and functions stay
small except where BUILD.md's "Architecture" section names the exception."""

import ast
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("lora_jax", "evals", "launch", "configs", "benchmarks")

# Inside lora_jax a unit imports only units of a lower layer (BUILD.md draws the same order).
LAYERS = [
  {"config", "sharding", "jsonl"},
  {"attention"},
  {"model", "answers", "metrics_log"},
  {"lora", "data", "precision"},
  {"io", "ortho", "optim", "checkpoint", "sampling"},
  {"run_config"},
  {"run", "__init__"},
  {"train", "analysis", "sample_file"},
  {"orthomerge"},
  {"export", "plan"},
]
LAYER = {unit: i for i, units in enumerate(LAYERS) for unit in units}
# Outside lora_jax: who may import whom (tests import anything).
OUTER = {
  "lora_jax": {"lora_jax"},
  "evals": {"lora_jax", "evals"},
  "configs": {"lora_jax", "evals", "configs"},
  "launch": {"lora_jax", "evals", "configs", "launch"},
  "benchmarks": {"lora_jax", "evals", "configs", "benchmarks"},
}
MAX_FILE_LINES = 500
MAX_FUNCTION_LINES = 60


def _sources(packages=PACKAGES):
  for package in packages:
    for dirpath, _, files in os.walk(os.path.join(ROOT, package)):
      for name in sorted(files):
        if name.endswith(".py"):
          path = os.path.join(dirpath, name)
          yield os.path.relpath(path, ROOT), path


def _unit(module: str) -> str:
  """lora_jax.sampling.engine -> sampling; lora_jax -> __init__; evals.x -> evals."""
  parts = module.split(".")
  if parts[0] != "lora_jax":
    return parts[0]
  return parts[1] if len(parts) > 1 else "__init__"


def _runtime_imports(tree):
  """Imported module names, leaving out `if TYPE_CHECKING:` blocks (never run)."""
  skip = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
      skip.update(id(n) for n in ast.walk(node))
  for node in ast.walk(tree):
    if id(node) in skip:
      continue
    if isinstance(node, ast.Import):
      yield from (alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      if node.module == "lora_jax":  # from lora_jax import jsonl: the submodule, if it is one
        for alias in node.names:
          sub = os.path.join(ROOT, "lora_jax", alias.name)
          is_module = os.path.isdir(sub) or os.path.exists(sub + ".py")
          yield f"lora_jax.{alias.name}" if is_module else "lora_jax"
      else:
        yield node.module


def _import_violations():
  bad = []
  for rel, path in _sources():
    package = rel.split(os.sep)[0]
    with open(path) as f:
      tree = ast.parse(f.read())
    own = _unit(rel[:-3].replace(os.sep, ".").removesuffix(".__init__"))
    for module in _runtime_imports(tree):
      top = module.split(".")[0]
      if top not in PACKAGES:
        continue
      if top not in OUTER[package]:
        bad.append(f"{rel} imports {module} ({package} may import {sorted(OUTER[package])})")
      elif package == "lora_jax" and top == "lora_jax":
        unit = _unit(module)
        for u in {unit, own} - set(LAYER):
          bad.append(f"lora_jax.{u} has no layer: add it to LAYERS here and to BUILD.md")
        if unit in LAYER and own in LAYER and unit != own and LAYER[unit] >= LAYER[own]:
          bad.append(f"{rel} ({own}, layer {LAYER[own]}) imports {unit} (layer {LAYER[unit]})")
  return sorted(set(bad))


def test_data_flows_one_way():
  assert _import_violations() == []


def test_the_layer_check_catches_an_upward_import():
  tree = ast.parse("from lora_jax.train import train\nfrom evals import runner\n")
  assert list(_runtime_imports(tree)) == ["lora_jax.train", "evals"]
  assert LAYER["train"] > LAYER["model"] and "evals" not in OUTER["lora_jax"]
  typed = ast.parse(
    "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n  import lora_jax.train\n"
  )
  assert list(_runtime_imports(typed)) == ["typing"]


def _oversized():
  found = set()
  for rel, path in _sources(("lora_jax", "evals", "launch")):
    with open(path) as f:
      text = f.read()
    if text.count("\n") > MAX_FILE_LINES:
      found.add(rel)
    for node in ast.walk(ast.parse(text)):
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        if node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES:
          found.add(f"{rel}:{node.name}")
  return found


def _listed_exceptions():
  with open(os.path.join(ROOT, "BUILD.md")) as f:
    text = f.read()
  section = text.split("## Architecture", 1)[1].split("\n## ", 1)[0]
  block = section.split("<!-- size-exceptions -->", 2)[1]
  return set(re.findall(r"^- `([^`]+)`", block, flags=re.M))


def test_size_exceptions_are_the_ones_build_md_lists():
  """A file over 500 lines or a function over 60 is either split or named in BUILD.md (with its
  reason); a listed exception that is gone is taken off the list."""
  assert _oversized() == _listed_exceptions()
