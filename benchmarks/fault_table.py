"""BUILD.md's fault table, from the rows the fault-injection suite (tests/faults/) records.

  python -m pytest -n 2 tests/faults                 # each passing fault test writes its row
  python benchmarks/fault_table.py --build_md BUILD.md

A fault test takes the `fault` fixture and calls `fault.record(...)` after its last check, which
writes `benchmarks/results/faults/<test>.json`. This script orders the rows as the tests are
defined and rewrites the block between the markers; tests/faults/test_fault_table.py fails when
a fault test has no row, a row has no test, or BUILD.md is not what this script would write.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import pathlib

REPO = pathlib.Path(__file__).resolve().parents[1]
SUITE = REPO / "tests/faults"
RESULTS = REPO / "benchmarks/results/faults"
BEGIN, END = "<!-- fault_table: begin -->", "<!-- fault_table: end -->"
NOTE = "<!-- made by benchmarks/fault_table.py --build_md; do not edit by hand -->\n"
HEADER = ("Fault", "How it is injected", "What is lost", "Recovered = uninterrupted, checked by")


def fault_tests() -> list[str]:
  """`file::function` of every test in tests/faults that takes the `fault` fixture, in order."""
  out = []
  for path in sorted(SUITE.glob("test_*.py")):
    for node in ast.parse(path.read_text()).body:
      if isinstance(node, ast.FunctionDef) and node.name.startswith("test_"):
        if "fault" in [a.arg for a in node.args.args]:
          out.append(f"{path.name}::{node.name}")
  return out


def read_rows() -> dict[str, dict]:
  rows = {}
  for path in sorted(RESULTS.glob("*.json")):
    row = json.loads(path.read_text())
    rows[row["test"]] = row
  return rows


def render(rows: dict[str, dict]) -> str:
  """The markdown table, one row per fault test in definition order (missing rows: an error)."""
  tests = fault_tests()
  missing = [t for t in tests if t not in rows]
  if missing:
    raise ValueError(f"no recorded row for {', '.join(missing)}: run pytest tests/faults first")
  cell = lambda s: str(s).replace("|", "\\|").replace("\n", " ")
  lines = ["| " + " | ".join(HEADER) + " | Test |", "|" + "---|" * (len(HEADER) + 1)]
  for t in tests:
    r = rows[t]
    cells = [r["fault"], r["injected"], r["lost"], r["check"], f"`{t}`"]
    lines.append("| " + " | ".join(cell(c) for c in cells) + " |")
  return "\n".join(lines) + "\n"


def section(text: str) -> str:
  """The generated block of a BUILD.md text (what sits between the markers, note included)."""
  if BEGIN not in text or END not in text:
    raise ValueError(f"no '{BEGIN}' ... '{END}' block")
  return text.split(BEGIN, 1)[1].split(END, 1)[0]


def update_build_md(path: str, table: str) -> None:
  with open(path, encoding="utf-8") as f:
    text = f.read()
  section(text)  # the markers must be there
  head, rest = text.split(BEGIN, 1)
  tail = rest.split(END, 1)[1]
  with open(path, "w", encoding="utf-8") as f:
    f.write(f"{head}{BEGIN}\n{NOTE}{table}{END}{tail}")


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--build_md", help="rewrite the generated block of this BUILD.md")
  args = ap.parse_args()
  table = render(read_rows())
  print(table, end="")
  if args.build_md:
    update_build_md(os.path.abspath(args.build_md), table)


if __name__ == "__main__":
  main()
