"""Per-slot memory cgroups for the code sandbox (host side).

RLIMIT_AS bounds one process's address space and the supervisor's sum of resident memory misses
what no process maps: SysV shared memory a program detached from, files in its tmpfs, page
cache. The kernel's memory controller counts all of it. Each sandbox slot gets a cgroup of its own
under this process's memory cgroup (v1 `memory` hierarchy, or v2 where the memory controller is
delegated to it), limited to `SandboxLimits.memory_bytes` with no swap; the program's processes
join it (the runner writes their pids), the evaluator stays out. The OOM killer then kills inside
the slot, and the supervisor reads the kill count to say "memory limit".

Only root (or a delegated v2 subtree) can do this; elsewhere `MemoryCgroups.create` returns None
and the supervisor's sum of resident memory is what remains.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

PREFIX = "megatron-ernie-sandbox"


def _mounts() -> list[tuple[str, str, str]]:
    """(mount point, file system type, super options) of every mount of this process."""
    out = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        fields, rest = left.split(), right.split()
        if len(fields) >= 5 and len(rest) >= 3:
            out.append((fields[4].replace("\\040", " "), rest[0], rest[2]))
    return out


def memory_cgroup_dir() -> tuple[int, Path] | None:
    """(version, directory) of this process's memory cgroup, or None if it has none we can see."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
        mounts = _mounts()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            for point, fstype, opts in mounts:
                if fstype == "cgroup" and "memory" in opts.split(","):
                    return 1, Path(point + path.rstrip("/"))
    for line in lines:
        hid, controllers, path = line.split(":", 2)
        if hid == "0" and controllers == "":
            for point, fstype, _ in mounts:
                if fstype == "cgroup2":
                    d = Path(point + path.rstrip("/"))
                    if "memory" in (d / "cgroup.controllers").read_text().split():
                        return 2, d
    return None


def _write(path: Path, value) -> None:
    with open(path, "w") as f:
        f.write(str(value))


class MemoryCgroups:
    """One memory cgroup per slot; `spec(slot)` is what the runner needs (`procs`, `events`)."""

    def __init__(self, version: int, dirs: list[Path]):
        self.version, self.dirs = version, dirs

    @property
    def name(self) -> str:
        return f"memory-cgroup-v{self.version}"

    @classmethod
    def create(cls, n: int, memory_bytes: int, required: bool = False) -> "MemoryCgroups | None":
        """n cgroups limited to `memory_bytes` each, or None where this process may not make them
        (OSError instead when `required`)."""
        found = memory_cgroup_dir()
        try:
            if found is None:
                raise OSError("no memory cgroup is visible to this process")
            version, base = found
            _prune_stale(base)
            dirs = []
            try:
                for slot in range(n):
                    d = base / f"{PREFIX}-{os.getpid()}-{id(dirs):x}-{slot}"
                    d.mkdir()
                    dirs.append(d)
                    _limit(version, base, d, memory_bytes)
            except OSError:
                _remove(dirs)
                raise
            return cls(version, dirs)
        except OSError as e:
            if required:
                raise OSError(f"memory cgroup unavailable: {e}") from None
            return None

    def spec(self, slot: int) -> dict:
        d = self.dirs[slot]
        events = "memory.oom_control" if self.version == 1 else "memory.events"
        return {"procs": str(d / "cgroup.procs"), "events": str(d / events)}

    def settle(self, slot: int, limit: int, timeout_s: float = 2.0) -> None:
        """Before a slot's next run: wait until the last run's memory is uncharged. The kernel
        frees an IPC namespace's segments (and a mount namespace's tmpfs) asynchronously after
        its last process is gone; a hostile run's gigabytes must not count against the next one."""
        usage = self.dirs[slot] / ("memory.usage_in_bytes" if self.version == 1 else "memory.current")
        deadline = time.monotonic() + timeout_s
        while int(usage.read_text()) > limit // 8 and time.monotonic() < deadline:
            time.sleep(0.01)
        if self.version == 1 and int(usage.read_text()) > limit // 8:
            try:
                _write(self.dirs[slot] / "memory.force_empty", 0)  # page cache left behind
            except OSError:
                pass

    def close(self) -> None:
        _remove(self.dirs)
        self.dirs = []


def _limit(version: int, base: Path, d: Path, memory_bytes: int) -> None:
    if version == 1:
        _write(d / "memory.limit_in_bytes", memory_bytes)
        if (d / "memory.memsw.limit_in_bytes").exists():  # memory + swap: no swapping past the limit
            _write(d / "memory.memsw.limit_in_bytes", memory_bytes)
        return
    if not (d / "memory.max").exists():  # the controller is not enabled below `base` yet
        _write(base / "cgroup.subtree_control", "+memory")
    _write(d / "memory.max", memory_bytes)
    if (d / "memory.swap.max").exists():
        _write(d / "memory.swap.max", 0)


def _remove(dirs) -> None:
    for d in dirs:
        try:
            d.rmdir()
        except OSError:
            pass


def _prune_stale(base: Path) -> None:
    """Slot cgroups of processes that died without closing their sandbox (kill -9)."""
    for d in base.glob(f"{PREFIX}-*"):
        try:
            pid = int(d.name[len(PREFIX) + 1:].split("-")[0])
        except ValueError:
            continue
        if pid != os.getpid() and not Path(f"/proc/{pid}").exists():
            _remove([d])
