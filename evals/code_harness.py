"""The code-grading harness: the code that runs inside the sandbox, one program per run.

The sandbox's fork server loads this file once as a module (its text is the fork server's
"prelude"), so each run only forks; a run's main.py calls `_child_main`. Hence: stdlib only
(programs get the fork server's modules, nothing else), and nothing runs at import but
definitions. The grader (`code_grader`) imports `encode` / `decode` / `Opaque` from here, so both
sides share one encoding.
"""

from __future__ import annotations


class Opaque:
  """A value the program returned that is not plain data: equal to nothing, not even itself,
  and with no truth value."""

  def __init__(self, type_name):
    self.type_name = type_name

  def __eq__(self, other):
    return False

  def __hash__(self):
    return id(self)

  def __bool__(self):
    raise TypeError(f"a {self.type_name} object is not plain data")

  def __repr__(self):
    return f"<{self.type_name} object>"


def encode(x, depth=0, room=None):
  """Plain data -> JSON-able tagged form. Exact built-in types are read directly, subclasses
  through the built-in type's own methods (the program's methods never run), numpy scalars as
  the Python numbers they hold; anything else -> an opaque marker. `room`: [items left],
  OverflowError when containers hold more items in all."""
  t = type(x)
  if x is None or t is bool or t is str or t is float:
    return x
  if t is int:
    return x if -(1 << 53) < x < (1 << 53) else {"i": format(x, "x")}
  if depth > 200:
    return {"o": "nested too deep"}
  if room is not None and t in (list, tuple, dict, set, frozenset):
    room[0] -= len(x)
    if room[0] < 0:
      raise OverflowError("output too large")
  if t is list:
    return [encode(v, depth + 1, room) for v in x]
  if t is tuple:
    return {"t": [encode(v, depth + 1, room) for v in x]}
  if t is dict:
    return {"d": [[encode(k, depth + 1, room), encode(v, depth + 1, room)] for k, v in x.items()]}
  if t is set or t is frozenset:
    return {"s" if t is set else "f": [encode(v, depth + 1, room) for v in x]}
  if t is complex:
    return {"c": [x.real, x.imag]}
  if t is bytes:
    return {"b": x.hex()}
  readers = (
    (int, int.__int__),
    (float, float.__float__),
    (str, str.__str__),
    (bytes, bytes.__bytes__),
    (complex, complex.__complex__),
    (list, lambda v: list(list.__iter__(v))),
    (tuple, lambda v: tuple(tuple.__iter__(v))),
    (dict, lambda v: dict(dict.items(v))),
    (set, lambda v: set(set.__iter__(v))),
    (frozenset, lambda v: frozenset(frozenset.__iter__(v))),
  )
  for base, read in readers:
    if issubclass(t, base):  # the real type: __class__ can lie, type() cannot
      return encode(read(x), depth + 1, room)
  name = type.__dict__["__name__"].__get__(t)
  if type.__dict__["__module__"].__get__(t) == "numpy" and name != "ndarray":
    return encode(x.item(), depth + 1, room)
  return {"o": name}


def _output_json(out):
  """The output's JSON text; None when it is too large to compare (over 4M items or 64 MB:
  such outputs are not shipped out of the sandbox)."""
  import json

  try:
    text = json.dumps(encode(out, 0, [4_000_000]))
  except (OverflowError, MemoryError):
    return None
  except BaseException as e:  # noqa: BLE001 - the program's object broke the encoder
    text = json.dumps({"o": f"unreadable ({_describe(e)})"})
  return text if len(text) <= 64 << 20 else None


def decode(v):
  """The inverse of encode; raises ValueError/TypeError on anything it did not make."""
  t = type(v)
  if v is None or t is bool or t is int or t is float or t is str:
    return v
  if t is list:
    return [decode(e) for e in v]
  if t is not dict or len(v) != 1:
    raise ValueError("malformed value")
  ((tag, val),) = v.items()
  if tag in ("t", "s", "f", "d", "c") and type(val) is not list:
    raise ValueError("malformed value")
  if tag == "t":
    return tuple(decode(e) for e in val)
  if tag == "s":
    return {decode(e) for e in val}
  if tag == "f":
    return frozenset(decode(e) for e in val)
  if tag == "d":
    return {decode(k): decode(e) for k, e in val}
  if tag == "c":
    return complex(float(val[0]), float(val[1]))
  if tag == "b":
    return bytes.fromhex(val)
  if tag == "i":
    return int(val, 16)
  if tag == "o":
    return Opaque(str(val))
  raise ValueError("malformed value")


class CandidateError(Exception):
  """The program raised, or its process ended, while the test called it."""


def _describe(e):
  try:
    return f"{type(e).__name__}: {e}"[:300]
  except BaseException:  # noqa: BLE001 - the program's exception may not even print
    return type(e).__name__


def _send_msg(fd, obj):
  import json
  import os

  data = json.dumps(obj).encode()
  data = len(data).to_bytes(8, "little") + data
  while data:
    data = data[os.write(fd, data) :]


def _recv_msg(fd):
  import json
  import os

  def exactly(n):
    buf = b""
    while len(buf) < n:
      chunk = os.read(fd, n - len(buf))
      if not chunk:
        return None
      buf += chunk
    return buf

  head = exactly(8)
  body = head and exactly(int.from_bytes(head, "little"))
  return None if body is None else json.loads(body)


def _load_solution(entry_point):
  """Run solution.py as module `solution`; returns the entry point."""
  import sys
  import types

  module = types.ModuleType("solution")
  sys.modules["solution"] = module
  with open("solution.py") as f:
    exec(compile(f.read(), "solution.py", "exec", dont_inherit=True), module.__dict__)
  return module.__dict__[entry_point]


def _run_sets(job, emit):
  """EvalPlus-style: call the function on every input of each set, one record per input."""
  import signal
  import time

  class TimeLimit(Exception):
    pass

  def on_alarm(signum, frame):
    raise TimeLimit("time limit exceeded")

  try:
    fn = _load_solution(job["entry_point"])
  except BaseException as e:  # noqa: BLE001
    emit({"load": _describe(e)})
    return
  signal.signal(signal.SIGALRM, on_alarm)
  for s, tests in enumerate(job["sets"]):
    inputs, start = decode(tests["inputs"]), time.perf_counter()
    for i, (args, limit) in enumerate(zip(inputs, tests["limits"])):
      left = tests["budget"] - (time.perf_counter() - start)
      if left <= 0:
        emit({"s": s, "budget": True})
        break
      try:
        signal.setitimer(signal.ITIMER_REAL, min(limit, left))
        t0 = time.perf_counter()
        out = fn(*args)
        dt = time.perf_counter() - t0
        signal.setitimer(signal.ITIMER_REAL, 0)
      except BaseException as e:  # noqa: BLE001
        signal.setitimer(signal.ITIMER_REAL, 0)
        over = isinstance(e, TimeLimit) and limit > left
        emit({"s": s, "budget": True} if over else {"s": s, "i": i, "err": _describe(e)})
        break
      text = _output_json(out)
      del out
      if text is None:
        emit({"s": s, "i": i, "t": dt, "big": True})
      else:
        emit({"s": s, "i": i, "t": dt}, text)
    else:
      emit({"s": s, "done": True})


def _serve_calls(job, requests, replies):
  """The program's side of a check script: load the program, then answer calls until EOF."""
  import os

  try:
    fn, failure = _load_solution(job["entry_point"]), None
  except BaseException as e:  # noqa: BLE001
    fn, failure = None, _describe(e)
  while True:
    msg = _recv_msg(requests)
    if msg is None:
      os._exit(0)
    if failure is not None:
      _send_msg(replies, {"err": f"the program does not load: {failure}"})
      continue
    try:
      out = fn(*decode(msg["args"]))
    except BaseException as e:  # noqa: BLE001
      _send_msg(replies, {"err": _describe(e)})
      continue
    try:
      value = encode(out)
    except BaseException as e:  # noqa: BLE001
      value = {"o": f"unreadable ({_describe(e)})"}
    _send_msg(replies, {"out": value})


def _run_check(job, emit):
  """human-eval style, but the test code (the checker, this process) and the program (a child
  that only answers calls) run apart: the program gets arguments and returns plain data, and
  never holds the result channel."""
  import ctypes
  import os
  import signal

  ctypes.CDLL(None).prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE 0: no ptrace, no /proc/<pid>/fd
  req_r, req_w = os.pipe()
  rep_r, rep_w = os.pipe()
  child = os.fork()
  if child == 0:
    try:
      os.close(3)  # the result channel stays with the checker
      os.close(req_w)
      os.close(rep_r)
      _serve_calls(job, req_r, rep_w)
    finally:
      os._exit(0)  # never fall through into the checker's code
  os.close(req_r)
  os.close(rep_w)

  def candidate(*args):
    try:
      _send_msg(req_w, {"args": encode(list(args))})
    except BrokenPipeError:
      raise CandidateError("the program's process ended") from None
    reply = _recv_msg(rep_r)
    if reply is None:
      raise CandidateError("the program's process ended")
    if "err" in reply:
      raise CandidateError(reply["err"])
    return decode(reply["out"])

  try:
    ns = {"__name__": "check"}
    exec(compile(job["prefix"], "prompt.py", "exec"), ns)
    ns[job["entry_point"]] = candidate
    exec(compile(job["test"], "test.py", "exec"), ns)
    if job["call_check"]:
      ns["check"](candidate)
    emit({"check": "pass"})
  except BaseException as e:  # noqa: BLE001
    emit({"check": "fail", "err": _describe(e)})
  os.kill(child, signal.SIGKILL)


def _child_main():
  import json
  import os
  import sys

  channel = os.fdopen(3, "w")

  def emit(record, out_json=None):  # a test's output follows its record after a tab
    channel.write(json.dumps(record) + ("" if out_json is None else "\t" + out_json) + "\n")
    channel.flush()

  with open("job.json") as f:
    job = json.load(f)
  sys.stdout = sys.stderr = open(os.devnull, "w")  # prints are swallowed, as in EvalPlus
  if job["mode"] == "sets":
    _run_sets(job, emit)
  else:
    _run_check(job, emit)
