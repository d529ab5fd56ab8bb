"""Code sandbox throughput: programs per second through `Sandbox` vs the same programs run bare.

Same invocation, same programs, same tests, same per-test wall time limit, same concurrency (2):

- sandbox: `Sandbox.run_many` — one isolated runner per program (namespaces, private root,
  per-slot uid, rlimits), a forked child per test.
- bare: a thread pool of 2; every test is `subprocess.run([python, "-I", "-S", "-c", program])`
  with the test's stdin and `timeout=` the wall limit; assertion tests run program + snippet.
  No isolation at all. Same interpreter flags as the sandbox's runner, so the difference is the
  isolation, not `site`.

The mix (per 10 programs): 5 passing, 3 failing (wrong answer, exception), 2 timing out (a busy
loop, a sleep); 3 tests each, stdin/stdout and assertion tests. Pass counts of both runs are
compared, so the two really ran the same work. Each repeat runs bare then sandbox; medians are
reported. The timeouts dominate the mix's wall time, so the same comparison is also printed
without the timing-out programs (the per-program overhead).

Last line: ratio_sandbox_over_bare=<sandbox wall time / bare wall time> (target <= 1.5).

    python benchmarks/sandbox.py [--programs 20] [--repeats 3] [--wall 1.0]
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from megatron_ernie.rewards.sandbox import Sandbox, SandboxLimits  # noqa: E402

IO = [{"input": "3 4\n", "output": "7"}, {"input": "10 20\n", "output": "30"}, {"input": "-5 5\n", "output": "0"}]
ASSERT = [{"code": "assert solve([3, 1, 2]) == [1, 2, 3]"}, {"code": "assert solve([]) == []"},
          {"code": "assert solve([5, 5, 1]) == [1, 5, 5]"}]
PASSING = [
    ("a, b = map(int, input().split())\nprint(a + b)\n", IO),
    ("import sys\nprint(sum(map(int, sys.stdin.read().split())))\n", IO),
    ("def solve(xs):\n    return sorted(xs)\n", ASSERT),
    ("import heapq\ndef solve(xs):\n    h = list(xs)\n    heapq.heapify(h)\n    return [heapq.heappop(h) for _ in xs]\n", ASSERT),
    ("a, b = map(int, input().split())\nprint(sum(i for i in range(200000)) * 0 + a + b)\n", IO),
]
FAILING = [
    ("a, b = map(int, input().split())\nprint(a - b)\n", IO),
    ("def solve(xs):\n    return xs\n", ASSERT),
    ("def solve(xs):\n    return xs[0]\n", ASSERT),
]
TIMING_OUT = [
    ("while True:\n    pass\n", IO),
    ("import time\ndef solve(xs):\n    time.sleep(60)\n", ASSERT),
]


def programs(n: int) -> list[tuple[str, list[dict], str]]:
    mix = [(c, t, "pass") for c, t in PASSING] + [(c, t, "fail") for c, t in FAILING] + \
          [(c, t, "timeout") for c, t in TIMING_OUT]
    return [mix[i % len(mix)] for i in range(n)]


def bare_one(code: str, tests: list[dict], wall: float) -> int:
    """Passed tests, no isolation: what a trainer without a sandbox would do."""
    passed = 0
    for t in tests:
        src = code + "\n" + t["code"] + "\n" if "code" in t else code
        try:
            r = subprocess.run([sys.executable, "-I", "-S", "-c", src], input=t.get("input", "").encode(),
                               capture_output=True, timeout=wall)
        except subprocess.TimeoutExpired:
            continue
        if r.returncode == 0 and ("code" in t or _norm(r.stdout.decode()) == _norm(t["output"])):
            passed += 1
    return passed


def _norm(s: str) -> str:
    return "\n".join(line.rstrip() for line in s.strip().splitlines())


def run_bare(progs, wall: float, concurrency: int) -> tuple[float, list[int]]:
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        passed = list(pool.map(lambda p: bare_one(p[0], p[1], wall), progs))
    return time.perf_counter() - t0, passed


def run_sandbox(sandbox: Sandbox, progs) -> tuple[float, list[int]]:
    t0 = time.perf_counter()
    results = sandbox.run_many([(c, t) for c, t, _ in progs])
    return time.perf_counter() - t0, [r.passed for r in results]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--programs", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--wall", type=float, default=1.0, help="per-test wall time limit, both runs")
    ap.add_argument("--concurrency", type=int, default=2)
    a = ap.parse_args()

    progs = programs(a.programs)
    sandbox = Sandbox(SandboxLimits(wall_time_s=a.wall, cpu_time_s=a.wall), concurrency=a.concurrency)
    kinds = {k: sum(p[2] == k for p in progs) for k in ("pass", "fail", "timeout")}
    print(f"{len(progs)} programs ({kinds}), {sum(len(p[1]) for p in progs)} tests, wall limit {a.wall}s, "
          f"concurrency {a.concurrency}, isolation {sandbox.isolation}")
    bare_times, box_times = [], []
    for rep in range(a.repeats):
        tb, passed_bare = run_bare(progs, a.wall, a.concurrency)
        ts, passed_box = run_sandbox(sandbox, progs)
        if passed_bare != passed_box:
            raise SystemExit(f"bare and sandbox disagree on pass counts:\n{passed_bare}\n{passed_box}")
        bare_times.append(tb)
        box_times.append(ts)
        print(f"repeat {rep}: bare {tb:.2f}s ({len(progs) / tb:.2f} programs/s)  "
              f"sandbox {ts:.2f}s ({len(progs) / ts:.2f} programs/s)  passed tests {sum(passed_box)}")
    # The timeouts dominate the mix's wall time; the per-program overhead shows without them.
    fast = [p for p in progs if p[2] != "timeout"]
    fast_bare = statistics.median(run_bare(fast, a.wall, a.concurrency)[0] for _ in range(a.repeats))
    fast_box = statistics.median(run_sandbox(sandbox, fast)[0] for _ in range(a.repeats))
    print(f"without the timing-out programs ({len(fast)}): bare {len(fast) / fast_bare:.1f} programs/s, "
          f"sandbox {len(fast) / fast_box:.1f} programs/s, ratio {fast_box / fast_bare:.3f}")
    tb, ts = statistics.median(bare_times), statistics.median(box_times)
    print(f"bare:    {len(progs) / tb:.2f} programs/s (median wall {tb:.2f}s)")
    print(f"sandbox: {len(progs) / ts:.2f} programs/s (median wall {ts:.2f}s)")
    print(f"ratio_sandbox_over_bare={ts / tb:.3f}")


if __name__ == "__main__":
    main()
