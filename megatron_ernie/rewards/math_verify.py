"""Maths answers: pull the final answer out of a response and decide whether it equals a reference.

Extraction (`extract_answer`): the last `\\boxed{...}` / `\\fbox{...}`, else the last "the answer is
…" / "final answer: …" / "答案是…" phrase, else the last number in the text.

Equivalence (`is_equivalent`) goes from cheap to expensive and stops at the first verdict:

1. string   — identical after normalisation (`$`, `\\text{}`, units, "x =", thousands separators …);
2. compound — tuples / intervals compare element-wise in order (brackets must agree), sets and
              bare lists ("1, 2", "1 and 2") compare as multisets;
3. numeric / fraction — plain numbers (ints, decimals, `3/4`, `\\frac{3}{4}`, `1e3`,
              `1.5\\times10^{3}`, percentages) compare exactly as `Fraction`s; the tolerance applies
              only when a side is a decimal (an int or a fraction is exact: 1000000 ≠ 1000001);
4. sympy    — anything else is translated from LaTeX into a whitelisted sympy expression and
              compared in a worker process (`simplify(a - b) == 0`, high-precision numeric
              evaluation, random-point sampling) under a time limit; a worker that runs over is
              killed and replaced, because sympy can hang or eat memory on `9^{9^{9^9}}`.

`@register_source("math")` wraps it as a reward source (reward 1/0).
"""
from __future__ import annotations

import atexit
import json
import os
import queue
import re
import select
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from fractions import Fraction

from megatron_ernie.rewards.registry import register_source
from megatron_ernie.rewards.text import strip_think
from megatron_ernie.rewards.types import PerSampleSource, RewardResult, RewardSample

# ---------------------------------------------------------------------------------------------
# Response text helpers
# ---------------------------------------------------------------------------------------------



def match_brace(s: str, i: int) -> int:
    """Index of the `}` closing the `{` at s[i], or -1. Escaped braces (`\\{`) do not count."""
    return _brace_pairs(s).get(i, -1)


_BOXED = re.compile(r"\\(?:boxed|fbox)\s*")


def _brace_pairs(s: str) -> dict[int, int]:
    """{index of "{": index of its "}"} in one pass (escaped braces skipped)."""
    pairs, stack, j = {}, [], 0
    while j < len(s):
        c = s[j]
        if c == "\\":
            j += 2
            continue
        if c == "{":
            stack.append(j)
        elif c == "}" and stack:
            pairs[stack.pop()] = j
        j += 1
    return pairs


def extract_boxed(text: str) -> str | None:
    """Content of the last complete `\\boxed{…}` or `\\fbox{…}` (nested braces allowed; also the
    brace-less `\\boxed 5`)."""
    found, pairs = None, None
    for m in _BOXED.finditer(text):
        j = m.end()
        if j < len(text) and text[j] == "{":
            pairs = _brace_pairs(text) if pairs is None else pairs  # one pass, not one per box
            if j not in pairs:
                continue  # truncated response: an unclosed box is no answer
            found = text[j + 1:pairs[j]]
        else:
            tail = re.match(r"[^\s$]+", text[j:])
            if tail:
                found = tail.group(0)
    return found.strip() if found is not None else None


_ANSWER_PHRASES = [
    re.compile(r"(?i)\bfinal\s+answer\s*(?:is\b)?\s*[:：]?\s*"),
    re.compile(r"(?i)\b(?:the\s+)?(?:correct\s+)?answer\s+is\b\s*[:：]?\s*"),
    re.compile(r"(?i)\banswer\s*[:：]\s*"),
    re.compile(r"(?:最终)?答案\s*(?:是|为|[:：])\s*"),
]
_SENTENCE_END = re.compile(r"\.(?=\s|$)|。|\n")
_PROSE_WORD = re.compile(r"(?<![\\a-zA-Z])[a-zA-Z]{2,}")


def extract_answer_phrase(text: str) -> str | None:
    """What follows the last "answer is / final answer: / 答案是", up to the end of its sentence."""
    best = None
    for pat in _ANSWER_PHRASES:
        for m in pat.finditer(text):
            if best is None or m.start() > best.start():
                best = m
    if best is None:
        return None
    tail = text[best.end():]
    end = _SENTENCE_END.search(tail)
    phrase = (tail[:end.start()] if end else tail).strip().strip("*").strip()
    if not phrase:
        return None
    # "the answer is the number of apples, 5" — prose around a number: keep the number.
    if len(_PROSE_WORD.findall(re.sub(r"\\text\{[^}]*\}", "", phrase))) >= 3:
        num = last_number(phrase)
        if num is not None:
            return num
    return phrase


_NUMBER = re.compile(
    r"(?:(?<![\w)\]])-)?"
    r"(?:\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?(?:[eE][-+]?\d+)?(?:/\d+)?|\.\d+)%?"
)


def last_number(text: str) -> str | None:
    found = None
    for m in _NUMBER.finditer(text):
        found = m.group(0)
    return found


def extract_answer(response: str) -> str | None:
    """The final answer in a response: last boxed, else last answer phrase, else last number."""
    for get in (extract_boxed, extract_answer_phrase, last_number):
        ans = get(response)
        if ans:
            return ans
    return None


def reference_answer(reference: str) -> str:
    """A reference may itself be a worked solution: take its boxed answer or GSM8K's `#### 72`."""
    boxed = extract_boxed(reference)
    if boxed:
        return boxed
    if "####" in reference:
        return reference.rsplit("####", 1)[1].strip()
    return reference.strip()


# ---------------------------------------------------------------------------------------------
# Normalisation
# ---------------------------------------------------------------------------------------------

_UNWRAP = ("text", "textbf", "textit", "textrm", "mathrm", "mathbf", "mathit", "mbox", "boxed",
           "operatorname", "textnormal")
_UNWRAP_RE = re.compile(r"\\(?:" + "|".join(_UNWRAP) + r")\s*\{")


def unwrap_commands(s: str) -> str:
    """`\\text{5 apples}` → ` 5 apples` (balanced braces; nested wrappers too). The space kept in
    front marks boxed text as separate from the maths before it: `5\\text{cm}` → `5 cm`."""
    while True:
        m = _UNWRAP_RE.search(s)
        if not m:
            return s
        start = m.end() - 1
        end = match_brace(s, start)
        if end < 0:
            return s[:m.start()] + s[start + 1:]
        s = s[:m.start()] + " " + s[start + 1:end] + s[end + 1:]


_SIMPLE_SUBS = [
    ("\\$", ""), ("$", ""), ("\\(", ""), ("\\)", ""), ("\\[", ""), ("\\]", ""),
    ("\\displaystyle", ""), ("\\!", ""), ("\\dfrac", "\\frac"), ("\\tfrac", "\\frac"),
    ("\\%", "%"), ("−", "-"), ("×", "\\times "), ("·", "\\cdot "), ("÷", "\\div "),
    ("π", "\\pi "), ("∞", "\\infty "), ("\\infinity", "\\infty "), ("°", ""),
    ("\\degree", ""), ("^\\circ", ""), ("^{\\circ}", ""), ("\\right.", ""),
    ("\\left", ""), ("\\right", ""), ("\\bigl", ""), ("\\bigr", ""),
]
_SPACES = re.compile(r"\\[,;:]|\\quad|\\qquad|~|\\ ")
_ASSIGNMENT = re.compile(r"^\s*(?:[A-Za-z](?:_\{?\w+\}?)?|\\[a-zA-Z]+)\s*=\s*([^=]+)$")
_NUMBERISH = r"[-+]?(?:\d[\d,]*(?:\.\d*)?|\.\d+)(?:/\d+)?%?"
_UNIT_WORD = r"[A-Za-z]+(?:\^\{?\d\}?)?(?:/[A-Za-z]+(?:\^\{?\d\}?)?)?"
# "5 apples", "12 cm^2": units need a space (or a \text{} box) — "0.5x" and "2xy" are maths
_WITH_UNITS = re.compile(rf"^({_NUMBERISH})\s+((?:{_UNIT_WORD})(?:\s+{_UNIT_WORD})*)\.?$")
_NOT_UNITS = {"e", "i", "pi", "sqrt", "oo", "inf"}
_THOUSANDS = re.compile(r"^[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?%?$")


def normalize_answer(s: str, strip_assignment: bool = True) -> str:
    """Canonical text of one answer; safe to apply twice. `strip_assignment`: `x = 5` → `5`."""
    s = unwrap_commands(str(s))
    s = re.sub(r"(?<=\d)\\,(?=\d{3})", "", s)  # LaTeX thin-space thousands: 1\,000\,000
    s = re.sub(r"(?<=\d)\{,\}(?=\d{3})", ",", s)  # 1{,}000
    for old, new in _SIMPLE_SUBS:
        s = s.replace(old, new)
    s = _SPACES.sub(" ", s)
    s = re.sub(r"\b(?:infinity|inf)\b", r"\\infty", s)
    s = re.sub(r"\s+", " ", s).strip()
    s = s.rstrip(".。").strip()
    m = _ASSIGNMENT.match(s) if strip_assignment else None
    if m:
        s = m.group(1).strip()
    m = _WITH_UNITS.match(s)
    if m and not (set(m.group(2).lower().split()) & _NOT_UNITS):
        s = m.group(1)
    if _THOUSANDS.match(s):
        s = s.replace(",", "")
    return s


# ---------------------------------------------------------------------------------------------
# Fast path: plain numbers as exact Fractions
# ---------------------------------------------------------------------------------------------

_MAX_EXPONENT = 400  # 1e999999999 must not build a billion-digit Fraction in the caller's thread
_MAX_DIGITS = 1000


@dataclass(frozen=True)
class Number:
    value: Fraction
    exact: bool      # int or fraction: equality must be exact; decimals get the tolerance
    percent: bool
    kind: str        # "int" | "decimal" | "fraction"


_INT = re.compile(r"^\d+$")
_DEC = re.compile(r"^(?:\d+\.\d*|\.\d+)$")
_SCI = re.compile(r"^(\d+(?:\.\d*)?|\.\d+)[eE]([-+]?\d+)$")
_TEX_SCI = re.compile(r"^(\d+(?:\.\d*)?|\.\d+)\s*(?:\\times|\\cdot|\*|x)\s*10\s*\^\s*\{?\s*([-+]?\d+)\s*\}?$")
_SLASH = re.compile(r"^([-+]?\d+)\s*/\s*([-+]?\d+)$")
_FRAC = re.compile(r"^\\frac\s*\{\s*([-+]?[\d.]+)\s*\}\s*\{\s*([-+]?[\d.]+)\s*\}$")


def _unsigned(s: str) -> tuple[Fraction, str] | None:
    if len(s) > _MAX_DIGITS:
        return None
    if _INT.match(s):
        return Fraction(int(s)), "int"
    if _DEC.match(s):
        return Fraction(s), "decimal"
    m = _SCI.match(s) or _TEX_SCI.match(s)
    if m:
        if abs(int(m.group(2))) > _MAX_EXPONENT:
            return None
        return Fraction(m.group(1)) * Fraction(10) ** int(m.group(2)), "decimal"
    return None


def _signed(s: str) -> tuple[Fraction, str] | None:
    s = s.strip()
    sign = -1 if s.startswith("-") else 1
    got = _unsigned(s.lstrip("+-").strip()) if s[:1] in "+-" else _unsigned(s)
    return (sign * got[0], got[1]) if got else None


def parse_number(s: str) -> Number | None:
    """A plain number (normalised text) as an exact Fraction, or None if it is anything else."""
    s = s.strip().replace(" ", "")
    percent = s.endswith("%")
    if percent:
        s = s[:-1]
    sign = 1
    if s.startswith("-\\frac") or s.startswith("+\\frac"):
        sign, s = (-1 if s[0] == "-" else 1), s[1:]
    frac = _SLASH.match(s) or _FRAC.match(s)
    if frac:
        num, den = _signed(frac.group(1)), _signed(frac.group(2))
        if not num or not den or den[0] == 0:
            return None
        exact = num[1] == "int" and den[1] == "int"
        return Number(sign * num[0] / den[0], exact, percent, "fraction" if exact else "decimal")
    got = _signed(s)
    if not got:
        return None
    return Number(sign * got[0], got[1] == "int", percent, got[1])


def _close(a: Fraction, b: Fraction, exact: bool, tol: float, abs_tol: float) -> bool:
    if exact:
        return a == b
    return abs(a - b) <= max(Fraction(abs_tol), Fraction(tol) * max(abs(a), abs(b)))


def numbers_equal(a: Number, b: Number, tol: float, abs_tol: float, percent_equivalence: bool) -> bool:
    """With percent_equivalence, `10%` equals both `0.1` and `10`; without, `%` is only a unit
    (`10%` equals `10`, not `0.1`). Two percentages compare as they are."""
    exact = a.exact and b.exact
    if a.percent == b.percent or not percent_equivalence:
        return _close(a.value, b.value, exact, tol, abs_tol)
    pct, other = (a, b) if a.percent else (b, a)
    return (_close(pct.value / 100, other.value, False, tol, abs_tol)
            or _close(pct.value, other.value, exact, tol, abs_tol))


# ---------------------------------------------------------------------------------------------
# LaTeX → whitelisted sympy syntax (done in the caller; the worker only ever parses this)
# ---------------------------------------------------------------------------------------------

_GREEK = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa",
          "lamda", "mu", "nu", "xi", "rho", "sigma", "tau", "upsilon", "phi", "chi", "psi", "omega"]
_FUNCS = ["sqrt", "sin", "cos", "tan", "cot", "sec", "csc", "asin", "acos", "atan", "sinh", "cosh",
          "tanh", "log", "exp", "binomial", "factorial", "Abs"]
_CONSTS = ["pi", "oo"]
ALLOWED_NAMES = frozenset(_GREEK + _FUNCS + _CONSTS)
_TEX_NAMES = {
    "pi": "pi", "infty": "oo", "cdot": "*", "times": "*", "div": "/", "ast": "*",
    "ln": "log", "log": "log", "exp": "exp", "arcsin": "asin", "arccos": "acos", "arctan": "atan",
    "lambda": "lamda", "varepsilon": "epsilon", "vartheta": "theta", "varphi": "phi",
    **{f: f for f in ("sin", "cos", "tan", "cot", "sec", "csc", "sinh", "cosh", "tanh")},
    **{g: g for g in _GREEK if g != "lamda"},
}
_MAX_SYMPY_CHARS = 400
_SAFE_CHARS = re.compile(r"^[0-9A-Za-z+\-*/().,=! ]*$")


def _replace_command(s: str, name: str, nargs: int, build) -> str | None:
    """Rewrite every `\\name{a}{b}` via build(args); None if an argument is not braced."""
    pat = re.compile(r"\\" + name + r"(?![a-zA-Z])\s*")
    while True:
        m = pat.search(s)
        if not m:
            return s
        j, args, opt = m.end(), [], None
        if name == "sqrt" and j < len(s) and s[j] == "[":
            close = s.find("]", j)
            if close < 0:
                return None
            opt, j = s[j + 1:close], close + 1
        for _ in range(nargs):
            while j < len(s) and s[j] == " ":
                j += 1
            if j < len(s) and s[j] == "{":
                end = match_brace(s, j)
                if end < 0:
                    return None
                args.append(s[j + 1:end])
                j = end + 1
            elif j < len(s) and s[j].isalnum():  # \frac12, \sqrt2
                args.append(s[j])
                j += 1
            else:
                return None
        s = s[:m.start()] + build(args, opt) + s[j:]


def _split_identifier(m: re.Match) -> str:
    name = m.group(0)
    if name in ALLOWED_NAMES or re.fullmatch(r"[A-Za-z]\d*", name):
        return name
    if name.isalpha() and len(name) <= 3:
        return "*".join(name)  # 2xy → 2x*y: implicit product of single-letter symbols
    raise ValueError(name)


def latex_to_sympy(s: str) -> str | None:
    """Translate a normalised LaTeX answer into sympy syntax built only from numbers, operators,
    single-letter symbols and a fixed set of names — so the worker's `parse_expr` cannot be made
    to evaluate anything else. None when the text is not such an expression."""
    if not s or len(s) > _MAX_SYMPY_CHARS or "%" in s:
        return None
    s = _replace_command(s, "frac", 2, lambda a, _: f"(({{{a[0]}}})/({{{a[1]}}}))")
    s = s and _replace_command(s, "sqrt", 1, lambda a, n: f"(({{{a[0]}}})**(1/({n})))" if n else f"sqrt({{{a[0]}}})")
    s = s and _replace_command(s, "binom", 2, lambda a, _: f"binomial({{{a[0]}}},{{{a[1]}}})")
    if s is None:
        return None

    def tex_name(m: re.Match) -> str:
        rep = _TEX_NAMES.get(m.group(1))
        if rep is None:
            raise ValueError(m.group(1))
        return f" {rep} "
    try:
        s = re.sub(r"\\([a-zA-Z]+)", tex_name, s)
    except ValueError:
        return None
    s = re.sub(r"_\{?([A-Za-z0-9]+)\}?", r"\1", s)  # x_{1} → x1
    s = s.replace("{", "(").replace("}", ")").replace("^", "**")
    s = re.sub(r"(?<![A-Za-z\d.])(\d+(?:\.\d*)?|\.\d+)[eE]([-+]?\d+)", r"(\1*10**(\2))", s)
    # a "." may only be a decimal point: `x.n(10**9)` would be attribute access
    if not _SAFE_CHARS.match(s) or s.count("=") > 1 or re.search(r"\.(?!\d)", s):
        return None
    try:
        s = re.sub(r"[A-Za-z_]\w*", _split_identifier, s)
    except ValueError:
        return None
    if not re.search(r"[\w)]", s):
        return None
    return re.sub(r"\s+", " ", s).strip()


# ---------------------------------------------------------------------------------------------
# The sympy worker process
# ---------------------------------------------------------------------------------------------

class SympyWorkerError(RuntimeError):
    """The worker process could not be started or talked to (not a verdict on the answer)."""


def _worker_compare(sa: str, sb: str, tol: float, abs_tol: float) -> dict:
    """Runs inside the worker. Returns {"equal": bool, "how": str}."""
    import random

    import sympy
    from sympy.parsing.sympy_parser import (convert_xor, implicit_multiplication_application,
                                            parse_expr, standard_transformations)

    names = {c: sympy.Symbol(c) for c in "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"}
    names.update({g: sympy.Symbol(g) for g in _GREEK})
    names["e"], names["i"] = sympy.E, sympy.I  # in a final answer, e and i are the constants
    trans = standard_transformations + (implicit_multiplication_application, convert_xor)

    def parse(text: str):
        if "=" in text:  # an equation l = r compares as l - r, up to sign
            left, right = text.split("=")
            return parse_expr(left, local_dict=dict(names), transformations=trans) - \
                parse_expr(right, local_dict=dict(names), transformations=trans), True
        return parse_expr(text, local_dict=dict(names), transformations=trans), False

    (a, a_eq), (b, b_eq) = parse(sa), parse(sb)
    if a_eq != b_eq:
        return {"equal": False, "how": "equation vs expression"}
    if a == b:
        return {"equal": True, "how": "structural"}
    inexact = a.has(sympy.Float) or b.has(sympy.Float)
    rel = tol if inexact else 1e-12

    def close(va, vb) -> bool:
        return bool(abs(va - vb) <= max(abs_tol, rel * max(abs(va), abs(vb))))

    if a_eq and b != 0:  # 2x+2y=2 is x+y=1: the two (l - r) differ by a non-zero constant
        ratio = sympy.simplify(a / b)
        if ratio.is_number and ratio.is_finite and ratio != 0:
            return {"equal": True, "how": "equation multiple"}
    signs = (1, -1) if a_eq else (1,)  # l1 - r1 = 0 and r1 - l1 = 0 are the same equation
    if not (a.free_symbols or b.free_symbols):
        va, vb = sympy.N(a, 30), sympy.N(b, 30)
        if not all(v.is_number and v.is_finite for v in (va, vb)):
            return {"equal": False, "how": "not finite"}
        return {"equal": any(close(va, s * vb) for s in signs), "how": "evaluated"}
    for s in signs:
        if sympy.expand(a - s * b) == 0 or sympy.simplify(a - s * b) == 0:
            return {"equal": True, "how": "simplify"}
    rng = random.Random(0)
    symbols = sorted(a.free_symbols | b.free_symbols, key=str)
    for s in signs:
        finite = 0
        for _ in range(8):
            point = {sym: sympy.Float(rng.uniform(-3, 3)) for sym in symbols}
            try:
                va, vb = sympy.N(a.subs(point), 20), sympy.N(b.subs(point), 20)
                if not all(v.is_number and v.is_finite for v in (va, vb)):
                    continue
                ok = close(va, s * vb)
            except (TypeError, ValueError, ZeroDivisionError):
                continue
            finite += 1
            if not ok:
                break
        else:
            if finite >= 3:
                return {"equal": True, "how": "sampling"}
    return {"equal": False, "how": "different"}


def _worker_main() -> None:
    """Entry point of the worker process: one JSON request per stdin line, one reply per line."""
    try:
        import resource
        limit = int(os.environ.get("MEGATRON_ERNIE_SYMPY_MEM_MB", "2048")) << 20
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    except (ImportError, ValueError, OSError):
        pass
    out = sys.stdout
    sys.stdout = sys.stderr  # a stray print inside sympy must not corrupt the protocol
    __import__("sympy")  # before "ready", so the first request does not pay for the import
    out.write('{"ready": true}\n')
    out.flush()
    for line in sys.stdin:
        try:
            req = json.loads(line)
            reply = _worker_compare(req["a"], req["b"], req["tol"], req["abs_tol"])
        except MemoryError:
            reply = {"equal": False, "how": "error", "error": "MemoryError"}
        except Exception as e:  # noqa: BLE001 - any failure is "not shown equal"
            reply = {"equal": False, "how": "error", "error": f"{type(e).__name__}: {e}"[:300]}
        out.write(json.dumps(reply) + "\n")
        out.flush()


def _readable(fd: int, timeout_s: float) -> bool:
    # poll, not select: select() fails on descriptors >= 1024, which a long-lived trainer reaches
    poller = select.poll()
    poller.register(fd, select.POLLIN | select.POLLHUP)
    return bool(poller.poll(max(0, int(timeout_s * 1000))))


class _Worker:
    """One child Python process; talks newline-delimited JSON over pipes."""

    def __init__(self, startup_timeout_s: float, memory_mb: int):
        env = dict(os.environ, MEGATRON_ERNIE_SYMPY_MEM_MB=str(memory_mb), PYTHONPATH=os.pathsep.join(
            [os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))]
            + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])))
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from megatron_ernie.rewards.math_verify import _worker_main; _worker_main()"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, bufsize=0)
        self.startup_timeout_s = startup_timeout_s
        self.ready = False
        self._buf = b""

    def _readline(self, timeout_s: float) -> bytes | None:
        deadline = time.monotonic() + timeout_s
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not _readable(fd, left):
                return None
            chunk = os.read(fd, 65536)
            if not chunk:
                raise SympyWorkerError(f"sympy worker exited (code {self.proc.poll()})")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return line

    def request(self, payload: dict, timeout_s: float) -> dict | None:
        """The reply, or None when it did not come within timeout_s (the caller kills us)."""
        if not self.ready:
            if self._readline(self.startup_timeout_s) is None:
                raise SympyWorkerError(f"sympy worker not ready after {self.startup_timeout_s}s")
            self.ready = True
        try:
            self.proc.stdin.write((json.dumps(payload) + "\n").encode())
        except (BrokenPipeError, OSError) as e:
            raise SympyWorkerError(f"sympy worker pipe closed: {e}") from None
        line = self._readline(timeout_s)
        if line is None:
            return None
        try:
            return json.loads(line)
        except ValueError:
            raise SympyWorkerError(f"sympy worker sent garbage: {line[:100]!r}") from None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout):
            f.close()


class SympyPool:
    """Up to `max_workers` sympy processes shared by any number of threads. A request that runs
    past its time limit kills its worker; a replacement is spawned at once (its ~0.5 s import
    overlaps with whatever the caller does next)."""

    def __init__(self, max_workers: int = 2, startup_timeout_s: float = 60.0, memory_mb: int = 2048):
        self.max_workers = max(1, int(max_workers))
        self.startup_timeout_s = startup_timeout_s
        self.memory_mb = memory_mb
        self._idle: queue.LifoQueue[_Worker] = queue.LifoQueue()
        self._lock = threading.Lock()
        self._count = 0
        self._closed = False
        self.restarts = 0

    def _checkout(self) -> _Worker:
        while True:
            with self._lock:
                if self._closed:
                    raise SympyWorkerError("sympy pool is closed")
                if self._idle.empty() and self._count < self.max_workers:
                    self._count += 1
                    try:
                        return _Worker(self.startup_timeout_s, self.memory_mb)
                    except OSError as e:
                        self._count -= 1
                        raise SympyWorkerError(f"cannot start sympy worker: {e}") from None
            try:
                return self._idle.get(timeout=0.5)  # re-check: a failed restart frees a slot
            except queue.Empty:
                continue

    def _replace(self, worker: _Worker) -> None:
        worker.kill()
        with self._lock:
            self.restarts += 1
            try:
                self._idle.put(_Worker(self.startup_timeout_s, self.memory_mb))
            except OSError:
                self._count -= 1  # the next caller will try to start one again

    def compare(self, a: str, b: str, tol: float, abs_tol: float, timeout_s: float) -> dict:
        """{"equal", "how", "timeout"} for two whitelisted sympy strings (see latex_to_sympy)."""
        worker = self._checkout()
        try:
            reply = worker.request({"a": a, "b": b, "tol": tol, "abs_tol": abs_tol}, timeout_s)
        except BaseException:
            self._replace(worker)
            raise
        if reply is None:
            self._replace(worker)
            return {"equal": False, "how": "timeout", "timeout": True}
        if self._closed:
            worker.kill()
        else:
            self._idle.put(worker)
        reply["timeout"] = False
        return reply

    def close(self) -> None:
        with self._lock:
            self._closed = True
        while not self._idle.empty():
            self._idle.get().kill()


_pool: SympyPool | None = None
_pool_pid = 0
_pool_lock = threading.Lock()


def default_pool() -> SympyPool:
    """The process-wide pool every math source shares (created on first use, and again in a
    forked child: the parent's worker pipes must not be shared)."""
    global _pool, _pool_pid
    with _pool_lock:
        if _pool is None or _pool_pid != os.getpid():
            _pool, _pool_pid = SympyPool(), os.getpid()
            atexit.register(_pool.close)
        return _pool


# ---------------------------------------------------------------------------------------------
# Equivalence
# ---------------------------------------------------------------------------------------------

@dataclass
class Equivalence:
    """method: "string" | "numeric" | "fraction" | "sympy" | "ordered" | "unordered" | "none"."""
    equal: bool
    method: str
    timeout: bool = False
    note: str = ""


_MAX_ELEMENTS = 32


def split_top_level(s: str, sep: str = ",") -> list[str]:
    """Split on `sep` outside any bracket pair (any opener closes with any closer: `[1, 2)`)."""
    parts, depth, start, i = [], 0, 0, 0
    while i < len(s):
        c = s[i]
        if c == "\\" and s[i + 1:i + 2] in ("{", "}"):
            depth += 1 if s[i + 1] == "{" else -1
            i += 2
            continue
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        elif depth == 0 and s.startswith(sep, i):
            parts.append(s[start:i])
            start = i + len(sep)
            i = start
            continue
        i += 1
    parts.append(s[start:])
    return [p.strip() for p in parts]


def _outer_pair(s: str) -> bool:
    """True when s[0] opens a bracket that closes exactly at s[-1]."""
    depth = 0
    for i, c in enumerate(s):
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
            if depth == 0:
                return i == len(s) - 1
    return False


@dataclass(frozen=True)
class _Compound:
    kind: str          # "ordered" (tuple / interval / list), "set", "bare"
    brackets: str      # e.g. "()", "[)", "{}", ""
    items: tuple


def parse_compound(s: str) -> _Compound | None:
    s = s.replace("\\{", "{").replace("\\}", "}")
    if len(s) >= 2 and s[0] in "([{" and s[-1] in ")]}" and _outer_pair(s):
        items = split_top_level(s[1:-1])
        if len(items) >= 2:
            kind = "set" if s[0] == "{" else "ordered"
            return _Compound(kind, s[0] + s[-1], tuple(items))
        return None
    for sep in (",", "\\cup", " and ", " or ", ";"):
        items = split_top_level(s, sep)
        if len(items) >= 2 and all(items):
            return _Compound("bare", "", tuple(items))
    return None


def _string_key(s: str) -> str:
    key = re.sub(r"\s+", "", s)
    return key.casefold() if re.fullmatch(r"[A-Za-z]+", key) else key


@dataclass(frozen=True)
class _Opts:
    tolerance: float
    abs_tolerance: float
    percent_equivalence: bool
    deadline: float   # time.monotonic() by which all sympy work for this comparison ends
    pool: SympyPool | None


def _assignment_lhs(s: str) -> str | None:
    m = _ASSIGNMENT.match(s)
    return s.split("=", 1)[0].strip() if m else None


def _normalize_pair(a: str, b: str) -> tuple[str, str]:
    """`x = 5` vs `5`: drop the `x =`. Two equations stay equations (`x+y=1` vs `y=1-x` must not
    become `x+y=1` vs `1-x`), unless both merely assign the same variable (`x = 1/2` vs `x=0.5`)."""
    a, b = normalize_answer(a, strip_assignment=False), normalize_answer(b, strip_assignment=False)
    la, lb = _assignment_lhs(a), _assignment_lhs(b)
    if ("=" in a) == ("=" in b) and not (la and la == lb):
        return a, b
    return normalize_answer(a), normalize_answer(b)


_MAX_ANSWER_CHARS = 2000  # longer "answers" are compared as plain text only


def _equiv(a: str, b: str, o: _Opts, depth: int) -> Equivalence:
    if max(len(a), len(b)) > _MAX_ANSWER_CHARS:
        return Equivalence(a.strip() == b.strip(), "string", note="too long to normalise")
    a, b = _normalize_pair(a, b)
    if not a or not b:
        return Equivalence(False, "none", note="empty answer")
    if _string_key(a) == _string_key(b):
        return Equivalence(True, "string")
    ca, cb = (parse_compound(a), parse_compound(b)) if depth < 3 else (None, None)
    if ca or cb:
        return _compound_equiv(ca, cb, o, depth)
    na, nb = parse_number(a), parse_number(b)
    if na and nb:
        ok = numbers_equal(na, nb, o.tolerance, o.abs_tolerance, o.percent_equivalence)
        return Equivalence(ok, "fraction" if "fraction" in (na.kind, nb.kind) else "numeric")
    sa, sb = latex_to_sympy(a), latex_to_sympy(b)
    if sa is None or sb is None:
        return Equivalence(False, "string", note="not a maths expression")
    left = o.deadline - time.monotonic()
    if left <= 0:
        return Equivalence(False, "sympy", timeout=True, note="time limit spent on earlier elements")
    reply = (o.pool or default_pool()).compare(sa, sb, o.tolerance, o.abs_tolerance, left)
    return Equivalence(bool(reply["equal"]), "sympy", timeout=reply["timeout"],
                       note=reply.get("error") or reply.get("how", ""))


def _compound_equiv(ca: _Compound | None, cb: _Compound | None, o: _Opts, depth: int) -> Equivalence:
    if ca is None or cb is None:
        return Equivalence(False, "none", note="one answer is a list, the other is not")
    if len(ca.items) != len(cb.items) or len(ca.items) > _MAX_ELEMENTS:
        return Equivalence(False, "none", note=f"{len(ca.items)} vs {len(cb.items)} elements")
    kinds = {ca.kind, cb.kind}
    if kinds == {"ordered", "set"}:
        return Equivalence(False, "none", note="tuple/interval vs set")
    if "ordered" in kinds:
        if ca.kind == cb.kind and ca.brackets != cb.brackets:
            return Equivalence(False, "ordered", note=f"brackets {ca.brackets} vs {cb.brackets}")
        results = [_equiv(x, y, o, depth + 1) for x, y in zip(ca.items, cb.items)]
        return Equivalence(all(r.equal for r in results), "ordered",
                           timeout=any(r.timeout for r in results))
    # sets and bare lists: every element of one matches a distinct element of the other
    left, timed_out = list(cb.items), False
    for x in ca.items:
        for k, y in enumerate(left):
            r = _equiv(x, y, o, depth + 1)
            timed_out |= r.timeout
            if r.equal:
                del left[k]
                break
        else:
            return Equivalence(False, "unordered", timeout=timed_out, note=f"no match for {x!r}")
    return Equivalence(True, "unordered", timeout=timed_out)


def is_equivalent(pred: str, ref: str, *, tolerance: float = 1e-4, abs_tolerance: float = 1e-9,
                  percent_equivalence: bool = True, timeout_s: float = 5.0,
                  pool: SympyPool | None = None) -> Equivalence:
    """Is answer `pred` mathematically the same as `ref`? `timeout_s` bounds all sympy work of
    this one comparison (tuple and set elements share it). Never raises for odd input; raises
    SympyWorkerError only when the worker process itself cannot run."""
    opts = _Opts(float(tolerance), float(abs_tolerance), bool(percent_equivalence),
                 time.monotonic() + float(timeout_s), pool)
    return _equiv(str(pred), str(ref), opts, 0)


# ---------------------------------------------------------------------------------------------
# Reward source
# ---------------------------------------------------------------------------------------------

@register_source("math")
class MathVerifier(PerSampleSource):
    """Reward 1 if the response's final answer equals `sample.reference`, else 0.

    details: extracted, reference, method, timeout (+ note when the comparison says why not)."""

    name = "math"

    def __init__(self, tolerance: float = 1e-4, abs_tolerance: float = 1e-9,
                 percent_equivalence: bool = True, timeout_s: float = 5.0,
                 strip_think: bool = True, concurrency: int = 1):
        if tolerance < 0 or abs_tolerance < 0 or timeout_s <= 0:
            raise ValueError("tolerance and abs_tolerance must be >= 0 and timeout_s > 0")
        self.tolerance = tolerance
        self.abs_tolerance = abs_tolerance
        self.percent_equivalence = percent_equivalence
        self.timeout_s = timeout_s
        self.strip_think = strip_think
        self.concurrency = concurrency

    def score_one(self, sample: RewardSample) -> RewardResult:
        if sample.reference is None or not str(sample.reference).strip():
            return RewardResult.failure(self.name, "missing reference answer")
        ref = reference_answer(str(sample.reference))
        text = strip_think(sample.response) if self.strip_think else sample.response
        pred = extract_answer(text)
        if pred is None:
            return RewardResult(0.0, self.name, reason="no answer found",
                                details={"extracted": None, "reference": ref, "method": "none", "timeout": False})
        eq = is_equivalent(pred, ref, tolerance=self.tolerance, abs_tolerance=self.abs_tolerance,
                           percent_equivalence=self.percent_equivalence, timeout_s=self.timeout_s)
        details = {"extracted": pred, "reference": ref, "method": eq.method, "timeout": eq.timeout}
        if eq.note:
            details["note"] = eq.note
        reason = "" if eq.equal else ("sympy time limit" if eq.timeout else "answer differs from reference")
        return RewardResult(1.0 if eq.equal else 0.0, self.name, reason=reason, details=details)
