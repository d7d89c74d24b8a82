"""The code sandbox (evals/sandbox*.py): isolation, limits, and hostile programs contained, in
each isolation: "root" (this test process, root), "userns" (an ordinary user with a process
limit, where the kernel allows user namespaces) and "processes" (the same user where the kernel
refuses them: the automatic fallback, which contains less, see ISOLATED).

Every hostile program must end as a failure with a reason, within a time bound, leaving no
process behind and nothing changed outside its directory, while the evaluator survives.
"""

import os
import pathlib
import shutil
import socket
import subprocess
import tempfile
import time

import pytest
from sandbox_users import OrdinaryUser, UserSandbox

from evals.sandbox import DEFAULT_UID_BASE, Limits, Sandbox

WALL = 3.0
ISOLATED = ["root", "userns"]  # what "processes" does not contain: network, files, signals
ALL = [*ISOLATED, "processes"]
BOMB = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"


@pytest.fixture(scope="module", autouse=True)
def needs_root():
  if os.geteuid() != 0:
    pytest.fail("the sandbox tests need root: they drop uids and create an ordinary user")


def sandbox_pids(uids) -> list[int]:
  """Processes owned by the sandbox's uids (there must be none once a run is over)."""
  pids = []
  for entry in pathlib.Path("/proc").iterdir():
    try:
      uid_line = next(
        line for line in (entry / "status").read_text().splitlines() if line.startswith("Uid:")
      )
    except (OSError, StopIteration):
      continue
    if int(uid_line.split()[1]) in uids:
      pids.append(int(entry.name))
  return pids


class RootSandbox:
  """A `Sandbox` in this (root) process, with the interface of `UserSandbox`."""

  home = "/root"

  def __init__(self, **kwargs):
    self.sb = Sandbox(**kwargs)
    self.uids, self.isolation = self.sb.uids, self.sb.isolation
    self._dirs = []

  def run(self, files, main="main.py", limits=None):
    return self.sb.run(files, main, limits)

  def run_parallel(self, programs: list[str], limits) -> list:
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(len(programs)) as pool:
      return list(pool.map(lambda p: self.run({"main.py": p}, limits=limits), programs))

  def leftovers(self) -> list[int]:
    return sandbox_pids(self.uids)

  def outside_dir(self, tmp_path) -> str:
    """A directory the programs' uids could write to, were it not for the sandbox."""
    path = tempfile.mkdtemp(dir="/tmp")
    os.chmod(path, 0o777)
    self._dirs.append(path)
    return path

  def bystander(self) -> int:
    self._bystander = subprocess.Popen(["sleep", "60"])  # a root process of ours
    return self._bystander.pid

  def alive(self) -> bool:
    return True  # this very process

  def close(self) -> None:
    self.sb.close()
    for path in self._dirs:
      shutil.rmtree(path, ignore_errors=True)
    if hasattr(self, "_bystander"):
      self._bystander.kill()
      self._bystander.wait()


@pytest.fixture(scope="module")
def user():
  with OrdinaryUser() as u:
    yield u
    assert u.tasks() == {}, "a process of the ordinary user outlived its tests"


@pytest.fixture(scope="module")
def sandbox(request, user):
  mode = request.param
  if mode == "root":
    sb = RootSandbox(workers=2, limits=Limits(wall_s=WALL))
  else:  # "processes": what "auto" falls back to where user namespaces are refused
    sb = UserSandbox(user, limits=Limits(wall_s=WALL), user_namespaces=mode == "userns")
  assert sb.isolation == mode
  yield sb
  sb.close()


def run(sandbox, program: str, wall_s: float = WALL, alone: bool = True, **limits):
  start = time.monotonic()
  res = sandbox.run({"main.py": program}, limits=Limits(wall_s=wall_s, **limits))
  assert time.monotonic() - start < wall_s + 3, "the run outlived its wall-clock limit"
  if alone:  # no other run in flight: nothing of the programs may be left
    assert sandbox.leftovers() == [], "a sandboxed process outlived its run"
  return res


@pytest.mark.parametrize("sandbox", ISOLATED, indirect=True)
def test_isolation_of_a_plain_run(sandbox):
  res = run(
    sandbox,
    """
import os, resource, socket
print(os.getuid(), os.getgid(), os.getgroups())
print(sorted(p for p in os.listdir("/proc") if p.isdigit()))
print(os.environ["HOME"] == os.getcwd(), sorted(os.environ))
print(resource.getrlimit(resource.RLIMIT_NPROC)[0])
try:
    os.setuid(0)
except OSError:
    print("no root")
print([line.split()[1] for line in open("/proc/self/status") if line.startswith("CapEff")])
os.write(3, b"result")
""",
  )
  assert res.status == "pass", res.reason
  assert res.notes == ()
  uid, procs, env, nproc, root, caps = res.stdout.decode().splitlines()
  assert int(uid.split()[0]) in sandbox.uids and uid.endswith("[]")
  assert procs == "['1']"  # its own PID namespace, nothing else visible
  assert env == "True ['HOME', 'LANG', 'OMP_NUM_THREADS', 'PATH', 'TMPDIR']"
  # In a user namespace the run process counts towards the namespace's processes too.
  assert int(nproc) == Limits().nproc + (sandbox.isolation == "userns")
  assert root == "no root"
  assert caps == "['0000000000000000']"
  assert res.channel == b"result"


@pytest.mark.parametrize("sandbox", ALL, indirect=True)
def test_exit_codes_exceptions_and_signals_have_reasons(sandbox):
  assert run(sandbox, "import sys; sys.exit(3)").reason == "exit code 3"
  res = run(sandbox, "raise ValueError('boom')")
  assert (res.status, res.reason) == ("fail", "exit code 1: ValueError: boom")
  assert "main.py" in res.stderr.decode() and "sandbox_server" not in res.stderr.decode()
  res = run(sandbox, "import ctypes; ctypes.string_at(0)")
  assert res.status == "fail" and res.reason == "killed by signal 11 (SIGSEGV)"


@pytest.mark.parametrize("sandbox", ISOLATED, indirect=True)
def test_bounded_fork_loop_hits_the_process_limit(sandbox):
  res = run(
    sandbox,
    """
import os, time
n = 0
for _ in range(200):
    try:
        pid = os.fork()
    except OSError:
        break
    if pid == 0:
        time.sleep(30)
        os._exit(0)
    n += 1
print(n)
""",
    nproc=16,
  )
  assert res.status == "pass"
  assert int(res.stdout) == 15  # 16 processes of the program in all


@pytest.mark.parametrize("sandbox", ALL, indirect=True)
def test_fork_bomb(sandbox):
  res = run(sandbox, BOMB)
  assert res.status == "timeout" and res.reason == f"timeout after {WALL:g}s"


@pytest.mark.parametrize("sandbox", ["userns", "processes"], indirect=True)
def test_fork_bomb_leaves_the_evaluator_room(sandbox, user):
  """Under the user's `ulimit -u`, a fork bomb in one slot while the other slot runs a
  program that forks, and the evaluator starts threads."""
  out = sandbox.proxy.call("under_fork_bomb", WALL, timeout=WALL + 30)
  assert out["bomb"].status == "timeout"
  assert out["threads"] == 16, "the evaluator could not start its threads"
  assert out["peak_tasks"] <= user.nproc - 16
  if sandbox.isolation == "userns":  # each run has a process count of its own
    assert (out["neighbour"].status, out["neighbour"].stdout) == ("pass", b"7\n")
  assert sandbox.leftovers() == []


@pytest.mark.parametrize("sandbox", ALL, indirect=True)
def test_infinite_loop(sandbox):
  res = run(sandbox, "while True:\n    pass\n")
  assert res.status == "timeout"


@pytest.mark.parametrize("sandbox", ALL, indirect=True)
def test_sleeper_that_left_the_process_group_is_still_stopped(sandbox):
  program = "import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(60)\nos.wait()\n"
  res = run(sandbox, program)
  assert res.status == "timeout"


@pytest.mark.parametrize("sandbox", ALL, indirect=True)
def test_infinite_loop_ignoring_signals_stopped_by_cpu_limit(sandbox):
  res = run(
    sandbox,
    "import signal\nsignal.signal(signal.SIGXCPU, signal.SIG_IGN)\nwhile True:\n    pass\n",
    wall_s=30,
    cpu_s=1,
  )
  assert (res.status, res.reason) == ("fail", "killed by signal 9 (SIGKILL)")  # at 2 cpu s


@pytest.mark.parametrize("sandbox", ALL, indirect=True)
def test_huge_allocation(sandbox):
  res = run(sandbox, "x = bytearray(20 << 30)\n")
  assert res.status == "fail" and res.reason == "exit code 1: MemoryError"


@pytest.mark.parametrize("sandbox", ISOLATED, indirect=True)
def test_writes_stay_inside_the_run_directory(sandbox, tmp_path):
  marker = f"sandbox-probe-{os.getpid()}"
  outside = sandbox.outside_dir(tmp_path)  # writable by the programs' uid, but outside
  places = ["/root", sandbox.home, "/tmp", "/dev/shm", outside]
  res = run(
    sandbox,
    f"""
import os
for path in [*(p + "/{marker}" for p in {places!r}), os.path.expanduser("~/own_file")]:
    try:
        with open(path, "w") as f:
            f.write("x")
        print("wrote", path)
    except OSError as e:
        print("refused", path, e.strerror)
""",
  )
  assert res.status == "pass"
  lines = res.stdout.decode().splitlines()
  assert [line.split()[0] for line in lines] == ["refused"] * len(places) + ["wrote"]
  for where in places:
    assert not os.path.exists(os.path.join(where, marker))


@pytest.mark.parametrize("sandbox", ISOLATED, indirect=True)
def test_deleting_outside_fails(sandbox, tmp_path):
  outside = sandbox.outside_dir(tmp_path)  # even a directory the uid may write to
  canary = os.path.join(outside, "canary.txt")
  with open(canary, "w") as f:
    f.write("alive")
  os.chmod(canary, 0o666)
  res = run(
    sandbox,
    f"""
import os, shutil
for attempt in (lambda: os.remove("{canary}"), lambda: shutil.rmtree("{outside}"),
                lambda: os.rename("{canary}", "/tmp/x"), lambda: open("{canary}", "w")):
    try:
        attempt()
    except OSError as e:
        print(type(e).__name__)
""",
  )
  assert res.status == "pass"
  assert len(res.stdout.decode().split()) == 4
  assert open(canary).read() == "alive"


@pytest.mark.parametrize("sandbox", ISOLATED, indirect=True)
def test_the_evaluators_files_are_out_of_sight(sandbox, user):
  """Where programs run as the evaluator's own uid, its home (keys, caches, expected outputs)
  is hidden, not merely read-only; as root, the programs' uids cannot read it."""
  secret_dir = user.new_dir() if sandbox.isolation == "userns" else tempfile.mkdtemp()
  secret = os.path.join(secret_dir, "secret.txt")
  with open(secret, "w") as f:
    f.write("the expected outputs")
  if sandbox.isolation == "userns":
    os.chown(secret, user.uid, user.uid)  # the programs' own file: only the mount hides it
  try:
    res = run(
      sandbox,
      f"""
try:
    print(open("{secret}").read())
except OSError as e:
    print("unreadable", type(e).__name__)
""",
    )
  finally:
    if sandbox.isolation == "root":
      shutil.rmtree(secret_dir)
  assert res.status == "pass" and res.stdout.startswith(b"unreadable")


@pytest.mark.parametrize("sandbox", ISOLATED, indirect=True)
def test_no_network(sandbox):
  server = socket.socket()
  server.bind(("127.0.0.1", 0))
  server.listen()
  server.settimeout(0.5)
  port = server.getsockname()[1]
  try:
    res = run(
      sandbox,
      f"""
import socket
try:
    socket.create_connection(("127.0.0.1", {port}), timeout=1)
    print("connected")
except OSError as e:
    print("refused", e.errno)
""",
    )
    assert res.status == "pass"
    assert res.stdout.decode().startswith("refused")
    with pytest.raises(socket.timeout):
      server.accept()
  finally:
    server.close()


@pytest.mark.parametrize("sandbox", ISOLATED, indirect=True)
def test_killing_the_parents_fails(sandbox):
  bystander = sandbox.bystander()  # a process of the evaluator's uid, outside the sandbox
  res = run(
    sandbox,
    """
import os, signal
for name, attempt in (("ppid", lambda: os.kill(os.getppid(), 9)),
                      ("group", lambda: os.killpg(os.getpgid(0), 9)),
                      ("all", lambda: os.kill(-1, 9)),
                      ("bystander", lambda: os.kill(BYSTANDER, 9))):
    try:
        attempt()
        print(name, "sent")
    except OSError as e:
        print(name, type(e).__name__)
""".replace("BYSTANDER", str(bystander)),
  )
  assert res.status in ("pass", "fail")
  assert sandbox.alive(), "the evaluator was killed"
  assert os.path.exists(f"/proc/{bystander}"), "a process outside the sandbox was killed"
  assert b"bystander ProcessLookupError" in res.stdout  # not even visible


@pytest.mark.parametrize("sandbox", ALL, indirect=True)
def test_escaped_processes_are_killed(sandbox):
  res = run(
    sandbox,
    """
import os, time
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        time.sleep(60)
    os._exit(0)
print("left a daemon behind")
""",
  )
  assert res.status == "pass"  # run() asserts that no sandbox process survived


@pytest.mark.parametrize("sandbox", ALL, indirect=True)
def test_output_flood_is_capped(sandbox):
  res = run(sandbox, "import os\nwhile True:\n    os.write(1, b'x' * 65536)\n")
  assert res.status == "fail" and res.reason.startswith("output flood")
  assert len(res.stdout) == Limits().output_bytes


@pytest.mark.parametrize("sandbox", ALL, indirect=True)
def test_result_channel_is_capped(sandbox):
  res = run(
    sandbox, "import os\nwhile True:\n    os.write(3, b'x' * 65536)\n", channel_bytes=1 << 20
  )
  assert res.status == "fail" and res.reason.startswith("result channel over")
  assert len(res.channel) == 1 << 20


@pytest.mark.parametrize("sandbox", ALL, indirect=True)
def test_parallel_runs_stay_separate(sandbox):
  program = (
    "import os, time\nopen('mine', 'w').write(str(os.getpid()))\ntime.sleep(0.3)\n"
    "print(sorted(os.listdir('.')), open('mine').read())\n"
  )
  results = sandbox.run_parallel([program] * 4, Limits(wall_s=WALL))
  assert sandbox.leftovers() == []
  assert all(r.status == "pass" for r in results)
  assert {r.stdout.decode().split("]")[0] for r in results} == {"['main.py', 'mine'"}


@pytest.mark.parametrize("sandbox", ["processes"], indirect=True)
def test_processes_isolation_says_what_it_does_not_isolate(sandbox):
  warnings = [line for line in sandbox.proxy.log().splitlines() if "code sandbox" in line]
  assert len(warnings) == 1
  assert "no user namespace here" in warnings[0]
  assert "NOT isolated from the network, from the files this user can read" in warnings[0]
  res = run(sandbox, "print('hello')")
  assert res.status == "pass" and "no PID namespace: isolation 'processes'" in res.notes


@pytest.mark.parametrize("sandbox", ["root"], indirect=True)
def test_sandboxes_never_share_uids(sandbox):
  with Sandbox(workers=2) as other:
    assert not set(other.uids) & set(sandbox.uids)
    assert min(other.uids) >= DEFAULT_UID_BASE


def test_root_without_namespaces_still_drops_uids_and_cleans_up():
  sb = RootSandbox(workers=1, limits=Limits(wall_s=WALL), isolation="processes")
  try:
    res = run(
      sb,
      """
import os, time
if os.fork() == 0:
    os.setsid()
    time.sleep(60)
print(os.getuid())
""",
    )
    assert res.status == "pass"
    assert "no network namespace: isolation 'processes'" in res.notes
    assert int(res.stdout) in sb.uids
    assert run(sb, BOMB).status == "timeout"
  finally:
    sb.close()


def test_a_process_limit_too_tight_is_one_clear_error():
  with OrdinaryUser(nproc=40) as user:
    with pytest.raises(RuntimeError, match=r"ulimit -u 40\) leaves the code sandbox \d+ processes"):
      UserSandbox(user, workers=2)


def test_isolation_choices_are_checked():
  with pytest.raises(ValueError, match="unknown sandbox isolation 'docker'"):
    Sandbox(isolation="docker")
  with pytest.raises(ValueError, match="isolation 'userns' is for ordinary users"):
    Sandbox(isolation="userns")
