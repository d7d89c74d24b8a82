"""BUILD.md's fault table lists every fault test of this suite, as benchmarks/fault_table.py
writes it from the rows the tests record (so the table cannot drift from the suite)."""

from benchmarks import fault_table

REPO = fault_table.REPO


def test_build_md_table_is_the_suites_rows():
  tests = fault_table.fault_tests()
  assert tests, "no fault tests found"
  rows = fault_table.read_rows()
  stale = sorted(set(rows) - set(tests))
  assert not stale, f"rows without a fault test (delete benchmarks/results/faults/*.json): {stale}"
  text = (REPO / "BUILD.md").read_text()
  listed = [line for line in fault_table.section(text).splitlines() if line.startswith("| ")][1:]
  assert [line.rsplit("`", 2)[1] for line in listed] == tests, (
    "BUILD.md's fault table does not list the suite's fault tests: "
    "run `python benchmarks/fault_table.py --build_md BUILD.md`"
  )
  assert fault_table.section(text) == "\n" + fault_table.NOTE + fault_table.render(rows), (
    "BUILD.md's fault table differs from the recorded rows: "
    "run `python benchmarks/fault_table.py --build_md BUILD.md`"
  )
