"""The code sandbox's fork server: run as a script by `sandbox.Sandbox` (single-threaded, a fresh
`python -E -s -S`), it forks every run, so a run costs forks, not interpreter start-ups. A fork
costs in proportion to the forking process's memory: this file and `sandbox_isolation` import
only what they need (the client side lives in `sandbox`).

At start the server imports the requested modules and trusted preludes and warms up the
compiler, then isolates itself, by `cfg["mode"]`:

- "root" (the server runs as root): its own empty network namespace (no device up, not even
  loopback) and mount namespace, where every mount is read-only, directories closed to others
  (`/root`) are hidden (only the Python installation is bound back) and `/proc` hides other
  users' processes;
- "userns" (an ordinary user): first a user namespace of its own (the user's uid mapped onto
  itself), then the same network and mount namespaces; as programs run as the evaluator's uid,
  its private directories are hidden too (home, /tmp, /run, /dev/shm: keys, sockets, the
  expected outputs) with the Python installation bound back;
- "processes": no namespace at all (the OS refuses them): resource limits only.

For each worker slot it keeps one "run process" forked ahead of time, which:

1. leads its own session and process group;
2. enters new PID, IPC and mount namespaces ("userns": inside a user namespace of its own,
   created with RLIMIT_NPROC at the sandbox-wide budget), waits for its request, and mounts a
   private size-limited tmpfs holding the run's directory;
3. forks the program process, PID 1 of the new PID namespace: when it exits, the kernel kills
   everything left in the namespace, including processes that escaped with `setsid`. It leads
   its own session and process group (killed at its end: all of it at once), sets
   rlimits (CPU, address space, processes, file size, open files, no core), gives up its
   privileges ("root": drops to the slot's own unprivileged uid, which can neither signal nor
   write anything of ours; "userns": drops every capability), sets `PR_SET_NO_NEW_PRIVS`,
   scrubs the environment (HOME and TMPDIR = the run's directory) and runs the program as
   `__main__`;
4. waits for it and reports how it ended on a pipe the program never holds (one JSON object a
   line: run_pid, notes, program_pid, then exit / signal / error).

SIGUSR1 to a run process means "stop it now": it SIGKILLs the program (PID 1 of its namespace:
all of it). Where the OS refuses a namespace, runs go on without it and say so in their notes;
without a PID namespace the run process kills what the program left after it ends (as root:
every process of the slot's uid; else: every descendant, which a subreaper adopts).

Processes in a user namespace count towards RLIMIT_NPROC per (namespace, uid), and also towards
their creator's count in the parent namespace, capped there by the creator's RLIMIT_NPROC when
it created the namespace. So in "userns" a run holds at most `Limits.nproc` processes (its own
namespace's count), all runs together at most `cfg["nproc_total"]` (the run processes' soft
limit when they create their namespaces), and the evaluator keeps the rest of this user's
`ulimit -u` (measured: two fork bombs under `ulimit -u 100` and a budget of 40 held 40 tasks
of the uid, and the evaluator still started 20 threads).
"""

from __future__ import annotations

import atexit
import gc
import importlib
import json
import os
import signal
import socket
import sys
import time
import types

# Run as a script, this file's folder is sys.path[0]: its helper module is imported from there
# (main() then drops that entry, so programs cannot import the evaluator's modules).
import sandbox_isolation as iso

CHANNEL_FD = 3
_SAFE_PATH = "/usr/local/bin:/usr/bin:/bin"


def main() -> None:
  del sys.path[0]
  _serve(json.loads(sys.argv[1]))


def _serve(cfg: dict) -> None:
  sock = socket.socket(fileno=cfg["sock_fd"])
  try:
    _start(cfg)
  except BaseException as e:  # noqa: BLE001 - sent to the parent as the start-up error
    sock.send(f"{e!r}".encode())
    return
  # Run processes, and orphans of dead ones (subreaper), are reaped here as they end (waited
  # for, not ignored, so that their CPU time adds up in the parent's accounting).
  iso.prctl(iso.PR_SET_CHILD_SUBREAPER, 1)
  signal.signal(signal.SIGCHLD, _reap)
  sock.send(b"ready")
  # One "warm" run process per slot, forked and isolated ahead of its request, so that a run
  # starts without waiting for that fork; the next one is forked while the run goes on.
  warm, running = {}, {}  # slot -> (socket, pid) of its warm run process; slot -> pid
  for slot in range(len(cfg["uids"])):
    warm[slot] = _spawn_warm(cfg, slot, [sock, *(c for c, _ in warm.values())])
  while True:
    try:
      msg, fds, _, _ = socket.recv_fds(sock, 1 << 16, 8)
    except OSError:
      msg = b""
    if not msg:  # the parent closed its end
      _shut_down([c for c, _ in warm.values()])
      return
    req = json.loads(msg)
    slot = int(req["slot"])
    if not 0 <= slot < len(cfg["uids"]):  # never trust a uid from a request
      for fd in fds:
        os.close(fd)
    elif req["op"] == "run":
      conn, running[slot] = warm.pop(slot)
      _hand_over(conn, msg, fds)
      warm[slot] = _spawn_warm(cfg, slot, [sock, *(c for c, _ in warm.values())])
    else:  # "sweep", synchronous: the parent waits for the kill to be done
      run_processes = {pid for _, pid in warm.values()} | set(running.values())
      _sweep(cfg["uids"][slot], run_processes)
      sock.send(b"done")


def _start(cfg: dict) -> None:
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
  cfg["notes"] = _server_namespaces(cfg)
  gc.freeze()  # children's collections leave these objects (and their pages) alone


def _server_namespaces(cfg) -> list[str]:
  """The fork server's own namespaces, inherited by every run (see the top of this file). Each
  run copies the mount namespace and adds its own writable directory. Returns notes on what the
  OS refused (repeated in every run's result); in "userns" a refusal is an error instead (the
  client then falls back to "processes")."""
  if cfg["mode"] == "processes":
    return [
      f"no {what} namespace: isolation 'processes'" for what in ("PID", "network", "IPC", "mount")
    ]
  if cfg["mode"] == "userns":
    iso.enter_user_namespace()
    for flag, what in ((iso.CLONE_NEWNET, "network"), (iso.CLONE_NEWNS, "mount")):
      iso.unshare(flag, what)
    iso.make_mounts_private()
    iso.hide(cfg["hide"], cfg["keep"])
    # /proc stays writable: each run process writes its user namespace's uid map there, and
    # each program covers it with a /proc of its own PID namespace.
    notes: list[str] = []
    iso.read_only_mounts(notes.append, skip=("/proc",))
    return notes
  notes = []
  iso.unshare(iso.CLONE_NEWNET, "network", notes.append)
  if iso.unshare(iso.CLONE_NEWNS, "mount", notes.append):
    try:
      iso.make_mounts_private()
      iso.hide(iso.closed_ancestors(cfg["keep"]), cfg["keep"])
      iso.read_only_mounts(notes.append)
      iso.mount_proc("hidepid=2")
    except OSError as e:
      notes.append(f"no mount namespace: {e}")
  return notes


def _shut_down(warm: list[socket.socket]) -> None:
  """Wait for the last runs, then return."""
  signal.signal(signal.SIGCHLD, signal.SIG_DFL)
  for conn in warm:
    conn.close()  # a warm run process leaves when its socket closes
  while True:
    try:
      os.wait()
    except ChildProcessError:
      return


def _hand_over(conn: socket.socket, msg: bytes, fds: list[int]) -> None:
  """Pass a run request and its pipes to the slot's warm run process."""
  try:
    socket.send_fds(conn, [msg], fds)
  except OSError as e:  # the parent reads a run's fate from its status pipe
    os.write(fds[3], json.dumps({"error": f"run process: {e}"}).encode() + b"\n")
  for fd in fds:
    os.close(fd)
  conn.close()


def _sweep(uid: int, run_processes: set[int]) -> None:
  """Kill what a stopped run left behind without a PID namespace: every process of the slot's
  uid (as root), else every process the server adopted that is not a run process."""
  if uid == os.getuid():
    for _ in range(100):  # a few passes stop any fork bomb within its process limit
      if not iso.kill_descendants(os.getpid(), run_processes):
        return
      time.sleep(0.005)
    return
  killer = os.fork()
  if killer == 0:
    iso.kill_uid(uid)
    os._exit(0)
  try:
    os.waitpid(killer, 0)
  except ChildProcessError:  # _reap got it first
    pass


def _spawn_warm(cfg, slot: int, keep_away: list) -> tuple[socket.socket, int]:
  """Fork the run process of `slot`'s next run; returns the socket its request goes to and
  its pid.
  `keep_away`: sockets the run process must not hold (the program must never reach the fork
  server)."""
  ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
  pid = os.fork()
  if pid == 0:
    try:
      for s in (ours, *keep_away):
        os.close(s.detach())
      signal.signal(signal.SIGCHLD, signal.SIG_DFL)
      _run_process(cfg, cfg["uids"][slot], theirs)
    finally:
      os._exit(0)
  theirs.close()
  return ours, pid


def _reap(signum=None, frame=None) -> None:
  while True:
    try:
      pid, _ = os.waitpid(-1, os.WNOHANG)
    except ChildProcessError:
      return
    if pid == 0:
      return


# --- a run process ----------------------------------------------------------------------------


def _run_process(cfg: dict, uid: int, conn: socket.socket) -> None:
  """Isolate, wait for the request, fork the program, wait for it, report how it ended.
  Without a PID namespace, adopt orphans (subreaper) and kill what the program left before
  leaving."""
  os.setsid()  # (and so a scheduler autogroup of its own: a fair share of a busy machine)
  notes = list(cfg["notes"])
  pid_ns, mount_ns = _enter_namespaces(cfg, notes.append)
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
  signal.signal(signal.SIGUSR1, lambda signum, frame: _stop(program))
  report(run_pid=os.getpid())
  try:
    for note in notes:
      report(note=note)
    fresh_proc = _prepare_dir(req, uid, pid_ns, mount_ns, report)
    _supervise(req, cfg, uid, (chan_w, stat_w), fresh_proc, program, report)
    if not pid_ns:
      _kill_leftovers_and_reap(uid)
  except ChildProcessError:
    pass
  except BaseException as e:  # noqa: BLE001 - reported to the parent, never raised
    report(error=f"setup: {e!r}")
  # The program and all it started are gone: let the parent go on while this process exits.
  os.closerange(0, 1 << 16)


def _stop(program: dict) -> None:
  if "pidfd" not in program:  # no program yet
    os._exit(0)
  try:  # a pidfd never reaches a recycled pid, even once the program is reaped
    signal.pidfd_send_signal(program["pidfd"], signal.SIGKILL)
  except ProcessLookupError:
    pass
  _kill_group(program["pid"])  # not reaped yet (we are in its wait): still its group


def _kill_group(pgid: int) -> None:
  """SIGKILL a process group: all of it at once, so none of it can fork meanwhile."""
  try:
    os.killpg(pgid, signal.SIGKILL)
  except ProcessLookupError:
    pass


def _supervise(req, cfg, uid, fds, fresh_proc: bool, program: dict, report) -> None:
  """Fork the program, and report its pid and how it ended. The program leads a session and
  process group of its own, killed when it ends: what a PID namespace does not end."""
  iso.prctl(iso.PR_SET_CHILD_SUBREAPER, 1)
  signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})  # until the pid is known
  child = os.fork()
  if child == 0:
    signal.signal(signal.SIGUSR1, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGUSR1})
    _run_program(req, cfg, uid, *fds, fresh_proc)
  program.update(pid=child, pidfd=os.pidfd_open(child))
  report(program_pid=child)
  signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGUSR1})
  # Ended but not reaped: its pid, and so its group's id, cannot be reused meanwhile.
  os.waitid(os.P_PID, child, os.WEXITED | os.WNOWAIT)
  _kill_group(child)
  _, st = os.waitpid(child, 0)
  if os.WIFSIGNALED(st):
    report(signal=os.WTERMSIG(st))
  else:
    report(exit=os.WEXITSTATUS(st))


def _kill_leftovers_and_reap(uid: int) -> None:
  """Kill what the program left (every process of its uid as root, else every descendant of
  this subreaper) and reap it all; ends in ChildProcessError once none is left."""
  if uid != os.getuid():
    killer = os.fork()
    if killer == 0:
      iso.kill_uid(uid)
      os._exit(0)
    while True:
      os.wait()
  while True:
    iso.kill_descendants(os.getpid(), set())
    while os.waitpid(-1, os.WNOHANG)[0]:
      pass
    time.sleep(0.002)  # processes signalled take a moment to end


def _enter_namespaces(cfg, note) -> tuple[bool, bool]:
  """The run's own PID, IPC and mount namespaces ("userns": in a user namespace of its own,
  see the top of this file); returns (PID namespace, mount namespace)."""
  if cfg["mode"] == "processes":
    return False, False
  if cfg["mode"] == "userns":
    try:
      iso.set_soft_nproc(cfg["nproc_total"])
      iso.enter_user_namespace()
    except OSError as e:  # the server's namespaces still isolate; the process counts are shared
      note(f"no user namespace of its own: {e}")
  pid_ns = iso.unshare(iso.CLONE_NEWPID, "PID", note)
  iso.unshare(iso.CLONE_NEWIPC, "IPC", note)
  mount_ns = not any(n.startswith("no mount namespace") for n in cfg["notes"])
  return pid_ns, mount_ns and iso.unshare(iso.CLONE_NEWNS, "mount", note)


def _prepare_dir(req, uid, pid_ns: bool, mount_ns: bool, report) -> bool:
  """The run's directory (a private tmpfs, else the host directory handed to the uid);
  returns whether the program should mount a /proc of its own."""
  workdir, gid = req["workdir"], uid if uid != os.getuid() else os.getgid()
  if mount_ns:
    try:
      iso.private_dir(workdir, uid, gid, req["limits"]["tmpfs_bytes"])
    except OSError as e:
      report(note=f"no private directory: {e}")
      mount_ns = False
  if not mount_ns:
    os.chown(workdir, uid, gid)
    os.chmod(workdir, 0o700)
  return pid_ns and mount_ns


def _run_program(req, cfg, uid, chan_w, stat_w, fresh_proc: bool) -> None:
  """The program's process: isolate, limit, drop privileges, compile, run the program."""
  try:
    # A session and process group of its own: a program of our uid could otherwise signal
    # the run process through its group (so, as in a job a shell started, setsid() fails).
    os.setsid()
    workdir = req["workdir"]
    if fresh_proc:  # PID 1 of the new namespace mounts a /proc showing only that namespace
      iso.mount_proc()
    os.close(stat_w)  # the program must not be able to forge its own exit status
    os.dup2(chan_w, CHANNEL_FD)
    os.closerange(CHANNEL_FD + 1, 1 << 16)
    os.chdir(workdir)
    iso.set_limits(req["limits"], _nproc(cfg, req["limits"]))
    if uid != os.getuid():
      iso.drop_to_uid(uid)
    elif cfg["mode"] == "userns":
      iso.drop_capabilities()
    else:
      iso.prctl(iso.PR_SET_NO_NEW_PRIVS, 1)
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


def _nproc(cfg, lim) -> int:
  """The program's RLIMIT_NPROC. It counts the processes of its real uid in its user
  namespace: as root the slot's uid (the program's alone); in "userns" its namespace's (its
  run process too); in "processes" all of this user's (those at the start, plus the budget)."""
  if cfg["mode"] == "userns":
    return lim["nproc"] + 1
  if os.getuid() != 0:
    return cfg["nproc_base"] + cfg["nproc_total"]
  return lim["nproc"]


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
  main()
  sys.exit(0)
