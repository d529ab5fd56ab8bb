r"""The maths reward on whole responses: our agreement and false-accept rate, Math-Verify alone on the
same table, the hard time limit, and the records the router keeps.

Two tables. tests/math_cases.py (318 cases) was written by the engineer who wrote the rules, partly
tuned on. tests/math_cases_blind.py (314 cases, 46 classes, every class both ways) was written
BLIND — before its author read the implementation, from what other graders test (Math-Verify's own
test categories, the MATH / GSM8K / AIME grader tests of other projects, small-model answer
styles) — and run once before any change to the code. First run: ours agreement 0.975 (306/314),
false accepts 0.020 (3/153); Math-Verify alone 0.898 / 0.059. Our eight misses: a trailing offer
or pleasantry with a number taken as the answer ("Would you like me to show it for 5 people?",
"Feel free to ask about step 2." — two false accepts, two false rejects), a unit mismatch ("5 m" for
`5 \text{ cm}`, a false accept), "∞" in prose not read as maths, an option letter before the value
("The answer is (C) 12."), and a box holding a sentence (`\boxed{\text{The answer is } 4}`). All
fixed in general form since (docs/rewards.md, "Maths answers")."""
import logging
import time
from collections import defaultdict

import pytest

from megatron_ernie.rewards import math_verify as mv
from megatron_ernie.rewards.registry import build_source
from megatron_ernie.rewards.router import RewardRouter
from megatron_ernie.rewards.types import RewardSample
from tests.math_cases import CASES
from tests.math_cases_blind import CASES as BLIND_CASES


def _verdicts_ours(cases=CASES) -> list[bool]:
    src = build_source("math", "math", concurrency=2)  # two threads share the worker pool
    results = src.score([RewardSample("q", resp, domain="math", reference=gold) for _, gold, resp, _ in cases])
    assert not any(r.failed for r in results), [r.reason for r in results if r.failed]
    return [r.reward == 1.0 for r in results]


def _verdicts_math_verify_alone(cases=CASES) -> list[bool]:
    """Math-Verify as its README uses it: `parse` with its default extraction configs on the
    response, the gold in maths delimiters (bare `4, 5` would otherwise be read as 5), `verify`.
    Its signal-based timeouts work here: pytest runs tests in the main thread."""
    from math_verify import parse, verify

    logging.getLogger("math_verify").setLevel(logging.ERROR)
    out = []
    for _, gold, resp, _ in cases:
        g = gold if ("$" in gold or "\\boxed" in gold) else f"${gold}$"
        out.append(bool(verify(parse(g), parse(resp))))
    return out


def _score(verdicts: list[bool], cases=CASES) -> tuple[float, float, dict]:
    per_class = defaultdict(lambda: [0, 0, 0, 0])  # right, total, false accepts, rejects expected
    for (cls, _, _, expected), got in zip(cases, verdicts):
        row = per_class[cls]
        row[0] += got == expected
        row[1] += 1
        row[2] += got and not expected
        row[3] += not expected
    right = sum(r[0] for r in per_class.values())
    false_accepts = sum(r[2] for r in per_class.values())
    rejects = sum(r[3] for r in per_class.values())
    return right / len(cases), false_accepts / rejects, dict(per_class)


def _report(name: str, verdicts: list[bool], cases=CASES) -> str:
    agree, fa, per_class = _score(verdicts, cases)
    lines = [f"{name}: agreement {agree:.3f}, false accepts {fa:.3f} over {len(cases)} cases"]
    for cls, (right, total, fas, _) in sorted(per_class.items()):
        lines.append(f"  {cls:24s} {right:3d}/{total:<3d} false accepts {fas}")
    for (cls, gold, resp, expected), got in zip(cases, verdicts):
        if got != expected:
            lines.append(f"  WRONG [{cls}] gold={gold!r} expected={expected} got={got} response={resp[-120:]!r}")
    return "\n".join(lines)


def test_table_covers_every_failure_class_both_ways():
    assert len(CASES) >= 150
    by_class = defaultdict(set)
    for cls, _, resp, expected in CASES:
        by_class[cls].add(expected)
        assert resp.strip()
    for cls in ("no_marker_fraction", "no_marker_interval", "no_marker_power", "no_marker_expression",
                "trailing_check", "phrase_prose", "multiple_boxes", "labelled", "decimal_comma", "thousands",
                "doubled_backslash", "mixed_number", "pm", "set_of_tuples", "matrix_env", "mv_glued_variable",
                "mv_expression_head", "mv_hedge", "mv_think_only", "mv_percent", "mv_units"):
        assert by_class[cls] == {True, False}, cls


def test_ours_on_the_table():
    ours = _verdicts_ours()
    agree, fa, _ = _score(ours)
    report = _report("ours", ours)
    print(report)
    assert agree >= 0.97 and fa <= 0.01, report


def test_math_verify_alone_on_the_same_table():
    ours, alone = _verdicts_ours(), _verdicts_math_verify_alone()
    agree_ours, fa_ours, _ = _score(ours)
    agree_alone, fa_alone, _ = _score(alone)
    ahead = [(cls, gold, resp) for (cls, gold, resp, exp), o, a in zip(CASES, ours, alone) if o == exp != a]
    behind = [(cls, gold, resp) for (cls, gold, resp, exp), o, a in zip(CASES, ours, alone) if a == exp != o]
    print(_report("Math-Verify alone", alone))
    print(f"ours {agree_ours:.3f} / {fa_ours:.3f} vs Math-Verify alone {agree_alone:.3f} / {fa_alone:.3f}; "
          f"ahead on {len(ahead)} cases, behind on {len(behind)}")
    for cls, gold, resp in ahead:
        print(f"  ahead [{cls}] gold={gold!r} response={resp[-100:]!r}")
    for cls, gold, resp in behind:
        print(f"  behind [{cls}] gold={gold!r} response={resp[-100:]!r}")
    assert agree_ours > agree_alone and fa_ours < fa_alone


def test_blind_table_covers_every_class_both_ways():
    assert len(BLIND_CASES) >= 200
    by_class = defaultdict(set)
    for cls, _, resp, expected in BLIND_CASES:
        by_class[cls].add(expected)
        assert resp.strip()
    assert all(v == {True, False} for v in by_class.values()), [c for c, v in by_class.items() if v != {True, False}]
    assert not {(g, r) for _, g, r, _ in BLIND_CASES} & {(g, r) for _, g, r, _ in CASES}  # new cases only


def test_ours_on_the_blind_table():
    """Written blind, first run 0.975 / 0.020 (module docstring); the bar is the issue's."""
    ours, alone = _verdicts_ours(BLIND_CASES), _verdicts_math_verify_alone(BLIND_CASES)
    agree, fa, _ = _score(ours, BLIND_CASES)
    agree_alone, fa_alone, _ = _score(alone, BLIND_CASES)
    report = _report("ours (blind table)", ours, BLIND_CASES)
    print(report)
    print(_report("Math-Verify alone (blind table)", alone, BLIND_CASES))
    print(f"blind table: ours {agree:.3f} / {fa:.3f} vs Math-Verify alone {agree_alone:.3f} / {fa_alone:.3f}")
    assert agree >= 0.97 and fa <= 0.01, report


@pytest.mark.parametrize("bomb", [r"\boxed{9^{9^{9^{9}}}}", r"The answer is $2^{2^{2^{2^{2^{2}}}}}$.",
                                  r"So $N = 10^{10^{10}} - 1$."])
def test_pathological_answer_hits_the_hard_limit(bomb):
    pool = mv.SympyPool(max_workers=1)
    try:
        assert mv.is_equivalent("x+x", "2x", pool=pool).equal  # the worker is up (start-up is not timed)
        src = build_source("m", "math", timeout_s=1.0, prestart=False)
        src._equiv = lambda p, r, t: mv.is_equivalent(p, r, timeout_s=t, pool=pool, rules=src.rules)
        t0 = time.monotonic()
        (res,) = src.score([RewardSample("q", bomb, reference="7")])
        assert time.monotonic() - t0 < 4.0
        assert (res.reward, res.failed, res.details["timeout"], res.details["method"]) == (0.0, False, True, "sympy"), res
        assert pool.restarts == 1
        # the replacement works
        assert mv.is_equivalent(r"\frac{x^2-1}{x-1}", "x+1", pool=pool).equal
    finally:
        pool.close()


def test_strictness_and_rule_options():
    strict = build_source("m", "math", strictness="strict", prestart=False)
    default = build_source("m", "math", prestart=False)
    no_units = build_source("m", "math", units=False, prestart=False)
    cases = [(r"\boxed{10\%}", "0.1"), ("So the average is 3,5 kg.", "3.5"), (r"\boxed{2\frac{1}{2}}", "2.5"),
             ("She has 12 apples.", "12"), (r"\boxed{15\text{ cm}}", "15")]
    samples = [RewardSample("q", r, reference=g) for r, g in cases]
    assert [r.reward for r in default.score(samples)] == [1.0] * 5
    assert [r.reward for r in strict.score(samples)] == [0.0] * 5
    assert [r.reward for r in no_units.score(samples)] == [1.0, 1.0, 1.0, 1.0, 0.0]
    with pytest.raises(ValueError, match="strictness"):
        build_source("m", "math", strictness="lenient", prestart=False)
    with pytest.raises(ValueError, match="decimal_comma"):
        build_source("m", "math", decimal_comma="yes", prestart=False)
    with pytest.raises(ValueError, match="fallback"):
        build_source("m", "math", fallback="first_number", prestart=False)
    with pytest.raises(ValueError, match="workers"):
        build_source("m", "math", workers=0, prestart=False)
    with pytest.raises(TypeError, match="rewards.sources.m"):
        build_source("m", "math", strictnes="strict")


def test_router_records_keep_their_shape():
    r = RewardRouter.from_config({"sources": {"math": {"type": "math"}},
                                  "routes": [{"domain": "math", "combine": {"math": 1.0}}]})
    out = r.score([RewardSample("q", "So the answer is $\\frac{1}{2}$.", domain="math", reference="0.5"),
                   RewardSample("q", "I give up.", domain="math", reference="3")])
    assert [o.reward for o in out] == [1.0, 0.0]
    rec = out[0].record()
    assert set(rec) == {"reward", "route", "failed", "components"}
    assert set(rec["components"]["math"]) == {"reward", "used", "reason", "failed"}
    details = out[0].components["math"].details
    assert {"extracted", "reference", "method", "timeout"} <= set(details)
    assert set(details) <= {"extracted", "reference", "method", "timeout", "note", "how", "seconds"}
    assert (details["extracted"], details["method"], details["how"]) == ("$\\frac{1}{2}$", "fraction", "phrase")
    assert out[1].components["math"].details["extracted"] is None
