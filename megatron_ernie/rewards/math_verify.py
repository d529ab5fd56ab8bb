"""Maths answers for RL rewards: find the answer a response commits to, decide whether it equals
the reference.

RL optimises whatever this says, so both halves are written against reward hacks as much as
against false rejects.

From the library — Hugging Face's Math-Verify (`math-verify` on PyPI, with
`latex2sympy2_extended`): LaTeX → sympy (`normalize_latex` + `latex2sympy`: fractions, roots,
powers, trig/log, factorials, binomials, `\\pm`, intervals, unions, sets, tuples, matrices in any
environment, relations and chains of equations) and the equality of two parsed answers
(`math_verify.verify`: structural, numeric, `simplify`, intervals by end-points and openness,
sets and tuples element-wise, equations up to a factor or by solving, flipped inequalities,
relation vs interval, matrices entry-wise). Those run only inside worker processes, with the
library's own timeouts off (`timeout_seconds=None`: they use `signal.alarm`, main thread only)
and our hard kill as the limit. We never call its `ExprExtractionConfig` path: it hands text to
sympy's `parse_expr`, which is `eval` (its regex admits only digits, `.`, whitespace and
`+-*/^()×÷`, so it is not exploitable today, but we do not rely on a regex for that); the LaTeX
path builds sympy objects from an ANTLR parse tree — the only `eval` under it is sympy's own
`Integer('12')` for a number token (tests/test_verifiers.py checks that).

Ours, and why (the library is weak here for rewards):
  * which answer a response commits to (`extract_answer`): its `<think>` block never counts, nor
    text after an end-of-turn token; the last `\\boxed{}` (boxes joined only by "and", ",", labels such as `x =` form one answer, compared
    as a set; a box after prose such as "then corrected:" replaces the earlier ones); else the last
    "answer is / final answer: / Answer: / ####" phrase, of which the first maths in its clause
    ("the answer is 5 pears, found in 2 steps" → 5); else the last sentence that states a result
    (check, note, restated-question, question and closing-pleasantry sentences skipped; in it the
    maths after the last "is / = / so / then …" of a main clause; a hedge between values answers
    all of them); a sentence retracting the phrase's answer ("Wait, that's wrong") passes to what
    follows it; else a bare short answer ("Evelyn"). An answer is always a whole maths span —
    never a number out of a larger expression (`$\\frac13$` is 1/3, `$10^4$` is 10000, `4+1` is 5,
    `[0,1)` an interval, `7y` and `20 + y` are not 7 and 20). The library's extraction takes the first of "4 and 6",
    a number glued to a variable, or a number out of the think block;
  * answer shapes (`normalize_answer`, `parse_number`): percentages (`10\\%` = 10 = 0.1 by
    default), units (`\\boxed{2,500} dollars`, `15\\text{ cm}^2`, `5 apples`; two known units
    must agree: `5 m` is not `5 cm`), currency, thousands separators (`1,000`, `1 000`,
    `1\\,000`, `32,\\!349`), decimal commas (`3,5` = 3.5 when the other side is a plain decimal),
    mixed numbers (`12 \\frac{3}{4}`, `2 1/2`), repeating decimals, degrees (`60^\\circ` = π/3
    when the other side is in radians), doubled backslashes, unicode maths, numeric chains
    (`48+24 = 72` → 72), labels (`x = 5`, `(p,q)=(3,2)`, `AB=4, CD=5`);
  * structure: tuples and intervals in order with matching brackets, sets and bare lists ("1, 2",
    "2 and 3", sets of tuples with `;` or "or", several boxes) as multisets, a point is not a set
    (the library equates `(1,2)` with `{1,2}`), a list of different values is never one number
    (hedging: "3 or 4"), a list repeating one value is that value ("1/2, or 50%");
  * a fast path: plain numbers (ints, decimals, fractions, scientific notation, percentages,
    mixed numbers) compare exactly as `Fraction`s in the caller, no worker — most RL answers;
    the tolerance applies only when a side is a decimal (an int or a fraction is exact);
  * on top of `verify`: our tolerance for decimals vs closed forms (`tolerance`), an exact check
    where the library's 15-digit evaluation says equal (`1/2004!` vs `1/2006!`), `i` as the
    imaginary unit, a column vector equal to the tuple of its entries;
  * the worker pool: hard time limit per comparison (a worker that runs over — `9^{9^{9^9}}` — is
    killed and replaced at once), memory limit, started ahead of the first request.

`@register_source("math")` wraps it as a reward source (reward 1/0).
"""
from __future__ import annotations
from __future__ import annotations

import re
import time
from dataclasses import dataclass, replace

from megatron_ernie.errors import ConfigError
from megatron_ernie.rewards.maths_answers import (Number, Rules, _atom, _Atom, _key, _MAX_ELEMENTS,
                                                  _Seq, _SCI, _structure, _THOUSANDS_COMMA, _TooBig, make_rules,
                                                  normalize_answer, numbers_equal, parse_number)
from megatron_ernie.rewards.maths_extract import (extract, extract_answer, extract_answer_phrase,  # noqa: F401
                                                  extract_boxed, reference_answer)
from megatron_ernie.rewards.maths_worker import SympyPool, SympyWorkerError, default_pool  # noqa: F401 - interface
from megatron_ernie.rewards.text import strip_think  # noqa: F401 - part of this module's interface
from megatron_ernie.rewards.types import PerSampleSource, RewardResult, RewardSample, register_source

# ---------------------------------------------------------------------------------------------
# Equivalence
# ---------------------------------------------------------------------------------------------

@dataclass
class Equivalence:
    """method: "string" | "numeric" | "fraction" | "sympy" (the library, in a worker) |
    "ordered" | "unordered" | "none"."""
    equal: bool
    method: str
    timeout: bool = False
    note: str = ""


_QUICK = re.compile(r"\s*[-+]?\d{1,30}(?:\.\d{1,30})?\s*")
_MAX_ANSWER_CHARS = 2000  # longer "answers" are compared as plain text only
_WORDS_ONLY = re.compile(r"[^\W\d_][^\W\d_' -]*")


def _is_words(s: str) -> bool:
    return bool(_WORDS_ONLY.fullmatch(s.strip())) and len(s.strip()) > 1 and not re.fullmatch(r"[A-Za-z]", s.strip())


_INF = re.compile(r"[-+]?\\infty")


class _Ctx:
    def __init__(self, rules: Rules, tol: float, abs_tol: float, deadline: float, pool: SympyPool | None):
        self.rules, self.tol, self.abs_tol, self.deadline, self.pool = rules, tol, abs_tol, deadline, pool
        self.pending: dict[tuple, tuple] = {}
        self.results: dict[tuple, Equivalence] = {}
        self.timed_out = False

    def number(self, a: _Atom, other: _Atom) -> Number | None:
        """a's value as a plain number; a decimal comma counts when the other side is a plain
        number written without one."""
        dc = self.rules.decimal_comma and "," not in other.text and "," in a.text
        n = parse_number(a.text, self.rules, decimal_comma=dc)
        return Number(n.value, n.exact, a.pct, n.kind) if n else None

    def plain(self, t: str) -> str:
        return t.replace(",", "") if self.rules.thousands_separators and _THOUSANDS_COMMA.fullmatch(t) else t

    def local(self, p: _Atom, g: _Atom) -> Equivalence | None:
        """Decide an atom pair without the worker, or None."""
        if not p.text or not g.text:
            return Equivalence(False, "none", note="empty answer")
        if p.unit and g.unit and p.unit != g.unit:  # "5 m" vs "5 cm"; an unknown word says nothing
            return Equivalence(False, "string", note=f"units {p.unit} vs {g.unit}")
        if p.label and g.label and _key(p.label) != _key(g.label):
            try:
                plain = self.number(p, g) is not None and self.number(g, p) is not None
            except _TooBig:
                plain = True
            if plain:
                return Equivalence(False, "string", note=f"{p.label} vs {g.label}")
            return None  # equations with variables on the right: the library decides
        if _key(self.plain(_side(p, g))) == _key(self.plain(_side(g, p))) and p.pct == g.pct and p.deg == g.deg:
            return Equivalence(True, "string")
        if _is_words(p.text) and _is_words(g.text):
            return Equivalence(_key(p.text) == _key(g.text), "string")
        try:
            na, nb = self.number(p, g), self.number(g, p)
        except _TooBig:
            return Equivalence(False, "numeric", note="exponent out of range")
        if na and nb:  # 60° vs 60: between two plain numbers the degree mark is a unit
            ok = numbers_equal(na, nb, self.tol, self.abs_tol, self.rules.percent_equivalence)
            return Equivalence(ok, "fraction" if "fraction" in (na.kind, nb.kind) else "numeric")
        if (na and (_INF.fullmatch(g.text) or _is_words(g.text))) or (nb and (_INF.fullmatch(p.text) or _is_words(p.text))):
            return Equivalence(False, "numeric")
        if (_INF.fullmatch(p.text) or _INF.fullmatch(g.text)) and not (re.search(r"\\infty", p.text) and re.search(r"\\infty", g.text)):
            return Equivalence(False, "string")
        return None

    def atom(self, p: _Atom, g: _Atom, collect: bool) -> Equivalence:
        key = (p.text, p.label, p.pct, p.deg, p.unit, g.text, g.label, g.pct, g.deg, g.unit)
        if key in self.results:
            return self.results[key]
        got = self.local(p, g)
        if got is None:
            if collect:
                self.pending[key] = (p, g)
                return Equivalence(False, "sympy")
            return Equivalence(False, "sympy", note="not compared")
        self.results[key] = got
        return got

    def resolve(self) -> None:
        """One worker request for every pair the in-process rules could not decide."""
        if not self.pending:
            return
        keys = list(self.pending)
        pairs = []
        for k in keys:
            p, g = self.pending[k]
            ptext, gtext = _lib_text(p, g), _lib_text(g, p)
            pairs.append([ptext, gtext, {"pct": p.pct, "deg": p.deg}, {"pct": g.pct, "deg": g.deg}])
        self.pending = {}
        left = self.deadline - time.monotonic()
        if left <= 0:
            self.timed_out = True
            for k in keys:
                self.results[k] = Equivalence(False, "sympy", timeout=True, note="time limit")
            return
        reply = (self.pool or default_pool()).compare_pairs(
            pairs, {"tol": self.tol, "abs_tol": self.abs_tol, "pct_equiv": self.rules.percent_equivalence}, left)
        self.timed_out |= reply["timeout"]
        results = reply.get("results") or [[False, reply.get("error", "error")]] * len(keys)
        for k, (ok, how) in zip(keys, results):
            self.results[k] = Equivalence(bool(ok), "sympy", timeout=reply["timeout"], note="" if ok else how)


_RELATION = re.compile(r"=|<|>|\\[lg]e\b|\\neq\b|\\in\b|\\approx\b")


def _side(a: _Atom, other: _Atom) -> str:
    """The text to compare for one side: its value, or `label = value` when the other side is an
    equation itself (`y = 1-x` vs `x+y=1`) or carries a different label (`x = 5` vs `y = 5`)."""
    if a.label and ((other.label and _key(other.label) != _key(a.label))
                    or (not other.label and _RELATION.search(other.text))):
        return f"{a.label} = {a.text}"
    return a.text


def _lib_text(a: _Atom, other: _Atom) -> str:
    """What the library parses for one side (scientific notation in LaTeX form)."""
    return _SCI.sub(r"\1\\times 10^{\2}", _side(a, other))


def _mixed_off(s: str) -> str:
    return re.sub(r"(\d)\s*\\frac", r"\1 \\cdot \\frac", s)


def _walk(p, g, ctx: _Ctx, collect: bool) -> Equivalence:
    if isinstance(p, _Atom) and isinstance(g, _Atom):
        return ctx.atom(p, g, collect)
    if isinstance(p, _Seq) and isinstance(g, _Seq):
        return _walk_seqs(p, g, ctx, collect)
    seq, atom = (p, g) if isinstance(p, _Seq) else (g, p)
    # "3,5" vs 3.5 (and "3,5 kg"): a decimal comma, not a list
    two = ctx.rules.decimal_comma and seq.kind == "list" and len(seq.items) == 2
    as_atom = _atom(seq.raw, ctx.rules) if two else None
    if as_atom is not None and re.fullmatch(r"-?(?:\d{1,3}(?:\.\d{3})+|\d+),\d+", as_atom.text):
        got = ctx.atom(as_atom, atom, collect) if seq is p else ctx.atom(atom, as_atom, collect)
        if got.equal or collect:
            return got
    if seq.kind in ("list", "set") and len(seq.items) <= _MAX_ELEMENTS:
        # "1/2, or 50%": the same value said twice is one answer (and {3} is 3); different values never are
        each = [_walk(x, atom, ctx, collect) if seq is p else _walk(atom, x, ctx, collect) for x in seq.items]
        if all(r.equal for r in each):
            return Equivalence(True, "unordered", note="every element of the list equals the answer")
    try:
        plain = ctx.number(atom, atom) is not None or _is_words(atom.text)
    except _TooBig:
        plain = True
    if plain or seq.kind == "list" and not re.search(r"\\cup|\\cap|matrix|[<>]|\\[lg]e\b|\\in\b", atom.raw):
        return Equivalence(False, "none", note="one answer is a list, the other is not")
    # a matrix vs a tuple, a relation vs an interval, {3} vs 3 …: the library, on the whole texts
    whole_p = p if isinstance(p, _Atom) else _Atom(p.raw, raw=p.raw)
    whole_g = g if isinstance(g, _Atom) else _Atom(g.raw, raw=g.raw)
    return ctx.atom(whole_p, whole_g, collect)


def _labels(seq: _Seq) -> list[str] | None:
    labels = [_key(x.label) if isinstance(x, _Atom) and x.label else None for x in seq.items]
    return labels if None not in labels and len(set(labels)) == len(labels) else None


def _by_labels(p: _Seq, g: _Seq) -> list | None:
    """g's items in the order of p's labels, when both are bare lists of distinct labels, the same ones."""
    if p.brackets or g.brackets:
        return None
    lp, lg = _labels(p), _labels(g)
    if not lp or not lg or set(lp) != set(lg):
        return None
    return [g.items[lg.index(label)] for label in lp]


def _walk_seqs(p: _Seq, g: _Seq, ctx: _Ctx, collect: bool) -> Equivalence:
    kinds = {p.kind, g.kind}
    if kinds == {"ordered", "set"}:
        return Equivalence(False, "none", note="tuple/interval vs set")
    if len(p.items) != len(g.items) or len(p.items) > _MAX_ELEMENTS:
        return Equivalence(False, "none", note=f"{len(p.items)} vs {len(g.items)} elements")
    if "ordered" in kinds:
        if p.brackets and g.brackets and p.brackets != g.brackets:
            return Equivalence(False, "ordered", note=f"brackets {p.brackets} vs {g.brackets}")
        g_items = _by_labels(p, g) or g.items  # "y = 2, x = 1" vs "x = 1, y = 2": matched by label
        results = [_walk(x, y, ctx, collect) for x, y in zip(p.items, g_items)]
        return Equivalence(all(r.equal for r in results), "ordered", timeout=any(r.timeout for r in results))
    # sets and bare lists: a perfect matching between the two multisets
    n = len(p.items)
    eq = [[_walk(x, y, ctx, collect) for y in g.items] for x in p.items]
    timed_out = any(r.timeout for row in eq for r in row)
    match_of: dict[int, int] = {}

    def augment(i: int, seen: set) -> bool:
        for j in range(n):
            if eq[i][j].equal and j not in seen:
                seen.add(j)
                if j not in match_of or augment(match_of[j], seen):
                    match_of[j] = i
                    return True
        return False

    for i in range(n):
        if not augment(i, set()):
            return Equivalence(False, "unordered", timeout=timed_out, note=f"no match for element {i + 1}")
    return Equivalence(True, "unordered", timeout=timed_out)


def is_equivalent(pred: str, ref: str, *, tolerance: float = 1e-4, abs_tolerance: float = 1e-9,
                  percent_equivalence: bool = True, timeout_s: float = 5.0,
                  pool: SympyPool | None = None, rules: Rules | None = None,
                  strictness: str = "default", **rule_options) -> Equivalence:
    """Is answer `pred` mathematically the same as `ref`? `timeout_s` bounds all worker time of
    this one comparison (tuple and set elements share it: one request). Never raises for odd
    input; raises SympyWorkerError only when the worker process itself cannot run."""
    if rules is None:
        rules = make_rules(strictness, **rule_options)
        if not percent_equivalence:
            rules = replace(rules, percent_equivalence=False)
    pred, ref = str(pred), str(ref)
    if _QUICK.fullmatch(pred) and _QUICK.fullmatch(ref):  # "72" vs "68": most RL answers
        if pred.strip() == ref.strip():
            return Equivalence(True, "string")
        na, nb = parse_number(pred, rules), parse_number(ref, rules)
        return Equivalence(numbers_equal(na, nb, float(tolerance), float(abs_tolerance), rules.percent_equivalence), "numeric")
    if max(len(pred), len(ref)) > _MAX_ANSWER_CHARS:
        return Equivalence(pred.strip() == ref.strip(), "string", note="too long to normalise")
    a, b = normalize_answer(pred), normalize_answer(ref)
    if not rules.mixed_numbers:
        a, b = _mixed_off(a), _mixed_off(b)
    if not a or not b:
        return Equivalence(False, "none", note="empty answer")
    ctx = _Ctx(rules, float(tolerance), float(abs_tolerance), time.monotonic() + float(timeout_s), pool)
    sp, sg = _structure(a, rules), _structure(b, rules)
    _walk(sp, sg, ctx, collect=True)
    ctx.resolve()
    res = _walk(sp, sg, ctx, collect=False)
    if ctx.timed_out and not res.equal:
        res.timeout = True
    return res


# ---------------------------------------------------------------------------------------------
# Reward source
# ---------------------------------------------------------------------------------------------

@register_source("math")
class MathVerifier(PerSampleSource):
    """Reward 1 if the response's final answer equals `sample.reference`, else 0.

    Options: tolerance / abs_tolerance (decimals only), percent_equivalence, timeout_s (hard, per
    sample), strip_think, concurrency, strictness ("default" | "strict") and the single rules it
    sets (units, thousands_separators, decimal_comma, mixed_numbers, fallback), prestart (spawn the
    worker processes now), workers (size of the shared worker pool, default 2; use with
    concurrency ≥ workers).
    details: extracted, reference, method, timeout (+ note when the comparison says why not; how:
    boxed | boxes | phrase | last_line | whole | none)."""

    name = "math"

    def __init__(self, tolerance: float = 1e-4, abs_tolerance: float = 1e-9,
                 percent_equivalence: bool = True, timeout_s: float = 5.0,
                 strip_think: bool = True, concurrency: int = 1, strictness: str = "default",
                 units: bool | None = None, thousands_separators: bool | None = None,
                 decimal_comma: bool | None = None, mixed_numbers: bool | None = None,
                 fallback: str | None = None, prestart: bool = True, workers: int | None = None):
        if tolerance < 0 or abs_tolerance < 0 or timeout_s <= 0:
            raise ConfigError("tolerance and abs_tolerance must be >= 0 and timeout_s > 0")
        if workers is not None and (not isinstance(workers, int) or workers < 1):
            raise ConfigError(f"workers must be a positive integer, got {workers!r}")
        self.rules = make_rules(strictness, units=units, thousands_separators=thousands_separators,
                                decimal_comma=decimal_comma, mixed_numbers=mixed_numbers, fallback=fallback)
        if not percent_equivalence:
            self.rules = replace(self.rules, percent_equivalence=False)
        self.tolerance = tolerance
        self.abs_tolerance = abs_tolerance
        self.percent_equivalence = self.rules.percent_equivalence
        self.timeout_s = timeout_s
        self.strip_think = strip_think
        self.concurrency = concurrency
        if workers is not None:  # the shared pool grows to the largest number any source asked for
            pool = default_pool()
            pool.max_workers = max(pool.max_workers, workers)
        if prestart:
            default_pool().prestart()

    def _equiv(self, pred: str, ref: str, timeout_s: float) -> Equivalence:
        return is_equivalent(pred, ref, tolerance=self.tolerance, abs_tolerance=self.abs_tolerance,
                             timeout_s=timeout_s, rules=self.rules)

    def score_one(self, sample: RewardSample) -> RewardResult:
        if sample.reference is None or not str(sample.reference).strip():
            return RewardResult.failure(self.name, "missing reference answer")
        ref = reference_answer(str(sample.reference), units=self.rules.units)
        got = extract(sample.response, think=self.strip_think, fallback=self.rules.fallback, units=self.rules.units)
        pred = got.answer
        if pred is None:
            return RewardResult(0.0, self.name, reason="no answer found",
                                details={"extracted": None, "reference": ref, "method": "none",
                                         "timeout": False, "how": "none"})
        t0 = time.monotonic()
        eq = self._equiv(pred, ref, self.timeout_s)
        # a multi-part reference answered in boxes spread over the response ("(a) … \boxed{3} …
        # (b) … \boxed{7}"): all its distinct boxes, as a set, when there are exactly as many
        if not eq.equal and not eq.timeout and len(got.all_boxes) > got.boxes:
            ref_struct = _structure(normalize_answer(ref), self.rules)
            if isinstance(ref_struct, _Seq) and len(ref_struct.items) == len(got.all_boxes):
                left = self.timeout_s - (time.monotonic() - t0)
                if left > 0:
                    alt = self._equiv(", ".join(got.all_boxes), ref, left)
                    if alt.equal:
                        pred, eq = ", ".join(got.all_boxes), alt
        details = {"extracted": pred, "reference": ref, "method": eq.method, "timeout": eq.timeout, "how": got.how}
        if eq.note:
            details["note"] = eq.note
        reason = "" if eq.equal else ("sympy time limit" if eq.timeout else "answer differs from reference")
        return RewardResult(1.0 if eq.equal else 0.0, self.name, reason=reason, details=details)
