"""Linux isolation primitives of the code sandbox's fork server: namespaces (user namespaces
too), mounts, resource limits, uid and capability drops, through ctypes (Python 3.11 has no
`os.unshare`, `mount` or `capset`).

Imported by `sandbox_server` (a fresh `python -S` that every run is forked from): standard
library only, and only modules the server has loaded anyway, so it costs every fork nothing.
"""

from __future__ import annotations

import ctypes
import math
import os
import resource
import signal

CLONE_NEWNS, CLONE_NEWIPC = 0x00020000, 0x08000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
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
PR_CAPBSET_DROP, PR_SET_SECUREBITS, PR_SET_CHILD_SUBREAPER = 24, 28, 36
PR_SET_NO_NEW_PRIVS, PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 38, 47, 4
SECBIT_NOROOT, SECBIT_NOROOT_LOCKED = 1, 2
_CAPABILITY_VERSION_3 = 0x20080522
# Directories hidden from programs that run as the evaluator's own uid: where this user's
# sockets (ssh-agent, ssh ControlMaster, D-Bus), terminals, shared memory and temporary files
# live (a read-only mount still lets one connect to a socket or write to a terminal).
PRIVATE_DIRS = ("/tmp", "/var/tmp", "/dev/shm", "/dev/pts", "/run", "/var/run", "/run/user")

libc = ctypes.CDLL(None, use_errno=True)


def unshare(flag: int, what: str, note=None) -> bool:
  """Enter a new namespace of kind `flag`; on refusal, `note` says why and returns False
  (without `note`: raises OSError)."""
  if libc.unshare(ctypes.c_int(flag)) == 0:
    return True
  why = f"no {what} namespace: {os.strerror(ctypes.get_errno())}"
  if note is None:
    raise OSError(why)
  note(why)
  return False


def prctl(option: int, value: int) -> None:
  if libc.prctl(option, ctypes.c_ulong(value), 0, 0, 0) != 0:
    err = ctypes.get_errno()
    raise OSError(err, f"prctl({option}): {os.strerror(err)}")


def enter_user_namespace() -> None:
  """A new user namespace where this process keeps its uid and gid (mapped onto themselves, the
  only mapping an unprivileged process may write) and holds every capability, over namespaces
  it creates from now on only. Needs a writable /proc."""
  uid, gid = os.getuid(), os.getgid()
  if libc.unshare(ctypes.c_int(CLONE_NEWUSER)) != 0:
    err = ctypes.get_errno()
    raise OSError(err, f"no user namespace: {os.strerror(err)}")
  for name, text in (
    ("setgroups", "deny"),
    ("uid_map", f"{uid} {uid} 1"),
    ("gid_map", f"{gid} {gid} 1"),
  ):
    with open(f"/proc/self/{name}", "w") as f:
      f.write(text)


def mount(source, target, fstype, flags, data=None) -> None:
  enc = lambda s: None if s is None else s.encode()
  if libc.mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)) != 0:
    err = ctypes.get_errno()
    raise OSError(err, os.strerror(err), target)


def mount_proc(data=None) -> None:
  """A /proc for the current PID namespace (with `data` options, e.g. hidepid=2)."""
  mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, data)


def make_mounts_private() -> None:
  """Nothing mounted in this mount namespace propagates to the host, nor back."""
  mount(None, "/", None, MS_REC | MS_PRIVATE)


def closed_ancestors(paths: list[str]) -> list[str]:
  """The first ancestor of each path that is closed to others (no o+x, e.g. /root holding
  pyenv): hidden from programs that run as another uid, with the paths bound back."""
  closed = set()
  for path in paths:
    parts = path.strip("/").split("/")
    for i in range(1, len(parts)):
      anc = "/" + "/".join(parts[:i])
      if not os.stat(anc).st_mode & 0o001:
        closed.add(anc)
        break
  return sorted(closed)


def hide(dirs: list[str], keep: list[str]) -> None:
  """Cover each directory of `dirs` with an empty tmpfs, binding back the directories of `keep`
  that lie under it (e.g. the Python installation under a hidden home). Shallow ones first, so
  a hidden directory inside a kept one is covered after the kept one is back."""
  for d in sorted(set(dirs), key=lambda p: p.count("/")):
    if not os.path.isdir(d) or os.path.islink(d):
      continue  # absent, a symlink to another entry, or already out of sight under another one
    back = [k for k in keep if k != d and k.startswith(d.rstrip("/") + "/") and os.path.isdir(k)]
    fds = [(k, os.open(k, os.O_PATH | os.O_DIRECTORY)) for k in back]
    mount("tmpfs", d, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=0755")
    for path, fd in fds:
      os.makedirs(path, mode=0o755, exist_ok=True)
      mount(f"/proc/self/fd/{fd}", path, None, MS_BIND | MS_REC)
      os.close(fd)


def read_only_mounts(note, skip: tuple[str, ...] = ()) -> None:
  """Remount every mount read-only, keeping its other flags (a user namespace may not drop
  them), except the mount points in `skip`; `note` names the ones the OS refused."""
  with open("/proc/self/mountinfo") as f:
    mounts = [line.split() for line in f]
  for fields in mounts:
    target = unescape(fields[4])
    if target in skip:
      continue
    flags = MS_BIND | MS_REMOUNT | MS_RDONLY
    for opt in fields[5].split(","):
      flags |= _MOUNT_OPTS.get(opt, 0)
    try:
      mount(None, target, None, flags)
    except OSError as e:
      if e.errno != 2:  # a mount hidden under another one is unreachable anyway
        note(f"not read-only: {target}: {e.strerror}")


def unescape(path: str) -> str:
  """mountinfo writes space, tab, newline and backslash as octal escapes (\\040 ...)."""
  parts = path.split("\\")
  return parts[0] + "".join(chr(int(p[:3], 8)) + p[3:] for p in parts[1:])


def private_dir(workdir: str, uid: int, gid: int, size: int) -> None:
  """Make `workdir` private: a size-limited tmpfs over its parent (the folder of all runs'
  directories, so other runs' files are out of sight too) holding `workdir` (owned by
  `uid`:`gid`) and copies of its files."""
  files = {}
  for name in os.listdir(workdir):
    with open(os.path.join(workdir, name), "rb") as f:
      files[name] = f.read()
  parent = os.path.dirname(workdir)
  mount("tmpfs", parent, "tmpfs", MS_NOSUID | MS_NODEV, f"size={size},mode=0755")
  os.mkdir(workdir, 0o700)
  for name, data in files.items():
    with open(os.path.join(workdir, name), "wb") as f:
      f.write(data)
  if (uid, gid) != (os.getuid(), os.getgid()):
    os.chown(workdir, uid, gid)  # its files stay ours: readable, not writable


def set_limits(lim: dict, nproc: int) -> None:
  """The run's rlimits (a `Limits` as a dict): CPU (soft, then SIGKILL a second later), address
  space, `nproc` processes, file size, open files, no core dumps. Soft and hard, so that the
  program cannot raise them; never above the hard limits we have (only root may raise those)."""
  cpu = math.ceil(lim["cpu_s"] if lim["cpu_s"] is not None else lim["wall_s"] + 1)
  for which, soft, hard in (
    (resource.RLIMIT_CPU, cpu, cpu + 1),
    (resource.RLIMIT_AS, lim["memory_bytes"], None),
    (resource.RLIMIT_DATA, lim["memory_bytes"], None),
    (resource.RLIMIT_NPROC, nproc, None),
    (resource.RLIMIT_FSIZE, lim["file_bytes"], None),
    (resource.RLIMIT_NOFILE, lim["open_files"], None),
    (resource.RLIMIT_CORE, 0, None),
  ):
    hard = soft if hard is None else hard
    _, ours = resource.getrlimit(which)
    if os.geteuid() != 0 and ours != resource.RLIM_INFINITY:
      soft, hard = min(soft, ours), min(hard, ours)
    resource.setrlimit(which, (soft, hard))


def set_soft_nproc(n: int) -> None:
  """RLIMIT_NPROC's soft limit (a user namespace created now caps its creator's uid's count at
  it, across all its processes: see `sandbox_server`)."""
  _, hard = resource.getrlimit(resource.RLIMIT_NPROC)
  resource.setrlimit(
    resource.RLIMIT_NPROC, (n if hard == resource.RLIM_INFINITY else min(n, hard), hard)
  )


def drop_to_uid(uid: int) -> None:
  """Become `uid` = gid, without supplementary groups and for good (no new privileges)."""
  os.setgroups([])
  os.setresgid(uid, uid, uid)
  os.setresuid(uid, uid, uid)
  prctl(PR_SET_NO_NEW_PRIVS, 1)


class _CapHeader(ctypes.Structure):
  _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
  _fields_ = [(name, ctypes.c_uint32) for name in ("effective", "permitted", "inheritable")]


def drop_capabilities() -> None:
  """Give up every capability for good: the bounding and ambient sets (nothing comes back on
  exec, not even as uid 0), root's exec rule (securebits), then the effective, permitted and
  inheritable sets; and no new privileges."""
  prctl(PR_SET_SECUREBITS, SECBIT_NOROOT | SECBIT_NOROOT_LOCKED)
  for cap in range(64):
    if libc.prctl(PR_CAPBSET_DROP, ctypes.c_ulong(cap), 0, 0, 0) != 0:
      if ctypes.get_errno() == 22:  # EINVAL: past the kernel's last capability
        break
      raise OSError(ctypes.get_errno(), f"cannot drop capability {cap}")
  prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)
  data = (_CapData * 2)()
  if libc.capset(ctypes.byref(_CapHeader(_CAPABILITY_VERSION_3, 0)), data) != 0:
    raise OSError(ctypes.get_errno(), "capset failed")
  prctl(PR_SET_NO_NEW_PRIVS, 1)


def user_tasks(uid: int) -> dict[int, tuple[int, int]]:
  """pid -> (parent pid, threads) of every process whose real uid is `uid` (from each
  /proc/<pid>/status: readable even where the process made itself non-dumpable)."""
  out = {}
  for entry in os.listdir("/proc"):
    if not entry.isdigit():
      continue
    try:
      with open(f"/proc/{entry}/status") as f:
        fields = dict(line.split(":", 1) for line in f if line[:4] in ("PPid", "Uid:", "Thre"))
    except (OSError, ValueError):
      continue  # gone meanwhile
    if len(fields) == 3 and int(fields["Uid"].split()[0]) == uid:
      out[int(entry)] = (int(fields["PPid"]), int(fields["Threads"]))
  return out


def kill_descendants(root: int, spare: set[int]) -> int:
  """SIGKILL every descendant of `root` except those in `spare` and what runs under them;
  returns how many were signalled. One pass: processes forked meanwhile are caught by the next
  one (a process with a pending SIGKILL cannot fork)."""
  children: dict[int, list[int]] = {}
  for pid, (ppid, _) in user_tasks(os.getuid()).items():
    children.setdefault(ppid, []).append(pid)
  doomed, todo = [], [c for c in children.get(root, ()) if c not in spare]
  while todo:
    pid = todo.pop()
    doomed.append(pid)
    todo.extend(c for c in children.get(pid, ()) if c not in spare)
  for pid in doomed:
    try:
      os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
      pass
  return len(doomed)


def kill_uid(uid: int) -> None:
  """Become `uid` and SIGKILL every other process of it (atomic against fork bombs: a process
  with a pending SIGKILL cannot fork). Call it in a throw-away child."""
  os.setgroups([])
  os.setresgid(uid, uid, uid)
  os.setresuid(uid, uid, uid)
  try:
    os.kill(-1, signal.SIGKILL)
  except ProcessLookupError:
    pass


def become_user(uid: int, nproc: int, visible: list[str]) -> None:
  """For tests and benchmarks run as root: become the ordinary user `uid` (gid = uid, no
  groups) with `nproc` as its RLIMIT_NPROC (soft and hard), in a mount namespace of its own
  where the directories `visible` (the Python installation, a checkout) are reachable although
  they sit under a directory closed to others (e.g. pyenv under /root). Call it in a child that
  then execs (e.g. as a subprocess's preexec_fn)."""
  unshare(CLONE_NEWNS, "mount")
  make_mounts_private()
  real = sorted({os.path.realpath(p) for p in visible})
  hide(closed_ancestors(real), real)
  resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))
  drop_to_uid(uid)
