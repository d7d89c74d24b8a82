"""Bad config values: every key of configs/base.py, given each value of the wrong type and each
out-of-range value its rule lists, is refused in one line naming the key and what it accepts;
through the launcher, before any work (no workdir is created)."""

import os
import subprocess
import sys

import pytest

from configs import base
from lora_jax.run_config import RULES, RunConfigError, from_dict

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _base_keys() -> list[str]:
  raw = base.get_config().to_dict()
  return [f"{section}.{key}" for section, fields in raw.items() for key in fields]


BASE_KEYS = _base_keys()


def test_every_base_key_has_a_rule_with_values_to_refuse():
  assert sorted(BASE_KEYS) == sorted(RULES), "configs/base.py and run_config.RULES differ"
  for key in BASE_KEYS:
    assert RULES[key].wrong_type, f"{key}: no wrong-type values to inject"


@pytest.mark.parametrize("key", BASE_KEYS)
def test_every_base_key_refuses_bad_values_in_one_line(key):
  """Each value of the wrong type or out of range that the key's rule lists fails at the typed
  boundary (what launch.train calls) with one line naming the key and the accepted values."""
  rule = RULES[key]
  section, field = key.split(".")
  for bad in rule.invalid_values():
    raw = base.get_config().to_dict()
    raw[section][field] = bad
    with pytest.raises(RunConfigError) as e:
      from_dict(raw)
    message = str(e.value)
    assert message.startswith(f"config.{key}=") and "\n" not in message, message
    assert "expected" in message, message
    if rule.expected.startswith("one of "):  # a choice names every accepted value
      assert rule.expected in message, message


def _train(tmp_path, *overrides: str) -> subprocess.CompletedProcess:
  return subprocess.run(
    [
      sys.executable,
      "-m",
      "launch.train",
      "--config=configs/base.py",
      f"--workdir={tmp_path / 'work'}",
      *overrides,
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
    env=os.environ | {"JAX_PLATFORMS": "cpu"},
  )


def test_the_launcher_refuses_bad_values_in_one_line_before_any_work(tmp_path, fault):
  cases = {
    # out of range: refused by run_config
    "--config.train.lr=-1.0": "error: config.train.lr=-1.0: expected a number > 0",
    # wrong type: refused by ml_collections while parsing the flag, reported the same way
    "--config.lora.rank=abc": "error: config.lora.rank='abc': expected an integer >= 1 (",
    "--config.data.format=nonsense": "error: config.data.format='nonsense': expected one of "
    + RULES["data.format"].expected[len("one of ") :],
    "--config.lora.rnak=2": "error: unknown config key among --config.lora.rnak: rnak Did you "
    "mean rank",
  }
  for flag, want in cases.items():
    done = _train(tmp_path, flag)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, f"{flag}: {done.stderr[-2000:]}"
    assert lines[0].startswith(want), (flag, lines[0])
    assert not (tmp_path / "work").exists()
  fault.record(
    fault="bad config values",
    injected="every key of configs/base.py given every wrong-type and "
    "out-of-range value its rule lists; and through launch.train's flags",
    lost="nothing: refused before any work (no workdir is created)",
    check="one line `config.KEY=VALUE: expected ...` naming the key and the accepted values; "
    "the launcher exits 2 with that line alone",
  )
