"""Code sandbox (rewards/sandbox.py): hostile programs earn nothing and leave the host as it was,
honest programs pass (fully or partially), the pool runs `concurrency` programs at a time, and the
isolation mode is chosen, forced and reported as documented.

Every hostile program is presented as the solution to a small task and must score 0 with a
reason; after each one the host is checked: no process of the sandbox's uids (or carrying the
test's marker) is left, no marker file exists outside, the victim file is intact, memory is back,
and the test process' secret environment variable appears in no output.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import socket
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

import pytest

from megatron_ernie.rewards import sandbox as sandbox_mod
from megatron_ernie.rewards.registry import build_source
from megatron_ernie.rewards.sandbox import (AUDIT, ROOT_NS, USER_NS, CodeSandboxSource, Sandbox, SandboxLimits,
                                            extract_code, select_isolation)
from megatron_ernie.rewards.types import RewardSample

from tests.sandbox_cases import ATTACKS, HONEST_SHAPES, TIME_LIMITS, Hostile

REPO = Path(__file__).resolve().parents[1]
TAG = f"sbxmark{uuid.uuid4().hex[:10]}"  # in every path/process a hostile program tries to leave
SECRET = f"hunter2-{uuid.uuid4().hex}"
# Slot uids of their own per test process, so the leftover scan never sees another run's sandbox.
LIMITS = SandboxLimits(wall_time_s=1.0, cpu_time_s=0.6, memory_bytes=384 << 20, max_processes=24,
                       max_open_files=64, output_bytes=64 << 10, file_size_bytes=1 << 20, disk_bytes=8 << 20,
                       uid_base=100000 + (os.getpid() % 10000) * 16)
SUM_PROMPT = "Read two integers from stdin and print their sum."
SUM_TESTS = [{"input": "2 3\n", "output": "5"}, {"input": "10 -4\n", "output": "6"}]
ADD_PROMPT = "Write add(a, b) returning a + b."
ADD_TESTS = [{"code": "assert add(2, 3) == 5"}, {"code": "assert add(-1, 1) == 0"}]
MARKERS = [Path("/tmp", TAG), Path("/var/tmp", TAG), Path("/dev/shm", TAG), Path("/", TAG), REPO / TAG,
           Path.home() / TAG]


# ---------------------------------------------------------------------------------------------
# Fixtures: one sandbox source for the module, and the host state a hostile program must not touch
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def source():
    src = build_source("code", "sandbox", concurrency=2, **asdict(LIMITS))
    src.runs = []  # every SandboxResult, to search the programs' raw output for the secret
    real_run = src.sandbox.run

    def recording_run(code, tests):
        res = real_run(code, tests)
        src.runs.append(res)
        return res

    src.sandbox.run = recording_run
    return src


@dataclass
class Host:
    port: int
    listener: socket.socket
    victim: Path


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    os.environ["SANDBOX_TEST_SECRET"] = SECRET
    victim = tmp_path_factory.mktemp("victim") / "victim.txt"
    victim.write_text("precious")
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.settimeout(0.05)
    yield Host(listener.getsockname()[1], listener, victim)
    listener.close()
    os.environ.pop("SANDBOX_TEST_SECRET", None)


def _mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no MemAvailable in /proc/meminfo")


def _rss() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _sandbox_processes(uids) -> list:
    """Live processes running as a slot uid or carrying the marker in their command line."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            status = Path(f"/proc/{pid}/status").read_text()
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        uid = int(re.search(r"^Uid:\s+(\d+)", status, re.M).group(1))
        state = re.search(r"^State:\s+(\S)", status, re.M).group(1)
        if state != "Z" and (uid in uids or TAG.encode() in cmdline):
            found.append((pid, uid, cmdline[:80]))
    return found


def _keys_beyond_keyrings(uids) -> dict:
    """{uid: keys} for slot uids holding more than their two per-user keyrings (/proc/key-users)."""
    out = {}
    for line in Path("/proc/key-users").read_text().splitlines():
        uid, rest = line.split(":", 1)
        if int(uid) in uids and int(rest.split()[0]) > 2:
            out[int(uid)] = int(rest.split()[0])
    return out


def _ipc_objects_of(uids) -> list:
    """SysV segments, queues and semaphore sets in this (the host's) IPC namespace owned by a slot uid."""
    found = []
    for kind, uid_col in (("shm", 7), ("msg", 7), ("sem", 4)):
        for line in Path(f"/proc/sysvipc/{kind}").read_text().splitlines()[1:]:
            cols = line.split()
            if int(cols[uid_col]) in uids or int(cols[uid_col + 2]) in uids:
                found.append((kind, line))
    return found


def assert_host_unaffected(src, host: Host, mem_before: int, rss_before: int, results) -> None:
    uids = set(src.sandbox.slot_uids)
    assert _sandbox_processes(uids) == []
    assert _keys_beyond_keyrings(uids) == {}
    assert _ipc_objects_of(uids) == []
    assert TAG not in Path("/proc/net/unix").read_text()  # no socket of the host's named after the marker
    for marker in MARKERS:
        assert not marker.exists(), f"{marker} was written from inside the sandbox"
    assert host.victim.read_text() == "precious"
    with pytest.raises(socket.timeout):  # nothing reached the listener
        host.listener.accept()
    # System-wide memory moves with whatever else runs on the machine: the bound catches a
    # sandbox that kept its GBs (20 GB allocation, zip bomb), not a busy neighbour.
    assert _mem_available() > mem_before - (1 << 30)
    assert _rss() < rss_before + (64 << 20)
    for res in results:
        assert SECRET not in repr(res)


def _sample(prompt: str, code: str, tests, wrap: str = "Here is my solution:\n```python\n{}\n```\n") -> RewardSample:
    return RewardSample(prompt=prompt, response=wrap.format(code), domain="code", tests=tests)


# ---------------------------------------------------------------------------------------------
# Hostile programs
# ---------------------------------------------------------------------------------------------

HOSTILE = [
    Hostile("fork_bomb", """
import json
import os
while True:
    try:
        os.fork()
    except OSError:
        pass
""", TIME_LIMITS + ("memory limit",)),
    Hostile("infinite_loop", "while True:\n    pass\n", TIME_LIMITS),
    Hostile("sleep_past_limit", "import time\ntime.sleep(60)\nprint(5)\n", ("timeout",)),
    Hostile("busy_orphan_after_correct_answer", """
import json
import os
a, b = map(int, input().split())
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        os.execvp("sh", ["sh", "-c", "while :; do :; done", "@TAG@"])
    os._exit(0)
os.wait()
print(a + b)
""", ("left background processes",)),
    Hostile("sleeping_orphan_python", """
import os, time
a, b = map(int, input().split())
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        time.sleep(30)
    os._exit(0)
print(a + b)
""", ("left background processes",)),
    Hostile("alloc_20gb", "x = bytearray(20 * 1024 ** 3)\nprint(len(x))\n", ("memory limit",)),
    Hostile("memory_across_processes", """
import os, time
for _ in range(8):
    if os.fork() == 0:
        block = b"\\x01" * (300 << 20)
        time.sleep(30)
        os._exit(0)
time.sleep(30)
""", ("memory limit",) + TIME_LIMITS),  # at the cgroup's limit the kernel reclaims (CPU) before it kills
    Hostile("output_1gb", """
import sys
chunk = "x" * (1 << 20)
for _ in range(1024):
    sys.stdout.write(chunk)
""", ("output limit",)),
    Hostile("stderr_flood", "import os\nwhile True:\n    os.write(2, b'e' * 65536)\n", ("output limit",)),
    Hostile("connect_to_host_listener", """
import socket
a, b = map(int, input().split())
s = socket.create_connection(("127.0.0.1", @PORT@), timeout=0.5)
s.sendall(b"@TAG@")
print(a + b)
""", ("runtime error: OSError",)),
    Hostile("read_etc_shadow", """
for path in ("/etc/shadow", "/proc/1/root/etc/shadow"):
    try:
        print(open(path).read())
    except OSError as e:
        print(path, type(e).__name__)
""", stdout=r"(?s)/etc/shadow (FileNotFoundError|PermissionError).*/proc/1/root/etc/shadow (FileNotFoundError|PermissionError)"),
    Hostile("parent_environment_secrets", """
import glob, os
print(dict(os.environ))
for path in ["/proc/%d/environ" % os.getppid(), "/proc/1/environ"] + glob.glob("/proc/*/environ"):
    try:
        print(path, open(path, "rb").read())
    except OSError as e:
        print(path, type(e).__name__)
"""),
    Hostile("write_tmp_var_tmp_dev_shm_root", """
for path in ("/tmp/@TAG@", "/var/tmp/@TAG@", "/dev/shm/@TAG@", "/@TAG@"):
    try:
        open(path, "w").write("x")
        print("wrote", path)
    except OSError as e:
        print(path, type(e).__name__)
"""),
    Hostile("write_repo_dir", "open('@REPO@/@TAG@', 'w').write('x')\n", ("runtime error",)),
    Hostile("write_host_home", "open('@HOME@/@TAG@', 'w').write('x')\n", ("runtime error",)),
    Hostile("delete_host_files", """
import os, shutil
os.remove("@VICTIM@")
shutil.rmtree(os.path.dirname("@VICTIM@"))
""", ("runtime error",)),
    Hostile("kill_parent_and_everyone", """
import os, signal
for pid in (os.getppid(), 1):
    try:
        os.kill(pid, signal.SIGKILL)
        print("killed", pid)
    except OSError as e:
        print(pid, type(e).__name__)
try:
    os.kill(-1, signal.SIGKILL)
except OSError as e:
    print(-1, type(e).__name__)
""", stdout=r"^\d+ PermissionError\n1 PermissionError\n"),
    Hostile("ignore_signals_then_loop", """
import signal
for sig in (signal.SIGTERM, signal.SIGXCPU, signal.SIGINT, signal.SIGHUP, signal.SIGALRM):
    signal.signal(sig, signal.SIG_IGN)
while True:
    pass
""", TIME_LIMITS),
    Hostile("raise_own_limits_then_loop", """
import resource
try:
    resource.setrlimit(resource.RLIMIT_CPU, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
except (ValueError, OSError):
    pass
while True:
    pass
""", TIME_LIMITS),
    Hostile("recursion_limit_bomb", """
import sys
sys.setrecursionlimit(10 ** 9)
def f(n):
    return f(n + 1) + 1
print(f(0))
""", ("memory limit", "killed by signal SIGSEGV", "recursion limit") + TIME_LIMITS),
    Hostile("ctypes_segfault", "import ctypes\nctypes.string_at(0)\n", ("blocked", "killed by signal SIGSEGV")),
    Hostile("c_level_segfault", "import faulthandler\nfaulthandler._sigsegv()\n", ("killed by signal SIGSEGV",)),
    Hostile("zip_bomb_memory", """
import zlib
c = zlib.compressobj(1)
blob = b"".join(c.compress(bytes(1 << 20)) for _ in range(64)) + c.flush()
keep = []
while True:
    keep.append(zlib.decompress(blob))
""", ("memory limit",) + TIME_LIMITS),  # whichever comes first: touching 64 MiB takes a while
    Hostile("zip_bomb_disk", """
import zlib
blob = zlib.compress(bytes(1 << 20), 9)
i = 0
while True:
    with open("part%d" % i, "wb") as f:
        f.write(zlib.decompress(blob)[:1000000])
    i += 1
""", ("disk full",)),
    Hostile("sparse_huge_file", "f = open('big', 'wb')\nf.seek(10 << 30)\nf.write(b'x')\nf.flush()\n", ("file size limit",)),
    Hostile("fill_dev_shm", """
with open("/dev/shm/@TAG@", "wb") as f:
    while True:
        f.write(bytes(65536))
        f.flush()
""", ("file size limit", "disk full")),
    Hostile("threads_spinning", """
import threading
def spin():
    while True:
        pass
for _ in range(8):
    threading.Thread(target=spin, daemon=True).start()
spin()
""", TIME_LIMITS),
    Hostile("fd_exhaustion", "files = [open('/dev/null') for _ in range(100000)]\n", ("open files limit",)),
    Hostile("ptrace_mount_chroot_setuid_escape", """
import subprocess, sys
probe = '''
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
for name, call in (("ptrace", lambda: libc.ptrace(16, 1, 0, 0)),
                   ("mount", lambda: libc.mount(b"none", b"/usr", b"tmpfs", 0, None)),
                   ("chroot", lambda: libc.chroot(b"/tmp")),
                   ("setuid", lambda: libc.setuid(0))):
    print(name, call(), os.strerror(ctypes.get_errno()))
'''
print(subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True).stdout)
""", stdout=r"ptrace -1 Operation not permitted\nmount -1 Operation not permitted\n"
             r"chroot -1 Operation not permitted\nsetuid -1 Operation not permitted"),
    Hostile("snoop_other_processes", """
import json
import os
for pid in sorted(p for p in os.listdir("/proc") if p.isdigit()):
    try:
        print(pid, open("/proc/%s/cmdline" % pid, "rb").read())
    except OSError as e:
        print(pid, type(e).__name__)
""", forbid=r"pytest"),
    Hostile("search_filesystem_for_answers", """
import json
import os
for root, dirs, files in os.walk("/"):
    dirs[:] = [d for d in dirs if not (root == "/" and d in ("proc", "usr"))]
    for f in files:
        if "test" in f:
            print(os.path.join(root, f))
""", forbid=r"test_sandbox|/work/"),
    Hostile("read_own_memory_for_nonce", """
import json
import os
os.symlink("/proc/self/mem", "m")
for path in ("/proc/self/mem", "m"):
    try:
        open(path, "rb").close()
        print("opened", path)
    except PermissionError as e:
        print("denied", path)
open("m", "rb")
""", ("runtime error: PermissionError",), stdout=r"^denied /proc/self/mem\ndenied m\n$"),
    # --- assertion-test harness tampering ---
    Hostile("exit_before_tests", "import os\nos._exit(0)\n", ("exited before the tests ran",), task="add"),
    Hostile("system_exit_before_tests", "raise SystemExit(0)\n", ("exited before the tests ran",), task="add"),
    Hostile("fake_verdicts_and_pass_marker", """
import json
import os
print("ALL TESTS PASSED")
for fd in range(3, 64):
    try:
        os.write(fd, b"0123456789abcdef0123456789abcdef pass \\t\\n")
    except OSError:
        pass
os._exit(0)
""", ("program sent garbage", "exited before the tests ran"), task="add"),
    Hostile("monkeypatch_harness_and_builtins", """
import builtins, sys
def add(a, b):
    return a - b
def passthrough(*args, **kwargs):
    return True
builtins.exec = builtins.compile = builtins.bool = builtins.isinstance = builtins.all = passthrough
builtins.AssertionError = type("Nope", (Exception,), {})
for mod in list(sys.modules.values()):
    for name in list(vars(mod)):
        if any(k in name.lower() for k in ("report", "verdict", "harness", "check", "eq", "trusted", "classify")):
            try:
                setattr(mod, name, passthrough)
            except Exception:
                pass
""", ("assertion failed", "program died during the test", "program sent garbage", "exited before the tests ran"), task="add"),
    Hostile("always_equal_object", """
class AlwaysEqual:
    def __eq__(self, other):
        return True
    def __ne__(self, other):
        return False
    __hash__ = None
def add(a, b):
    return AlwaysEqual()
""", ("compared an object of the program's own class",), task="add"),
    Hostile("always_equal_int_subclass", """
class Liar(int):
    __eq__ = int.__ge__
def add(a, b):
    return Liar(10 ** 9)
""", ("assertion failed",), task="add"),
    Hostile("steal_nonce_from_frames", """
import gc, sys
def add(a, b):
    for get in (lambda: sys._getframe(1).f_back.f_locals, lambda: gc.get_objects()):
        try:
            get()
        except Exception:
            pass
    try:
        1 / 0
    except ZeroDivisionError as e:
        return e.__traceback__.tb_frame.f_back.f_locals
""", (), task="add"),
    Hostile("steal_frames_with_signal_handler", """
import os, signal
got = []
signal.signal(signal.SIGUSR1, lambda s, frame: got.append(frame))
def add(a, b):
    os.kill(os.getpid(), signal.SIGUSR1)
    return got[0].f_back.f_locals
""", (), task="add"),
    Hostile("swap_harness_code", """
import _signal
def add(a, b):
    # whatever function of the sandbox can be found gets an always-true body
    for f in [_signal.signal, *_signal.signal.__globals__.values(), *list(globals().values())]:
        if callable(f) and hasattr(f, "__code__") and f is not add:
            f.__code__ = (lambda *a, **k: True).__code__
    return 0
""", (), task="add"),
]
HOSTILE += ATTACKS
assert len(HOSTILE) >= 60


def _fill(code: str, host: Host) -> str:
    for key, value in (("@TAG@", TAG), ("@PORT@", str(host.port)), ("@VICTIM@", str(host.victim)),
                       ("@REPO@", str(REPO)), ("@HOME@", str(Path.home()))):
        code = code.replace(key, value)
    return code


@pytest.mark.parametrize("h", HOSTILE, ids=[h.name for h in HOSTILE])
def test_hostile_program_earns_nothing_and_leaves_host_untouched(h: Hostile, source, host):
    mem_before, rss_before, n_runs = _mem_available(), _rss(), len(source.runs)
    prompt, tests = (SUM_PROMPT, SUM_TESTS) if h.task == "sum" else (ADD_PROMPT, ADD_TESTS)
    tests = h.tests or tests
    [res] = source.score([_sample(prompt, _fill(h.code, host), tests)])
    assert res.reward == 0.0 and res.reason and not res.failed, res
    if h.reasons:
        assert any(r in res.reason for r in h.reasons), res
    assert res.details["passed"] == 0 and res.details["total"] == len(tests)
    assert res.details["isolation"] == source.isolation and res.details["reason"] == res.reason
    assert all(o != "pass" for o in res.details["outcomes"]) and len(res.details["outcomes"]) == len(tests)
    [run] = source.runs[n_runs:]
    assert not any("sandbox" in o.reason for o in run.outcomes), run  # the supervisor survived it
    if h.stdout:
        assert re.search(h.stdout, run.outcomes[0].stdout), run.outcomes[0]
    if h.forbid:
        assert not re.search(h.forbid, run.outcomes[0].stdout), run.outcomes[0].stdout[:2000]
    assert_host_unaffected(source, host, mem_before, rss_before, [res, run])


def test_cpu_and_wall_limits_are_told_apart():
    """CPU time is summed over threads (four spinning threads on two cores use it up faster than
    the wall clock) and told apart from a wall-clock timeout (a sleep uses no CPU)."""
    box = Sandbox(SandboxLimits(wall_time_s=10.0, cpu_time_s=0.4), concurrency=1)
    spin = "import threading\ndef spin():\n    while True:\n        pass\n" \
           "for _ in range(4):\n    threading.Thread(target=spin).start()\n"
    res = box.run(spin, [{"input": "", "output": ""}])
    assert res.reason == "cpu time limit" and res.outcomes[0].wall_s < 5.0, res
    res = Sandbox(SandboxLimits(wall_time_s=0.5, cpu_time_s=10.0), concurrency=1).run(
        "import time\ntime.sleep(60)\n", [{"input": "", "output": ""}])
    assert res.reason == "timeout" and 0.5 <= res.outcomes[0].wall_s < 2.0 and res.outcomes[0].cpu_s < 0.3, res


# SysV segments and queues, keys, abstract sockets and files: one run makes them all, the next
# (same slot, same uid) looks for them. Run with and without seccomp: without it the key is made,
# and it is the keyring clearing that keeps it from the next run.
_SYSCALLS = "import ctypes, errno, os, socket\nlibc = ctypes.CDLL(None, use_errno=True)\nlibc.syscall.restype = ctypes.c_long\n" \
            "ADD_KEY, KEYCTL = {'x86_64': (248, 250), 'aarch64': (217, 219)}[os.uname().machine]\n"
PERSIST = _SYSCALLS + """
shm = libc.shmget(0x5EED, 1 << 20, 0o1666)
print("shm", "ok" if shm >= 0 and libc.shmat(shm, None, 0) not in (None, -1) else errno.errorcode[ctypes.get_errno()])
print("msg", "ok" if libc.msgget(0x5EED, 0o1666) >= 0 else errno.errorcode[ctypes.get_errno()])
key = libc.syscall(ADD_KEY, b"user", b"@TAG@", b"secret", 6, -4)
print("key", "ok" if key >= 0 else errno.errorcode[ctypes.get_errno()])
s = socket.socket(socket.AF_UNIX)
s.bind("\\0@TAG@")
s.listen()
for path in ("/tmp/@TAG@", "/dev/shm/@TAG@", "@TAG@"):
    open(path, "w").write("x")
print("left")
"""
LOOK = _SYSCALLS + """
print("shm", errno.errorcode[ctypes.get_errno()] if libc.shmget(0x5EED, 0, 0) < 0 else "FOUND")
print("msg", errno.errorcode[ctypes.get_errno()] if libc.msgget(0x5EED, 0) < 0 else "FOUND")
found = libc.syscall(KEYCTL, 10, -4, b"user", b"@TAG@", 0)  # KEYCTL_SEARCH in the user keyring
print("key", "absent" if found < 0 and ctypes.get_errno() in (errno.EPERM, errno.ENOKEY) else "FOUND")
try:
    socket.socket(socket.AF_UNIX).connect("\\0@TAG@")
    print("socket FOUND")
except OSError:
    print("socket absent")
print("files", "FOUND" if any(os.path.exists(p) for p in ("/tmp/@TAG@", "/dev/shm/@TAG@", "@TAG@")) else "absent")
"""


@pytest.mark.parametrize("seccomp", [True, False])
def test_nothing_a_run_leaves_reaches_the_next_run(seccomp, host):
    box = Sandbox(LIMITS, concurrency=1, seccomp=seccomp)
    assert ("seccomp" in box.hardening) is seccomp
    made = box.run(_fill(PERSIST, host), [{"input": "", "output": f"shm ok\nmsg ok\nkey {'EPERM' if seccomp else 'ok'}\nleft"}])
    assert made.passed == 1, made.outcomes[0]
    seen = box.run(_fill(LOOK, host), [{"input": "", "output": "shm ENOENT\nmsg ENOENT\nkey absent\nsocket absent\nfiles absent"}])
    assert seen.passed == 1, seen.outcomes[0]
    for marker in MARKERS:
        assert not marker.exists()


def test_segments_and_queues_do_not_outlive_a_test_of_the_same_program():
    """Each test has its own IPC namespace: the second test of one program finds nothing."""
    code = _SYSCALLS + "import sys\nfirst = sys.stdin.read().strip() == 'make'\n" \
        "print(libc.shmget(0x5EED, 4096, 0o1666 if first else 0) >= 0)\n"
    res = Sandbox(LIMITS, concurrency=1).run(code, [{"input": "make", "output": "True"}, {"input": "look", "output": "False"}])
    assert res.passed == 2, res.outcomes


def test_shared_memory_counts_against_the_memory_limit(host):
    """Detached SysV segments are in no process's RSS: three times the limit of them is stopped
    by the slot's memory cgroup, and the memory comes back when the run ends."""
    mem_before = _mem_available()
    code = _SYSCALLS + """
libc.shmat.restype = ctypes.c_void_p
for _ in range(12):  # 12 x 96 MiB = 3 x the 384 MiB limit
    seg = libc.shmget(0, 96 << 20, 0o1600)
    addr = libc.shmat(seg, None, 0)
    ctypes.memset(addr, 1, 96 << 20)
    libc.shmdt(ctypes.c_void_p(addr))
print("held")
"""
    box = Sandbox(dataclasses.replace(LIMITS, wall_time_s=5.0, cpu_time_s=4.0), concurrency=1, memory_cgroup=True)
    assert box.hardening[0] == "memory-cgroup-v1" or box.hardening[0] == "memory-cgroup-v2"
    res = box.run(code, [{"input": "", "output": "held"}])
    assert res.reason == "memory limit" and res.outcomes[0].stdout == "", res.outcomes[0]
    # The kernel frees the segments with the IPC namespace, shortly after its last process: the
    # next run in the slot, started at once, still gets its whole limit.
    honest = box.run("x = bytearray(300 << 20)\nprint(len(x) >> 20)", [{"input": "", "output": "300"}])
    assert honest.passed == 1, honest.outcomes[0]
    # The slot's cgroup measures the sandbox alone (MemAvailable moves with the whole machine).
    usage = box._cgroups.dirs[0] / ("memory.usage_in_bytes" if box._cgroups.version == 1 else "memory.current")
    deadline = time.monotonic() + 3.0
    while int(usage.read_text()) > 32 << 20 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert int(usage.read_text()) <= 32 << 20, usage.read_text()
    assert _mem_available() > mem_before - (1 << 30)


def test_seccomp_is_what_refuses_namespaces_and_keyrings():
    """An unprivileged uid may create a user namespace and keys; the filter takes both away."""
    code = _SYSCALLS + """
for name, call in (("unshare", lambda: libc.unshare(0x10000000)), ("keyctl", lambda: libc.syscall(KEYCTL, 0, -3, 0)),
                   ("bpf", lambda: libc.syscall(321 if os.uname().machine == "x86_64" else 280, 0, 0, 0))):
    rc = call()
    print(name, "ok" if rc >= 0 else errno.errorcode[ctypes.get_errno()])
"""
    test = [{"input": "", "output": "?"}]
    filtered = Sandbox(LIMITS, concurrency=1, seccomp=True).run(code, test).outcomes[0].stdout
    assert filtered == "unshare EPERM\nkeyctl EPERM\nbpf EPERM\n", filtered
    unfiltered = Sandbox(LIMITS, concurrency=1, seccomp=False).run(code, test).outcomes[0].stdout
    assert unfiltered.startswith("unshare ok\nkeyctl ok\n"), unfiltered


def test_required_hardening_is_refused_where_missing(monkeypatch):
    from megatron_ernie.rewards import sandbox_cgroup
    monkeypatch.setattr(sandbox_cgroup, "memory_cgroup_dir", lambda: None)
    with pytest.raises(ValueError, match="memory_cgroup=True: memory cgroup unavailable"):
        Sandbox(LIMITS, memory_cgroup=True)
    assert not any(h.startswith("memory-cgroup") for h in Sandbox(LIMITS).hardening)  # None: where available
    probe = sandbox_mod.probe_isolation()
    monkeypatch.setattr(sandbox_mod, "probe_isolation", lambda: dict(probe, seccomp=False))
    with pytest.raises(ValueError, match="seccomp=True"):
        Sandbox(LIMITS, seccomp=True)
    assert "seccomp" not in Sandbox(LIMITS).hardening


def test_slot_cgroups_are_made_limited_and_removed():
    box = Sandbox(LIMITS, concurrency=2, memory_cgroup=True)
    dirs = list(box._cgroups.dirs)
    assert len(dirs) == 2 and all(d.is_dir() for d in dirs)
    if box._cgroups.version == 1:
        assert all(int((d / "memory.limit_in_bytes").read_text()) == LIMITS.memory_bytes for d in dirs)
    del box
    import gc
    gc.collect()
    assert not any(d.exists() for d in dirs)


def test_network_namespace_has_no_usable_interface(source):
    """Passes only if the program sees loopback alone, down, and cannot even reach 127.0.0.1."""
    code = """
import fcntl, socket, struct
s = socket.socket()
for _, name in socket.if_nameindex():
    flags = struct.unpack("16sH", fcntl.ioctl(s.fileno(), 0x8913, struct.pack("16sH", name.encode(), 0)))[1]
    print(name, "UP" if flags & 1 else "DOWN")
print(sorted(l.split(":")[0].strip() for l in open("/proc/net/dev").read().splitlines()[2:]))
try:
    socket.create_connection(("127.0.0.1", 9), timeout=0.5)
except OSError as e:
    print(e.errno)
"""
    if source.isolation == AUDIT:
        pytest.fail("the root / user namespace modes are expected on this machine")
    [res] = source.score([_sample("network", code, [{"input": "", "output": "lo DOWN\n['lo']\n101"}])])
    assert res.reward == 1.0, res


# ---------------------------------------------------------------------------------------------
# Honest programs
# ---------------------------------------------------------------------------------------------

HONEST = [
    ("stdin_sum", "a, b = map(int, input().split())\nprint(a + b)\n", SUM_TESTS),
    ("whitespace_and_crlf_tolerated", "a, b = map(int, input().split())\nprint(a + b, '   \\r\\n\\n')\n", SUM_TESTS),
    ("sys_exit_zero_after_answer", "import sys\na, b = map(int, sys.stdin.read().split())\nprint(a + b)\nsys.exit(0)\n",
     SUM_TESTS),
    ("main_in_thread_with_big_stack", """
import sys, threading
def main():
    sys.setrecursionlimit(100000)
    def depth(n):
        return 0 if n == 0 else 1 + depth(n - 1)
    a, b = map(int, input().split())
    print(a + b + depth(20000) - 20000)
threading.stack_size(64 << 20)
threading.Thread(target=main).start()
""", SUM_TESTS),
    ("stdlib_namedtuple_dataclass_logging_signal", """
import collections, dataclasses, logging, signal
P = collections.namedtuple("P", "a b")
@dataclasses.dataclass
class Q:
    a: int
signal.signal(signal.SIGALRM, lambda s, f: None)
logging.getLogger("x").debug("quiet")
a, b = map(int, input().split())
print(P(a, b).a + Q(b).a)
""", SUM_TESTS),
    ("files_in_workdir_and_subprocess", """
import os, subprocess, sys
a, b = map(int, input().split())
open("scratch.txt", "w").write(str(a + b))
out = subprocess.run([sys.executable, "-c", "print(open('scratch.txt').read())"], capture_output=True, text=True)
print(out.stdout.strip())
""", SUM_TESTS),
    ("assertions", "def add(a, b):\n    return a + b\n", ADD_TESTS),
    ("assertions_with_containers_and_counter", """
import collections
def add(a, b):
    return a + b
def tally(s):
    return collections.Counter(s)
""", [{"code": "assert add(2, 3) == 5\nassert tally('aab') == {'a': 2, 'b': 1}"},
      {"code": "assert [add(1, 1), (add(0, 0),)] == [2, (0,)]"}]),
    ("main_guard_skipped_for_assertions", """
def add(a, b):
    return a + b
if __name__ == "__main__":
    print(add(int(input()), 1))
""", ADD_TESTS),
]


# Assertion tests in the shapes datasets write them: every comparison runs in the evaluator, over
# the plain values the program's functions return.
HONEST += [
    ("isclose_tolerance_with_the_programs_math_import", """
import math
def area(r):
    return math.pi * r * r
""", [{"code": "assert math.isclose(area(2), 12.566370614359172)"},   # `math` from the program's import
      {"code": "assert abs(area(1) - 3.14159265) < 1e-6\nassert area(0) <= 1e-12"},
      {"code": "from math import isclose\nassert isclose(area(3), 28.274, rel_tol=1e-3)"}]),
    ("membership_and_ordering", """
def primes(n):
    return [p for p in range(2, n) if all(p % d for d in range(2, int(p ** 0.5) + 1))]
""", [{"code": "assert 7 in primes(10) and 4 not in primes(10)\nassert primes(10) == [2, 3, 5, 7]"},
      {"code": "assert max(primes(100)) < 100 <= 101\nassert sorted(primes(20), reverse=True)[0] == 19"},
      {"code": "cases = [(2, []), (3, [2]), (12, [2, 3, 5, 7, 11])]\nfor n, want in cases:\n    assert primes(n) == want, n"}]),
    ("fraction_and_decimal_results", """
from fractions import Fraction
from decimal import Decimal
def harmonic(n):
    return sum(Fraction(1, k) for k in range(1, n + 1))
def total(price, qty):
    return Decimal(price) * qty
""", [{"code": "from fractions import Fraction\nassert harmonic(3) == Fraction(11, 6)\nassert harmonic(1) == 1"},
      {"code": "from decimal import Decimal\nassert total('1.10', 3) == Decimal('3.30')\nassert isinstance(total('2', 2), Decimal)"}]),
    ("classes_instances_and_len", """
class Solution:
    def twoSum(self, nums, target):
        seen = {}
        for i, x in enumerate(nums):
            if target - x in seen:
                return [seen[target - x], i]
            seen[x] = i
class Stack:
    def __init__(self):
        self.items = []
    def push(self, x):
        self.items.append(x)
    def pop(self):
        return self.items.pop()
    def __len__(self):
        return len(self.items)
""", [{"code": "assert Solution().twoSum([2, 7, 11, 15], 9) == [0, 1]"},
      {"code": "s = Stack()\ns.push(1)\ns.push(2)\nassert s.pop() == 2\nassert len(s) == 1 and s\nassert s.items == [1]"}]),
    ("generators_and_iteration", """
def fib():
    a, b = 0, 1
    while True:
        yield a
        a, b = b, a + b
def squares(n):
    return (i * i for i in range(n))
""", [{"code": "import itertools\nassert list(itertools.islice(fib(), 7)) == [0, 1, 1, 2, 3, 5, 8]"},
      {"code": "assert sum(squares(4)) == 14 and list(squares(1000))[-1] == 998001\nassert 9 in squares(5)"}]),
    ("in_place_mutation_and_keyword_arguments", """
def rotate(m):
    m[:] = [list(r) for r in zip(*m[::-1])]
def sort_in_place(xs, *, reverse=False):
    xs.sort(reverse=reverse)
def tally(words, counts):
    for w in words:
        counts[w] = counts.get(w, 0) + 1
""", [{"code": "m = [[1, 2], [3, 4]]\nrotate(m)\nassert m == [[3, 1], [4, 2]]"},
      {"code": "xs = [3, 1, 2]\nsort_in_place(xs, reverse=True)\nassert xs == [3, 2, 1]"},
      {"code": "c = {'a': 1}\ntally(['a', 'b'], c)\nassert c == {'a': 2, 'b': 1}"}]),
    ("exceptions_cross_as_their_builtin_base", """
class InsufficientFunds(ValueError):
    pass
def withdraw(balance, amount):
    if amount > balance:
        raise InsufficientFunds("balance too low")
    return balance - amount
""", [{"code": "try:\n    withdraw(1, 5)\nexcept ValueError as e:\n    assert 'too low' in str(e)\n"
               "    assert type(e).__name__ == 'InsufficientFunds'\nelse:\n    raise AssertionError('no error')"},
      {"code": "assert withdraw(5, 1) == 4"}]),
    ("subclass_results_arrive_as_plain_values", """
import collections, dataclasses, enum
Point = collections.namedtuple("Point", "x y")
class Color(enum.IntEnum):
    RED = 1
@dataclasses.dataclass
class Item:
    name: str
    qty: int
def point():
    return Point(1, 2)
def letters(s):
    return collections.Counter(s)
def red():
    return Color.RED
def item():
    return Item("pen", 3)
""", [{"code": "assert point() == (1, 2) and point().y == 2 and letters('aab') == {'a': 2, 'b': 1} and red() == 1\n"
               "assert letters('abcb').most_common(1) == [('b', 2)]"},
      {"code": "it = item()\nassert (it.name, it.qty) == ('pen', 3)"}]),
    ("humaneval_check_constants_and_shadowing", """
LIMIT = 100
TABLE = {i: i * i for i in range(5)}
def has_close_elements(numbers, threshold):
    return any(abs(a - b) < threshold for i, a in enumerate(numbers) for b in numbers[i + 1:])
def max(xs):  # the task's own max; the test's builtin max stays the builtin
    best = xs[0]
    for x in xs:
        best = x if x > best else best
    return best
""", [{"code": "def check(candidate):\n    assert candidate([1.0, 2.0, 3.0], 0.5) is False\n"
               "    assert candidate([1.0, 2.8, 3.0], 0.3) is True\ncheck(has_close_elements)"},
      {"code": "assert LIMIT == 100 and TABLE[4] == 16\nassert max(1, 2) == 2\n"
               "from solution import max as task_max\nassert task_max([3, 9, 2]) == 9"}]),
    ("functions_of_the_test_passed_to_the_program", """
def apply_twice(f, x):
    return f(f(x))
def sort_by(xs, key):
    return sorted(xs, key=key)
def memoize(f):
    cache = {}
    def wrapper(n):
        if n not in cache:
            cache[n] = f(n)
        return cache[n]
    return wrapper
def each(xs, visit):
    for x in xs:
        visit(x)
""", [{"code": "assert apply_twice(lambda x: x * 3, 2) == 18\nassert sort_by(['bb', 'a', 'ccc'], len) == ['a', 'bb', 'ccc']"},
      {"code": "calls = []\n@memoize\ndef fib(n):\n    calls.append(n)\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n"
               "assert fib(20) == 6765 and len(calls) == 21"},                  # the test's fib calls the program's wrapper
      {"code": "seen = []\neach([3, 1, 2], seen.append)\nassert seen == [3, 1, 2]"}]),
    ("big_values_and_many_calls", """
import math
def fact(n):
    return math.factorial(n)
def echo(x):
    return x
""", [{"code": "assert fact(3000) == math.factorial(3000) and fact(30) == 265252859812191058636308480000000"},
      {"code": "v = {'k': [1, (2.5, None), {3, 4}, frozenset({5}), b'x', bytearray(b'y'), 1 + 2j, range(3)]}\n"
               "assert echo(v) == v\nassert all(echo(i) == i for i in range(2000))"}]),
]
HONEST += HONEST_SHAPES


@pytest.mark.parametrize("name,code,tests", HONEST, ids=[h[0] for h in HONEST])
def test_honest_program_gets_full_reward(name, code, tests, source):
    [res] = source.score([_sample("task", code, tests)])
    assert res.reward == 1.0 and res.reason == "" and res.details["outcomes"] == ["pass"] * len(tests), res


def test_a_failed_assertion_inside_a_test_function_fails_the_test_even_if_the_program_swallows_it(source):
    code = "def each(xs, visit):\n    for x in xs:\n        try:\n            visit(x)\n        except Exception:\n            pass\n    return 'done'\n"
    test = "def positive(x):\n    assert x > 0, x\nassert each([1, -2, 3], positive) == 'done'"
    [res] = source.score([_sample("task", code, [{"code": test}])])
    assert (res.reward, res.reason) == (0.0, "assertion failed"), res
    [ok] = source.score([_sample("task", code, [{"code": test.replace("-2", "2")}])])
    assert ok.reward == 1.0, ok


def test_bare_names_a_test_relies_on_are_the_programs_unless_the_test_imports_them(source):
    """A known limit, with its remedy. A test that uses a bare helper it neither defines nor
    imports (`isclose`, `pi`: MBPP-style tests that rely on the solution's `from math import
    ...`) gets the program's binding, so a program that defines a lying `isclose` and a `pi` to
    match its wrong area earns credit; the dataset's test imports put in front of the test take
    that away (and names used as modules, `math.isclose`, are always the standard library's)."""
    liar = "pi = 3.0\ndef isclose(*args, **kwargs):\n    return True\ndef area(r):\n    return pi * r * r\n"
    bare = [{"code": "assert isclose(area(2), 12.566, rel_tol=1e-3)"}, {"code": "assert abs(area(2) - 4 * pi) < 1e-9"}]
    imported = [{"code": "from math import isclose, pi\n" + t["code"]} for t in bare]
    as_module = [{"code": "assert math.isclose(area(2), 12.566, rel_tol=1e-3)"}]
    got_bare, got_imported, got_module = source.score([_sample("area", liar, t) for t in (bare, imported, as_module)])
    assert got_bare.reward == 1.0  # the limit, stated
    assert (got_imported.reward, got_imported.reason) == (0.0, "assertion failed"), got_imported
    assert got_module.reward == 0.0, got_module


def test_partial_credit_and_mixed_test_kinds(source):
    code = "def add(a, b):\n    return a + b if a >= 0 else 0\nif __name__ == '__main__':\n    print(add(*map(int, input().split())))\n"
    tests = [{"code": "assert add(1, 2) == 3"}, {"code": "assert add(-1, 2) == 1"},
             {"input": "4 5", "output": "9"}, {"input": "-3 1", "output": "-2"}]
    # io tests run the program as __main__, assertion tests as module `solution`
    [res] = source.score([_sample("task", code, tests)])
    assert res.reward == pytest.approx(2 / 4) and res.details["passed"] == 2, res
    assert res.details["outcomes"] == ["pass", "assertion failed", "pass", "wrong answer"]
    assert res.reason == "assertion failed" and not res.failed


def test_wrong_answer_syntax_error_no_code_no_tests(source):
    wrong, syntax, empty, no_tests, bad = source.score([
        _sample(SUM_PROMPT, "print(4)", SUM_TESTS),
        _sample(SUM_PROMPT, "def f(:\n    pass", SUM_TESTS),
        _sample(SUM_PROMPT, "", SUM_TESTS, wrap="I don't know.\n```python\n{}```"),
        _sample(SUM_PROMPT, "print(5)", []),
        _sample(SUM_PROMPT, "print(5)", [{"stdin": "1"}]),
    ])
    assert (wrong.reward, wrong.reason, wrong.failed) == (0.0, "wrong answer", False)
    assert (syntax.reward, syntax.reason, syntax.details["outcomes"]) == (0.0, "syntax error", ["syntax error"] * 2)
    assert (empty.reward, empty.reason, empty.failed) == (0.0, "no code", False)
    assert (no_tests.reward, no_tests.reason, no_tests.failed) == (0.0, "no tests", True)
    assert bad.failed and bad.reason.startswith("bad tests: test 0") and bad.reward == 0.0


def test_programs_over_the_size_cap_are_not_run():
    box = Sandbox(dataclasses.replace(LIMITS, max_code_bytes=1000), concurrency=1)
    big = "x = 1\n" * 200 + "print(5)\n"
    res = box.run(big, SUM_TESTS)
    assert (res.passed, res.reason) == (0, "program too large (1209 bytes > 1000)") and len(res.outcomes) == 2
    assert box.run("print(5)", [{"input": "", "output": "5"}]).passed == 1


def test_extract_code_takes_last_python_block():
    assert extract_code("a\n```python\nx = 1\n```\nb\n```py\nx = 2\n```\n```bash\nls\n```") == "x = 2\n"
    assert extract_code("```\nplain = 1\n```") == "plain = 1\n"
    assert extract_code("print(3)") == "print(3)"
    assert extract_code("only shell:\n```bash\nls\n```") == "only shell:\n```bash\nls\n```"
    assert extract_code("cut off:\n```python\nprint(1)\n") == "print(1)\n"


def test_pool_runs_concurrency_programs_at_a_time(source):
    """Six programs that each sleep 0.4 s and print their start and end times: exactly two ever
    overlap (a bound of one gives 1, no bound 6), so the batch takes at least three rounds."""
    code = "import time\nt0 = time.time()\ntime.sleep(0.4)\nprint(t0, time.time())\n"
    n_runs = len(source.runs)
    t0 = time.perf_counter()
    results = source.score([_sample("sleep", code, [{"input": "", "output": "?"}]) for _ in range(6)])
    wall = time.perf_counter() - t0
    assert all(r.reason == "wrong answer" for r in results)
    spans = [tuple(map(float, run.outcomes[0].stdout.split())) for run in source.runs[n_runs:]]
    assert len(spans) == 6
    overlap = max(sum(s <= t < e for s, e in spans) for t, _ in spans)
    assert overlap == 2, spans
    assert wall >= 1.2, wall  # three rounds of two


# ---------------------------------------------------------------------------------------------
# Isolation modes
# ---------------------------------------------------------------------------------------------

def test_select_isolation_prefers_root_then_user_namespaces_then_audit_hook():
    both = {ROOT_NS: True, USER_NS: True}
    assert select_isolation(0, both) == ROOT_NS
    assert select_isolation(1000, both) == USER_NS  # root namespaces need root
    assert select_isolation(0, {ROOT_NS: False, USER_NS: True}) == USER_NS
    assert select_isolation(1000, {ROOT_NS: False, USER_NS: False}) == AUDIT


def test_sandbox_reports_mode_selected_for_this_process(monkeypatch):
    assert Sandbox(LIMITS).isolation == select_isolation(os.geteuid(), sandbox_mod.probe_isolation())
    assert os.geteuid() != 0 or Sandbox(LIMITS).isolation == ROOT_NS
    monkeypatch.setattr(sandbox_mod, "probe_isolation", lambda: {ROOT_NS: False, USER_NS: False})
    assert Sandbox(LIMITS).isolation == AUDIT
    with pytest.raises(ValueError, match="not available"):
        Sandbox(LIMITS, isolation=USER_NS)
    with pytest.raises(ValueError, match="known modes"):
        Sandbox(LIMITS, isolation="chroot")
    with pytest.raises(TypeError, match="unknown sandbox option"):
        build_source("code", "sandbox", wall_time=3)


# Marked with the tag where it can exec (host uid 0 in forced user-namespaces mode as root: the
# leftover scan then finds it by tag), plain Python where the audit hook refuses exec.
ORPHAN = """
import os, time
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        try:
            os.execvp("sh", ["sh", "-c", "while :; do sleep 1; done", "@TAG@"])
        except Exception:
            time.sleep(30)
    os._exit(0)
print(5)
"""
FORCED_PROBE = """
import os, socket
print(os.getuid(), [l.split()[1] for l in open("/proc/self/status") if l.startswith("CapEff")])
for name, attempt in (("connect", lambda: socket.socket().connect(("127.0.0.1", @PORT@))),
                      ("write /tmp", lambda: open("/tmp/@TAG@", "w").write("x")),
                      ("delete victim", lambda: os.remove("@VICTIM@")),
                      ("signal parent", lambda: os.kill(os.getppid(), 0)),
                      ("write workdir", lambda: open("scratch", "w").write("x"))):
    try:
        attempt()
        print(name, "ok")
    except OSError as e:
        print(name, type(e).__name__)
"""


@pytest.mark.parametrize("mode", [USER_NS, AUDIT])
def test_forced_fallback_mode_refuses_network_and_cleans_up(mode, host):
    """The non-root paths, forced on this root machine: the mode is recorded, correct programs
    pass, the listener on 127.0.0.1 gets nothing, and an escaping orphan is killed."""
    src = CodeSandboxSource(concurrency=2, isolation=mode, **asdict(LIMITS))
    assert src.isolation == mode
    orphan = _fill(ORPHAN, host)
    ok, probe, escaped = src.score([
        _sample(SUM_PROMPT, "a, b = map(int, input().split())\nprint(a + b)", SUM_TESTS),
        _sample("probe", _fill(FORCED_PROBE, host), [{"input": "", "output": "?"}]),
        _sample(SUM_PROMPT, orphan, SUM_TESTS[:1]),
    ])
    assert ok.reward == 1.0 and ok.details["isolation"] == mode, ok
    assert probe.reward == 0.0 and probe.details["isolation"] == mode
    assert (escaped.reward, escaped.reason) == (0.0, "left background processes")
    with pytest.raises(socket.timeout):
        host.listener.accept()
    assert _sandbox_processes(set(src.sandbox.slot_uids)) == []
    out = src.sandbox.run(_fill(FORCED_PROBE, host), [{"input": "", "output": "?"}]).outcomes[0].stdout
    uid, rest = out.split(" ", 1)
    if mode == USER_NS:  # root of its own user namespace without a single capability; no route,
        # a private /tmp (the write lands in the sandbox's tmpfs), the host's files out of sight
        assert uid == "0" and rest.startswith("['0000000000000000']"), out
        assert rest.split("\n", 1)[1] == ("connect OSError\nwrite /tmp ok\ndelete victim FileNotFoundError\n"
                                          "signal parent ok\nwrite workdir ok\n"), out
    else:  # the slot uid, and the audit hook refuses the socket, outside writes and signals
        assert int(uid) in src.sandbox.slot_uids, out
        assert rest.split("\n", 1)[1] == ("connect _Denied\nwrite /tmp _Denied\ndelete victim _Denied\n"
                                          "signal parent _Denied\nwrite workdir ok\n"), out
    for marker in MARKERS:
        assert not marker.exists()
    assert host.victim.read_text() == "precious"


def test_runs_under_a_python_from_a_venv_under_tmp(tmp_path):
    """CI and users often run from a venv (a link into the base install) placed under /tmp, the
    first place the runner would build its private root on: it must stay reachable."""
    import subprocess
    import sys

    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp_path / "venv")], check=True, timeout=120)
    program = "import subprocess, sys\nprint(subprocess.run([sys.executable, '-c', 'print(6 * 7)'], capture_output=True, text=True).stdout.strip())"
    code = ("import json\nfrom megatron_ernie.rewards.sandbox import Sandbox, SandboxLimits\n"
            f"r = Sandbox(SandboxLimits()).run({program!r}, [{{'input': '', 'output': '42'}}])\n"
            "print(json.dumps([r.passed, r.total, r.reason, r.outcomes[0].stderr]))")
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([str(tmp_path / "venv" / "bin" / "python"), "-c", code], capture_output=True, text=True,
                         timeout=120, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(root)})
    assert out.returncode == 0, out.stderr[-2000:]
    passed, total, reason, stderr = json.loads(out.stdout.splitlines()[-1])
    assert (passed, total) == (1, 1), (reason, stderr)
