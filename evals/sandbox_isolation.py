"""Linux isolation primitives of the code sandbox's fork server: namespaces, mounts, resource
limits and uid drops, through ctypes (Python 3.11 has no `os.unshare` and no `mount`).

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

libc = ctypes.CDLL(None, use_errno=True)


def unshare(flag: int, what: str, note) -> bool:
  """Enter a new namespace of kind `flag`; on refusal, `note` says why and returns False."""
  if libc.unshare(ctypes.c_int(flag)) == 0:
    return True
  note(f"no {what} namespace: {os.strerror(ctypes.get_errno())}")
  return False


def prctl(option: int, value: int) -> None:
  if libc.prctl(option, value, 0, 0, 0) != 0:
    err = ctypes.get_errno()
    raise OSError(err, f"prctl({option}): {os.strerror(err)}")


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


def expose(paths: list[str]) -> None:
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
    mount("tmpfs", anc, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=0755")
    for path, fd in fds:
      os.makedirs(path, mode=0o755, exist_ok=True)
      mount(f"/proc/self/fd/{fd}", path, None, MS_BIND | MS_REC)
      os.close(fd)


def read_only_mounts(note) -> None:
  """Remount every mount read-only, keeping its other flags (a user namespace may not drop
  them); `note` names the ones the OS refused."""
  with open("/proc/self/mountinfo") as f:
    mounts = [line.split() for line in f]
  for fields in mounts:
    target = unescape(fields[4])
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


def private_dir(workdir: str, uid: int, size: int) -> None:
  """A private size-limited tmpfs on `workdir`, holding copies of its files, owned by `uid`."""
  files = {}
  for name in os.listdir(workdir):
    with open(os.path.join(workdir, name), "rb") as f:
      files[name] = f.read()
  mount(
    "tmpfs", workdir, "tmpfs", MS_NOSUID | MS_NODEV, f"size={size},mode=0700,uid={uid},gid={uid}"
  )
  for name, data in files.items():
    with open(os.path.join(workdir, name), "wb") as f:
      f.write(data)


def set_limits(lim: dict) -> None:
  """The run's rlimits (a `Limits` as a dict): CPU (soft, then SIGKILL a second later), address
  space, processes, file size, open files, no core dumps."""
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


def drop_to_uid(uid: int) -> None:
  """Become `uid` = gid, without supplementary groups and for good (no new privileges)."""
  os.setgroups([])
  os.setresgid(uid, uid, uid)
  os.setresuid(uid, uid, uid)
  prctl(PR_SET_NO_NEW_PRIVS, 1)


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
