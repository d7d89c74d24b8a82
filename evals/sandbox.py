"""Run untrusted Python programs in throw-away sandbox processes.

A `Sandbox` starts one fork server (`sandbox_server.py`, a fresh interpreter) and asks it for
runs; see that file for what each isolation gives. The isolation is chosen automatically
(`isolation="auto"`), or forced:

- "root" (as root): network, mount, PID and IPC namespaces, a private tmpfs, rlimits, and an
  unprivileged uid per worker slot (claimed with a lock file, so no two sandboxes on the
  machine share one);
- "userns" (an ordinary user, where the kernel allows unprivileged user namespaces): the same
  namespaces inside a user namespace, programs without any capability, the user's private
  directories hidden, and process counts capped per run and for the whole sandbox;
- "processes" (where neither is possible; "auto" falls back to it with one warning line):
  separate processes with resource limits only, as EvalPlus runs them (as root, each slot still
  gets its own uid).

This side writes a run's files, hands the server the run's pipes, and drains them:
stdout/stderr are kept up to a cap (a flood is killed, not buffered), results the program writes
to fd 3 (the "channel") likewise, and a status pipe the program never holds says how it ended.
Past the wall-clock deadline it asks the run process to kill the program (which ends its whole
namespace), then kills the run process's and the program's process groups. Where the OS refuses
a namespace, runs go on without it and say so in `RunResult.notes`; without a PID namespace, the
server kills what a stopped run left (every process of the slot's uid as root, else every
process it adopted).
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import logging
import os
import queue
import resource
import select
import selectors
import shutil
import signal
import site
import socket
import subprocess
import sys
import tempfile
import threading
import time

from evals import sandbox_isolation as iso

log = logging.getLogger(__name__)

# Each worker slot runs as its own uid = gid, uid_base + n, where n is claimed with a lock file so
# that no two Sandboxes on the machine (other processes included) share one. Far above login and
# subordinate-id ranges, so "kill every process of this uid" can only hit our own sandboxes.
DEFAULT_UID_BASE = 1_900_000_000
MAX_UIDS = 4096
_SERVER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sandbox_server.py")
ISOLATIONS = ("auto", "root", "userns", "processes")
# Processes (threads included) of this user left to the evaluator beyond those it runs when the
# sandbox starts (its worker threads, a progress bar's): the sandbox's budget stops below.
EVALUATOR_RESERVE = 32


@dataclasses.dataclass(frozen=True)
class Limits:
  """Resource limits of one run. `cpu_s` None: the wall time plus one second."""

  wall_s: float = 10.0
  cpu_s: float | None = None
  memory_bytes: int = 4 << 30  # address space (EvalPlus's default cap is 4 GiB too)
  nproc: int = 64  # processes + threads of the worker's uid
  file_bytes: int = 16 << 20  # largest file the program may write
  open_files: int = 256
  tmpfs_bytes: int = 256 << 20  # the run's directory (memory-backed)
  output_bytes: int = 64 << 10  # stdout / stderr kept (the rest is drained and counted)
  flood_bytes: int = 32 << 20  # stdout + stderr beyond this: killed as an output flood
  channel_bytes: int = 256 << 20  # fd-3 results beyond this: killed


@dataclasses.dataclass
class RunResult:
  status: str  # "pass" (exit code 0) | "fail" | "timeout" | "error" (the sandbox itself failed)
  reason: str  # "" on pass; e.g. "timeout after 3s", "killed by signal 9 (SIGKILL)"
  duration: float
  exit_code: int | None = None
  signal: int | None = None
  stdout: bytes = b""
  stderr: bytes = b""
  channel: bytes = b""
  notes: tuple[str, ...] = ()  # isolation the OS refused, e.g. "no network namespace: EPERM"


class Sandbox:
  """`workers` sandbox slots behind one fork server. `run` is thread-safe and blocks until a slot
  is free, so a thread pool of `workers` threads can drive it.

  `isolation`: one of ISOLATIONS (see the top of this file); the one in use is
  `self.isolation`. `preload`: modules the fork server imports once, so programs get them for
  free (each costs every fork some memory); `prelude`: trusted source the fork server runs once
  as a module of the given name, importable by every program (e.g. a test harness, compiled
  once); `hide`: directories programs must not see when they run as this user (e.g. where
  expected outputs are kept), on top of its home and temporary directories."""

  def __init__(
    self,
    workers: int = 2,
    limits: Limits = Limits(),
    uid_base: int = DEFAULT_UID_BASE,
    isolation: str = "auto",
    preload: tuple[str, ...] = (),
    prelude: dict[str, str] | None = None,
    hide: tuple[str, ...] = (),
  ):
    if workers < 1:
      raise ValueError(f"sandbox workers must be >= 1, got {workers}")
    mode = check_isolation(isolation)
    self.limits = limits
    root = os.geteuid() == 0
    self._uid_locks = claim_uids(workers, uid_base) if root else []
    self.uids = tuple(u for u, _ in self._uid_locks) if root else (os.getuid(),) * workers
    self._slots: queue.SimpleQueue[int] = queue.SimpleQueue()
    for slot in range(workers):
      self._slots.put(slot)
    # Run directories: in memory (/dev/shm) where possible. 0711: the dropped uids may
    # traverse the root to reach their run directory, not list it.
    shm = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
    self._root = tempfile.mkdtemp(prefix="lora_jax_sandbox_", dir=shm)
    os.chmod(self._root, 0o711)
    self._lock = threading.Lock()
    try:
      self.isolation = self._start(isolation, mode, self._config(workers, preload, prelude, hide))
    except BaseException:
      self._release()
      raise

  def _start(self, isolation: str, mode: str, cfg: dict) -> str:
    """Start the fork server in `mode`; "auto" falls back from "userns" to "processes".
    Returns the mode in use."""
    try:
      self._start_server(dict(cfg, mode=mode))
    except _NoServer as e:
      if isolation != "auto" or mode != "userns":
        raise RuntimeError(f"the sandbox fork server did not start: {e}") from None
      log.warning(_warning(f"no user namespace here ({e})"))
      self._start_server(dict(cfg, mode="processes"))
      return "processes"
    if mode == "processes":
      log.warning(_warning("isolation 'processes' asked for"))
    return mode

  def _config(self, workers: int, preload, prelude, hide) -> dict:
    """The fork server's configuration, less its mode and socket."""
    site_dirs = [d for d in site.getsitepackages() if os.path.isdir(d)]
    keep = {sys.base_prefix, sys.prefix, *site_dirs, self._root}
    cfg = dict(
      uids=self.uids,
      preload=list(preload),
      prelude=prelude or {},
      site_dirs=site_dirs,
      keep=sorted({os.path.realpath(p) for p in keep}),
      hide=_private_dirs(hide),
    )
    if os.geteuid() != 0:
      cfg.update(_process_budget(workers, self.limits.nproc))
    return cfg

  def _start_server(self, cfg: dict) -> None:
    self._sock, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    # -E -s -S: no environment, user site or site hooks; unlike -I, the script's folder stays on
    # sys.path (the server imports its helper module from there, then drops it).
    self._server = subprocess.Popen(
      [sys.executable, "-E", "-s", "-S", _SERVER, json.dumps(dict(cfg, sock_fd=theirs.fileno()))],
      stdin=subprocess.DEVNULL,
      stdout=subprocess.DEVNULL,
      pass_fds=(theirs.fileno(),),
      start_new_session=True,
      env={},
    )
    theirs.close()
    hello = self._sock.recv(1 << 16)
    if hello != b"ready":
      self._stop_server()
      raise _NoServer(hello.decode(errors="replace") or "it exited")

  def _stop_server(self) -> None:
    self._sock.close()  # the fork server exits on EOF
    try:
      self._server.wait(timeout=5)
    except subprocess.TimeoutExpired:
      self._server.kill()
      self._server.wait()

  def _release(self) -> None:
    shutil.rmtree(self._root, ignore_errors=True)
    for _, lock in self._uid_locks:
      os.close(lock)

  def close(self) -> None:
    self._stop_server()
    self._release()

  def __enter__(self) -> Sandbox:
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def run(
    self, files: dict[str, str | bytes], main: str = "main.py", limits: Limits | None = None
  ) -> RunResult:
    """Run `main` as `__main__` in a fresh directory holding `files` (plain names)."""
    for name in files:
      if not name or "/" in name or name.startswith("."):
        raise ValueError(f"sandbox file names must be plain names, got {name!r}")
    if main not in files:
      raise ValueError(f"sandbox main file {main!r} is not among the files")
    slot = self._slots.get()
    try:
      return self._run(slot, files, main, limits or self.limits)
    finally:
      self._slots.put(slot)

  def _send_request(self, req: dict, fds: list[int]) -> None:
    with self._lock:
      socket.send_fds(self._sock, [json.dumps(req).encode()], fds)

  def _run(self, slot: int, files, main: str, limits: Limits) -> RunResult:
    workdir = tempfile.mkdtemp(dir=self._root)
    for name, data in files.items():
      with open(os.path.join(workdir, name), "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
    os.chmod(workdir, 0o755)
    pipes = [os.pipe() for _ in range(4)]  # stdout, stderr, channel, status
    req = dict(op="run", slot=slot, workdir=workdir, main=main, limits=dataclasses.asdict(limits))
    start = time.monotonic()
    try:
      self._send_request(req, [w for _, w in pipes])
    except OSError as e:
      for r, w in pipes:
        os.close(r)
        os.close(w)
      shutil.rmtree(workdir, ignore_errors=True)
      return RunResult("error", f"sandbox error: the fork server is gone: {e}", 0.0)
    for _, w in pipes:
      os.close(w)
    try:
      streams, killed_for = _Drain([r for r, _ in pipes], start + limits.wall_s, limits).run()
    finally:
      shutil.rmtree(workdir, ignore_errors=True)
    res = _result(streams, killed_for, time.monotonic() - start, limits)
    if killed_for and any(n.startswith("no PID namespace") for n in res.notes):
      self._sweep(slot)  # the run process died with the group: catch setsid escapees
    return res

  def _sweep(self, slot: int) -> None:
    with self._lock:
      try:
        socket.send_fds(self._sock, [json.dumps(dict(op="sweep", slot=slot)).encode()], [])
        self._sock.recv(16)
      except OSError:
        pass


class _NoServer(Exception):
  """The fork server did not start; the message is its reason."""


def check_isolation(isolation: str) -> str:
  """The isolation to try first; raises (one line) on one this process cannot have, so a launcher
  can refuse a bad choice before it spends hours generating answers."""
  if isolation not in ISOLATIONS:
    raise ValueError(
      f"unknown sandbox isolation {isolation!r}; expected one of {', '.join(ISOLATIONS)}"
    )
  root = os.geteuid() == 0
  if isolation == "root" and not root:
    raise PermissionError("sandbox isolation 'root' needs root (isolation 'userns' does not)")
  if isolation == "userns" and root:
    # As root in a user namespace, programs would still be root to the kernel's process limit.
    raise ValueError("sandbox isolation 'userns' is for ordinary users; as root use 'root'")
  if isolation == "auto":
    return "root" if root else "userns"
  return isolation


def _warning(why: str) -> str:
  if os.geteuid() == 0:
    return (
      f"code sandbox: {why}: programs run under their own uids with resource limits only, "
      "without namespaces: NOT isolated from the network or from world-writable files"
    )
  return (
    f"code sandbox: {why}: programs run as plain processes of this user with resource limits "
    "only (as EvalPlus runs them): NOT isolated from the network, from the files this user can "
    "read or write, or from this user's other processes"
  )


def _private_dirs(extra) -> list[str]:
  """Directories hidden from programs that run as this user: its home and temporary and
  runtime directories, and `extra`; never one that holds the system (/, /usr)."""
  dirs = [*iso.PRIVATE_DIRS, os.path.expanduser("~"), os.environ.get("XDG_RUNTIME_DIR", "/run")]
  out = set()
  for d in (*dirs, *extra):
    real = os.path.realpath(d)
    if not any(s == real or s.startswith(real.rstrip("/") + "/") for s in ("/usr", "/etc")):
      out.add(real)
  return sorted(out)


def _process_budget(workers: int, nproc: int) -> dict:
  """How many processes (threads too) all runs together may hold (`nproc_total`), and how many
  this user runs now (`nproc_base`). Within this user's RLIMIT_NPROC, minus what it runs now and
  EVALUATOR_RESERVE: a fork bomb must never leave the evaluator unable to start a thread."""
  want = workers * (nproc + 2) + 1  # each slot: a run process, its program's, a warm one; server
  used = sum(threads for _, threads in iso.user_tasks(os.getuid()).values())
  soft, _ = resource.getrlimit(resource.RLIMIT_NPROC)
  if soft == resource.RLIM_INFINITY:
    return dict(nproc_total=want, nproc_base=used)
  room = soft - used - EVALUATOR_RESERVE
  if room < workers * 4 + 2:
    raise RuntimeError(
      f"this user's process limit (ulimit -u {soft}) leaves the code sandbox {max(room, 0)} "
      f"processes ({used} in use, {EVALUATOR_RESERVE} kept for the evaluator); it needs at "
      f"least {workers * 4 + 2} for {workers} workers: raise ulimit -u or use fewer workers"
    )
  if room < want:
    log.info("code sandbox: ulimit -u %d leaves all runs together %d processes", soft, room)
  return dict(nproc_total=min(want, room), nproc_base=used)


def _result(streams: dict, killed_for: str, duration: float, limits: Limits) -> RunResult:
  """A run's result from its drained streams and why it was stopped ("" if it was not)."""
  status = [json.loads(line) for line in streams["status"].splitlines() if line]
  end = next((s for s in status if {"exit", "signal", "error"} & s.keys()), {})
  res = RunResult(
    "fail",
    "",
    duration,
    end.get("exit"),
    end.get("signal"),
    streams["stdout"],
    streams["stderr"],
    streams["channel"],
    tuple(s["note"] for s in status if "note" in s),
  )
  if "error" in end:
    res.status, res.reason = "error", f"sandbox error: {end['error']}"
  elif killed_for == "timeout":
    res.status, res.reason = "timeout", f"timeout after {limits.wall_s:g}s"
  elif killed_for:
    res.reason = killed_for
  elif res.signal is not None:
    res.reason = _signal_reason(res.signal)
  elif res.exit_code == 0:
    res.status = "pass"
  elif res.exit_code is not None:
    res.reason = f"exit code {res.exit_code}"
    last = _last_line(res.stderr)
    if last:
      res.reason += f": {last}"
  else:
    res.status, res.reason = "error", "sandbox error: no exit status reported"
  return res


class _Drain:
  """Drains stdout, stderr, the channel and the status pipe of a run until all close, keeping at
  most the capped bytes; past the deadline (or on a flood), stops the run. `run` returns (bytes
  by stream, kill reason or ""), once the run is over (its processes gone).

  Stopping: SIGUSR1 asks the run process to SIGKILL the program (which ends its namespace);
  should the pipes stay open 5 s later, the run process's and the program's process groups and
  the program are SIGKILLed directly (the program may have left its group with setsid)."""

  NAMES = ("stdout", "stderr", "channel", "status")

  def __init__(self, fds: list[int], deadline: float, limits: Limits):
    self.fds, self.deadline, self.limits = fds, deadline, limits
    caps = (limits.output_bytes, limits.output_bytes, limits.channel_bytes, 1 << 16)
    self.caps = dict(zip(self.NAMES, caps))
    self.by_fd = dict(zip(fds, self.NAMES))
    self.kept = {name: bytearray() for name in self.NAMES}
    self.output_total, self.killed_for, self.stage = 0, "", 0
    self.run_pid, self.run_pidfd = None, None  # a pidfd never reaches a recycled pid

  def run(self) -> tuple[dict[str, bytes], str]:
    sel = selectors.DefaultSelector()
    for fd in self.fds:
      os.set_blocking(fd, False)
      sel.register(fd, selectors.EVENT_READ)
    try:
      while sel.get_map() and self.stage < 3:
        now = time.monotonic()
        if now >= self.deadline:
          self._escalate("timeout")
          continue
        for key, _ in sel.select(timeout=self.deadline - now):
          self._read(sel, key.fd)
    finally:
      sel.close()
      for fd in self.fds:
        os.close(fd)
    if self.run_pidfd is not None:
      # A run that ended by itself closed its pipes once all was over; a stopped one did not.
      if self.killed_for and not select.select([self.run_pidfd], [], [], 5.0)[0]:
        _send(self.run_pidfd, signal.SIGKILL)  # readable only once the process is gone
      os.close(self.run_pidfd)
    return {k: bytes(v) for k, v in self.kept.items()}, self.killed_for

  def _read(self, sel, fd: int) -> None:
    name = self.by_fd[fd]
    try:
      data = os.read(fd, 1 << 16)
    except BlockingIOError:
      return
    if not data:
      sel.unregister(fd)
      return
    room = self.caps[name] - len(self.kept[name])
    self.kept[name] += data[: max(room, 0)]
    if name == "status" and self.run_pid is None and self._status("run_pid"):
      self.run_pid = self._status("run_pid")[0]
      try:  # it is alive until its status pipe closes
        self.run_pidfd = os.pidfd_open(self.run_pid)
      except ProcessLookupError:
        pass
    elif name in ("stdout", "stderr"):
      self.output_total += len(data)
      if self.output_total > self.limits.flood_bytes and not self.stage:
        self._escalate(f"output flood (over {self.limits.flood_bytes} bytes)")
    elif name == "channel" and len(data) > room and not self.stage:
      self._escalate(f"result channel over {self.limits.channel_bytes} bytes")

  def _status(self, key: str) -> list:
    lines = self.kept["status"].splitlines()
    return [json.loads(line)[key] for line in lines if key.encode() in line]

  def _escalate(self, reason: str = "") -> None:
    self.killed_for = self.killed_for or reason
    self.stage += 1
    if self.stage == 1:
      _send(self.run_pidfd, signal.SIGUSR1)
    elif self.stage == 2:
      _send(self.run_pidfd, signal.SIGKILL)
      if self.run_pid is not None:
        _kill_quietly(lambda: os.killpg(self.run_pid, signal.SIGKILL))
      for program_pid in self._status("program_pid"):  # it leads a process group too
        _kill_quietly(lambda p=program_pid: os.killpg(p, signal.SIGKILL))
        _kill_quietly(lambda p=program_pid: os.kill(p, signal.SIGKILL))
    # Stopping a namespace of many processes takes a while on a busy machine.
    self.deadline = time.monotonic() + (5.0 if self.stage == 1 else 1.0)


def claim_uids(n: int, uid_base: int) -> list[tuple[int, int]]:
  """`n` (uid, lock fd) pairs: uid_base + k for the first k whose lock file this process can
  lock exclusively (the lock goes with the fd, and with the process if it dies)."""
  folder = os.path.join(tempfile.gettempdir(), "lora_jax_sandbox_uids")
  os.makedirs(folder, mode=0o700, exist_ok=True)
  claimed = []
  for k in range(MAX_UIDS):
    fd = os.open(os.path.join(folder, str(k)), os.O_RDWR | os.O_CREAT, 0o600)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      os.close(fd)
      continue
    claimed.append((uid_base + k, fd))
    if len(claimed) == n:
      return claimed
  for _, fd in claimed:
    os.close(fd)
  raise RuntimeError(f"no free sandbox uids: all {MAX_UIDS} are taken by running sandboxes")


def _send(pidfd, sig) -> None:
  if pidfd is not None:
    _kill_quietly(lambda: signal.pidfd_send_signal(pidfd, sig))


def _kill_quietly(kill) -> None:
  try:
    kill()
  except ProcessLookupError:
    pass


def _signal_reason(sig: int) -> str:
  try:
    name = signal.Signals(sig).name
  except ValueError:
    name = "?"
  if sig == signal.SIGXCPU:
    return f"cpu time limit (signal {sig}, {name})"
  if sig == signal.SIGXFSZ:
    return f"file size limit (signal {sig}, {name})"
  return f"killed by signal {sig} ({name})"


def _last_line(data: bytes) -> str:
  lines = [ln.strip() for ln in data.decode("utf-8", "replace").splitlines() if ln.strip()]
  return lines[-1][:300] if lines else ""
