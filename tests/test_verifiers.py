"""Rule verifiers: maths answer extraction and equivalence (with the sympy worker's time limit),
multiple choice, exact match, regex, and batch scoring through the registry."""
import re
import time

import pytest

from megatron_ernie.rewards import math_verify as mv
from megatron_ernie.rewards import verifiers  # noqa: F401 - registers multiple_choice/exact/regex
from megatron_ernie.rewards.registry import build_source
from megatron_ernie.rewards.types import RewardSample

# (predicted, reference, equal, options)
EQUIVALENCES = [
    (r"\frac{1}{2}", "0.5", True, {}),
    ("1/2", "0.5", True, {}),
    (r"\dfrac{1}{2}", "1/2", True, {}),
    (r"\tfrac{3}{4}", "0.75", True, {}),
    (r"\frac12", "0.5", True, {}),
    (r"-\frac{1}{2}", "-0.5", True, {}),
    (r"\frac{-1}{2}", "-1/2", True, {}),
    (r"\frac{1}{2}", r"\frac{2}{1}", False, {}),
    ("0.333", "1/3", False, {}),                                  # default tolerance 1e-4
    ("0.333", "1/3", True, {"tolerance": 1e-2}),
    (r"\pi", "3.14", False, {}),
    (r"\pi", "3.14", True, {"tolerance": 1e-3}),
    (r"\pi/2", "1.5707963", True, {}),
    (r"\dfrac{\pi}{4}", "0.785398", True, {}),
    ("e", "2.718281828", True, {}),
    (r"\sqrt{2}", "1.4", False, {}),
    ("1000000", "1000001", False, {}),                            # ints are exact: no tolerance
    ("5.00001", "5", True, {}),                                   # a decimal gets the tolerance
    ("5.0", "5", True, {}),
    ("+5", "5", True, {}),
    ("-3", "3", False, {}),
    ("5", "50", False, {}),
    ("1,000", "1000", True, {}),
    ("1,234.5", "1234.5", True, {}),
    (r"1\,000\,000", "10^6", True, {}),
    (r"\$1,000", "1000", True, {}),
    ("12", "1,2", False, {}),                                     # "1,2" is a list, not 12
    ("1e3", "1000", True, {}),
    ("2.5e-3", "0.0025", True, {}),
    (r"1.5\times10^{3}", "1500", True, {}),
    ("10%", "0.1", True, {}),
    (r"50\%", "50", True, {}),
    ("10%", "0.1", False, {"percent_equivalence": False}),
    ("10%", "10", True, {"percent_equivalence": False}),
    ("x=5", "5", True, {}),
    ("y = 2x+1", "2x+1", True, {}),
    ("x=5", "y=5", False, {}),
    ("x+y=1", "y=1-x", True, {}),
    ("2x+2y=2", "x+y=1", True, {}),
    ("x+y=1", "1-x", False, {}),                                  # equation vs expression
    (r"\text{5 apples}", "5", True, {}),
    (r"12 \text{ cm}^2", "12", True, {}),
    (r"30^\circ", "30", True, {}),
    (r"\text{apples}", "5", False, {}),
    (r"2\sqrt{2}", r"\sqrt{8}", True, {}),
    (r"\frac{\sqrt{2}}{2}", r"\frac{1}{\sqrt{2}}", True, {}),
    (r"\sqrt[3]{27}", "3", True, {}),
    (r"\binom{5}{2}", "10", True, {}),
    (r"3 \cdot 4", "12", True, {}),
    (r"2 \times 3", "6", True, {}),
    ("x^2+2x+1", "(x+1)^2", True, {}),
    ("x^2+1", "(x+1)^2", False, {}),
    ("x^2-1", r"\left(x-1\right)(x+1)", True, {}),
    (r"\frac{x}{2}", "0.5x", True, {}),
    (r"\sin^2 x + \cos^2 x", "1", True, {}),
    (r"e^{i\pi}", "-1", True, {}),
    ("3+4i", "4i+3", True, {}),
    ("0.1+0.2", "0.3", True, {}),
    ("1/0", "0", False, {}),
    (r"\infty", "∞", True, {}),
    (r"-\infty", "-oo", True, {}),
    (r"\infty", r"-\infty", False, {}),
    ("(1,2)", "(2,1)", False, {}),
    (r"\left(1, 2\right)", "(1,2)", True, {}),
    ("[1,2]", "(1,2)", False, {}),
    (r"(-\infty, 3]", r"(-\infty, 3)", False, {}),
    (r"(-\infty, 3]", "(-oo,3]", True, {}),
    (r"(0.5, \frac{1}{3})", r"(\frac{1}{2}, 1/3)", True, {}),
    ("{1,2}", "{2,1}", True, {}),
    (r"\{1, 2\}", r"\{2,1\}", True, {}),
    ("{1,2}", "{1,2,3}", False, {}),
    ("(1,2)", "{1,2}", False, {}),                                # tuple vs set
    (r"\{(1,2), (3,4)\}", r"\{(3,4),(1,2)\}", True, {}),
    (r"\{(1,2), (3,4)\}", r"\{(4,3),(1,2)\}", False, {}),
    (r"x = 1 \text{ or } x = 2", "2, 1", True, {}),
    ("yes", "Yes", True, {}),
    ("yes", "no", False, {}),
    ("", "5", False, {}),
]


@pytest.mark.parametrize("pred,ref,equal,opts", EQUIVALENCES, ids=[f"{i}:{c[0]}|{c[1]}" for i, c in enumerate(EQUIVALENCES)])
def test_equivalence_table(pred, ref, equal, opts):
    res = mv.is_equivalent(pred, ref, **opts)
    assert res.equal is equal, res
    assert res.timeout is False
    # symmetric: the reference and the prediction can swap roles
    assert mv.is_equivalent(ref, pred, **opts).equal is equal


@pytest.mark.parametrize("pred,ref,method", [
    ("0.5", "0.50", "numeric"),
    (r"\frac{1}{2}", "0.5", "fraction"),
    ("1,000", "1000", "string"),
    ("x^2+2x+1", "(x+1)^2", "sympy"),
    ("(1,2)", "(1,2.0)", "ordered"),
    ("{1,2}", "{2,1}", "unordered"),
])
def test_method_says_which_path_decided(pred, ref, method):
    assert mv.is_equivalent(pred, ref).method == method


@pytest.mark.parametrize("text,expected", [
    (r"so $\boxed{\frac{1}{2}}$", r"\frac{1}{2}"),                       # nested braces
    (r"first \boxed{3}, then corrected: \boxed{4}", "4"),                 # last box wins
    (r"\fbox{7} is it", "7"),
    (r"\boxed{\text{(1, 2)}}", r"\text{(1, 2)}"),
    (r"\boxed 5$", "5"),
    ("The answer is 42.", "42"),
    ("The answer is 42. Check: 40 + 2 = 42", "42"),
    ("**Final Answer:** 3.5.", "3.5"),
    ("Final answer: $x = 5$", "$x = 5$"),
    ("答案是 5。", "5"),
    ("The answer is the number of apples, which is 12 in total.", "12"),
    ("we get 3 then 7 apples", "7"),
    ("a total of 1,234 people", "1,234"),
    ("so x - 4 gives -4", "-4"),
    ("I do not know", None),
])
def test_extract_answer(text, expected):
    assert mv.extract_answer(text) == expected


def test_reference_may_be_a_worked_solution():
    assert mv.reference_answer("Natalia sold 48 + 24 = 72 clips.\n#### 72") == "72"
    assert mv.reference_answer(r"So the total is $\boxed{\frac{3}{4}}$.") == r"\frac{3}{4}"
    assert mv.reference_answer(" 17 ") == "17"


def test_strip_think():
    assert mv.strip_think(r"<think>maybe \boxed{1}</think> so \boxed{2}") == r"so \boxed{2}"
    assert mv.strip_think("<think>still thinking, 3") == ""            # never left its reasoning
    assert mv.strip_think("reasoning 3</think>The answer is 4") == "The answer is 4"
    assert mv.strip_think("no think block 5") == "no think block 5"


def test_model_text_never_reaches_eval(tmp_path, monkeypatch):
    """The library's LaTeX path builds sympy objects from a parse tree; the only `eval` under it is
    sympy's own `Integer('12')` for a number token (and sympy's lazy imports). Run the worker's
    comparison in this process with sympy's eval recorded, on hostile and ordinary answers."""
    import sympy.parsing.sympy_parser as sp

    from megatron_ernie.rewards import maths_worker
    maths_worker._lib_load()
    evaluated = []
    real_eval = sp.eval_expr
    monkeypatch.setattr(sp, "eval_expr", lambda code, ld, gd: (evaluated.append(code), real_eval(code, ld, gd))[1])
    marker = tmp_path / "pwned"
    hostile = [f"__import__('os').system('touch {marker}')", "x.__class__.__mro__", "x.n(10**9)", "open(1)",
               r"\input{/etc/passwd}", "lambda: 1", r"\text{__import__('os')}", r"\operatorname{eval}(1)",
               "(1).__class__", "1,000", r"\frac{1}{2}", "2.5e3", r"\begin{pmatrix}1&2\\3&4\end{pmatrix}", "12:00"]
    for text in hostile:
        try:
            maths_worker._lib_equal(mv.normalize_answer(text), "1", {}, {}, {"tol": 1e-4, "abs_tol": 1e-9})
        except Exception:  # noqa: BLE001 - unparsable is fine; what matters is what got evaluated
            pass
        assert not mv.is_equivalent(text, "1", timeout_s=2.0).equal
    assert not marker.exists()
    benign = re.compile(r"^(?:(?:Integer|Float|Rational)\s*\(\s*'?[\d.eE+-]+'?\s*\)|Symbol\s*\('[A-Za-z_]+'\s*\)|[A-Z]\s*)$")
    assert all(benign.match(code) for code in evaluated), [c for c in evaluated if not benign.match(c)]


def test_sympy_bomb_times_out_and_worker_recovers():
    pool = mv.SympyPool(max_workers=1)
    try:
        assert mv.is_equivalent("x+x", "2x", pool=pool).equal  # warm the worker
        t0 = time.monotonic()
        res = mv.is_equivalent("9^{9^{9^{9}}}", "1", timeout_s=1.0, pool=pool)
        assert time.monotonic() - t0 < 3.0
        assert (res.equal, res.method, res.timeout) == (False, "sympy", True)
        assert pool.restarts == 1
        after = mv.is_equivalent("x^2+2x+1", "(x+1)^2", pool=pool)   # the replacement works
        assert (after.equal, after.timeout) == (True, False)
        # a huge exponent in plain-number form never reaches Fraction arithmetic or sympy's clock
        t0 = time.monotonic()
        assert not mv.is_equivalent("1e999999999", "1", timeout_s=1.0, pool=pool).equal
        assert time.monotonic() - t0 < 3.0
    finally:
        pool.close()


def test_time_limit_is_shared_by_list_elements():
    pool = mv.SympyPool(max_workers=1)
    try:
        bombs = ", ".join(["(10^{10})!"] * 4)
        t0 = time.monotonic()
        res = mv.is_equivalent(bombs, "1, 2, 3, 4", timeout_s=1.0, pool=pool)
        assert not res.equal and res.timeout
        assert time.monotonic() - t0 < 4.0  # ~1 s total, not 1 s per element pair
    finally:
        pool.close()


def test_pool_is_thread_safe():
    from concurrent.futures import ThreadPoolExecutor
    pool = mv.SympyPool(max_workers=2)
    pairs = [("x^2+2x+1", "(x+1)^2", True), ("x^2+1", "(x+1)^2", False)] * 4
    try:
        with ThreadPoolExecutor(4) as ex:
            got = list(ex.map(lambda p: mv.is_equivalent(p[0], p[1], pool=pool).equal, pairs))
        assert got == [p[2] for p in pairs]
    finally:
        pool.close()


def _sample(response, reference=None, **kw):
    return RewardSample(prompt="q", response=response, reference=reference, **kw)


def test_math_source_batch_through_registry():
    src = build_source("m", "math", timeout_s=2.0)
    samples = [
        _sample(r"<think>maybe \boxed{3}</think>So $\boxed{\dfrac{1}{2}}$.", "0.5"),
        _sample("The answer is 7.", "#### 8"),
        _sample("I give up.", "5"),
        _sample(r"\boxed{5}", None),
        _sample(None, "5"),                        # malformed sample: an internal TypeError
        _sample("The answer is 1,000.", r"\boxed{1000}"),
    ]
    res = src.score(samples)
    assert [r.reward for r in res] == [1.0, 0.0, 0.0, 0.0, 0.0, 1.0]
    assert [r.failed for r in res] == [False, False, False, True, True, False]
    assert all(r.source == "m" for r in res)
    assert res[0].details["extracted"] == r"\dfrac{1}{2}" and res[0].details["method"] == "fraction"
    assert res[0].details["timeout"] is False
    assert res[1].details["extracted"] == "7" and res[1].details["reference"] == "8"
    assert res[2].reason == "no answer found" and res[2].details["extracted"] is None
    assert "reference" in res[3].reason
    assert "TypeError" in res[4].reason


def test_math_source_records_timeout():
    src = build_source("m", "math", timeout_s=1.0)
    (res,) = src.score([_sample(r"\boxed{(10^{10})!}", "3")])
    assert (res.reward, res.failed, res.details["timeout"], res.details["method"]) == (0.0, False, True, "sympy")


def test_math_source_options_are_checked():
    with pytest.raises(TypeError, match="rewards.sources.m"):
        build_source("m", "math", tolerence=0.1)
    with pytest.raises(ValueError):
        build_source("m", "math", timeout_s=0)
    loose = build_source("m", "math", tolerance=1e-2)
    assert loose.score([_sample(r"\boxed{0.333}", "1/3")])[0].reward == 1.0


# ---------------------------------------------------------------------------------------------
# Multiple choice
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text,letter", [
    ("The answer is (B).", "B"),
    ("After checking each, **C**", "C"),
    ("D.", "D"),
    (r"Therefore $\boxed{A}$", "A"),
    (r"\boxed{\text{(c)}}", "C"),
    ("I think the correct choice is B because it balances", "B"),
    ("A good approach is elimination; we are left with (C)", "C"),
    ("答案是C", "C"),
    ("Answer: **E**", "E"),
    ("I cannot tell", None),
])
def test_extract_choice(text, letter):
    assert verifiers.extract_choice(text)[0] == letter


def test_extract_choice_respects_allowed_letters():
    assert verifiers.extract_choice("The answer is E.", "ABCD")[0] is None


def test_multiple_choice_source():
    src = build_source("mc", "multiple_choice")
    opts = {"options": ["Paris", "London", "Berlin", "Rome"]}
    samples = [
        _sample("The answer is (B).", "B"),
        _sample("The answer is (B).", "(b)"),
        _sample("**B**", "London", meta=opts),              # reference given as option text
        _sample("The answer is London.", "B", meta=opts),   # response gives the option text
        _sample("The answer is C.", "B", meta=opts),
        _sample("The answer is E.", "B", meta=opts),        # E is not an option here
        _sample("B", "Madrid", meta=opts),
        _sample("B", "B", meta={"options": 3}),
        _sample("B", None),
    ]
    res = src.score(samples)
    assert [r.reward for r in res] == [1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    assert [r.failed for r in res] == [False] * 6 + [True] * 3
    assert res[3].details == {"extracted": "B", "reference": "B", "how": "option_text", "seconds": res[3].details["seconds"]}
    assert res[5].reason == "no answer found"
    assert "Madrid" in res[6].reason and "options" in res[7].reason


# ---------------------------------------------------------------------------------------------
# Exact and regex
# ---------------------------------------------------------------------------------------------

def test_exact_match():
    default = build_source("e", "exact")
    strict = build_source("e", "exact", case_sensitive=True, normalize_whitespace=False)
    extract = build_source("e", "exact", extract_answer=True)
    punct = build_source("e", "exact", strip_punctuation=True)
    s = _sample("  Hello   World ", "hello world")
    assert default.score([s])[0].reward == 1.0
    assert strict.score([s])[0].reward == 0.0
    assert strict.score([_sample("Hello World", "Hello World")])[0].reward == 1.0
    assert default.score([_sample(r"so \boxed{Paris}", "Paris")])[0].reward == 0.0
    assert extract.score([_sample(r"<think>Rome?</think>so \boxed{Paris}", "paris")])[0].reward == 1.0
    assert punct.score([_sample("Paris!", "paris")])[0].reward == 1.0
    assert default.score([_sample("Paris!", "paris")])[0].reward == 0.0
    assert default.score([_sample("x", None)])[0].failed


def test_regex_verifier():
    search = build_source("r", "regex")
    full = build_source("r", "regex", mode="fullmatch")
    fmt = build_source("r", "regex", pattern=r"^Answer: \d+$", multiline=True)
    icase = build_source("r", "regex", ignore_case=True)
    assert search.score([_sample("the id is AB-123 ok", r"[A-Z]{2}-\d+")])[0].reward == 1.0
    assert full.score([_sample("the id is AB-123 ok", r"[A-Z]{2}-\d+")])[0].reward == 0.0
    assert full.score([_sample(" AB-123\n", r"[A-Z]{2}-\d+")])[0].reward == 1.0
    # a configured pattern wins over the reference (which may be another source's answer)
    assert fmt.score([_sample("Work...\nAnswer: 42", "41")])[0].reward == 1.0
    assert fmt.score([_sample("Answer: forty-two", "41")])[0].reward == 0.0
    assert icase.score([_sample("HELLO", "hello")])[0].reward == 1.0
    assert search.score([_sample("HELLO", "hello")])[0].reward == 0.0
    bad = search.score([_sample("x", "(unclosed")])[0]
    assert bad.failed and "bad pattern" in bad.reason
    assert search.score([_sample("x", None)])[0].failed
    with pytest.raises(ValueError, match="mode"):
        build_source("r", "regex", mode="partial")
