"""Run untrusted Python programs in throw-away sandbox processes.

A `Sandbox` starts one fork server (this file run as a script: root, single-threaded, a fresh
`python -I -S`), so a run costs forks, not interpreter start-ups. The server first enters its own
empty network namespace (no device up, not even loopback) and its own mount namespace, where every
mount is read-only, directories closed to others (`/root`) are hidden (only the Python
installation is bound back) and `/proc` hides other users' processes. For each worker slot it
keeps one "run process" (root) forked ahead of time, which:

1. leads its own session and process group;
2. enters new PID, IPC and mount namespaces (`unshare` through ctypes; Python 3.11 has no
   `os.unshare`), waits for its request, and mounts a private size-limited tmpfs on the run's
   directory;
3. forks the program process, PID 1 of the new PID namespace: when it exits, the kernel kills
   everything left in the namespace, including processes that escaped with `setsid`. It sets
   rlimits (CPU, address space, processes, file size, open files, no core), drops to the slot's
   unprivileged uid/gid (root ignores RLIMIT_NPROC; the uid can neither signal nor write anything
   of ours), sets `PR_SET_NO_NEW_PRIVS`, scrubs the environment (HOME and TMPDIR = the run's
   directory) and runs the program as `__main__`;
4. waits for it and reports how it ended on a pipe the program never holds.

Each slot's uid is claimed with a lock file, so no two sandboxes on the machine share one. Past
the wall-clock deadline the parent asks the run process to kill the program (which ends its whole
namespace), then kills the run process's group and the program itself. Where the OS refuses a
namespace, runs go on without it and say so in `RunResult.notes`; without a PID namespace, every
process of the slot's uid is killed after the run instead. stdout/stderr are drained with a cap (a
flood is killed, not buffered). The program may write results to fd 3 (the "channel"), read back
with a cap.
"""

from __future__ import annotations

# A fork costs in proportion to the forking process's memory, and every run is forked from the
# fork server: so the server's part of this file comes first and imports only what it needs; the
# parent's part (class Sandbox) imports the rest below the server's entry point.
import atexit
import ctypes
import gc
import importlib
import json
import math
import os
import resource
import signal
import socket
import sys
import types

CHANNEL_FD = 3
# Each worker slot runs as its own uid = gid, uid_base + n, where n is claimed with a lock file so
# that no two Sandboxes on the machine (other processes included) share one. Far above login and
# subordinate-id ranges, so "kill every process of this uid" can only hit our own sandboxes.
DEFAULT_UID_BASE = 1_900_000_000
MAX_UIDS = 4096

CLONE_NEWNS, CLONE_NEWIPC = 0x00020000, 0x08000000
CLONE_NEWPID, CLONE_NEWNET = 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_NOATIME, MS_NODIRATIME, MS_BIND = 32, 1024, 2048, 4096
MS_REC, MS_PRIVATE, MS_RELATIME, MS_STRICTATIME = 1 << 14, 1 << 18, 1 << 21, 1 << 24
_MOUNT_OPTS = {
  "nosuid": MS_NOSUID,
  "nodev": MS_NODEV,
  "noexec": MS_NOEXEC,
  "noatime": MS_NOATIME,
  "nodiratime": MS_NODIRATIME,
  "relatime": MS_RELATIME,
  "strictatime": MS_STRICTATIME,
}
PR_SET_CHILD_SUBREAPER, PR_SET_NO_NEW_PRIVS = 36, 38
_SAFE_PATH = "/usr/local/bin:/usr/bin:/bin"


# --- the fork server (root, single-threaded) ----------------------------------------------------


def _serve(cfg: dict) -> None:
  sock = socket.socket(fileno=cfg["sock_fd"])
  try:
    for name in cfg["preload"]:
      importlib.import_module(name)
    for name, source in cfg["prelude"].items():
      module = types.ModuleType(name)
      exec(compile(source, f"<{name}>", "exec"), module.__dict__)
      sys.modules[name] = module
    sys.path.extend(cfg["site_dirs"])  # no .pth processing: programs need packages, not hooks
    # A process's first compile() sets up the parser (~3 ms, measured): done once here, every
    # forked run inherits it.
    compile("pass\n", "<warm-up>", "exec")
    libc = ctypes.CDLL(None, use_errno=True)
    cfg["notes"] = _server_namespaces(cfg, libc)
    gc.freeze()  # children's collections leave these objects (and their pages) alone
  except BaseException as e:  # noqa: BLE001 - sent to the parent as the start-up error
    sock.send(f"{e!r}".encode())
    return
  # Run processes, and orphans of dead ones (subreaper), are reaped here as they end (waited
  # for, not ignored, so that their CPU time adds up in the parent's accounting).
  libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
  signal.signal(signal.SIGCHLD, _reap)
  sock.send(b"ready")
  # One "warm" run process per slot, forked and isolated ahead of its request, so that a run
  # starts without waiting for that fork; the next one is forked while the run goes on.
  warm = {}
  for slot in range(len(cfg["uids"])):
    warm[slot] = _spawn_warm(cfg, slot, libc, [sock, *warm.values()])
  while True:
    try:
      msg, fds, _, _ = socket.recv_fds(sock, 1 << 16, 8)
    except OSError:
      msg = b""
    if not msg:  # the parent closed its end: wait for the last runs, then leave
      signal.signal(signal.SIGCHLD, signal.SIG_DFL)
      for conn in warm.values():
        conn.close()  # a warm run process leaves when its socket closes
      while True:
        try:
          os.wait()
        except ChildProcessError:
          return
    req = json.loads(msg)
    slot = int(req["slot"])
    if not 0 <= slot < len(cfg["uids"]):  # never trust a uid from a request
      for fd in fds:
        os.close(fd)
      continue
    if req["op"] == "run":
      conn = warm.pop(slot)
      try:
        socket.send_fds(conn, [msg], fds)
      except OSError as e:  # the parent reads a run's fate from its status pipe
        os.write(fds[3], json.dumps({"error": f"run process: {e}"}).encode() + b"\n")
      for fd in fds:
        os.close(fd)
      conn.close()
      warm[slot] = _spawn_warm(cfg, slot, libc, [sock, *warm.values()])
    else:  # "sweep", synchronous: the parent waits for the kill to be done
      killer = os.fork()
      if killer == 0:
        _kill_uid(cfg["uids"][slot])
        os._exit(0)
      try:
        os.waitpid(killer, 0)
      except ChildProcessError:  # _reap got it first
        pass
      sock.send(b"done")


def _spawn_warm(cfg, slot: int, libc, keep_away: list) -> socket.socket:
  """Fork the run process of `slot`'s next run; returns the socket its request goes to.
  `keep_away`: sockets the run process must not hold (the program must never reach the fork
  server)."""
  ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
  pid = os.fork()
  if pid == 0:
    try:
      for s in (ours, *keep_away):
        os.close(s.detach())
      signal.signal(signal.SIGCHLD, signal.SIG_DFL)
      _run_process(cfg, cfg["uids"][slot], theirs, libc)
    finally:
      os._exit(0)
  theirs.close()
  return ours


def _reap(signum=None, frame=None) -> None:
  while True:
    try:
      pid, _ = os.waitpid(-1, os.WNOHANG)
    except ChildProcessError:
      return
    if pid == 0:
      return


def _server_namespaces(cfg, libc) -> list[str]:
  """The fork server's own namespaces, inherited by every run: an empty network namespace, and a
  mount namespace with every mount read-only, closed directories hidden and a /proc that shows
  other users' processes to nobody (hidepid). Each run copies the mount namespace and adds its own
  writable directory. Returns notes on what the OS refused (repeated in every run's result)."""
  if not cfg["namespaces"]:
    return [f"no {what} namespace: disabled" for what in ("PID", "network", "IPC", "mount")]
  notes: list[str] = []
  _unshare(libc, CLONE_NEWNET, "network", notes.append)
  if _unshare(libc, CLONE_NEWNS, "mount", notes.append):
    try:
      _mount(libc, None, "/", None, MS_REC | MS_PRIVATE)  # nothing propagates to the host
      _expose(libc, cfg["expose"])
      _read_only_mounts(libc, notes.append)
      _mount(libc, "proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, "hidepid=2")
    except OSError as e:
      notes.append(f"no mount namespace: {e}")
  return notes


def _unshare(libc, flag: int, what: str, note) -> bool:
  if libc.unshare(ctypes.c_int(flag)) == 0:
    return True
  note(f"no {what} namespace: {os.strerror(ctypes.get_errno())}")
  return False


def _expose(libc, paths: list[str]) -> None:
  """For each directory the program needs that sits under a directory closed to others (no
  o+x, e.g. pyenv under /root), hide that closed directory under an empty tmpfs and bind-mount
  just the needed directory back at its own path."""
  closed: dict[str, list[str]] = {}
  for path in paths:
    parts = path.strip("/").split("/")
    for i in range(1, len(parts)):
      anc = "/" + "/".join(parts[:i])
      if not os.stat(anc).st_mode & 0o001:
        closed.setdefault(anc, []).append(path)
        break
  for anc, needed in closed.items():
    fds = [(p, os.open(p, os.O_PATH | os.O_DIRECTORY)) for p in needed]
    _mount(libc, "tmpfs", anc, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=0755")
    for path, fd in fds:
      os.makedirs(path, mode=0o755, exist_ok=True)
      _mount(libc, f"/proc/self/fd/{fd}", path, None, MS_BIND | MS_REC)
      os.close(fd)


def _read_only_mounts(libc, note) -> None:
  with open("/proc/self/mountinfo") as f:
    mounts = [line.split() for line in f]
  for fields in mounts:
    target = _unescape(fields[4])
    flags = MS_BIND | MS_REMOUNT | MS_RDONLY
    for opt in fields[5].split(","):
      flags |= _MOUNT_OPTS.get(opt, 0)
    try:
      _mount(libc, None, target, None, flags)
    except OSError as e:
      if e.errno != 2:  # a mount hidden under another one is unreachable anyway
        note(f"not read-only: {target}: {e.strerror}")


def _unescape(path: str) -> str:
  """mountinfo writes space, tab, newline and backslash as octal escapes (\\040 ...)."""
  parts = path.split("\\")
  return parts[0] + "".join(chr(int(p[:3], 8)) + p[3:] for p in parts[1:])


def _mount(libc, source, target, fstype, flags, data=None) -> None:
  enc = lambda s: None if s is None else s.encode()  # noqa: E731
  if libc.mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)) != 0:
    err = ctypes.get_errno()
    raise OSError(err, os.strerror(err), target)


def _kill_uid(uid: int) -> None:
  """Become `uid` and SIGKILL every other process of it (atomic against fork bombs: a process
  with a pending SIGKILL cannot fork)."""
  os.setgroups([])
  os.setresgid(uid, uid, uid)
  os.setresuid(uid, uid, uid)
  try:
    os.kill(-1, signal.SIGKILL)
  except ProcessLookupError:
    pass


def _run_process(cfg: dict, uid: int, conn: socket.socket, libc) -> None:
  """Isolate, wait for the request, fork the program, wait for it, report how it ended.
  SIGUSR1 from the parent means "stop it now": the program is killed (PID 1 of its namespace:
  all of it). Without a PID namespace, adopt orphans (subreaper) and kill every process of the
  uid before leaving."""
  os.setsid()
  notes = list(cfg["notes"])
  pid_ns, mount_ns = _enter_namespaces(cfg, libc, notes.append)
  try:
    msg, fds, _, _ = socket.recv_fds(conn, 1 << 16, 8)
  except OSError:
    return
  if not msg:
    return  # the fork server is closing
  conn.close()
  req = json.loads(msg)
  out_w, err_w, chan_w, stat_w = fds
  null = os.open(os.devnull, os.O_RDONLY)
  for fd, target in ((null, 0), (out_w, 1), (err_w, 2)):
    os.dup2(fd, target)
  status = os.fdopen(stat_w, "w", buffering=1)

  def report(**item) -> None:
    status.write(json.dumps(item) + "\n")

  program = {}

  def stop(signum, frame) -> None:
    if "pidfd" not in program:  # no program yet
      os._exit(0)
    try:  # a pidfd never reaches a recycled pid, even once the program is reaped
      signal.pidfd_send_signal(program["pidfd"], signal.SIGKILL)
    except ProcessLookupError:
      pass

  signal.signal(signal.SIGUSR1, stop)
  report(run_pid=os.getpid())
  try:
    for note in notes:
      report(note=note)
    fresh_proc = _prepare_dir(libc, req, uid, pid_ns, mount_ns, report)
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})  # until the pid is known
    child = os.fork()
    if child == 0:
      signal.signal(signal.SIGUSR1, signal.SIG_DFL)
      signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGUSR1})
      _run_program(req, uid, chan_w, stat_w, libc, fresh_proc)
    program["pidfd"] = os.pidfd_open(child)
    report(program_pid=child)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGUSR1})
    _, st = os.waitpid(child, 0)
    if os.WIFSIGNALED(st):
      report(signal=os.WTERMSIG(st))
    else:
      report(exit=os.WEXITSTATUS(st))
    if not pid_ns:
      killer = os.fork()
      if killer == 0:
        _kill_uid(uid)
        os._exit(0)
      while True:  # reap the killer and everything it killed; ends in ChildProcessError
        os.wait()
  except ChildProcessError:
    pass
  except BaseException as e:  # noqa: BLE001 - reported to the parent, never raised
    report(error=f"setup: {e!r}")
  # The program and all it started are gone: let the parent go on while this process exits.
  os.closerange(0, 1 << 16)


def _enter_namespaces(cfg, libc, note) -> tuple[bool, bool]:
  """The run's own PID, IPC and mount namespaces; returns (PID namespace, mount namespace)."""
  if not cfg["namespaces"]:
    return False, False
  pid_ns = _unshare(libc, CLONE_NEWPID, "PID", note)
  _unshare(libc, CLONE_NEWIPC, "IPC", note)
  mount_ns = not any(n.startswith("no mount namespace") for n in cfg["notes"])
  return pid_ns, mount_ns and _unshare(libc, CLONE_NEWNS, "mount", note)


def _prepare_dir(libc, req, uid, pid_ns: bool, mount_ns: bool, report) -> bool:
  """The run's directory (a private tmpfs, else the host directory handed to the uid);
  returns whether the program should mount a /proc of its own."""
  workdir = req["workdir"]
  if mount_ns:
    try:
      _private_dir(libc, workdir, uid, req["limits"]["tmpfs_bytes"])
    except OSError as e:
      report(note=f"no private directory: {e}")
      mount_ns = False
  if not mount_ns:
    os.chown(workdir, uid, uid)
    os.chmod(workdir, 0o700)
  return pid_ns and mount_ns


def _private_dir(libc, workdir: str, uid: int, size: int) -> None:
  """A private size-limited tmpfs on the run's directory, holding copies of its files."""
  files = {}
  for name in os.listdir(workdir):
    with open(os.path.join(workdir, name), "rb") as f:
      files[name] = f.read()
  _mount(
    libc,
    "tmpfs",
    workdir,
    "tmpfs",
    MS_NOSUID | MS_NODEV,
    f"size={size},mode=0700,uid={uid},gid={uid}",
  )
  for name, data in files.items():
    with open(os.path.join(workdir, name), "wb") as f:
      f.write(data)


def _run_program(req, uid, chan_w, stat_w, libc, fresh_proc: bool) -> None:
  try:
    lim, workdir = req["limits"], req["workdir"]
    if fresh_proc:  # PID 1 of the new namespace mounts a /proc showing only that namespace
      _mount(libc, "proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    os.close(stat_w)  # the program must not be able to forge its own exit status
    os.dup2(chan_w, CHANNEL_FD)
    os.closerange(CHANNEL_FD + 1, 1 << 16)
    os.chdir(workdir)
    cpu = math.ceil(lim["cpu_s"] if lim["cpu_s"] is not None else lim["wall_s"] + 1)
    for which, soft, hard in (
      (resource.RLIMIT_CPU, cpu, cpu + 1),
      (resource.RLIMIT_AS, lim["memory_bytes"], None),
      (resource.RLIMIT_DATA, lim["memory_bytes"], None),
      (resource.RLIMIT_NPROC, lim["nproc"], None),
      (resource.RLIMIT_FSIZE, lim["file_bytes"], None),
      (resource.RLIMIT_NOFILE, lim["open_files"], None),
      (resource.RLIMIT_CORE, 0, None),
    ):
      resource.setrlimit(which, (soft, soft if hard is None else hard))
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
      raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS) failed")
    os.umask(0o077)
    os.environ.clear()
    os.environ.update(
      PATH=_SAFE_PATH, HOME=workdir, TMPDIR=workdir, LANG="C.UTF-8", OMP_NUM_THREADS="1"
    )
    path = os.path.join(workdir, req["main"])
    with open(path, "rb") as f:
      code = compile(f.read(), path, "exec")
  except BaseException as e:  # noqa: BLE001 - the parent sees exit code 125 and this line
    os.write(2, f"sandbox: cannot start the program: {e!r}\n".encode())
    os._exit(125)
  os._exit(_exec_main(code, path))


def _exec_main(code, path: str) -> int:
  """Run `code` as `__main__` the way `python path` would; returns the exit code."""
  main = types.ModuleType("__main__")
  main.__file__ = path
  sys.modules["__main__"] = main
  sys.argv = [path]
  try:
    exec(code, main.__dict__)
    rc = 0
  except SystemExit as e:
    if e.code is None or isinstance(e.code, int):
      rc = e.code or 0
    else:
      print(e.code, file=sys.stderr)
      rc = 1
  except BaseException as e:  # noqa: BLE001 - a crash of the program is its result
    e = e.with_traceback(e.__traceback__.tb_next)  # start at the program's own frame
    sys.__excepthook__(type(e), e, e.__traceback__)
    rc = 1
  try:
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
  except BaseException:  # noqa: BLE001 - the program may have broken its own streams
    pass
  return rc & 0xFF


if __name__ == "__main__":
  _serve(json.loads(sys.argv[1]))
  sys.exit(0)


# --- the parent's side -------------------------------------------------------------------------

import dataclasses  # noqa: E402  (see the note on imports at the top)
import fcntl  # noqa: E402
import queue  # noqa: E402
import select  # noqa: E402
import selectors  # noqa: E402
import shutil  # noqa: E402
import site  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402


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
  """`workers` sandbox slots (one uid each) behind one fork server. `run` is thread-safe and
  blocks until a slot is free, so a thread pool of `workers` threads can drive it.

  `preload`: modules the fork server imports once, so programs get them for free (each costs
  every fork some memory); `prelude`: trusted source the fork server runs once as a module of
  the given name, importable by every program (e.g. a test harness, compiled once)."""

  def __init__(
    self,
    workers: int = 2,
    limits: Limits = Limits(),
    uid_base: int = DEFAULT_UID_BASE,
    namespaces: bool = True,
    preload: tuple[str, ...] = (),
    prelude: dict[str, str] | None = None,
  ):
    if workers < 1:
      raise ValueError(f"sandbox workers must be >= 1, got {workers}")
    if os.geteuid() != 0:
      raise PermissionError(
        "the code sandbox must run as root: it drops each program to "
        "its own unprivileged uid (root is needed to switch uids)"
      )
    self.limits = limits
    self._uid_locks = _claim_uids(workers, uid_base)
    self.uids = tuple(uid for uid, _ in self._uid_locks)
    self._slots: queue.SimpleQueue[int] = queue.SimpleQueue()
    for slot in range(workers):
      self._slots.put(slot)
    # Run directories: in memory (/dev/shm) where possible. 0711: the dropped uids may
    # traverse the root to reach their run directory, not list it.
    shm = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
    self._root = tempfile.mkdtemp(prefix="lora_jax_sandbox_", dir=shm)
    os.chmod(self._root, 0o711)
    self._lock = threading.Lock()
    self._sock, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    cfg = dict(
      sock_fd=theirs.fileno(),
      uids=self.uids,
      namespaces=namespaces,
      preload=list(preload),
      prelude=prelude or {},
      site_dirs=[d for d in site.getsitepackages() if os.path.isdir(d)],
      expose=sorted({os.path.realpath(sys.base_prefix), os.path.realpath(sys.prefix)}),
    )
    self._server = subprocess.Popen(
      [sys.executable, "-I", "-S", os.path.abspath(__file__), json.dumps(cfg)],
      stdin=subprocess.DEVNULL,
      stdout=subprocess.DEVNULL,
      pass_fds=(theirs.fileno(),),
      start_new_session=True,
      env={},
    )
    theirs.close()
    hello = self._sock.recv(1 << 16)
    if hello != b"ready":
      self.close()
      raise RuntimeError(f"the sandbox fork server did not start: {hello.decode()!r}")

  def close(self) -> None:
    self._sock.close()  # the fork server exits on EOF
    try:
      self._server.wait(timeout=5)
    except subprocess.TimeoutExpired:
      self._server.kill()
      self._server.wait()
    shutil.rmtree(self._root, ignore_errors=True)
    for _, lock in self._uid_locks:
      os.close(lock)

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
      streams, killed_for = _collect([r for r, _ in pipes], start + limits.wall_s, limits)
    finally:
      shutil.rmtree(workdir, ignore_errors=True)
    duration = time.monotonic() - start
    status = [json.loads(line) for line in streams["status"].splitlines() if line]
    notes = tuple(s["note"] for s in status if "note" in s)
    if killed_for and any(n.startswith("no PID namespace") for n in notes):
      self._sweep(slot)  # the run process died with the group: catch setsid escapees
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
      notes,
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

  def _sweep(self, slot: int) -> None:
    with self._lock:
      try:
        socket.send_fds(self._sock, [json.dumps(dict(op="sweep", slot=slot)).encode()], [])
        self._sock.recv(16)
      except OSError:
        pass


def _collect(fds: list[int], deadline: float, limits: Limits):
  """Drain stdout, stderr, the channel and the status pipe of a run until all close, keeping at
  most the capped bytes; past the deadline (or on a flood), stop the run. Returns (bytes by
  stream, kill reason or ""), once the run is over (its processes gone).

  Stopping: SIGUSR1 asks the run process to SIGKILL the program (which ends its namespace);
  should the pipes stay open 5 s later, the run process's group and the program are SIGKILLed
  directly (the program may have left the group with setsid)."""
  names = ("stdout", "stderr", "channel", "status")
  caps = dict(zip(names, (limits.output_bytes, limits.output_bytes, limits.channel_bytes, 1 << 16)))
  by_fd = dict(zip(fds, names))
  kept = {name: bytearray() for name in names}
  output_total, killed_for, stage = 0, "", 0
  run = {}  # the run process: "pid" and a "pidfd" (signals never reach a recycled pid)
  sel = selectors.DefaultSelector()
  for fd in fds:
    os.set_blocking(fd, False)
    sel.register(fd, selectors.EVENT_READ)

  def status(key: str) -> list:
    return [json.loads(line)[key] for line in kept["status"].splitlines() if key.encode() in line]

  def escalate(reason: str = "") -> None:
    nonlocal killed_for, deadline, stage
    killed_for = killed_for or reason
    stage += 1
    if stage == 1:
      _send(run.get("pidfd"), signal.SIGUSR1)
    elif stage == 2:
      _send(run.get("pidfd"), signal.SIGKILL)
      if "pid" in run:
        _kill_quietly(lambda: os.killpg(run["pid"], signal.SIGKILL))
      for program_pid in status("program_pid"):
        _kill_quietly(lambda p=program_pid: os.kill(p, signal.SIGKILL))
    # Stopping a namespace of many processes takes a while on a busy machine.
    deadline = time.monotonic() + (5.0 if stage == 1 else 1.0)

  try:
    while sel.get_map() and stage < 3:
      now = time.monotonic()
      if now >= deadline:
        escalate("timeout")
        continue
      for key, _ in sel.select(timeout=deadline - now):
        name = by_fd[key.fd]
        try:
          data = os.read(key.fd, 1 << 16)
        except BlockingIOError:
          continue
        if not data:
          sel.unregister(key.fd)
          continue
        room = caps[name] - len(kept[name])
        kept[name] += data[: max(room, 0)]
        if name == "status" and "pid" not in run and status("run_pid"):
          run["pid"] = status("run_pid")[0]
          try:  # it is alive until its status pipe closes
            run["pidfd"] = os.pidfd_open(run["pid"])
          except ProcessLookupError:
            pass
        elif name in ("stdout", "stderr"):
          output_total += len(data)
          if output_total > limits.flood_bytes and not stage:
            escalate(f"output flood (over {limits.flood_bytes} bytes)")
        elif name == "channel" and len(data) > room and not stage:
          escalate(f"result channel over {limits.channel_bytes} bytes")
  finally:
    sel.close()
    for fd in fds:
      os.close(fd)
  if "pidfd" in run:
    # A run that ended by itself closed its pipes once all was over; a stopped one did not.
    if killed_for and not select.select([run["pidfd"]], [], [], 5.0)[0]:
      _send(run["pidfd"], signal.SIGKILL)  # readable only once the process is gone
    os.close(run["pidfd"])
  return {k: bytes(v) for k, v in kept.items()}, killed_for


def _claim_uids(n: int, uid_base: int) -> list[tuple[int, int]]:
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
