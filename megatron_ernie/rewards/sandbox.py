"""Code sandbox: run a response's program against tests in an isolated process, reward = pass fraction.

    sandbox = Sandbox(SandboxLimits(wall_time_s=2), concurrency=2)
    res = sandbox.run("print(int(input()) * 2)", [{"input": "2", "output": "4"}])
    res.passed, res.total, res.reason, res.isolation, sandbox.hardening

Tests: {"input": str, "output": str} stdin/stdout cases (stripped output compared, trailing
whitespace of each line ignored; the expected output never enters the sandbox) and {"code": str}
assertion tests. An assertion test runs in a trusted evaluator process, apart from the program:
the program runs as module `solution` in its own process (its `if __name__ == "__main__":` block
does not run) and its functions are called across the two with plain data only
(`sandbox_calls`), so no object, patched module, forked child or descriptor of the program can
change a verdict. Each test runs in fresh processes. Programs get the standard library only (`-I -S`).

Isolation (`Sandbox.isolation`, recorded in every result):
- "root-namespaces" (running as root): new network (loopback down, no interface), mount, pid,
  ipc and uts namespaces; a private tmpfs root with the system and Python directories bound
  read-only; the program runs as a per-slot unprivileged uid (`uid_base + slot`), the evaluator
  as another (`uid_base + concurrency + slot`), both no_new_privs and not dumpable; pid 1 of the
  namespace kills every leftover process after each test.
- "user-namespaces" (not root, kernel allows unprivileged user namespaces): the same namespaces
  and root, the test processes being root of their user namespace with every capability dropped.
- "audit-hook" (neither): a Python audit hook refuses sockets, starting programs, signalling
  processes, ctypes and changing files outside the private host temp directory it runs in;
  rlimits; a child subreaper that kills every descendant (as root also the per-slot uid). Best
  effort only: anything that gets past the Python level gets past the sandbox.

Hardening (`Sandbox.hardening`, recorded too): "memory-cgroup-v1" / "memory-cgroup-v2" — the
kernel's memory controller bounds everything the program's processes touch, shared memory and
page cache included (a per-slot cgroup, made where this process may, i.e. as root); "seccomp" — a
libseccomp filter refusing keyrings, ptrace, mounts, namespaces, bpf and the like;
"ipc-namespace-per-test" — no SysV segment, semaphore or queue survives a test.

Limits (`SandboxLimits`) hold in every mode: wall time and output size watched by the
supervisor, CPU time summed over the program's processes by the supervisor and backed per
process by RLIMIT_CPU, memory by the cgroup (else the supervisor's sum of resident memory) and
RLIMIT_AS per process, RLIMIT_NPROC / NOFILE / FSIZE, no core dumps.

The sandbox never raises for bad code: hostile or broken programs get reward 0 and a reason.
"""
from __future__ import annotations

import os
import queue
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import weakref
from dataclasses import asdict, dataclass, field, fields
from typing import Sequence

from megatron_ernie.errors import ConfigError
from megatron_ernie.rewards.sandbox_cgroup import MemoryCgroups
from megatron_ernie.rewards.sandbox_runner import AUDIT, ROOT_NS, USER_NS, command, decode_frames, encode_frame
from megatron_ernie.rewards.types import PerSampleSource, RewardResult, RewardSample, register_source

ISOLATION_MODES = (ROOT_NS, USER_NS, AUDIT)
_RUNNER_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": "/"}


@dataclass(frozen=True)
class SandboxLimits:
    """Per-test limits; times in seconds, sizes in bytes. CPU time and resident memory are summed
    over all the test's processes every 50 ms by the supervisor; the kernel backs them per process
    (RLIMIT_CPU, rounded up to whole seconds, and RLIMIT_AS)."""
    wall_time_s: float = 5.0
    cpu_time_s: float = 4.0              # all processes and threads together
    memory_bytes: int = 1 << 30          # resident memory of all processes; address space of each
    max_processes: int = 64              # processes + threads of the slot's uid
    max_open_files: int = 128
    output_bytes: int = 1 << 20          # stdout + stderr captured; more kills the test
    file_size_bytes: int = 16 << 20      # largest file a test may write
    disk_bytes: int = 64 << 20           # the private tmpfs (workdir, /tmp, /var/tmp, /dev/shm)
    max_inodes: int = 16384
    uid_base: int = 61000                # slot uids/gids: uid_base, uid_base + 1, ...
    max_code_bytes: int = 1 << 17        # longer programs are not run (compiling some shapes is superlinear)

    def __post_init__(self):
        for f in fields(self):
            if getattr(self, f.name) <= 0:
                raise ConfigError(f"SandboxLimits.{f.name} must be > 0, got {getattr(self, f.name)!r}")


@dataclass
class TestOutcome:
    passed: bool
    reason: str = ""                     # "" when passed
    stdout: str = ""
    stderr: str = ""                     # tail
    exit_code: int | None = None
    signal: str | None = None
    cpu_s: float = 0.0
    wall_s: float = 0.0

    @property
    def short(self) -> str:
        return "pass" if self.passed else self.reason


@dataclass
class SandboxResult:
    passed: int
    total: int
    outcomes: list[TestOutcome] = field(default_factory=list)
    reason: str = ""                     # first failing test's reason; "" when all passed
    isolation: str = ""
    seconds: float = 0.0
    error: bool = False                  # the sandbox could not run it (not the program's fault)

    @property
    def fraction(self) -> float:
        return self.passed / self.total if self.total else 0.0


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------

_FENCE = re.compile(r"```[ \t]*([\w+.-]*)[^\n]*\n(.*?)(?:```|\Z)", re.S)


def extract_code(response: str) -> str:
    """The last ```python / ```py / plain ``` fenced block (an unclosed last fence runs to the
    end), else the whole response."""
    blocks = [body for lang, body in _FENCE.findall(response) if lang.lower() in ("python", "py", "python3", "")]
    return blocks[-1] if blocks else response


def normalize_tests(tests) -> list[dict]:
    """Validate tests into [{"input", "output"} | {"code"}]; ValueError names the bad one."""
    out = []
    for i, t in enumerate(tests or ()):
        if not isinstance(t, dict):
            raise ValueError(f"test {i}: expected a dict, got {type(t).__name__}")
        if "code" in t and isinstance(t["code"], str):
            out.append({"code": t["code"]})
        elif isinstance(t.get("input"), str) and isinstance(t.get("output"), str):
            out.append({"input": t["input"], "output": t["output"]})
        else:
            raise ValueError(f"test {i}: needs {{'input': str, 'output': str}} or {{'code': str}}, got keys {sorted(t)}")
    return out


def tests_memfd(items: list[str]) -> bytes:
    """The runner's view of the tests' data: a count, (offset, length) per test, the UTF-8 texts."""
    blobs = [t.encode("utf-8", "surrogatepass") for t in items]
    head = len(blobs).to_bytes(8, "big")
    offset = 8 + 16 * len(blobs)
    for b in blobs:
        head += offset.to_bytes(8, "big") + len(b).to_bytes(8, "big")
        offset += len(b)
    return head + b"".join(blobs)


def _normalize_output(text: str) -> str:
    return "\n".join(line.rstrip() for line in text.replace("\r\n", "\n").strip().split("\n"))


# ---------------------------------------------------------------------------------------------
# Isolation mode
# ---------------------------------------------------------------------------------------------

_probe_lock = threading.Lock()
_probe_cache: dict | None = None


def probe_isolation() -> dict:
    """What this machine allows ({"euid", "root-namespaces": bool, "user-namespaces": bool}),
    tried for real once per process in a throwaway runner. A runner that cannot even start is an
    error, not a reason to fall back to weaker isolation."""
    global _probe_cache
    with _probe_lock:
        if _probe_cache is None:
            proc = subprocess.run(command("--probe"), capture_output=True, timeout=60, env=_RUNNER_ENV, cwd="/")
            frames = decode_frames(proc.stdout) if proc.returncode == 0 else []
            if not frames:
                tail = proc.stderr.decode("utf-8", "replace").strip()[-500:]
                raise RuntimeError(f"sandbox runner failed to start (exit {proc.returncode}): {tail}")
            _probe_cache = frames[0]
        return dict(_probe_cache)


def select_isolation(euid: int, probe: dict) -> str:
    """The strongest mode available: root namespaces (with a per-slot uid), else unprivileged
    user namespaces, else the audit hook."""
    if euid == 0 and probe.get(ROOT_NS):
        return ROOT_NS
    if probe.get(USER_NS):
        return USER_NS
    return AUDIT


_uid_lock = threading.Lock()
_uids_taken: set[int] = set()


def _take_uids(base: int, n: int) -> list[int]:
    """Slot uids unique within this process, so two sandboxes never share a uid's process limit."""
    with _uid_lock:
        start = base
        while any(u in _uids_taken for u in range(start, start + n)):
            start += n
        uids = list(range(start, start + n))
        _uids_taken.update(uids)
        return uids


def _release_uids(uids: list[int]) -> None:
    with _uid_lock:
        _uids_taken.difference_update(uids)


# ---------------------------------------------------------------------------------------------
# The sandbox
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Slot:
    index: int
    uid: int        # the program's processes
    eval_uid: int   # the evaluator of assertion tests


@dataclass
class _Runner:
    """A started runner waiting for its job, and the memfd it will give the evaluators their
    tests through."""
    proc: subprocess.Popen
    tests_fd: int

    def close(self) -> None:
        if self.proc.poll() is None:
            _kill_group(self.proc.pid)
        self.proc.communicate()
        os.close(self.tests_fd)


class _RunnerPool:
    """Each slot's next runner is started while its current program runs, so the interpreter's
    start-up, its imports and the seccomp filter are off the next program's critical path.
    Runners are started from one long-lived thread: a runner dies with the thread that started
    it (PR_SET_PDEATHSIG follows the thread), and a pool thread of `run_many` may be gone soon."""

    def __init__(self, mode: str, cgroups: MemoryCgroups | None, seccomp: bool, memory_bytes: int):
        from concurrent.futures import ThreadPoolExecutor
        self.mode, self.cgroups, self.seccomp, self.memory_bytes = mode, cgroups, seccomp, memory_bytes
        self._spawner = ThreadPoolExecutor(1, thread_name_prefix="sandbox-runners")
        self._ready: dict = {}

    def _start(self, slot: _Slot) -> _Runner:
        fd = os.memfd_create("sandbox-tests", os.MFD_CLOEXEC)
        proc = subprocess.Popen(command(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                env=_RUNNER_ENV, cwd="/", close_fds=True, pass_fds=(fd,), start_new_session=True)
        prep = {"mode": self.mode, "cgroup": self.cgroups.spec(slot.index) if self.cgroups else None,
                "seccomp": self.seccomp}
        try:
            proc.stdin.write(encode_frame(prep))
            proc.stdin.flush()
        except OSError:
            pass  # it died at once: take() sees that and says why
        return _Runner(proc, fd)

    def take(self, slot: _Slot) -> _Runner:
        """The slot's waiting runner (started now if there is none), and the next one started."""
        fut = self._ready.pop(slot.index, None) or self._spawner.submit(self._start, slot)
        runner = fut.result()
        if runner.proc.poll() is not None:  # died while it waited (killed from outside): start another
            runner.close()
            runner = self._spawner.submit(self._start, slot).result()
        self._ready[slot.index] = self._spawner.submit(self._start, slot)
        if self.cgroups:  # the last program's memory is uncharged before this one joins
            self.cgroups.settle(slot.index, self.memory_bytes)
        return runner

    def close(self) -> None:
        for fut in list(self._ready.values()):
            fut.result().close()
        self._ready.clear()
        self._spawner.shutdown(wait=True)
        if self.cgroups:
            self.cgroups.close()


class Sandbox:
    """At most `concurrency` programs at a time, each in its own isolated runner process.

    `memory_cgroup` / `seccomp`: None uses them where available, True requires them (ValueError
    when missing), False never uses them."""

    def __init__(self, limits: SandboxLimits | None = None, concurrency: int = 2, isolation: str | None = None,
                 memory_cgroup: bool | None = None, seccomp: bool | None = None):
        if concurrency < 1:
            raise ConfigError(f"concurrency must be >= 1, got {concurrency}")
        self.limits = limits or SandboxLimits()
        self.concurrency = concurrency
        probe = probe_isolation()
        if isolation is None:
            isolation = select_isolation(os.geteuid(), probe)
        elif isolation not in ISOLATION_MODES:
            raise ConfigError(f"isolation={isolation!r}: known modes are {', '.join(ISOLATION_MODES)}")
        elif isolation != AUDIT and not probe.get(isolation):
            raise ConfigError(f"isolation={isolation!r} is not available here (probe: {probe})")
        self._isolation = isolation
        if seccomp and not probe.get("seccomp"):
            raise ConfigError("seccomp=True but no seccomp filter loads here (is libseccomp2 installed?)")
        self._seccomp = bool(probe.get("seccomp")) if seccomp is None else seccomp
        self._cgroups = None
        if memory_cgroup is not False:
            try:
                self._cgroups = MemoryCgroups.create(concurrency, self.limits.memory_bytes, required=bool(memory_cgroup))
            except OSError as e:
                raise ConfigError(f"memory_cgroup=True: {e}") from None
        self._runners = _RunnerPool(isolation, self._cgroups, self._seccomp, self.limits.memory_bytes)
        weakref.finalize(self, self._runners.close)
        uids = _take_uids(self.limits.uid_base, 2 * concurrency)
        self.slot_uids = uids  # every uid this sandbox's processes may run as
        weakref.finalize(self, _release_uids, list(uids))
        self._slots: queue.Queue[_Slot] = queue.Queue()
        for i in range(concurrency):
            self._slots.put(_Slot(i, uids[i], uids[concurrency + i]))

    @property
    def hardening(self) -> tuple[str, ...]:
        """What holds beyond the isolation mode (see the module docstring)."""
        out = [self._cgroups.name] if self._cgroups else []
        if self._seccomp:
            out.append("seccomp")
        if os.geteuid() == 0 or self.isolation == USER_NS:
            out.append("ipc-namespace-per-test")
        return tuple(out)

    @property
    def isolation(self) -> str:
        """Which isolation mode is in force (see the module docstring)."""
        return self._isolation

    def run(self, code: str, tests: Sequence[dict]) -> SandboxResult:
        """Run `code` against every test; blocks while all slots are busy. Raises ValueError only
        for malformed tests (see `normalize_tests`), never for the program."""
        tests = normalize_tests(tests)
        t0 = time.perf_counter()
        if not tests:
            return SandboxResult(0, 0, reason="no tests", isolation=self.isolation, error=True)
        if not code.strip():
            outcomes = [TestOutcome(False, "no code") for _ in tests]
            return SandboxResult(0, len(tests), outcomes, "no code", self.isolation)
        size = len(code.encode("utf-8", "surrogatepass"))
        if size > self.limits.max_code_bytes:
            why = f"program too large ({size} bytes > {self.limits.max_code_bytes})"
            return SandboxResult(0, len(tests), [TestOutcome(False, why) for _ in tests], why, self.isolation)
        slot = self._slots.get()
        try:
            res = self._run_in_slot(code, tests, slot)
        finally:
            self._slots.put(slot)
        res.seconds = round(time.perf_counter() - t0, 4)
        return res

    def run_many(self, jobs: Sequence[tuple[str, Sequence[dict]]]) -> list[SandboxResult]:
        """(code, tests) pairs, `concurrency` at a time, results in order."""
        if len(jobs) <= 1 or self.concurrency == 1:
            return [self.run(c, t) for c, t in jobs]
        from concurrent.futures import ThreadPoolExecutor
        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(jobs))) as pool:
            return list(pool.map(lambda job: self.run(*job), jobs))

    # -- one program ---------------------------------------------------------------------------

    def _run_in_slot(self, code: str, tests: list[dict], slot: _Slot) -> SandboxResult:
        lim, uid = self.limits, slot.uid
        runner = self._runners.take(slot)
        # The tests' data (assertion code with the values it expects, stdin inputs) goes in a memfd
        # the supervisor never reads: each evaluator reads its own test, each program's stdin is
        # its own input copied by the kernel, so no process that runs the program holds another
        # test. Expected outputs of stdin/stdout tests never leave this process.
        os.pwrite(runner.tests_fd, tests_memfd([t["code"] if "code" in t else t["input"] for t in tests]), 0)
        job = {"mode": self.isolation, "uid": uid, "gid": uid, "eval_uid": slot.eval_uid, "limits": asdict(lim),
               "code": code, "tests": [{"code": True} if "code" in t else {"input": True} for t in tests],
               "tests_fd": runner.tests_fd,
               # without seccomp, keys a program stores in its uid's keyrings outlive it
               "clear_keys": not self._seccomp and os.geteuid() == 0 and self.isolation != USER_NS}
        workdir = None
        if self.isolation == AUDIT:
            workdir = job["workdir"] = tempfile.mkdtemp(prefix="sandbox-")
            if os.geteuid() == 0:
                os.chown(workdir, uid, uid)
        budget = 10.0 + len(tests) * (lim.wall_time_s + 2.0)
        proc = runner.proc
        try:
            try:
                out, stderr = proc.communicate(encode_frame(job), timeout=budget)
            except subprocess.TimeoutExpired:
                _kill_group(proc.pid)
                out, stderr = proc.communicate()
        finally:
            os.close(runner.tests_fd)
            if workdir:
                shutil.rmtree(workdir, ignore_errors=True)
        reports, error = _parse_reports(out)
        if error is None and len(reports) < len(tests):
            tail = stderr.decode("utf-8", "replace").strip().splitlines()[-1:] or [f"exit {proc.returncode}"]
            error = f"sandbox runner died: {tail[0][:200]}"
        outcomes = [self._judge(t, reports.get(i)) if i in reports else TestOutcome(False, error or "not run")
                    for i, t in enumerate(tests)]
        passed = sum(o.passed for o in outcomes)
        reason = next((o.reason for o in outcomes if not o.passed), "")
        return SandboxResult(passed, len(tests), outcomes, reason, self.isolation,
                             error=bool(error) and not reports)

    def _judge(self, test: dict, rep: dict) -> TestOutcome:
        o = TestOutcome(False, "", rep["stdout"], rep["stderr"], rep["exit"], rep["signal"], rep["cpu_s"], rep["wall_s"])
        o.reason = _failure_reason(test, rep, self.limits)
        o.passed = not o.reason
        return o


def _failure_reason(test: dict, rep: dict, lim: SandboxLimits) -> str:
    """"" when the test passed, else why not. Limits first, then what the harness reported, then
    the answer itself. Only the output comparison and the nonce-checked verdict can pass a test."""
    over_cpu = rep["cpu_s"] >= lim.cpu_time_s
    if rep.get("oom"):  # the kernel's OOM killer acted in the slot's cgroup: the cause, whatever came next
        return "memory limit"
    if rep["limit"] == "timeout":
        return "cpu time limit" if over_cpu else "timeout"
    if rep["limit"]:
        return rep["limit"]
    sig = rep["signal"]
    if sig == "SIGXCPU" or (sig == "SIGKILL" and over_cpu):
        return "cpu time limit"
    if sig == "SIGXFSZ":
        return "file size limit"
    if sig:
        return f"killed by signal {sig}"
    if rep["leftover"]:
        return "left background processes"
    v = rep["verdict"]
    if v and v["status"] in ("tampered", "error", "fail"):
        return v["kind"] or "failed"
    if over_cpu:
        return "cpu time limit"
    if rep["exit"] != 0:
        return f"exit code {rep['exit']}"
    if "code" in test:
        if not v:
            return "no verdict"
        return "" if v["status"] == "pass" else "failed"
    return "" if _normalize_output(rep["stdout"]) == _normalize_output(test["output"]) else "wrong answer"


def _parse_reports(out: bytes) -> tuple[dict[int, dict], str | None]:
    reports, error = {}, None
    try:
        frames = decode_frames(out)
    except (ValueError, EOFError, TypeError):
        return reports, "sandbox runner wrote garbage"
    for obj in frames:
        if "error" in obj:
            error = obj["error"]
        elif "i" in obj:
            reports[obj["i"]] = obj
    return reports, error


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


# ---------------------------------------------------------------------------------------------
# Reward source
# ---------------------------------------------------------------------------------------------

_LIMIT_FIELDS = frozenset(f.name for f in fields(SandboxLimits))


@register_source("sandbox")
class CodeSandboxSource(PerSampleSource):
    """`type: sandbox`. Options: `concurrency` (default 2), `isolation` (default: strongest
    available), `memory_cgroup` and `seccomp` (default: where available; true: required) and any
    `SandboxLimits` field. Reward = passed / total tests.
    details: passed, total, outcomes (one short string per test), isolation, hardening, reason."""

    name = "sandbox"

    def __init__(self, concurrency: int = 2, isolation: str | None = None, memory_cgroup: bool | None = None,
                 seccomp: bool | None = None, **limits):
        unknown = sorted(set(limits) - _LIMIT_FIELDS)
        if unknown:
            raise TypeError(f"unknown sandbox option(s) {unknown}; known: concurrency, isolation, memory_cgroup, "
                            f"seccomp, {', '.join(sorted(_LIMIT_FIELDS))}")
        self.sandbox = Sandbox(SandboxLimits(**limits), concurrency=concurrency, isolation=isolation,
                               memory_cgroup=memory_cgroup, seccomp=seccomp)
        self.concurrency = concurrency

    @property
    def isolation(self) -> str:
        return self.sandbox.isolation

    def score_one(self, sample: RewardSample) -> RewardResult:
        try:
            tests = normalize_tests(sample.tests)
        except ValueError as e:
            return RewardResult.failure(self.name, f"bad tests: {e}", isolation=self.isolation)
        res = self.sandbox.run(extract_code(sample.response), tests)
        details = {"passed": res.passed, "total": res.total, "outcomes": [o.short for o in res.outcomes],
                   "isolation": res.isolation, "hardening": list(self.sandbox.hardening), "reason": res.reason}
        return RewardResult(res.fraction, self.name, reason=res.reason, failed=res.error, details=details)
