"""Child side of the code sandbox (see `sandbox.py`); standard library only.

Started once per scored program (`command()`: `python -I -S`, this module imported), it reads one
job (marshal) from stdin, isolates itself, runs every test in a fresh forked child and writes one
frame per test to stdout. Everything that needs privilege or namespaces happens here, after exec, so the parent
never needs `preexec_fn` (not thread-safe) and stays free of this module's imports.

Process tree in the namespace modes:

    runner (unshares net/mount/pid/ipc/uts, waits)
      └─ init, pid 1 of the new pid namespace (builds the private root, mounts /proc, runs the
         │  tests, watches their time/memory/output, kills and reaps leftovers)
         └─ test child (limits itself, drops privileges, runs program + test), one per test

In "audit-hook" mode the runner is the init: no namespaces, a child subreaper instead of pid 1.

What leaves the sandbox: the test child's stdout/stderr (capped) and one verdict line on a private
pipe, prefixed with a per-test random nonce. The parent decides pass/fail: stdin/stdout cases by
comparing the output itself (expected outputs never enter the sandbox); assertion cases from the
verdict line, which the program can only forge by digging the nonce out of the harness' memory —
frames, gc, ctypes and /proc/*/mem are blocked by an audit hook to make that hard.
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

CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 1, 2, 4, 8, 32
MS_NOATIME, MS_NODIRATIME, MS_BIND, MS_REC, MS_PRIVATE, MS_RELATIME = 1024, 2048, 4096, 16384, 1 << 18, 1 << 21
MNT_DETACH = 2
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_SET_CHILD_SUBREAPER, PR_SET_NO_NEW_PRIVS = 1, 4, 36, 38
M_ARENA_MAX = -8
# statvfs f_flag bit -> mount flag; a read-only remount must keep what the source mount had
# (in a user namespace the kernel refuses to clear locked flags).
_ST_TO_MS = {2: MS_NOSUID, 4: MS_NODEV, 8: MS_NOEXEC, 1024: MS_NOATIME, 2048: MS_NODIRATIME, 4096: MS_RELATIME}
_SYSCALLS = {"x86_64": {"pivot_root": 155, "capset": 126}, "aarch64": {"pivot_root": 41, "capset": 91}}

USAGE_CHECK_S = 0.05  # how often the supervisor sums the test's memory and CPU time
PAGE_SIZE, CLOCK_TICKS = os.sysconf("SC_PAGE_SIZE"), os.sysconf("SC_CLK_TCK")
WORKDIR = "/sandbox"  # inside the private root of the namespace modes
VERDICT_FD = 3
_libc = ctypes.CDLL(None, use_errno=True)


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
# Running one test
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


def _usage(mode: str) -> tuple:
    """(resident bytes, CPU seconds) of all the test's live processes together. RLIMIT_AS and
    RLIMIT_CPU bound each process alone (CPU in whole seconds): summed here, a program that
    forks or threads cannot use max_processes times the limits."""
    if mode == AUDIT:
        pids = _descendants(os.getpid())[0]
    else:  # this /proc is the namespace's own: every process but us (pid 1) belongs to the test
        pids = [int(n) for n in os.listdir("/proc") if n.isdigit() and n != "1"]
    rss = cpu = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2:].split()  # field 3 (state) onwards
        cpu += int(fields[11]) + int(fields[12])  # utime + stime, in clock ticks
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


def _run_one(job: dict, test: dict, workdir: str) -> dict:
    lim = job["limits"]
    nonce = os.urandom(16).hex()
    stdin = os.memfd_create("stdin", 0)
    data = test.get("input", "").encode()
    while data:
        data = data[os.write(stdin, data):]
    os.lseek(stdin, 0, os.SEEK_SET)
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    ver_r, ver_w = os.pipe()
    t0 = time.monotonic()
    pid = os.fork()
    if pid == 0:
        try:
            _child(job, test, (stdin, out_w, err_w, ver_w), nonce, workdir)
        finally:
            os._exit(120)
    for fd in (stdin, out_w, err_w, ver_w):
        os.close(fd)
    pidfd = os.pidfd_open(pid)
    bufs = {out_r: bytearray(), err_r: bytearray(), ver_r: bytearray()}
    poller = select.poll()
    for fd in (*bufs, pidfd):
        poller.register(fd, select.POLLIN)
    cap, limit, exited = lim["output_bytes"], None, False

    def read_some(fd) -> bool:
        chunk = os.read(fd, 1 << 16)
        if chunk:
            bufs[fd] += chunk
        else:
            poller.unregister(fd)
        return bool(chunk)

    next_check = t0 + USAGE_CHECK_S
    while not exited:
        now = time.monotonic()
        left = t0 + lim["wall_time_s"] - now
        if left <= 0:
            limit = "timeout"
            break
        if now >= next_check:
            next_check = now + USAGE_CHECK_S
            rss, cpu = _usage(job["mode"])
            if rss > lim["memory_bytes"]:
                limit = "memory limit"
                break
            if cpu >= lim["cpu_time_s"]:
                limit = "cpu time limit"
                break
        wait = min(left, next_check - now)
        for fd, _ in poller.poll(max(1, int(wait * 1000))):
            if fd == pidfd:
                exited = True
            else:
                read_some(fd)
        if len(bufs[out_r]) + len(bufs[err_r]) > cap:
            limit = "output limit"
            break
        if len(bufs[ver_r]) > 4096:
            break  # a verdict is one short line: anything longer is tampering, stop reading it
    wall = time.monotonic() - t0
    if not exited:
        _kill_all(job["mode"], job["uid"])
    _, status, ru = os.wait4(pid, 0)
    leftover = _kill_all(job["mode"], job["uid"])
    _reap_all(job["mode"], job["uid"])
    # Every writer is dead now: drain what is buffered, within the caps.
    for fd in (out_r, err_r, ver_r):
        while len(bufs[out_r]) + len(bufs[err_r]) <= cap and len(bufs[ver_r]) <= 4096:
            try:
                if not read_some(fd):
                    break
            except (OSError, KeyError):
                break
        os.close(fd)
    os.close(pidfd)
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
        "leftover": leftover and not limit,
        "verdict": _parse_verdict(bytes(bufs[ver_r]), nonce),
    }


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
# The test child: limits, credentials, then the harness
# ---------------------------------------------------------------------------------------------

def _child(job: dict, test: dict, fds: tuple, nonce: str, workdir: str) -> None:
    os.setsid()
    high = [_fcntl_dupfd(fd) for fd in fds]  # out of the way first: a source may sit on 0..3
    for target, fd in enumerate(high):
        os.dup2(fd, target)
    os.closerange(VERDICT_FD + 1, 1 << 16)  # the report pipe and everything else of the init
    os.chdir(workdir)
    _limit_and_drop(job)
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": workdir, "TMPDIR": "/tmp"}
    os.environ.clear()
    os.environ.update(env)
    _harness(job, test, nonce, workdir)


def _fcntl_dupfd(fd: int) -> int:
    return fcntl.fcntl(fd, fcntl.F_DUPFD, 100)


def _limit_and_drop(job: dict) -> None:
    lim, mode = job["limits"], job["mode"]
    cpu = max(1, int(-(-lim["cpu_time_s"] // 1)))  # RLIMIT_CPU is whole seconds: round up
    for res, value in ((resource.RLIMIT_CPU, (cpu, cpu + 1)),  # SIGXCPU, then SIGKILL a second later
                       (resource.RLIMIT_AS, lim["memory_bytes"]),
                       (resource.RLIMIT_NPROC, lim["max_processes"]),
                       (resource.RLIMIT_NOFILE, lim["max_open_files"]),
                       (resource.RLIMIT_FSIZE, lim["file_size_bytes"]),
                       (resource.RLIMIT_CORE, 0)):
        resource.setrlimit(res, value if isinstance(value, tuple) else (value, value))
    if os.geteuid() == 0 and mode != USER_NS:
        # A per-slot unprivileged uid: RLIMIT_NPROC applies (root ignores it), root-only files and
        # other users' processes (the supervisor, the init) are out of reach.
        os.setgroups([])
        os.setresgid(job["gid"], job["gid"], job["gid"])
        os.setresuid(job["uid"], job["uid"], job["uid"])
    elif mode == USER_NS:
        _drop_capabilities()  # root of the user namespace, minus every capability
    _prctl(PR_SET_NO_NEW_PRIVS, 1)  # no setuid binary or file capability gives anything back
    _prctl(PR_SET_DUMPABLE, 0)  # not ptrace-able, /proc/<pid>/mem closed even to the same uid
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # after the uid change, which clears it


def _drop_capabilities() -> None:
    header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this process
    data = (ctypes.c_uint32 * 6)()  # effective, permitted, inheritable x 2 words: all empty
    _syscall("capset", header, data)


_FRAME_ATTRS = frozenset({"tb_frame", "gi_frame", "cr_frame", "ag_frame", "f_back"})
_CODE_ATTRS = frozenset({"__code__"})
_DENIED = frozenset({"sys._getframe", "sys._current_frames", "sys.settrace", "sys.setprofile",
                     "gc.get_objects", "gc.get_referrers", "gc.get_referents"})
_DENIED_AUDIT_MODE = frozenset({"socket.__new__", "socket.connect", "socket.bind", "socket.sendto",
                                "socket.sendmsg", "os.exec", "os.posix_spawn", "os.spawn", "os.system",
                                "subprocess.Popen", "pty.spawn", "os.kill", "os.killpg", "signal.pthread_kill"})
# audit-hook mode: events that change the file system, and which of their arguments are paths
_PATH_EVENTS = {"os.remove": (0,), "os.rmdir": (0,), "os.rename": (0, 1), "os.truncate": (0,),
                "os.chmod": (0,), "os.chown": (0,), "os.link": (0, 1), "os.symlink": (1,), "os.mkdir": (0,),
                "os.utime": (0,), "shutil.rmtree": (0,)}
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_DENIED_IMPORTS = frozenset({"_posixsubprocess"})  # its fork_exec starts programs without an event


class _Denied(PermissionError, ValueError):
    """Also a ValueError: the standard library treats `sys._getframe` raising ValueError as "no
    caller frame" (namedtuple, typing, logging, enum), so denying frames breaks none of it."""


_FRAMELESS_SIGNAL = """
def frameless_signal(signum, handler):
    if callable(handler):
        user = handler
        handler = lambda signum, _frame: user(signum, None)
    return real_signal(signum, handler)
"""


def _install_audit_hook(mode: str, workdir: str) -> None:
    """Deny the ways Python code reaches the harness' stack and memory (frames, gc, ctypes,
    /proc/*/mem). In audit-hook mode, where nothing else stands in the way, also sockets,
    starting programs, signalling processes and changing files outside the working directory.
    The hook only uses what it captured here: the program cannot reach it, but it can rebind
    module attributes such as `os.stat`."""
    audit_mode = mode == AUDIT
    denied, frame_attrs, code_attrs = _DENIED, _FRAME_ATTRS, _CODE_ATTRS
    denied_audit, denied_imports, Denied = _DENIED_AUDIT_MODE, _DENIED_IMPORTS, _Denied
    stat, fsdecode, is_int, proc_dev = os.stat, os.fsdecode, int, os.stat("/proc").st_dev
    path_events, write_flags, realpath, any_ = _PATH_EVENTS, _WRITE_FLAGS, os.path.realpath, any

    def outside(path) -> bool:
        if path.__class__ is is_int:  # an fd: opened through a path that was checked
            return False
        real = realpath(fsdecode(path))
        return not (real == workdir or real.startswith(workdir + "/") or real == "/dev/null")

    def is_proc_mem(path) -> bool:
        # /proc/<pid>/mem is the one 0600 file a process owns there; the name catches dir_fd opens.
        path = fsdecode(path)
        if path.rpartition("/")[2] == "mem":
            return True
        try:
            st = stat(path)
        except OSError:
            return False
        return st.st_dev == proc_dev and st.st_mode & 0o777 == 0o600

    def hook(event, args):
        if event in denied or event.startswith("ctypes."):
            pass
        elif event == "object.__getattr__":
            if args[1] not in frame_attrs:
                return
        elif event == "object.__setattr__":
            if args[1] not in code_attrs:  # swapping a harness function's code
                return
        elif event == "open":
            if args[0].__class__ is is_int:
                return
            if not is_proc_mem(args[0]) and not (audit_mode and (args[2] or 0) & write_flags and outside(args[0])):
                return
        elif not audit_mode:
            return
        elif event in denied_audit or (event == "import" and args[0] in denied_imports):
            pass
        elif event in path_events:
            if not any_(outside(args[i]) for i in path_events[event]):
                return
        else:
            return
        raise Denied(f"sandbox: {event} {args[0]} is not allowed" if event == "import" else
                     f"sandbox: {event} is not allowed")

    sys.addaudithook(hook)
    # Signal handlers are handed the interrupted frame: give them None instead. `signal.signal`
    # calls `_signal.signal`, so replacing the builtin covers both. Defined with globals of its
    # own, so `_signal.signal.__globals__` does not lead to this module.
    scope = {"__builtins__": {}, "callable": callable, "real_signal": sys.modules["_signal"].signal}
    exec(_FRAMELESS_SIGNAL, scope)
    sys.modules["_signal"].signal = scope["frameless_signal"]


# Strict equality for assertion tests. `assert a == b` becomes `assert __sandbox_eq__(a, b)`: when
# exactly one side holds an object whose equality the program defined (an "always equal" object,
# a patched stdlib class), the assertion fails instead of trusting that object's __eq__. The
# program can reach these functions (module globals), so they use nothing it could swap: every
# helper and builtin comes in the immutable `env` tuple, and the type slots are read through
# `type`'s own descriptors (a metaclass can fake `cls.__mro__` / `cls.__dict__`, not those).

def _eq_env() -> tuple:
    import collections
    known = tuple((cls, type.__dict__["__dict__"].__get__(cls).get("__eq__")) for cls in (
        collections.Counter, collections.UserDict, collections.UserList, collections.UserString,
        collections.ChainMap))
    return (_trusted, known, 1 << 9,  # Py_TPFLAGS_HEAPTYPE: C types cannot be patched
            _known_eq,
            type, issubclass, all, bool, type.__dict__["__mro__"].__get__, type.__dict__["__dict__"].__get__,
            type.__dict__["__flags__"].__get__, list.__iter__, tuple.__iter__, dict.items,
            set.__iter__, frozenset.__iter__, collections.deque, collections.deque.__iter__)


def _trusted(env, v, depth) -> bool:
    (trusted, known, heap, known_eq, type_, issubclass_, all_, _, mro, tdict, tflags,
     list_iter, tuple_iter, dict_items, set_iter, fset_iter, deque, deque_iter) = env
    t = type_(v)
    if depth > 40:
        return False
    for k in mro(t):
        d = tdict(k)
        if "__eq__" in d:
            if tflags(k) & heap and not known_eq(known, k, d["__eq__"]):
                return False
            break
    if issubclass_(t, list):
        items = list_iter(v)
    elif issubclass_(t, tuple):
        items = tuple_iter(v)
    elif issubclass_(t, dict):
        items = (x for kv in dict_items(v) for x in kv)
    elif issubclass_(t, frozenset):
        items = fset_iter(v)
    elif issubclass_(t, set):
        items = set_iter(v)
    elif issubclass_(t, deque):
        items = deque_iter(v)
    else:
        return True
    return all_(trusted(env, x, depth + 1) for x in items)


def _known_eq(pairs: tuple, cls, eq) -> bool:
    for c, e in pairs:
        if c is cls:
            return e is eq
    return False


def _strict_eq(env, a, b) -> bool:
    trusted, as_bool = env[0], env[7]
    if trusted(env, a, 0) is not trusted(env, b, 0):
        return False
    return as_bool(a == b)


def _test_function(source: str, ns: dict):
    """The assertion snippet compiled as the body of `__sandbox_test__(__sandbox_eq__)` with the
    program's namespace as globals: the equality helper is then a local, which the program's code
    (running inside the asserts) cannot rebind the way it could a global."""
    import ast
    import types

    compile(source, "<test>", "exec", dont_inherit=True)  # module-level rules: no yield/return

    class StrictEq(ast.NodeTransformer):
        def visit_Assert(self, node):
            self.generic_visit(node)
            t = node.test
            if isinstance(t, ast.Compare) and len(t.ops) == 1 and isinstance(t.ops[0], ast.Eq):
                node.test = ast.Call(ast.Name("__sandbox_eq__", ast.Load()), [t.left, t.comparators[0]], [])
            return node

    body = StrictEq().visit(ast.parse(source, "<test>")).body or [ast.Pass()]
    args = ast.arguments(posonlyargs=[], args=[ast.arg("__sandbox_eq__")], kwonlyargs=[], kw_defaults=[], defaults=[])
    fn = ast.FunctionDef("__sandbox_test__", args, body, [], None, None)
    code = compile(ast.fix_missing_locations(ast.Module([fn], [])), "<test>", "exec", dont_inherit=True, optimize=0)
    inner = next(c for c in code.co_consts if isinstance(c, types.CodeType))
    return types.FunctionType(inner, ns, "__sandbox_test__")


def _classify(e) -> tuple:
    """(kind, detail) of an exception, without touching frames (the audit hook denies them)."""
    name = type(e).__name__
    if isinstance(e, SyntaxError):
        return "syntax error", f"line {e.lineno}: {e.msg}"
    if isinstance(e, MemoryError):
        return "memory limit", name
    if isinstance(e, RecursionError):
        return "recursion limit", name
    if isinstance(e, OSError):
        by_errno = {27: "file size limit", 28: "disk full", 24: "open files limit", 11: "process limit"}
        if e.errno in by_errno:
            return by_errno[e.errno], name
    if isinstance(e, PermissionError) and str(e).startswith("sandbox:"):
        return "blocked", str(e)[9:]
    try:
        msg = str(e)
    except BaseException:  # noqa: BLE001 - a hostile __str__
        msg = "?"
    tb, line = e.__traceback__, None
    while tb is not None:
        line, tb = tb.tb_lineno, tb.tb_next
    return f"runtime error: {name}", f"{msg} (line {line})"


def _harness(job: dict, test: dict, nonce: str, workdir: str) -> None:
    """Run the program, then the test; report one verdict line; exit. Everything used after the
    program starts is bound to a local first, so monkeypatching modules or builtins changes
    nothing here."""
    import builtins
    import functools
    import io
    import threading

    _exec, _write, _exit, _Base, _SystemExit = exec, os.write, os._exit, BaseException, SystemExit
    _classify_, _shutdown, _type, _str, _isinstance = _classify, threading._shutdown, type, str, isinstance
    _AssertionError = AssertionError
    kind = "code" if "code" in test else "io"
    out = io.open(1, "w", encoding="utf-8", errors="backslashreplace", closefd=False)
    err = io.open(2, "w", encoding="utf-8", errors="backslashreplace", closefd=False, buffering=1)
    sys.stdin = sys.__stdin__ = io.open(0, "r", encoding="utf-8", errors="replace", closefd=False)
    sys.stdout = sys.__stdout__ = out
    sys.stderr = sys.__stderr__ = err

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
        report("fail", *_classify_(e))
        _exit(1)
    module = _type(sys)("__main__" if kind == "io" else "solution")
    module.__dict__["__builtins__"] = builtins
    sys.modules["__main__"] = module
    sys.argv = ["solution.py"]
    sys.path.insert(0, workdir)
    ns = module.__dict__
    if kind == "code":
        try:
            test_fn = _test_function(test["code"], ns)
        except SyntaxError as e:
            report("fail", "bad test", f"line {e.lineno}: {e.msg}")
            _exit(2)
        strict_eq = functools.partial(_strict_eq, _eq_env())
    _install_audit_hook(_MODE[0], workdir)

    try:
        _exec(program, ns)
        exc = None
    except _SystemExit as e:
        exc = e
    except _Base as e:  # noqa: BLE001
        exc = e
    if kind == "io":
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
            what, detail = _classify_(exc)
            err.write(f"{_type(exc).__name__}: {detail}\n")
            report("error", what, detail)
            _exit(1)
        report("ok", "exit", _str(code))
        _exit(code & 0xFF)
    if exc is not None:
        what, detail = ("exited before the tests ran", "") if _isinstance(exc, _SystemExit) else _classify_(exc)
        report("fail", what, detail)
        _exit(1)
    try:
        test_fn(strict_eq)
    except _Base as e:  # noqa: BLE001 - AssertionError, SystemExit, anything
        what, detail = ("assertion failed", _str(e)[:200]) if _type(e) is _AssertionError else _classify_(e)
        report("fail", what, detail)
        _exit(1)
    report("pass")
    _exit(0)


_MODE = [AUDIT]  # set once by main(); read by the harness


# ---------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------

def _run_tests(job: dict, workdir: str) -> None:
    # Imported once here, so no forked test child pays for them.
    _preload("threading", "functools", "io")
    if any("code" in t for t in job["tests"]):
        _preload("ast", "types", "collections")
    stop = None
    for i, test in enumerate(job["tests"]):
        if stop is not None:  # a syntax error fails every test the same way: do not rerun it
            _emit(dict(stop, i=i))
            continue
        res = _run_one(job, test, workdir)
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
    """Which isolation this machine allows: each candidate is tried for real in a throwaway child
    (unshare, uid map, a tmpfs mount), since a kernel may allow the unshare and refuse the mount."""
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
    return result


def main(argv: list) -> None:
    # Imported by the bootstrap (see `command`) as a top-level module: out of sight it goes,
    # before any program runs here.
    sys.modules.pop(__name__, None)
    if argv == ["--probe"]:
        _emit(probe())
        return
    _die_with_parent()
    job = marshal.loads(sys.stdin.buffer.read())
    mode = _MODE[0] = job["mode"]
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    _libc.mallopt(M_ARENA_MAX, 2)  # glibc reserves 64 MiB of address space per thread arena
    if mode == AUDIT:
        _prctl(PR_SET_CHILD_SUBREAPER, 1)
        # Loaded here so the barrier a program meets is the audit hook, not a stdlib directory the
        # slot uid may be unable to read (an interpreter installed under a 0700 home).
        _preload("socket")
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
        except OSError as e:
            _emit({"error": f"sandbox setup failed: {e}"})
            os._exit(3)
        _run_tests(job, WORKDIR)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    os._exit(0 if status == 0 else 3)


def command(*args: str) -> list:
    """How the parent starts the runner: `-I -S` (no site, no environment), and the module
    imported from its directory rather than run as a script, so its bytecode is cached."""
    # Appended, not prepended: its neighbours (rewards/types.py) must not shadow the stdlib.
    boot = "import sys; sys.path.append(sys.argv[1]); import sandbox_runner; sys.path.pop(); " \
           "sandbox_runner.main(sys.argv[2:])"
    return [sys.executable, "-I", "-S", "-c", boot, os.path.dirname(os.path.abspath(__file__)), *args]


if __name__ == "__main__":
    main(sys.argv[1:])
