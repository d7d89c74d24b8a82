"""The rows of BUILD.md's fault table: each fault test (tests/faults/) takes the `fault` fixture
(tests/conftest.py) and calls `fault.record(...)` after its last check, so a row is written only
by a test that passed. `benchmarks/fault_table.py` turns the rows into the table."""

import json
import os
import pathlib

REPO = pathlib.Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks/results/faults"


class FaultRow:
  def __init__(self, node):
    self.test = f"{pathlib.Path(node.path).name}::{node.originalname}"
    self.name = node.originalname

  def record(self, *, fault: str, injected: str, lost: str, check: str) -> None:
    """This test's row: the fault, how it was injected, what was lost, and the check that the
    recovered result equals the uninterrupted one. Rows are plain text fixed by the test (no
    timings or random draws), so rerunning the suite rewrites the same files."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    row = {"test": self.test, "fault": fault, "injected": injected, "lost": lost, "check": check}
    tmp = RESULTS / f".{self.name}.json.tmp"
    tmp.write_text(json.dumps(row, indent=2) + "\n")
    os.replace(tmp, RESULTS / f"{self.name}.json")
