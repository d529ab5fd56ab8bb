"""Maths reward speed: the in-process fast path, the worker path (Math-Verify in a worker
process), extraction on long responses, a batch of integer answers through the source, and the
whole-response table (tests/math_cases.py) through our source against Math-Verify alone
(`parse` + `verify` in this process, as its README uses it) in the same invocation.

    python benchmarks/maths_reward.py [--n 2000]

Prints one line per measurement (median per call). Worker start-up is excluded (the pool is
started and warmed first, as `MathVerifier(prestart=True)` does at construction). Last line:
ratio_ours_over_math_verify=<our seconds for the table / Math-Verify alone's>.
"""
from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_ernie.rewards import math_verify as mv  # noqa: E402
from megatron_ernie.rewards.registry import build_source  # noqa: E402
from megatron_ernie.rewards.types import RewardSample  # noqa: E402


def _median_us(fn, items, repeats: int) -> float:
    times = []
    for i in range(repeats):
        t0 = time.perf_counter()
        fn(items[i % len(items)])
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=2000)
    args = ap.parse_args()

    t0 = time.perf_counter()
    pool = mv.default_pool()
    pool.prestart()
    mv.is_equivalent("x+1", "1+x")
    print(f"worker start-up (import Math-Verify, warm its parser): {time.perf_counter() - t0:.2f} s")

    ints = [("72", "72"), ("18", "17"), ("3.5", "3.50"), ("-4", "4")]
    print(f"fast path, plain ints/decimals: {_median_us(lambda p: mv.is_equivalent(*p), ints, 2000):.0f} us")
    plain = [(r"\frac{1}{2}", "0.5"), ("1,000", "1000"), (r"12 \frac{3}{4}", "12.75"), (r"10\%", "0.1"),
             ("(1, 2)", "(1,2.0)"), (r"\{1,2\}", r"\{2,1\}"), ("x = 5", "5")]
    print(f"fast path, fractions / percent / tuples / labels: {_median_us(lambda p: mv.is_equivalent(*p), plain, 2000):.0f} us")

    exprs = [(r"\frac{\sqrt{3}}{2}", r"\frac{1}{2}\sqrt{3}"), ("x^2+2x+1", "(x+1)^2"), (r"3\sqrt{13}", r"\sqrt{117}"),
             (r"(-\infty, 3]", r"(-\infty, 3)"), (r"\begin{pmatrix}1&2\\3&4\end{pmatrix}", r"\begin{bmatrix}1&2\\3&4\end{bmatrix}"),
             ("2x+4y-3=0", "y=-x/2+3/4"), (r"\frac{\pi}{3}", r"60^\circ")]
    # a fresh string each call, so the worker's parse cache does not help
    counter = iter(range(10 ** 9))
    fresh = lambda p: mv.is_equivalent(p[0] + (f" + {next(counter)} - 0" if "=" not in p[0] and "\\begin" not in p[0] and "infty" not in p[0] else ""), p[1])  # noqa: E731
    print(f"worker path (Math-Verify parse + verify, one request): {_median_us(fresh, exprs, 140) / 1e3:.1f} ms")

    resp = ("Janet's ducks lay 16 eggs per day. She eats three for breakfast and bakes muffins with four. "
            "So she sells 16 - 3 - 4 = 9 eggs. At $2 each, she makes 9 * 2 = $18 every day.")
    print(f"extraction, last-line fallback ({len(resp)} chars): {_median_us(mv.extract, [resp], 500):.0f} us")
    long = "Let me think. " + "We have 3 + 4 = 7 and so on. " * 400 + r"So the answer is $\boxed{7}$."
    print(f"extraction, boxed ({len(long)} chars): {_median_us(mv.extract, [long], 100):.0f} us")

    src = build_source("m", "math")
    samples = [RewardSample("q", f"So the answer is \\boxed{{{i % 50}}}.", reference=str(i % 37)) for i in range(args.n)]
    t0 = time.perf_counter()
    src.score(samples)
    dt = time.perf_counter() - t0
    print(f"MathVerifier.score, {args.n} boxed integer answers: {dt:.2f} s ({dt / args.n * 1e6:.0f} us per sample)")

    from math_verify import parse, verify
    from tests.math_cases import CASES
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    table = [RewardSample("q", resp, domain="math", reference=gold) for _, gold, resp, _ in CASES]
    src.score(table)  # warm both (parse caches, imports)
    t0 = time.perf_counter()
    src.score(table)
    ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _, gold, resp, _ in CASES:
        verify(parse(gold if ("$" in gold or "\\boxed" in gold) else f"${gold}$"), parse(resp))
    alone = time.perf_counter() - t0
    print(f"table of {len(CASES)} whole responses: ours {ours:.2f} s, Math-Verify alone {alone:.2f} s")
    print(f"ratio_ours_over_math_verify={ours / alone:.3f}")


if __name__ == "__main__":
    main()
