"""Run the code sandbox and the code grader as an ordinary user, from tests that run as root.

`OrdinaryUser` claims an unused uid (by lock file, as the sandbox claims its uids) with a home
directory and a process limit (`ulimit -u`); `Proxy` starts this file as a process of that uid
(in a mount namespace where the root-only Python installation is reachable, nothing else
changed) and calls the sandbox or the grader through it. Every call has a hard wall-clock
limit, and closing the user SIGKILLs every process of its uid: a test can never leave one.
"""

from __future__ import annotations

import ctypes
import os
import pickle
import platform
import select
import shutil
import subprocess
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

from evals import sandbox_isolation as iso  # noqa: E402
from evals.sandbox import claim_uids  # noqa: E402

USER_UID_BASE = 1_899_000_000  # below the sandbox's own uids, far above login ranges
USER_NPROC = 120  # the user's `ulimit -u`: tight, so that the sandbox's budget matters


class OrdinaryUser:
  def __init__(self, nproc: int = USER_NPROC):
    ((self.uid, self._lock),) = claim_uids(1, USER_UID_BASE)
    self.nproc = nproc
    # Where homes are (not under /tmp, which the sandbox hides anyway: its own hiding is tested)
    self.home = tempfile.mkdtemp(prefix="lora_jax_user_", dir="/home")
    os.chown(self.home, self.uid, self.uid)
    os.chmod(self.home, 0o700)

  def tasks(self) -> dict[int, tuple[int, int]]:
    """pid -> (parent pid, threads) of this user's processes."""
    return iso.user_tasks(self.uid)

  def new_dir(self) -> str:
    """A directory of this user's, outside any sandbox."""
    path = tempfile.mkdtemp(dir=self.home)
    os.chown(path, self.uid, self.uid)
    return path

  def kill_all(self) -> None:
    killer = os.fork()
    if killer == 0:
      try:
        iso.kill_uid(self.uid)
      finally:
        os._exit(0)
    os.waitpid(killer, 0)

  def close(self) -> None:
    self.kill_all()
    shutil.rmtree(self.home, ignore_errors=True)
    os.close(self._lock)

  def __enter__(self) -> OrdinaryUser:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


class Proxy:
  """A process of `user` serving calls: `call(op, *args)` runs `_OPS[op]` there and returns
  its result (exceptions come back raised). `user_namespaces=False`: the kernel refuses it
  user namespaces (as where they are disabled for ordinary users)."""

  def __init__(self, user: OrdinaryUser, user_namespaces: bool = True):
    self.user = user
    visible = [sys.base_prefix, sys.prefix, REPO]

    def become_user():
      iso.become_user(user.uid, user.nproc, visible)
      if not user_namespaces:
        deny_user_namespaces()

    env = {"HOME": user.home, "PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONPATH": REPO}
    self.stderr = tempfile.TemporaryFile()
    self.proc = subprocess.Popen(
      [sys.executable, os.path.abspath(__file__)],
      stdin=subprocess.PIPE,
      stdout=subprocess.PIPE,
      stderr=self.stderr,
      env=env,
      cwd=user.home,
      preexec_fn=become_user,
    )
    self.pid = self.proc.pid
    self._lock = threading.Lock()

  def call(self, op: str, *args, timeout: float = 60.0):
    with self._lock:  # one call at a time (the proxy answers in order)
      return self._call(op, args, timeout)

  def _call(self, op: str, args, timeout: float):
    data = pickle.dumps((op, args))
    self.proc.stdin.write(len(data).to_bytes(8, "little") + data)
    self.proc.stdin.flush()
    deadline = time.monotonic() + timeout
    head = self._read(8, deadline, op)
    ok, value = pickle.loads(self._read(int.from_bytes(head, "little"), deadline, op))
    if not ok:
      raise value
    return value

  def _read(self, n: int, deadline: float, op: str) -> bytes:
    out = b""
    fd = self.proc.stdout.fileno()
    while len(out) < n:
      left = deadline - time.monotonic()
      if left <= 0 or not select.select([fd], [], [], left)[0]:
        self.user.kill_all()
        raise TimeoutError(f"the user's proxy did not answer {op!r} in time: {self.log()}")
      chunk = os.read(fd, n - len(out))
      if not chunk:
        raise RuntimeError(f"the user's proxy died during {op!r}: {self.log()}")
      out += chunk
    return out

  def log(self) -> str:
    self.stderr.seek(0)
    return self.stderr.read().decode(errors="replace")

  def close(self) -> None:
    if self.proc.poll() is None:
      self.proc.stdin.close()
      try:
        self.proc.wait(timeout=10)
      except subprocess.TimeoutExpired:
        self.user.kill_all()
        self.proc.wait()
    self.proc.stdout.close()


def deny_user_namespaces() -> None:
  """A seccomp filter on this process and its children: unshare(CLONE_NEWUSER) and
  clone(CLONE_NEWUSER) fail with EPERM, as where the kernel disables unprivileged user
  namespaces (clone3, whose flags a filter cannot read, says ENOSYS: callers fall back to
  clone). Needs no_new_privs (`become_user` sets it)."""
  if platform.machine() != "x86_64":
    raise RuntimeError(
      f"deny_user_namespaces knows x86_64 syscall numbers only, not {platform.machine()}"
    )
  ld, jeq, jset, ret = 0x20, 0x15, 0x45, 0x06  # BPF_LD|W|ABS, BPF_JMP|JEQ|K, ..|JSET|K, BPF_RET|K
  allow, eperm, enosys = 0x7FFF0000, 0x00050000 | 1, 0x00050000 | 38
  code = [  # (op, jump if true, jump if false, k); offsets into struct seccomp_data
    (ld, 0, 0, 4),  # arch
    (jeq, 1, 0, 0xC000003E),  # AUDIT_ARCH_X86_64
    (ret, 0, 0, allow),
    (ld, 0, 0, 0),  # syscall number
    (jeq, 6, 0, 435),  # clone3
    (jeq, 1, 0, 272),  # unshare
    (jeq, 0, 2, 56),  # clone
    (ld, 0, 0, 16),  # first argument (its low 32 bits): the flags
    (jset, 1, 0, 0x10000000),  # CLONE_NEWUSER
    (ret, 0, 0, allow),
    (ret, 0, 0, eperm),
    (ret, 0, 0, enosys),
  ]

  class Insn(ctypes.Structure):
    _fields_ = [
      ("code", ctypes.c_uint16),
      ("jt", ctypes.c_uint8),
      ("jf", ctypes.c_uint8),
      ("k", ctypes.c_uint32),
    ]

  class Prog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(Insn))]

  insns = (Insn * len(code))(*[Insn(*i) for i in code])
  prog = Prog(len(code), insns)
  if iso.libc.prctl(22, 2, ctypes.byref(prog), 0, 0) != 0:  # PR_SET_SECCOMP, SECCOMP_MODE_FILTER
    raise OSError(ctypes.get_errno(), "cannot install the seccomp filter")


class UserSandbox:
  """A `Sandbox(**kwargs)` in a proxy of `user`, with the interface the tests use."""

  def __init__(self, user: OrdinaryUser, workers: int = 2, user_namespaces: bool = True, **kwargs):
    self.user, self.workers, self.home = user, workers, user.home
    self.proxy = Proxy(user, user_namespaces)
    try:
      info = self.proxy.call("open", dict(kwargs, workers=workers))
    except BaseException:
      self.proxy.close()
      raise
    self.isolation, self.uids, self.server = info["isolation"], info["uids"], info["server"]
    self.bystanders: set[int] = set()

  def run(self, files, main="main.py", limits=None):
    wall = limits.wall_s if limits else 10.0
    return self.proxy.call("run", files, main, limits, timeout=wall + 30.0)

  def run_parallel(self, programs: list[str], limits) -> list:
    """Each program in a run of its own, `len(programs)` runs at once."""
    return self.proxy.call("run_parallel", programs, limits, timeout=limits.wall_s + 30.0)

  def leftovers(self, settle: float = 3.0) -> list[int]:
    """Processes of the user beyond the proxy, its bystanders, the fork server and one warm run
    process per slot (a finished run process may take a moment to go)."""
    deadline = time.monotonic() + settle
    while True:
      tasks = self.user.tasks()
      ours = {self.proxy.pid, self.server, *self.bystanders}
      extra = [p for p in tasks if p not in ours]
      warm = [p for p in extra if tasks[p][0] == self.server]
      if len(extra) == len(warm) == self.workers:
        return []
      if time.monotonic() > deadline:
        return sorted(extra)
      time.sleep(0.05)

  def outside_dir(self, tmp_path) -> str:
    return self.user.new_dir()

  def bystander(self) -> int:
    pid = self.proxy.call("bystander")
    self.bystanders.add(pid)
    return pid

  def alive(self) -> bool:
    return self.proxy.call("uid", timeout=10.0) == self.user.uid

  def close(self) -> None:
    self.proxy.call("close")
    self.proxy.close()
    for pid in self.bystanders:
      try:
        os.kill(pid, 9)
      except ProcessLookupError:
        pass


# --- the proxy's side (runs as the ordinary user) ------------------------------------------------

_state: dict = {}


def _open_sandbox(kwargs: dict) -> dict:
  from evals.sandbox import Sandbox

  _state["sandbox"] = sandbox = Sandbox(**kwargs)
  return {"isolation": sandbox.isolation, "uids": sandbox.uids, "server": sandbox._server.pid}


def _run(files, main, limits):
  return _state["sandbox"].run(files, main, limits)


def _run_parallel(programs, limits):
  from concurrent.futures import ThreadPoolExecutor

  with ThreadPoolExecutor(len(programs)) as pool:
    return list(pool.map(lambda p: _run({"main.py": p}, "main.py", limits), programs))


def _close_sandbox() -> None:
  _state.pop("sandbox").close()


def _grade(benchmark, problems, generations, kwargs):
  from evals.code_grader import grade_code

  return grade_code(benchmark, problems, generations, **kwargs)


def _threads(n: int) -> int:
  """How many of `n` new threads start (the evaluator must still be able to)."""
  started = []
  try:
    for _ in range(n):
      t = threading.Thread(target=time.sleep, args=(0.2,))
      t.start()
      started.append(t)
  except RuntimeError:
    pass
  for t in started:
    t.join()
  return len(started)


def _under_fork_bomb(wall: float) -> dict:
  """A fork bomb in one slot; meanwhile a program that forks once in the other slot, and this
  evaluator starting 16 threads. Returns both results, the threads started and the most tasks
  (threads included) this user held at any sample."""
  from evals.sandbox import Limits

  sandbox, limits, out = _state["sandbox"], Limits(wall_s=wall), {}
  bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
  neighbour = (
    "import os\npid = os.fork()\nif pid == 0:\n    os._exit(7)\nprint(os.waitpid(pid, 0)[1] >> 8)\n"
  )
  thread = threading.Thread(
    target=lambda: out.update(bomb=sandbox.run({"main.py": bomb}, limits=limits))
  )
  thread.start()
  peak, start = 0, time.monotonic()
  while time.monotonic() - start < wall / 2:
    peak = max(peak, sum(n for _, n in iso.user_tasks(os.getuid()).values()))
  out["neighbour"] = sandbox.run({"main.py": neighbour}, limits=limits)
  out["threads"] = _threads(16)
  thread.join()
  return dict(out, peak_tasks=peak)


def _bystander() -> int:
  """A process of this user outside the sandbox (a `sleep`), for programs to try to kill."""
  return subprocess.Popen(["sleep", "120"]).pid


_OPS = {
  "open": _open_sandbox,
  "run": _run,
  "run_parallel": _run_parallel,
  "close": _close_sandbox,
  "grade": _grade,
  "threads": _threads,
  "bystander": _bystander,
  "under_fork_bomb": _under_fork_bomb,
  "uid": os.getuid,
}


def _serve() -> None:
  inp, out = sys.stdin.buffer, sys.stdout.buffer
  sys.stdout = sys.stderr  # prints must not mix with the replies
  while True:
    head = inp.read(8)
    if len(head) < 8:
      return
    op, args = pickle.loads(inp.read(int.from_bytes(head, "little")))
    try:
      reply = (True, _OPS[op](*args))
    except Exception as e:  # noqa: BLE001 - sent back to the test, raised there
      reply = (False, e)
    data = pickle.dumps(reply)
    out.write(len(data).to_bytes(8, "little") + data)
    out.flush()


if __name__ == "__main__":
  _serve()
