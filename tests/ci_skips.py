"""A pytest plugin (loaded by conftest.py): under CI (the `CI` environment variable set, as CI
services set it) a skipped test is a failed one, with its reason, so that missing data, a missing
tool or a missing privilege can never turn into a green run. A test that needs one of those
should fail saying what is missing in the first place; this catches the ones that skip."""

import os

import pytest


def in_ci() -> bool:
  return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
  outcome = yield
  report = outcome.get_result()
  if not (report.skipped and in_ci()) or hasattr(report, "wasxfail"):
    return
  reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
  report.outcome = "failed"
  report.longrepr = (
    f"skipped under CI={os.environ['CI']!r}, which counts as a failure: {reason}\n"
    "(a test that needs data, a tool or root must fail saying what is missing)"
  )
