"""Child side of the code sandbox (see `sandbox.py`); standard library only.

Started once per scored program (`command()`: `python -I -S`, this module and `sandbox_calls`
imported), it reads one job (marshal) from stdin, isolates itself, runs every test in fresh forked
processes and writes one frame per test to stdout. Everything that needs privilege or namespaces
happens here, after exec, so the parent never needs `preexec_fn` (not thread-safe) and stays free
of this module's imports.

Process tree in the namespace modes:

    runner (unshares net/mount/pid/ipc/uts, waits)
      └─ init, pid 1 of the new pid namespace (builds the private root, mounts /proc, runs the
         │  tests, watches their time/memory/output, kills and reaps leftovers)
         ├─ candidate, one per test: the program (stdin/stdout test: reads the input, prints;
         │  assertion test: defines its functions, then serves calls, see `sandbox_calls`)
         └─ evaluator, one per assertion test: runs the test code, calling into the candidate
            with plain data only, and writes the verdict (see `sandbox_evaluator`)

In "audit-hook" mode the runner is the init: no namespaces, a child subreaper instead of pid 1.

What the candidate gets: the slot's unprivileged uid, its own IPC namespace (no SysV segment or
message queue outlives the test), the slot's memory cgroup when the parent made one (every page
it, its children, its tmpfs files and shared memory touch counts), rlimits, no_new_privs, not
dumpable, and a seccomp filter refusing the system calls a solution never needs (keyrings,
ptrace, mounts, namespaces, bpf, ...) where libseccomp is installed. What leaves the sandbox: the
candidate's stdout/stderr (capped) and one verdict line per test, prefixed with a per-test random
nonce. The parent decides pass/fail: stdin/stdout cases by comparing the output itself (expected
outputs never enter the sandbox); assertion cases from the verdict of the evaluator, which runs as
another uid (not visible to the candidate, not ptrace-able, holding the only verdict pipe). The
assertion tests' code reaches the evaluator through a memfd that init never reads, so no
candidate (forked from init) has the test code or its expected values in its memory.
"""
import fcntl
import marshal
import os
import resource
import select
import signal
import sys
import time

ROOT_NS, USER_NS, AUDIT = "root-namespaces", "user-namespaces", "audit-hook"

M_ARENA_MAX = -8

USAGE_CHECK_S = 0.05  # how often the supervisor sums the test's CPU time (and memory without a cgroup)
PAGE_SIZE, CLOCK_TICKS = os.sysconf("SC_PAGE_SIZE"), os.sysconf("SC_CLK_TCK")
VERDICT_FD = 3
try:  # inside the sandbox: the bootstrap put this directory on sys.path (see `command`)
    import sandbox_calls as calls
    import sandbox_evaluator as evaluator
    import sandbox_isolation as iso
except ImportError:  # imported by the parent (rewards/sandbox.py) for command() and the frames
    calls = evaluator = iso = None


def encode_frame(obj) -> bytes:
    """One message on the runner's pipes: 4-byte length, then `marshal` (a builtin module, no
    import cost; both ends are the same interpreter, and only the trusted supervisor writes)."""
    data = marshal.dumps(obj)
    return len(data).to_bytes(4, "big") + data


def decode_frames(buf: bytes) -> list:
    out, pos = [], 0
    while pos + 4 <= len(buf):
        n = int.from_bytes(buf[pos:pos + 4], "big")
        if pos + 4 + n > len(buf):
            break  # cut short (the runner was killed mid-write)
        out.append(marshal.loads(buf[pos + 4:pos + 4 + n]))
        pos += 4 + n
    return out


def _emit(obj) -> None:
    data = encode_frame(obj)
    while data:
        data = data[os.write(1, data):]


# ---------------------------------------------------------------------------------------------
# Supervising one test
# ---------------------------------------------------------------------------------------------

def _reap_zombies() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _descendants(root: int) -> tuple:
    """(live descendants of `root`, whether it has any at all, zombies included). The audit-hook
    mode's init is a subreaper: orphans of double forks are re-parented to it and found here.
    Zombies are walked through, and a zombie means "look again": /proc is listed before the
    entries are read, so a child forked after the listing by a process that then died is missed
    by this scan and only shows up in the next one."""
    parents, live = {}, set()
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat", "rb") as f:
                    stat = f.read()
            except OSError:
                continue
            fields = stat[stat.rfind(b")") + 2:].split()
            parents.setdefault(int(fields[1]), []).append(int(name))
            if fields[0] != b"Z":
                live.add(int(name))
    out, todo, seen = [], [root], False
    while todo:
        for kid in parents.get(todo.pop(), ()):
            seen = True
            if kid in live:
                out.append(kid)
            todo.append(kid)
    return out, seen


def _kill_all(mode: str, uid: int) -> bool:
    """SIGKILL everything but ourselves; True when something was still running."""
    _reap_zombies()
    if mode != AUDIT:  # pid 1 of the namespace: kill(-1) reaches exactly the sandbox's processes
        try:
            os.kill(-1, signal.SIGKILL)
        except ProcessLookupError:
            return False
        return True
    found = False
    for _ in range(200):  # until the tree is empty: a fork bomb may keep spawning while we kill
        pids, seen = _descendants(os.getpid())
        if not seen:
            break
        found = found or bool(pids)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.001)  # let the killed die before reaping
        _reap_zombies()
    if os.geteuid() == 0:
        _kill_uid(uid)
    return found


def _kill_uid(uid: int) -> None:
    """kill(-1) as the slot's uid: every process of that uid, wherever it was re-parented (not
    a leftover test: zombies the machine's init has yet to reap count there too)."""
    pid = os.fork()
    if pid == 0:
        try:
            os.setresuid(uid, uid, uid)
            os.kill(-1, signal.SIGKILL)
        finally:
            os._exit(0)
    os.waitpid(pid, 0)


def _usage(mode: str, exclude: set, with_rss: bool) -> tuple:
    """(resident bytes, CPU seconds) of the candidate's live processes together (the evaluator
    excluded). RLIMIT_AS and RLIMIT_CPU bound each process alone (CPU in whole seconds): summed
    here, a program that forks or threads cannot use max_processes times the limits. With a
    memory cgroup the kernel counts memory (shared memory and page cache too): RSS is not summed."""
    if mode == AUDIT:
        pids = _descendants(os.getpid())[0]
    else:  # this /proc is the namespace's own: every process but us (pid 1) belongs to the test
        pids = [int(n) for n in os.listdir("/proc") if n.isdigit() and n != "1"]
    rss = cpu = 0
    for pid in pids:
        if pid in exclude:
            continue
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2:].split()  # field 3 (state) onwards
        cpu += int(fields[11]) + int(fields[12])  # utime + stime, in clock ticks
        if with_rss:
            rss += int(fields[21]) * PAGE_SIZE
    return rss, cpu / CLOCK_TICKS


def _reap_all(mode: str, uid: int) -> None:
    """Reap every child (killed ones need a moment to die) before the next test, and before we
    exit: orphans would go to the machine's init, which need not reap them. Anything that slipped
    past the last kill is killed again."""
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            _kill_all(mode, uid)
            time.sleep(0.002)


def _spawn(target, *args) -> int:
    pid = os.fork()
    if pid == 0:
        try:
            target(*args)
        finally:
            os._exit(120)
    return pid


def _slice(fd: int, index: int) -> tuple:
    """(offset, length) of test `index`'s data in the tests' memfd (see `sandbox.tests_memfd`)."""
    entry = os.pread(fd, 16, 8 + 16 * index)
    return int.from_bytes(entry[:8], "big"), int.from_bytes(entry[8:], "big")


def _memfd(data: bytes) -> int:
    fd = os.memfd_create("stdin", 0)
    while data:
        data = data[os.write(fd, data):]
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def _run_one(job: dict, test: dict, index: int, workdir: str) -> dict:
    """One test: the candidate (and, for an assertion test, the evaluator) forked, watched until
    they exit or a limit is hit, everything left killed and reaped."""
    nonce = os.urandom(16).hex()
    stdin = _memfd(b"")
    if "input" in test:  # copied by the kernel from the tests' memfd: no test's data in our memory
        offset, length = _slice(job["tests_fd"], index)
        while length:
            n = os.copy_file_range(job["tests_fd"], stdin, length, offset)
            offset, length = offset + n, length - n
        os.lseek(stdin, 0, os.SEEK_SET)
    (out_r, out_w), (err_r, err_w), (ver_r, ver_w) = os.pipe(), os.pipe(), os.pipe()
    oom_before = iso.oom_kills()
    t0 = time.monotonic()
    if "code" in test:
        (req_r, req_w), (rep_r, rep_w) = os.pipe(), os.pipe()
        cand = _spawn(_candidate, job, test, (stdin, out_w, err_w, req_r, rep_w), nonce, workdir)
        evaluator = _spawn(_evaluator, job, index, (ver_w, req_w, rep_r), nonce)
        mine = (stdin, out_w, err_w, ver_w, req_r, req_w, rep_r, rep_w)
    else:
        cand = _spawn(_candidate, job, test, (stdin, out_w, err_w, ver_w), nonce, workdir)
        evaluator, mine = None, (stdin, out_w, err_w, ver_w)
    for fd in mine:
        os.close(fd)
    limit, wall, bufs, running = _supervise(job, cand, evaluator, (out_r, err_r, ver_r), t0)
    # Our two first, by pid: _kill_all reaps every zombie it meets, and their status is ours.
    for pid in (cand, evaluator) if running else ():
        if pid:
            os.kill(pid, signal.SIGKILL)
    _, status, ru = os.wait4(cand, 0)
    if evaluator:
        os.waitpid(evaluator, 0)
    if running:
        _kill_all(job["mode"], job["uid"])
    leftover = _kill_all(job["mode"], job["uid"])
    _reap_all(job["mode"], job["uid"])
    if job.get("clear_keys"):
        iso.clear_keyrings(job["uid"])
    cap = job["limits"]["output_bytes"]
    # Every writer is dead now: drain what is buffered, within the caps.
    for fd in (out_r, err_r, ver_r):
        while len(bufs[out_r]) + len(bufs[err_r]) <= cap and len(bufs[ver_r]) <= 4096:
            try:
                chunk = os.read(fd, 1 << 16)
            except OSError:
                break
            if not chunk:
                break
            bufs[fd] += chunk
        os.close(fd)
    if limit is None and len(bufs[out_r]) + len(bufs[err_r]) > cap:
        limit = "output limit"
    return {
        "stdout": bytes(bufs[out_r][:cap]).decode("utf-8", "replace"),
        "stderr": bytes(bufs[err_r][-400:]).decode("utf-8", "replace"),
        "exit": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None,
        "signal": _signal_name(os.WTERMSIG(status)) if os.WIFSIGNALED(status) else None,
        "cpu_s": round(ru.ru_utime + ru.ru_stime, 4),
        "wall_s": round(wall, 4),
        "limit": limit,
        "oom": iso.oom_kills() > oom_before,
        "leftover": leftover and not limit,
        "verdict": _parse_verdict(bytes(bufs[ver_r]), nonce),
    }


def _supervise(job: dict, cand: int, evaluator, fds: tuple, t0: float) -> tuple:
    """Collect the output and watch the limits until the test's processes exit.
    Returns (limit hit or None, wall seconds, {fd: bytes read}, whether any still runs)."""
    lim, (out_r, err_r, ver_r) = job["limits"], fds
    bufs = {fd: bytearray() for fd in fds}
    poller = select.poll()
    for fd in fds:
        poller.register(fd, select.POLLIN)
    running = set()
    for pid in (cand, evaluator):
        if pid:
            pidfd = os.pidfd_open(pid)
            running.add(pidfd)
            poller.register(pidfd, select.POLLIN)
    pidfds = set(running)
    exclude, with_rss = {evaluator}, not iso.CGROUP
    cap, limit = lim["output_bytes"], None
    next_check = t0 + USAGE_CHECK_S
    while running:
        now = time.monotonic()
        left = t0 + lim["wall_time_s"] - now
        if left <= 0:
            limit = "timeout"
            break
        if now >= next_check:
            next_check = now + USAGE_CHECK_S
            rss, cpu = _usage(job["mode"], exclude, with_rss)
            if rss > lim["memory_bytes"]:
                limit = "memory limit"
                break
            if cpu >= lim["cpu_time_s"]:
                limit = "cpu time limit"
                break
        for fd, _ in poller.poll(max(1, int(min(left, next_check - now) * 1000))):
            if fd in pidfds:
                running.discard(fd)
                poller.unregister(fd)
                continue
            chunk = os.read(fd, 1 << 16)
            if chunk:
                bufs[fd] += chunk
            else:
                poller.unregister(fd)
        if len(bufs[out_r]) + len(bufs[err_r]) > cap:
            limit = "output limit"
            break
        if len(bufs[ver_r]) > 4096:
            break  # a verdict is one short line: anything longer is tampering, stop reading it
    for pidfd in pidfds:
        os.close(pidfd)
    return limit, time.monotonic() - t0, bufs, bool(running)


def _signal_name(num: int) -> str:
    try:
        return signal.Signals(num).name
    except ValueError:
        return f"signal {num}"


def _parse_verdict(raw: bytes, nonce: str):
    """The one line the harness writes: `<nonce> <status> <kind>\\t<detail>`. None when absent;
    {"status": "tampered"} when anything else came down the pipe."""
    if not raw:
        return None
    lines = raw.split(b"\n")
    if len(lines) != 2 or lines[1] or not lines[0].startswith(nonce.encode() + b" "):
        return {"status": "tampered", "kind": "verdict channel tampered", "detail": ""}
    status, _, rest = lines[0][len(nonce) + 1:].decode("utf-8", "replace").partition(" ")
    kind, _, detail = rest.partition("\t")
    return {"status": status, "kind": kind, "detail": detail}


# ---------------------------------------------------------------------------------------------
# The test processes: descriptors, limits, credentials
# ---------------------------------------------------------------------------------------------

def _place_fds(fds: tuple) -> None:
    """fds[i] becomes descriptor i; every other descriptor (the init's report pipe, the tests'
    memfd, the other process' pipes) is closed."""
    high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 100) for fd in fds]  # out of the way first: a source may sit on 0..n
    for target, fd in enumerate(high):
        os.dup2(fd, target)
    os.closerange(len(fds), 1 << 16)


def _candidate(job: dict, test: dict, fds: tuple, nonce: str, workdir: str) -> None:
    """The program's process: stdin/stdout test or the call-serving side of an assertion test."""
    os.setsid()
    _place_fds(fds)
    os.chdir(workdir)
    _limit_and_drop(job, job["uid"], candidate=True)
    os.environ.clear()
    os.environ.update({"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": workdir, "TMPDIR": "/tmp"})
    _streams()
    sys.argv = ["solution.py"]
    sys.path.insert(0, workdir)
    hook = (lambda: iso.install_audit_hook(workdir)) if job["mode"] == AUDIT else None
    if "code" in test:
        calls.serve(job["code"], 3, 4, _max_message(job), before_run=hook)
    _run_program(job, nonce, hook)


def _evaluator(job: dict, index: int, fds: tuple, nonce: str) -> None:
    """The trusted side of an assertion test: reads its test (only its own) from the memfd the
    supervisor never reads."""
    os.setsid()
    null = os.open("/dev/null", os.O_RDWR)
    _place_fds((null, null, null, *fds, job["tests_fd"]))  # 3 verdict, 4 requests, 5 replies, 6 tests
    _limit_and_drop(job, job["eval_uid"], candidate=False)
    test_code = os.pread(6, *reversed(_slice(6, index))).decode("utf-8", "surrogatepass")
    os.close(6)

    def report(status: str, kind: str = "", detail: str = "") -> None:
        line = f"{nonce} {status} {kind}\t{detail[:300]}".replace("\n", " ") + "\n"
        try:
            os.write(VERDICT_FD, line.encode("utf-8", "replace"))
        except OSError:
            pass

    evaluator.evaluate(test_code, 4, 5, _max_message(job), report)
    os._exit(0)


def _max_message(job: dict) -> int:
    return max(1 << 20, min(64 << 20, job["limits"]["memory_bytes"] // 4))


def _limit_and_drop(job: dict, uid: int, candidate: bool) -> None:
    lim, mode = job["limits"], job["mode"]
    cpu = max(1, int(-(-lim["cpu_time_s"] // 1)))  # RLIMIT_CPU is whole seconds: round up
    for res, value in ((resource.RLIMIT_CPU, (cpu, cpu + 1)),  # SIGXCPU, then SIGKILL a second later
                       (resource.RLIMIT_AS, lim["memory_bytes"]),
                       (resource.RLIMIT_NPROC, lim["max_processes"]),
                       (resource.RLIMIT_NOFILE, lim["max_open_files"]),
                       (resource.RLIMIT_FSIZE, lim["file_size_bytes"]),
                       (resource.RLIMIT_CORE, 0)):
        if res == resource.RLIMIT_CPU and not candidate:
            continue  # the evaluator is bounded by the wall clock; its CPU is not the program's
        resource.setrlimit(res, value if isinstance(value, tuple) else (value, value))
    iso.oom_score_adj(1000 if candidate else 500)  # the program first; the evaluator before the supervisors
    if candidate and (os.geteuid() == 0 or mode == USER_NS):
        # SysV segments, semaphores and message queues live in the IPC namespace: a private one
        # per test, gone with its last process, so nothing outlives the test or reaches the next.
        iso.check(iso.libc.unshare(iso.CLONE_NEWIPC), "unshare(iso.CLONE_NEWIPC)")
    if os.geteuid() == 0 and mode != USER_NS:
        # An unprivileged uid of its own: RLIMIT_NPROC applies (root ignores it), root-only files
        # and other users' processes (the supervisor, the init, the evaluator) are out of reach.
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
    elif mode == USER_NS:
        iso.drop_capabilities()  # root of the user namespace, minus every capability
    iso.prctl(iso.PR_SET_NO_NEW_PRIVS, 1)  # no setuid binary or file capability gives anything back
    iso.prctl(iso.PR_SET_DUMPABLE, 0)  # not ptrace-able, /proc/<pid>/mem and fd closed even to the same uid
    iso.prctl(iso.PR_SET_PDEATHSIG, signal.SIGKILL)  # after the uid change, which clears it
    iso.load_seccomp()


def _streams() -> None:
    import io
    sys.stdin = sys.__stdin__ = io.open(0, "r", encoding="utf-8", errors="replace", closefd=False)
    sys.stdout = sys.__stdout__ = io.open(1, "w", encoding="utf-8", errors="backslashreplace", closefd=False)
    sys.stderr = sys.__stderr__ = io.open(2, "w", encoding="utf-8", errors="backslashreplace", closefd=False,
                                          buffering=1)


# ---------------------------------------------------------------------------------------------
# stdin/stdout tests: run the program as __main__
# ---------------------------------------------------------------------------------------------

def _run_program(job: dict, nonce: str, before_run) -> None:
    """Run the program, report how it ended on the verdict pipe (for the reason only: the parent
    compares the output itself), exit with its exit code. Never returns."""
    import builtins
    import threading
    _write, _exit, _Base, _SystemExit, _isinstance, _str = os.write, os._exit, BaseException, SystemExit, isinstance, str
    _classify, _shutdown, out, err = calls.classify, threading._shutdown, sys.stdout, sys.stderr

    def report(status: str, what: str = "", detail: str = "") -> None:
        for stream in (out, err):
            try:
                stream.flush()
            except _Base:  # noqa: BLE001 - the program may have broken its own streams
                pass
        line = f"{nonce} {status} {what}\t{detail[:300]}".replace("\n", " ") + "\n"
        try:
            _write(VERDICT_FD, line.encode("utf-8", "replace"))
        except _Base:  # noqa: BLE001 - a closed verdict pipe just means no verdict
            pass

    try:
        program = compile(job["code"], "<solution>", "exec", dont_inherit=True, optimize=0)
    except _Base as e:  # noqa: BLE001 - SyntaxError, ValueError (NUL bytes), MemoryError...
        report("fail", *_classify(e))
        _exit(1)
    module = type(sys)("__main__")
    module.__dict__["__builtins__"] = builtins
    sys.modules["__main__"] = module
    if before_run:
        before_run()
    try:
        exec(program, module.__dict__)
        exc = None
    except _Base as e:  # noqa: BLE001 - SystemExit included
        exc = e
    try:
        _shutdown()  # join non-daemon threads, as interpreter exit would
    except _Base:  # noqa: BLE001
        pass
    code = 0
    if _isinstance(exc, _SystemExit):
        c = exc.code
        code = c if _isinstance(c, int) else (0 if c is None else 1)
        if not _isinstance(c, int) and c is not None:
            err.write(_str(c) + "\n")
    elif exc is not None:
        what, detail = _classify(exc)
        err.write(f"{type(exc).__name__}: {detail}\n")
        report("error", what, detail)
        _exit(1)
    report("ok", "exit", _str(code))
    _exit(code & 0xFF)


# ---------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------

def _prepare(prep: dict) -> None:
    """Everything that does not depend on the job, done before it arrives: the cgroup's
    descriptors, the seccomp filter, the modules every test process uses (imported once, so no forked process
    pays for them; `socket` so that the barrier a program meets in audit-hook mode is the hook,
    not a stdlib directory the slot uid may be unable to read)."""
    iso.open_cgroup(prep.get("cgroup"))
    if prep.get("seccomp"):
        filt = iso.seccomp_filter()
        if filt is None:
            raise OSError("libseccomp is not installed")
        iso.SECCOMP[:] = [iso.seccomp_bpf(filt)]
    _preload("threading", "io", "types", *(("socket",) if prep.get("mode") == AUDIT else ()))
    iso.join_cgroup()


def _read_frame(fd: int):
    """One length-prefixed marshal frame from the parent (trusted); None at end of input."""
    def exactly(n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = os.read(fd, n - len(buf))
            if not chunk:
                return b""
            buf += chunk
        return buf
    head = exactly(4)
    return marshal.loads(exactly(int.from_bytes(head, "big"))) if head else None


def _run_tests(job: dict, workdir: str) -> None:
    # The supervisor never compiles the program: each test's candidate does, under the program's
    # limits (compiling some shapes, a `match` with thousands of captures, costs gigabytes), and
    # a report it forges ("syntax error") concerns its own test only.
    for i, test in enumerate(job["tests"]):
        res = _run_one(job, test, i, workdir)
        res["i"] = i
        _emit(res)


def _preload(*modules: str) -> None:
    for name in modules:
        __import__(name)


def _die_with_parent() -> None:
    ppid = os.getppid()
    iso.prctl(iso.PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != ppid:  # the parent died before the prctl took effect
        os._exit(1)


def probe() -> dict:
    """What this machine allows: each isolation mode is tried for real in a throwaway child
    (unshare, uid map, a tmpfs mount), since a kernel may allow the unshare and refuse the mount;
    and whether a seccomp filter loads and refuses keyctl."""
    result = {"euid": os.geteuid()}
    for mode in (ROOT_NS, USER_NS):
        if mode == ROOT_NS and os.geteuid() != 0:
            result[mode] = False
            continue
        pid = os.fork()
        if pid == 0:
            try:
                iso.enter_namespaces(mode == USER_NS)
                iso.mount(None, "/", None, iso.MS_REC | iso.MS_PRIVATE)
                iso.mount("probe", "/tmp", "tmpfs", iso.MS_NOSUID | iso.MS_NODEV, "size=65536")
                os._exit(0)
            except BaseException:  # noqa: BLE001
                os._exit(1)
        _, status = os.waitpid(pid, 0)
        result[mode] = status == 0
    result["seccomp"] = _probe_seccomp()
    return result


def _probe_seccomp() -> bool:
    pid = os.fork()
    if pid == 0:
        try:
            filt = iso.seccomp_filter()
            if filt is None:
                os._exit(2)
            iso.SECCOMP[:] = [iso.seccomp_bpf(filt)]
            iso.prctl(iso.PR_SET_NO_NEW_PRIVS, 1)
            iso.load_seccomp()
            try:
                iso.syscall("keyctl", 0, -3, 0)  # KEYCTL_GET_KEYRING_ID of the session keyring
            except OSError as e:
                os._exit(0 if e.errno == iso.EPERM else 1)
            os._exit(1)
        except BaseException:  # noqa: BLE001
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    return os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0


def main(argv: list) -> None:
    # Out of sight before any program runs here.
    for name in (__name__, "sandbox_calls", "sandbox_codec", "sandbox_evaluator", "sandbox_isolation"):
        sys.modules.pop(name, None)
    if argv == ["--probe"]:
        _emit(probe())
        return
    _die_with_parent()
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    iso.libc.mallopt(M_ARENA_MAX, 2)  # glibc reserves 64 MiB of address space per thread arena
    try:
        _prepare(_read_frame(0))
    except OSError as e:
        _emit({"error": f"sandbox setup failed: {e}"})
        os._exit(3)
    job = _read_frame(0)  # a runner is started ahead of its job, which it waits for here
    if job is None:
        os._exit(0)  # the sandbox closed without using us
    mode = job["mode"]
    if mode == AUDIT:
        iso.prctl(iso.PR_SET_CHILD_SUBREAPER, 1)
        iso.prctl(iso.PR_SET_DUMPABLE, 0)  # the tests' memfd out of reach of same-uid processes
        _run_tests(job, job["workdir"])
        return
    try:
        iso.enter_namespaces(mode == USER_NS)
    except OSError as e:
        _emit({"error": f"sandbox setup failed: {e}"})
        os._exit(3)
    pid = os.fork()
    if pid == 0:  # pid 1: when it exits, the kernel kills everything left in the namespace
        try:
            iso.prctl(iso.PR_SET_PDEATHSIG, signal.SIGKILL)
            iso.build_root(job["limits"], job["uid"], job["gid"], own_workdir=mode == ROOT_NS)
            iso.libc.sethostname(b"sandbox", 7)
            # after the uid map is written (user namespaces): our descriptors (the tests' memfd)
            # are then out of reach of the test processes, which share our uid there
            iso.prctl(iso.PR_SET_DUMPABLE, 0)
        except OSError as e:
            _emit({"error": f"sandbox setup failed: {e}"})
            os._exit(3)
        _run_tests(job, iso.WORKDIR)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    os._exit(0 if status == 0 else 3)


def command(*args: str) -> list:
    """How the parent starts the runner: `-I -S` (no site, no environment), and the modules
    imported from their directory rather than run as a script, so their bytecode is cached."""
    # Appended, not prepended: its neighbours (rewards/types.py) must not shadow the stdlib.
    boot = "import sys; sys.path.append(sys.argv[1]); import sandbox_runner; sys.path.pop(); " \
           "sandbox_runner.main(sys.argv[2:])"
    return [sys.executable, "-I", "-S", "-c", boot, os.path.dirname(os.path.abspath(__file__)), *args]


if __name__ == "__main__":
    main(sys.argv[1:])
