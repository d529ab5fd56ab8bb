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
            with plain data only, and writes the verdict

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
import ctypes
import fcntl
import marshal
import os
import resource
import select
import signal
import sys
import time

ROOT_NS, USER_NS, AUDIT = "root-namespaces", "user-namespaces", "audit-hook"

CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC, CLONE_NEWCGROUP = 0x00020000, 0x04000000, 0x08000000, 0x02000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 1, 2, 4, 8, 32
MS_NOATIME, MS_NODIRATIME, MS_BIND, MS_REC, MS_PRIVATE, MS_RELATIME = 1024, 2048, 4096, 16384, 1 << 18, 1 << 21
MNT_DETACH = 2
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_SET_CHILD_SUBREAPER, PR_SET_NO_NEW_PRIVS = 1, 4, 36, 38
PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 22, 2
M_ARENA_MAX = -8
# statvfs f_flag bit -> mount flag; a read-only remount must keep what the source mount had
# (in a user namespace the kernel refuses to clear locked flags).
_ST_TO_MS = {2: MS_NOSUID, 4: MS_NODEV, 8: MS_NOEXEC, 1024: MS_NOATIME, 2048: MS_NODIRATIME, 4096: MS_RELATIME}
_SYSCALLS = {"x86_64": {"pivot_root": 155, "capset": 126, "keyctl": 250},
             "aarch64": {"pivot_root": 41, "capset": 91, "keyctl": 219}}

USAGE_CHECK_S = 0.05  # how often the supervisor sums the test's CPU time (and memory without a cgroup)
PAGE_SIZE, CLOCK_TICKS = os.sysconf("SC_PAGE_SIZE"), os.sysconf("SC_CLK_TCK")
WORKDIR = "/sandbox"  # inside the private root of the namespace modes
VERDICT_FD = 3
_libc = ctypes.CDLL(None, use_errno=True)
calls = None  # the sandbox_calls module, bound by main()


def _check(ret: int, what: str) -> int:
    if ret == -1:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return ret


def _syscall(name: str, *args) -> int:
    nr = _SYSCALLS.get(os.uname().machine, {}).get(name)
    if nr is None:
        raise OSError(38, f"{name}: unknown syscall number on {os.uname().machine}")
    return _check(_libc.syscall(nr, *args), name)


def _prctl(option: int, arg: int) -> None:
    _check(_libc.prctl(option, ctypes.c_ulong(arg), 0, 0, 0), f"prctl({option})")


def _mount(src, dst, fstype, flags, data=None) -> None:
    enc = (lambda s: None if s is None else s.encode())
    _check(_libc.mount(enc(src), enc(dst), enc(fstype), ctypes.c_ulong(flags), enc(data)), f"mount {dst}")


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
# Namespaces and the private root
# ---------------------------------------------------------------------------------------------

def _enter_namespaces(mode: str) -> None:
    flags = CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWUTS
    if mode == USER_NS:
        uid, gid = os.geteuid(), os.getegid()
        _check(_libc.unshare(flags | CLONE_NEWUSER), "unshare")
        # Map our one uid/gid to root of the new namespace; setgroups must be denied first.
        for name, text in (("setgroups", "deny"), ("uid_map", f"0 {uid} 1"), ("gid_map", f"0 {gid} 1")):
            with open(f"/proc/self/{name}", "w") as f:
                f.write(text)
    else:
        _check(_libc.unshare(flags), "unshare")


def _ro_bind(src: str, dst: str) -> None:
    _mount(src, dst, None, MS_BIND | MS_REC)
    keep = 0
    st = os.statvfs(src)
    for bit, ms in _ST_TO_MS.items():
        if st.f_flag & bit:
            keep |= ms
    _mount(None, dst, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | keep)


def _python_dirs() -> list:
    # both ends of sys.executable: a venv's bin/python is a link into the base install (and
    # under -I the venv is not detected, so sys.prefix alone misses it)
    dirs = {sys.base_prefix, sys.prefix, sys.exec_prefix, sys.base_exec_prefix,
            os.path.dirname(os.path.realpath(sys.executable)), os.path.dirname(os.path.abspath(sys.executable))}
    return sorted(d for d in dirs if d and os.path.isdir(d))


def _staging_dir(keep: list) -> str:
    """A mount point for the new root that hides none of the directories still to be bound
    (a Python in a venv under /tmp must stay reachable while the root is built)."""
    for cand in ("/tmp", "/mnt", "/srv", "/media", "/opt", "/var/tmp"):
        if os.path.isdir(cand) and not any(d == cand or d.startswith(cand + "/") for d in keep):
            return cand
    raise OSError("no directory to build the sandbox root on (every candidate holds the Python install)")


def _build_root(job: dict) -> None:
    """A fresh tmpfs as `/`: the system and Python directories bound read-only, a few device
    nodes, and tmpfs space (one size limit for all of it) for /sandbox, /tmp, /var/tmp, /dev/shm.
    Nothing the program writes can reach the host; nothing outside these binds is visible."""
    lim = job["limits"]
    _mount(None, "/", None, MS_REC | MS_PRIVATE)  # no mount event propagates back to the host
    new = _staging_dir(_python_dirs())  # the private mount namespace hides it from the host
    _mount("sandbox", new, "tmpfs", MS_NOSUID | MS_NODEV,
           f"size={int(lim['disk_bytes'])},nr_inodes={int(lim['max_inodes'])},mode=755")
    bound = []
    for top in ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", *_python_dirs()):
        if any(top == b or top.startswith(b + "/") for b in bound) or not os.path.lexists(top):
            continue
        dst = new + top
        if os.path.islink(top) and top.count("/") == 1:  # merged-/usr links such as /bin -> usr/bin
            os.symlink(os.readlink(top), dst)
            continue
        os.makedirs(dst, mode=0o755, exist_ok=True)
        try:
            _ro_bind(top, dst)
            bound.append(top)
        except OSError:
            os.rmdir(dst)  # e.g. not traversable for an unprivileged user: that Python dir stays out
    for d, mode in (("proc", 0o555), ("dev", 0o755), ("dev/shm", 0o1777), ("tmp", 0o1777),
                    ("var", 0o755), ("var/tmp", 0o1777), ("etc", 0o755), (WORKDIR[1:], 0o700)):
        os.makedirs(f"{new}/{d}", exist_ok=True)
        os.chmod(f"{new}/{d}", mode)
    for dev in ("null", "zero", "full", "random", "urandom"):
        open(f"{new}/dev/{dev}", "w").close()
        _mount(f"/dev/{dev}", f"{new}/dev/{dev}", None, MS_BIND)
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
                         ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2")):
        os.symlink(target, f"{new}/dev/{name}")
    uid, gid = job["uid"], job["gid"]
    with open(f"{new}/etc/passwd", "w") as f:
        f.write(f"root:x:0:0:root:/:/bin/false\nsandbox:x:{uid}:{gid}:sandbox:{WORKDIR}:/bin/false\n")
    with open(f"{new}/etc/group", "w") as f:
        f.write(f"root:x:0:\nsandbox:x:{gid}:\n")
    with open(f"{new}/etc/hosts", "w") as f:
        f.write("127.0.0.1 localhost\n")
    if os.path.isfile("/etc/ld.so.cache"):
        open(f"{new}/etc/ld.so.cache", "w").close()
        _ro_bind("/etc/ld.so.cache", f"{new}/etc/ld.so.cache")
    if job["mode"] == ROOT_NS:
        os.chown(new + WORKDIR, uid, gid)
    _mount_proc(new + "/proc")
    os.chdir(new)
    _syscall("pivot_root", b".", b".")  # the old root ends up stacked under the new one...
    _check(_libc.umount2(b".", MNT_DETACH), "umount old root")  # ...and is detached here
    os.chdir("/")


def _mount_proc(target: str) -> None:
    """The new pid namespace's /proc, mounted by its pid 1 before the pivot: in a user namespace
    the kernel allows a proc mount only while an unobstructed one is still visible."""
    flags = MS_NOSUID | MS_NODEV | MS_NOEXEC
    try:  # hide the root-owned init from the test processes where the kernel knows the option
        _mount("proc", target, "proc", flags, "hidepid=invisible")
    except OSError:
        _mount("proc", target, "proc", flags)


# ---------------------------------------------------------------------------------------------
# Hardening: seccomp, the memory cgroup, keyrings
# ---------------------------------------------------------------------------------------------

# System calls no solution needs: each fails with EPERM. Also clone() with a namespace flag, and
# clone3 with ENOSYS (its flags sit in memory a filter cannot read; glibc falls back to clone).
SECCOMP_DENIED = (
    "keyctl", "add_key", "request_key", "ptrace", "process_vm_readv", "process_vm_writev",
    "mount", "umount2", "pivot_root", "chroot", "unshare", "setns", "fsopen", "fsmount", "fspick",
    "open_tree", "move_mount", "mount_setattr", "bpf", "perf_event_open", "userfaultfd",
    "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module", "reboot",
    "swapon", "swapoff", "acct", "quotactl", "syslog", "open_by_handle_at", "name_to_handle_at",
    "lookup_dcookie", "fanotify_init", "io_uring_setup", "io_uring_enter", "io_uring_register",
    "settimeofday", "clock_settime", "clock_adjtime", "adjtimex", "sethostname", "setdomainname",
    "iopl", "ioperm", "vhangup",
)
_SCMP_ACT_ALLOW, _SCMP_CMP_MASKED_EQ, _EPERM, _ENOSYS = 0x7FFF0000, 7, 1, 38
_SECCOMP = []  # [the filter as BPF bytes] when the job asks for it


class _ScmpArg(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int), ("datum_a", ctypes.c_uint64), ("datum_b", ctypes.c_uint64)]


def seccomp_filter():
    """(libseccomp, filter context) built once and loaded into every test process, or None where
    libseccomp is not installed. Raises OSError when it is installed but refuses a rule."""
    try:
        lib = ctypes.CDLL("libseccomp.so.2", use_errno=True)
    except OSError:
        return None
    lib.seccomp_init.restype, lib.seccomp_init.argtypes = ctypes.c_void_p, [ctypes.c_uint32]
    lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint,
                                           ctypes.POINTER(_ScmpArg)]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_load.argtypes = [ctypes.c_void_p]
    ctx = lib.seccomp_init(_SCMP_ACT_ALLOW)
    if not ctx:
        raise OSError("seccomp_init failed")

    def deny(name: str, errno: int, *conditions) -> None:
        nr = lib.seccomp_syscall_resolve_name(name.encode())
        if nr < 0:
            return  # not a system call of this architecture
        args = (_ScmpArg * max(1, len(conditions)))(*conditions)
        rc = lib.seccomp_rule_add_array(ctx, 0x00050000 | errno, nr, len(conditions), args)
        if rc < 0:
            raise OSError(-rc, f"seccomp rule for {name}: {os.strerror(-rc)}")

    for name in SECCOMP_DENIED:
        deny(name, _EPERM)
    for flag in (CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC, CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET, CLONE_NEWCGROUP):
        deny("clone", _EPERM, _ScmpArg(0, _SCMP_CMP_MASKED_EQ, flag, flag))
    deny("clone3", _ENOSYS)
    return lib, ctx


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_char_p)]


def seccomp_bpf(filt) -> bytes:
    """The filter compiled to classic BPF once (libseccomp's seccomp_export_bpf), so each test
    process installs it with one prctl instead of compiling it again."""
    lib, ctx = filt
    lib.seccomp_export_bpf.argtypes = [ctypes.c_void_p, ctypes.c_int]
    fd = os.memfd_create("seccomp-bpf", 0)
    try:
        rc = lib.seccomp_export_bpf(ctx, fd)
        if rc < 0:
            raise OSError(-rc, f"seccomp_export_bpf: {os.strerror(-rc)}")
        return os.pread(fd, os.fstat(fd).st_size, 0)
    finally:
        os.close(fd)


def _load_seccomp() -> None:
    """Install the filter (no_new_privs must be set). Every test process does, after dropping
    privileges and before the program or the test runs."""
    for bpf in _SECCOMP:
        prog = _SockFprog(len(bpf) // 8, bpf)
        _check(_libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(prog), 0, 0), "prctl(PR_SET_SECCOMP)")


_CGROUP: dict = {}  # "procs" / "events": descriptors of the slot's memory cgroup, opened by _prepare()


def _open_cgroup(spec) -> None:
    """Opened while the runner waits for its job, and before the private root replaces the
    host's file system: the descriptors stay usable from inside it."""
    if spec:
        _CGROUP["procs"] = os.open(spec["procs"], os.O_WRONLY | os.O_CLOEXEC)
        _CGROUP["events"] = os.open(spec["events"], os.O_RDONLY | os.O_CLOEXEC)
        _oom_score_adj(-1000)  # the supervisors are never the OOM killer's choice


def _join_cgroup() -> None:
    """Move this runner into the slot's memory cgroup: everything it forks (init, the test
    processes, their children) is counted there. Done last while it waits for its job, off the
    critical path (the first cgroup move after a quiet spell waits for an RCU grace period in
    the kernel), when its imports are done: a runner waiting beside a running program charges
    the slot next to nothing."""
    fd = _CGROUP.get("procs")
    if fd is not None:
        os.write(fd, str(os.getpid()).encode())
        os.close(_CGROUP.pop("procs"))


def _oom_score_adj(value: int) -> None:
    try:
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write(str(value))
    except OSError:
        pass  # lowering needs privilege; raising (the test processes) never fails


def _oom_kills() -> int:
    """The cgroup's OOM-kill count (v1 memory.oom_control and v2 memory.events both say `oom_kill N`)."""
    fd = _CGROUP.get("events")
    if fd is None:
        return 0
    for line in os.pread(fd, 4096, 0).decode().splitlines():
        key, _, value = line.partition(" ")
        if key == "oom_kill":
            return int(value)
    return 0


def _clear_keyrings(uid: int) -> None:
    """Without seccomp, a program can store keys in its uid's user keyrings, which outlive every
    process: empty them as that uid after each test (KEYCTL_CLEAR of @u and @us)."""
    pid = os.fork()
    if pid == 0:
        try:
            os.setresuid(uid, uid, uid)
            for ring in (-4, -5):
                _syscall("keyctl", 7, ring)
        except BaseException:  # noqa: BLE001
            os._exit(1)
        os._exit(0)
    os.waitpid(pid, 0)


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
    stdin = _memfd(test.get("input", "").encode())
    (out_r, out_w), (err_r, err_w), (ver_r, ver_w) = os.pipe(), os.pipe(), os.pipe()
    oom_before = _oom_kills()
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
    if running:
        _kill_all(job["mode"], job["uid"])
    _, status, ru = os.wait4(cand, 0)
    if evaluator:
        os.waitpid(evaluator, 0)
    leftover = _kill_all(job["mode"], job["uid"])
    _reap_all(job["mode"], job["uid"])
    if job.get("clear_keys"):
        _clear_keyrings(job["uid"])
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
        "oom": _oom_kills() > oom_before,
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
    exclude, with_rss = {evaluator}, not _CGROUP
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
    hook = (lambda: _install_audit_hook(workdir)) if job["mode"] == AUDIT else None
    if "code" in test:
        calls.serve(job["code"], 3, 4, _max_message(job), before_run=hook)
    _run_program(job, nonce, hook)


def _evaluator(job: dict, index: int, fds: tuple, nonce: str) -> None:
    """The trusted side of an assertion test: reads its test from the memfd init never read."""
    os.setsid()
    null = os.open("/dev/null", os.O_RDWR)
    _place_fds((null, null, null, *fds, job["tests_fd"]))  # 3 verdict, 4 requests, 5 replies, 6 tests
    _limit_and_drop(job, job["eval_uid"], candidate=False)
    test_code = marshal.loads(os.pread(6, os.fstat(6).st_size, 0))[index]
    os.close(6)

    def report(status: str, kind: str = "", detail: str = "") -> None:
        line = f"{nonce} {status} {kind}\t{detail[:300]}".replace("\n", " ") + "\n"
        try:
            os.write(VERDICT_FD, line.encode("utf-8", "replace"))
        except OSError:
            pass

    calls.evaluate(test_code, 4, 5, _max_message(job), report)
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
    _oom_score_adj(1000 if candidate else 500)  # the program first; the evaluator before the supervisors
    if candidate and (os.geteuid() == 0 or mode == USER_NS):
        # SysV segments, semaphores and message queues live in the IPC namespace: a private one
        # per test, gone with its last process, so nothing outlives the test or reaches the next.
        _check(_libc.unshare(CLONE_NEWIPC), "unshare(CLONE_NEWIPC)")
    if os.geteuid() == 0 and mode != USER_NS:
        # An unprivileged uid of its own: RLIMIT_NPROC applies (root ignores it), root-only files
        # and other users' processes (the supervisor, the init, the evaluator) are out of reach.
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
    elif mode == USER_NS:
        _drop_capabilities()  # root of the user namespace, minus every capability
    _prctl(PR_SET_NO_NEW_PRIVS, 1)  # no setuid binary or file capability gives anything back
    _prctl(PR_SET_DUMPABLE, 0)  # not ptrace-able, /proc/<pid>/mem and fd closed even to the same uid
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # after the uid change, which clears it
    _load_seccomp()


def _drop_capabilities() -> None:
    header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this process
    data = (ctypes.c_uint32 * 6)()  # effective, permitted, inheritable x 2 words: all empty
    _syscall("capset", header, data)


def _streams() -> None:
    import io
    sys.stdin = sys.__stdin__ = io.open(0, "r", encoding="utf-8", errors="replace", closefd=False)
    sys.stdout = sys.__stdout__ = io.open(1, "w", encoding="utf-8", errors="backslashreplace", closefd=False)
    sys.stderr = sys.__stderr__ = io.open(2, "w", encoding="utf-8", errors="backslashreplace", closefd=False,
                                          buffering=1)


# ---------------------------------------------------------------------------------------------
# audit-hook mode: the Python-level barrier where no namespace is available
# ---------------------------------------------------------------------------------------------

_DENIED_EVENTS = frozenset({"socket.__new__", "socket.connect", "socket.bind", "socket.sendto",
                            "socket.sendmsg", "os.exec", "os.posix_spawn", "os.spawn", "os.system",
                            "subprocess.Popen", "pty.spawn", "os.kill", "os.killpg", "signal.pthread_kill"})
# events that change the file system, and which of their arguments are paths
_PATH_EVENTS = {"os.remove": (0,), "os.rmdir": (0,), "os.rename": (0, 1), "os.truncate": (0,),
                "os.chmod": (0,), "os.chown": (0,), "os.link": (0, 1), "os.symlink": (1,), "os.mkdir": (0,),
                "os.utime": (0,), "shutil.rmtree": (0,)}
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_DENIED_IMPORTS = frozenset({"_posixsubprocess"})  # its fork_exec starts programs without an event


class _Denied(PermissionError):
    pass


def _install_audit_hook(workdir: str) -> None:
    """Refuse sockets, starting programs, signalling processes, ctypes (which would step around
    the hook) and changing files outside the working directory. The hook only uses what it
    captured here: the program cannot reach it, but it can rebind module attributes."""
    denied, denied_imports, path_events, Denied = _DENIED_EVENTS, _DENIED_IMPORTS, _PATH_EVENTS, _Denied
    fsdecode, is_int, write_flags, realpath, any_ = os.fsdecode, int, _WRITE_FLAGS, os.path.realpath, any

    def outside(path) -> bool:
        if path.__class__ is is_int:  # an fd: opened through a path that was checked
            return False
        real = realpath(fsdecode(path))
        return not (real == workdir or real.startswith(workdir + "/") or real == "/dev/null")

    def hook(event, args):
        if event in denied or event.startswith("ctypes.") or (event == "import" and args[0] in denied_imports):
            pass
        elif event == "open":
            if args[0].__class__ is is_int or not ((args[2] or 0) & write_flags and outside(args[0])):
                return
        elif event in path_events:
            if not any_(outside(args[i]) for i in path_events[event]):
                return
        else:
            return
        raise Denied(f"sandbox: {event} {args[0]} is not allowed" if event == "import" else
                     f"sandbox: {event} is not allowed")

    sys.addaudithook(hook)


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
    _open_cgroup(prep.get("cgroup"))
    if prep.get("seccomp"):
        filt = seccomp_filter()
        if filt is None:
            raise OSError("libseccomp is not installed")
        _SECCOMP[:] = [seccomp_bpf(filt)]
    _preload("threading", "io", "types", *(("socket",) if prep.get("mode") == AUDIT else ()))
    _join_cgroup()


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
    stop = None
    for i, test in enumerate(job["tests"]):
        if stop is not None:  # a syntax error fails every test the same way: do not rerun it
            _emit(dict(stop, i=i))
            continue
        res = _run_one(job, test, i, workdir)
        res["i"] = i
        _emit(res)
        v = res["verdict"]
        if v and v["kind"] == "syntax error" and v["status"] != "tampered":
            stop = res


def _preload(*modules: str) -> None:
    for name in modules:
        __import__(name)


def _die_with_parent() -> None:
    ppid = os.getppid()
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
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
                _enter_namespaces(mode)
                _mount(None, "/", None, MS_REC | MS_PRIVATE)
                _mount("probe", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "size=65536")
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
            filt = seccomp_filter()
            if filt is None:
                os._exit(2)
            _SECCOMP[:] = [seccomp_bpf(filt)]
            _prctl(PR_SET_NO_NEW_PRIVS, 1)
            _load_seccomp()
            try:
                _syscall("keyctl", 0, -3, 0)  # KEYCTL_GET_KEYRING_ID of the session keyring
            except OSError as e:
                os._exit(0 if e.errno == _EPERM else 1)
            os._exit(1)
        except BaseException:  # noqa: BLE001
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    return os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0


def main(argv: list) -> None:
    global calls
    import sandbox_calls  # imported by the bootstrap beside us (see `command`)
    calls = sandbox_calls
    # Out of sight before any program runs here.
    sys.modules.pop(__name__, None)
    sys.modules.pop("sandbox_calls", None)
    if argv == ["--probe"]:
        _emit(probe())
        return
    _die_with_parent()
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    _libc.mallopt(M_ARENA_MAX, 2)  # glibc reserves 64 MiB of address space per thread arena
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
        _prctl(PR_SET_CHILD_SUBREAPER, 1)
        _prctl(PR_SET_DUMPABLE, 0)  # the tests' memfd out of reach of same-uid processes
        _run_tests(job, job["workdir"])
        return
    try:
        _enter_namespaces(mode)
    except OSError as e:
        _emit({"error": f"sandbox setup failed: {e}"})
        os._exit(3)
    pid = os.fork()
    if pid == 0:  # pid 1: when it exits, the kernel kills everything left in the namespace
        try:
            _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
            _build_root(job)
            _libc.sethostname(b"sandbox", 7)
            # after the uid map is written (user namespaces): our descriptors (the tests' memfd)
            # are then out of reach of the test processes, which share our uid there
            _prctl(PR_SET_DUMPABLE, 0)
        except OSError as e:
            _emit({"error": f"sandbox setup failed: {e}"})
            os._exit(3)
        _run_tests(job, WORKDIR)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    os._exit(0 if status == 0 else 3)


def command(*args: str) -> list:
    """How the parent starts the runner: `-I -S` (no site, no environment), and the modules
    imported from their directory rather than run as a script, so their bytecode is cached."""
    # Appended, not prepended: its neighbours (rewards/types.py) must not shadow the stdlib.
    boot = "import sys; sys.path.append(sys.argv[1]); import sandbox_calls, sandbox_runner; sys.path.pop(); " \
           "sandbox_runner.main(sys.argv[2:])"
    return [sys.executable, "-I", "-S", "-c", boot, os.path.dirname(os.path.abspath(__file__)), *args]


if __name__ == "__main__":
    main(sys.argv[1:])
