"""Isolation primitives of the code sandbox, child side (standard library only; see
`sandbox_runner`, which uses them): system calls through libc, namespaces and the private root,
the seccomp filter, the slot's memory cgroup, keyrings, capabilities, and the audit hook of the
"audit-hook" mode. Every function here runs inside a runner process, never in the trainer."""
import ctypes
import os
import sys

CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC, CLONE_NEWCGROUP = 0x00020000, 0x04000000, 0x08000000, 0x02000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 1, 2, 4, 8, 32
MS_NOATIME, MS_NODIRATIME, MS_BIND, MS_REC, MS_PRIVATE, MS_RELATIME = 1024, 2048, 4096, 16384, 1 << 18, 1 << 21
MNT_DETACH = 2
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_SET_CHILD_SUBREAPER, PR_SET_NO_NEW_PRIVS = 1, 4, 36, 38
PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 22, 2
# statvfs f_flag bit -> mount flag; a read-only remount must keep what the source mount had
# (in a user namespace the kernel refuses to clear locked flags).
_ST_TO_MS = {2: MS_NOSUID, 4: MS_NODEV, 8: MS_NOEXEC, 1024: MS_NOATIME, 2048: MS_NODIRATIME, 4096: MS_RELATIME}
_SYSCALLS = {"x86_64": {"pivot_root": 155, "capset": 126, "keyctl": 250},
             "aarch64": {"pivot_root": 41, "capset": 91, "keyctl": 219}}
WORKDIR = "/sandbox"  # the working directory inside the private root of the namespace modes
libc = ctypes.CDLL(None, use_errno=True)


def check(ret: int, what: str) -> int:
    if ret == -1:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return ret


def syscall(name: str, *args) -> int:
    nr = _SYSCALLS.get(os.uname().machine, {}).get(name)
    if nr is None:
        raise OSError(38, f"{name}: unknown syscall number on {os.uname().machine}")
    return check(libc.syscall(nr, *args), name)


def prctl(option: int, arg: int) -> None:
    check(libc.prctl(option, ctypes.c_ulong(arg), 0, 0, 0), f"prctl({option})")


def mount(src, dst, fstype, flags, data=None) -> None:
    enc = (lambda s: None if s is None else s.encode())
    check(libc.mount(enc(src), enc(dst), enc(fstype), ctypes.c_ulong(flags), enc(data)), f"mount {dst}")


# ---------------------------------------------------------------------------------------------
# Namespaces and the private root
# ---------------------------------------------------------------------------------------------

def enter_namespaces(user: bool) -> None:
    """New mount, network, pid, IPC and UTS namespaces (and a user namespace when `user`: not
    root, our one uid mapped to its root)."""
    flags = CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWUTS
    if user:
        uid, gid = os.geteuid(), os.getegid()
        check(libc.unshare(flags | CLONE_NEWUSER), "unshare")
        # Map our one uid/gid to root of the new namespace; setgroups must be denied first.
        for name, text in (("setgroups", "deny"), ("uid_map", f"0 {uid} 1"), ("gid_map", f"0 {gid} 1")):
            with open(f"/proc/self/{name}", "w") as f:
                f.write(text)
    else:
        check(libc.unshare(flags), "unshare")


def _ro_bind(src: str, dst: str) -> None:
    mount(src, dst, None, MS_BIND | MS_REC)
    keep = 0
    st = os.statvfs(src)
    for bit, ms in _ST_TO_MS.items():
        if st.f_flag & bit:
            keep |= ms
    mount(None, dst, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | keep)


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


def build_root(limits: dict, uid: int, gid: int, own_workdir: bool) -> None:
    """A fresh tmpfs as `/`: the system and Python directories bound read-only, a few device
    nodes, and tmpfs space (one size limit for all of it) for /sandbox, /tmp, /var/tmp, /dev/shm.
    Nothing the program writes can reach the host; nothing outside these binds is visible."""
    lim = limits
    mount(None, "/", None, MS_REC | MS_PRIVATE)  # no mount event propagates back to the host
    new = _staging_dir(_python_dirs())  # the private mount namespace hides it from the host
    mount("sandbox", new, "tmpfs", MS_NOSUID | MS_NODEV,
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
        mount(f"/dev/{dev}", f"{new}/dev/{dev}", None, MS_BIND)
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
                         ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2")):
        os.symlink(target, f"{new}/dev/{name}")
    with open(f"{new}/etc/passwd", "w") as f:
        f.write(f"root:x:0:0:root:/:/bin/false\nsandbox:x:{uid}:{gid}:sandbox:{WORKDIR}:/bin/false\n")
    with open(f"{new}/etc/group", "w") as f:
        f.write(f"root:x:0:\nsandbox:x:{gid}:\n")
    with open(f"{new}/etc/hosts", "w") as f:
        f.write("127.0.0.1 localhost\n")
    if os.path.isfile("/etc/ld.so.cache"):
        open(f"{new}/etc/ld.so.cache", "w").close()
        _ro_bind("/etc/ld.so.cache", f"{new}/etc/ld.so.cache")
    if own_workdir:
        os.chown(new + WORKDIR, uid, gid)
    _mount_proc(new + "/proc")
    os.chdir(new)
    syscall("pivot_root", b".", b".")  # the old root ends up stacked under the new one...
    check(libc.umount2(b".", MNT_DETACH), "umount old root")  # ...and is detached here
    os.chdir("/")


def _mount_proc(target: str) -> None:
    """The new pid namespace's /proc, mounted by its pid 1 before the pivot: in a user namespace
    the kernel allows a proc mount only while an unobstructed one is still visible."""
    flags = MS_NOSUID | MS_NODEV | MS_NOEXEC
    try:  # hide the root-owned init from the test processes where the kernel knows the option
        mount("proc", target, "proc", flags, "hidepid=invisible")
    except OSError:
        mount("proc", target, "proc", flags)


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
_SCMP_ACT_ALLOW, _SCMP_CMP_MASKED_EQ, EPERM, _ENOSYS = 0x7FFF0000, 7, 1, 38
SECCOMP = []  # [the filter as BPF bytes] when the job asks for it


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
        deny(name, EPERM)
    for flag in (CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC, CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET, CLONE_NEWCGROUP):
        deny("clone", EPERM, _ScmpArg(0, _SCMP_CMP_MASKED_EQ, flag, flag))
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


def load_seccomp() -> None:
    """Install the filter (no_new_privs must be set). Every test process does, after dropping
    privileges and before the program or the test runs."""
    for bpf in SECCOMP:
        prog = _SockFprog(len(bpf) // 8, bpf)
        check(libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(prog), 0, 0), "prctl(PR_SET_SECCOMP)")


CGROUP: dict = {}  # "procs" / "events": descriptors of the slot's memory cgroup, opened by _prepare()


def open_cgroup(spec) -> None:
    """Opened while the runner waits for its job, and before the private root replaces the
    host's file system: the descriptors stay usable from inside it."""
    if spec:
        CGROUP["procs"] = os.open(spec["procs"], os.O_WRONLY | os.O_CLOEXEC)
        CGROUP["events"] = os.open(spec["events"], os.O_RDONLY | os.O_CLOEXEC)
        oom_score_adj(-1000)  # the supervisors are never the OOM killer's choice


def join_cgroup() -> None:
    """Move this runner into the slot's memory cgroup: everything it forks (init, the test
    processes, their children) is counted there. Done last while it waits for its job, off the
    critical path (the first cgroup move after a quiet spell waits for an RCU grace period in
    the kernel), when its imports are done: a runner waiting beside a running program charges
    the slot next to nothing."""
    fd = CGROUP.get("procs")
    if fd is not None:
        os.write(fd, str(os.getpid()).encode())
        os.close(CGROUP.pop("procs"))


def oom_score_adj(value: int) -> None:
    try:
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write(str(value))
    except OSError:
        pass  # lowering needs privilege; raising (the test processes) never fails


def oom_kills() -> int:
    """The cgroup's OOM-kill count (v1 memory.oom_control and v2 memory.events both say `oom_kill N`)."""
    fd = CGROUP.get("events")
    if fd is None:
        return 0
    for line in os.pread(fd, 4096, 0).decode().splitlines():
        key, _, value = line.partition(" ")
        if key == "oom_kill":
            return int(value)
    return 0


def clear_keyrings(uid: int) -> None:
    """Without seccomp, a program can store keys in its uid's user keyrings, which outlive every
    process: empty them as that uid after each test (KEYCTL_CLEAR of @u and @us)."""
    pid = os.fork()
    if pid == 0:
        try:
            os.setresuid(uid, uid, uid)
            for ring in (-4, -5):
                syscall("keyctl", 7, ring)
        except BaseException:  # noqa: BLE001
            os._exit(1)
        os._exit(0)
    os.waitpid(pid, 0)


def drop_capabilities() -> None:
    header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this process
    data = (ctypes.c_uint32 * 6)()  # effective, permitted, inheritable x 2 words: all empty
    syscall("capset", header, data)


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


def install_audit_hook(workdir: str) -> None:
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
