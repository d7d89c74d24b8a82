"""The code sandbox (evals/sandbox.py): isolation, limits, and hostile programs contained.

Every hostile program must end as a failure with a reason, within a time bound, leaving no
process behind and nothing changed outside its directory, while this test process survives.
"""

import os
import pathlib
import socket
import subprocess
import time

import pytest

from evals.sandbox import DEFAULT_UID_BASE, Limits, Sandbox

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the sandbox needs root to drop uids")

WALL = 3.0


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


@pytest.fixture(scope="module")
def sandbox():
  with Sandbox(workers=2, limits=Limits(wall_s=WALL)) as sb:
    yield sb


def run(sandbox, program: str, wall_s: float = WALL, alone: bool = True, **limits):
  start = time.monotonic()
  res = sandbox.run({"main.py": program}, limits=Limits(wall_s=wall_s, **limits))
  assert time.monotonic() - start < wall_s + 3, "the run outlived its wall-clock limit"
  if alone:  # no other run in flight: nothing of any sandbox uid may be left
    assert sandbox_pids(sandbox.uids) == [], "a sandboxed process outlived its run"
  return res


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
except PermissionError:
    print("no root")
os.write(3, b"result")
""",
  )
  assert res.status == "pass", res.reason
  assert res.notes == ()
  uid, procs, env, nproc, root = res.stdout.decode().splitlines()
  assert int(uid.split()[0]) in sandbox.uids and uid.endswith("[]")
  assert procs == "['1']"  # its own PID namespace, nothing else visible
  assert env == "True ['HOME', 'LANG', 'OMP_NUM_THREADS', 'PATH', 'TMPDIR']"
  assert int(nproc) == Limits().nproc
  assert root == "no root"
  assert res.channel == b"result"


def test_exit_codes_exceptions_and_signals_have_reasons(sandbox):
  assert run(sandbox, "import sys; sys.exit(3)").reason == "exit code 3"
  res = run(sandbox, "raise ValueError('boom')")
  assert (res.status, res.reason) == ("fail", "exit code 1: ValueError: boom")
  assert "main.py" in res.stderr.decode() and "sandbox.py" not in res.stderr.decode()
  res = run(sandbox, "import ctypes; ctypes.string_at(0)")
  assert res.status == "fail" and res.reason == "killed by signal 11 (SIGSEGV)"


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
  assert int(res.stdout) == 15  # 16 processes of the uid in all


def test_fork_bomb(sandbox):
  res = run(
    sandbox,
    "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n",
  )
  assert res.status == "timeout" and res.reason == f"timeout after {WALL:g}s"


def test_infinite_loop(sandbox):
  res = run(sandbox, "while True:\n    pass\n")
  assert res.status == "timeout"


def test_sleeper_that_left_the_process_group_is_still_stopped(sandbox):
  res = run(sandbox, "import os, time\nos.setsid()\ntime.sleep(60)\n")
  assert res.status == "timeout"


def test_infinite_loop_ignoring_signals_stopped_by_cpu_limit(sandbox):
  res = run(
    sandbox,
    "import signal\nsignal.signal(signal.SIGXCPU, signal.SIG_IGN)\nwhile True:\n    pass\n",
    wall_s=30,
    cpu_s=1,
  )
  assert (res.status, res.reason) == ("fail", "killed by signal 9 (SIGKILL)")  # at 2 cpu s


def test_huge_allocation(sandbox):
  res = run(sandbox, "x = bytearray(20 << 30)\n")
  assert res.status == "fail" and res.reason == "exit code 1: MemoryError"


def test_writes_stay_inside_the_run_directory(sandbox, tmp_path):
  marker = f"sandbox-probe-{os.getpid()}"
  res = run(
    sandbox,
    f"""
import os
for path in ["/root/{marker}", "/tmp/{marker}", "/dev/shm/{marker}", "{tmp_path}/{marker}",
             os.path.expanduser("~/own_file")]:
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
  assert [line.split()[0] for line in lines] == ["refused"] * 4 + ["wrote"]
  for where in ("/root", "/tmp", "/dev/shm", str(tmp_path)):
    assert not os.path.exists(os.path.join(where, marker))


def test_deleting_outside_fails(sandbox, tmp_path):
  canary = tmp_path / "canary.txt"
  canary.write_text("alive")
  os.chmod(tmp_path, 0o777)  # even a world-writable directory is read-only in the sandbox
  res = run(
    sandbox,
    f"""
import os, shutil
for attempt in (lambda: os.remove("{canary}"), lambda: shutil.rmtree("{tmp_path}"),
                lambda: os.rename("{canary}", "/tmp/x"), lambda: open("{canary}", "w")):
    try:
        attempt()
    except OSError as e:
        print(type(e).__name__)
""",
  )
  assert res.status == "pass"
  assert len(res.stdout.decode().split()) == 4
  assert canary.read_text() == "alive"


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


def test_killing_the_parents_fails(sandbox):
  bystander = subprocess.Popen(["sleep", "60"])  # a root process of ours outside the sandbox
  try:
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
""".replace("BYSTANDER", str(bystander.pid)),
    )
    assert res.status in ("pass", "fail")
    assert bystander.poll() is None, "a process outside the sandbox was killed"
    assert b"bystander ProcessLookupError" in res.stdout  # not even visible
  finally:
    bystander.kill()
    bystander.wait()


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


def test_output_flood_is_capped(sandbox):
  res = run(sandbox, "import os\nwhile True:\n    os.write(1, b'x' * 65536)\n")
  assert res.status == "fail" and res.reason.startswith("output flood")
  assert len(res.stdout) == Limits().output_bytes


def test_result_channel_is_capped(sandbox):
  res = run(
    sandbox, "import os\nwhile True:\n    os.write(3, b'x' * 65536)\n", channel_bytes=1 << 20
  )
  assert res.status == "fail" and res.reason.startswith("result channel over")
  assert len(res.channel) == 1 << 20


def test_parallel_runs_stay_separate(sandbox):
  from concurrent.futures import ThreadPoolExecutor

  program = (
    "import os, time\nopen('mine', 'w').write(str(os.getuid()))\ntime.sleep(0.3)\n"
    "print(sorted(os.listdir('.')), open('mine').read())\n"
  )
  with ThreadPoolExecutor(4) as pool:
    results = list(pool.map(lambda _: run(sandbox, program, alone=False), range(4)))
  assert sandbox_pids(sandbox.uids) == []
  assert all(r.status == "pass" for r in results)
  assert {r.stdout.decode().split("]")[0] for r in results} == {"['main.py', 'mine'"}


def test_sandboxes_never_share_uids(sandbox):
  with Sandbox(workers=2) as other:
    assert not set(other.uids) & set(sandbox.uids)
    assert min(other.uids) >= DEFAULT_UID_BASE


def test_fallback_without_namespaces_records_why_and_still_cleans_up():
  with Sandbox(workers=1, limits=Limits(wall_s=WALL), namespaces=False) as sb:
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
    assert "no network namespace: disabled" in res.notes
    assert int(res.stdout) in sb.uids
    res = run(
      sb, "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    )
    assert res.status == "timeout"
