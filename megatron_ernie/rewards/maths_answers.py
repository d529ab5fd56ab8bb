"""Maths answers, ours: the rules (percentages, units, thousands separators, decimal commas,
mixed numbers), normalisation of one answer, plain numbers as exact Fractions (the fast path that
needs no worker), and the structure of an answer (atoms, tuples / intervals, sets, lists). See
`math_verify.py` for what comes from Hugging Face's Math-Verify and why these parts are ours."""
from __future__ import annotations

import re
from dataclasses import dataclass, replace
from fractions import Fraction

from megatron_ernie.errors import ConfigError

# ---------------------------------------------------------------------------------------------
# Rules (configurable strictness)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rules:
    """How answer shapes are read. `strictness="strict"` turns the lenient ones off."""
    percent_equivalence: bool = True   # 10% equals 0.1 as well as 10 (False: % is a unit, 10% = 10)
    units: bool = True                 # trailing units / \\text{cm} / currency are dropped: "5 apples" = 5
    thousands_separators: bool = True  # 1,000 / 1 000 / 1\\,000 / 32,\\!349 are one number
    decimal_comma: bool = True         # 3,5 = 3.5 when the other side is a plain decimal number
    mixed_numbers: bool = True         # 2 1/2 and 2\\frac{1}{2} are 5/2 (False: 2\\frac12 = 2·½)
    fallback: str = "last_line"        # no box, no "answer is": "last_line" (last stated result) | "none"


STRICTNESS = {
    "default": Rules(),
    "strict": Rules(percent_equivalence=False, units=False, decimal_comma=False, mixed_numbers=False,
                    fallback="none"),
}
_RULE_NAMES = tuple(Rules.__dataclass_fields__)
DEFAULT_RULES = Rules()


def make_rules(strictness: str = "default", **overrides) -> Rules:
    if strictness not in STRICTNESS:
        raise ConfigError(f"strictness={strictness!r}: expected one of {sorted(STRICTNESS)}")
    unknown = set(overrides) - set(_RULE_NAMES)
    if unknown:
        raise TypeError(f"unknown rule option(s) {sorted(unknown)}; known: {list(_RULE_NAMES)}")
    rules = replace(STRICTNESS[strictness], **{k: v for k, v in overrides.items() if v is not None})
    if rules.fallback not in ("last_line", "none"):
        raise ConfigError(f"fallback={rules.fallback!r}: expected 'last_line' or 'none'")
    for name in _RULE_NAMES[:-1]:
        if not isinstance(getattr(rules, name), bool):
            raise ConfigError(f"{name} must be true or false, got {getattr(rules, name)!r}")
    return rules



# ---------------------------------------------------------------------------------------------
# LaTeX text: doubled backslashes, braces
# ---------------------------------------------------------------------------------------------

_CMDS = ("boxed|fbox|frac|dfrac|tfrac|cfrac|sqrt|text|textbf|mathrm|mathbf|pi|cdot|times|div|pm|mp|"
         "infty|le|leq|ge|geq|neq|ne|approx|circ|sin|cos|tan|log|ln|exp|theta|alpha|beta|cup|cap|"
         "emptyset|begin|end|binom|ldots|dots|quad|overline|angle|mathbb|left|right|displaystyle")
_DOUBLED_CMD = re.compile(r"(?<!\\)\\\\(?=(?:" + _CMDS + r")(?![a-zA-Z]))")
_SINGLE_CMD = re.compile(r"(?<!\\)\\(?:" + _CMDS + r")(?![a-zA-Z])")


def undouble_backslashes(text: str) -> str:
    """`\\\\frac{1}{2}` (JSON-escaped output) → `\\frac{1}{2}`. A text written doubled throughout is
    halved everywhere (matrix row breaks `\\\\\\\\` become `\\\\`); a mixed one only before commands."""
    if "\\\\" not in text or not _DOUBLED_CMD.search(text):
        return text
    if not _SINGLE_CMD.search(text):
        return text.replace("\\\\", "\\")
    if "\\begin" in text or "\\\\begin" in text:
        return text  # a matrix: "\\\\" there is a row break
    return _DOUBLED_CMD.sub(r"\\", text)


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


def match_brace(s: str, i: int) -> int:
    """Index of the `}` closing the `{` at s[i], or -1. Escaped braces (`\\{`) do not count."""
    return _brace_pairs(s).get(i, -1)


_LABEL_RE = (r"(?:[A-Za-z](?:_\{?\w+\}?)?'*|\\[a-zA-Z]+(?:_\{?\w+\}?)?|[A-Z]{2,3}|[A-Za-z]\([^()=]{1,12}\)"
             r"|\([A-Za-z](?:\s*,\s*[A-Za-z])+\)|m?\\angle\s*[A-Z]{1,3})")
# what may stand between two boxes that together form one answer: separators, "and"/"or", labels
_BOX_JOINER = re.compile(
    r"(?:\s|\$|\\[()\[\]]|[,;.&:]|\\\\|\\q?quad|\\[,;:! ]|~|\*\*|\band\b|\bor\b"
    r"|\\text\{\s*(?:and|or|,)?\s*\}|" + _LABEL_RE + r"\s*(?:=|\\in)|\((?:[a-h]|i{1,3}|iv)\)|\b[a-h]\))*")

_PCT_WORDS = {"percent", "percentage", "pct"}
_MAX_ELEMENTS = 32


def _key(s: str) -> str:
    key = re.sub(r"\s+", "", s).replace("{", "").replace("}", "")
    return key.casefold() if re.fullmatch(r"[^\W\d_]+", key) else key


# ---------------------------------------------------------------------------------------------
# Normalisation of one answer (ours)
# ---------------------------------------------------------------------------------------------

_UNICODE = [("−", "-"), ("–", "-"), ("×", "\\times "), ("·", "\\cdot "), ("⋅", "\\cdot "), ("÷", "\\div "),
            ("π", "\\pi "), ("∞", "\\infty "), ("√", "\\sqrt"), ("≤", "\\le "), ("≥", "\\ge "),
            ("≠", "\\neq "), ("±", "\\pm "), ("∓", "\\mp "), ("²", "^2"), ("³", "^3"), ("∅", "\\emptyset "),
            ("∪", "\\cup "), ("∩", "\\cap "), ("≈", "\\approx "), ("′", "'"), ("，", ","), ("：", ":")]
_SIMPLE_SUBS = [("\\$", ""), ("$", ""), ("\\displaystyle", ""), ("\\dfrac", "\\frac"), ("\\tfrac", "\\frac"),
                ("\\cfrac", "\\frac"), ("\\left.", ""), ("\\right.", ""), ("\\infinity", "\\infty"),
                ("\\varnothing", "\\emptyset"), ("\\leqslant", "\\le"), ("\\geqslant", "\\ge"),
                (">=", "\\ge "), ("<=", "\\le "), ("=<", "\\le "), ("!=", "\\neq "), ("\\%", "%"),
                ("\\lbrace", "\\{"), ("\\rbrace", "\\}"), ("\\{\\}", "\\emptyset")]
_RELATION_NAMES = {"leq": "\\le ", "geq": "\\ge ", "ne": "\\neq ", "lt": "<", "gt": ">", "leqq": "\\le ", "geqq": "\\ge "}
_RELATIONS = re.compile(r"\\(leqq|geqq|leq|geq|ne|lt|gt)(?![a-zA-Z])")
_LEFT_RIGHT = re.compile(r"\\(?:left|right|big|Big|bigg|Bigg)[lr]?(?=[(\[|)\]./]|\\[{}|])")
_DELIMS = re.compile(r"\\[()\[\]]")
_LEAD_IN = re.compile(r"^\s*(?:\\(?:therefore|Rightarrow|implies|Longrightarrow|rightarrow|to)(?![a-zA-Z])|[∴⇒→]|=>)\s*")
_WRAPPERS = re.compile(r"\\(?:text|textbf|textit|textrm|textnormal|textup|mbox|mathrm|mathbf|mathit|mathsf|"
                       r"boldsymbol|bm|emph|boxed|fbox|hbox)\s*\{")
_SPACING = re.compile(r"(?<!\\)\\[,;:!> ]|\\q?quad\b|~|\\hspace\s*\{[^{}]*\}|\\thinspace\b|\\enspace\b")
_THOUSANDS_LATEX = [
    (re.compile(r"(?<=\d),\\!\s*(?=\d{3}(?!\d))"), ","),   # 32,\! 349
    (re.compile(r"(?<=\d)\{,\}\s*(?=\d{3}(?!\d))"), ","),  # 14{,}916
    (re.compile(r"(?<=\d)\s*\{\s*,\s*\}\s*(?=\d{3}(?!\d))"), ","),  # 14 {, }916
    (re.compile(r"(?<=\d)\\[,;:! ]\s*(?=\d{3}(?!\d))"), ""),  # 1\,000\,000
]
_DEGREES = re.compile(r"\s*(?:\^\s*\{?\s*\\circ\s*\}?|\\degree\b|°|\\text\{\s*°\s*\}|\^\{\\text\{o\}\})")
_INF_WORDS = re.compile(r"(?<![\\a-zA-Z])(?:infinity|inf|oo)(?![a-zA-Z])")
_SCI = re.compile(r"(?<![\w.\\])(\d+(?:\.\d+)?|\.\d+)[eE]([-+]?\d+)(?![\w.])")


def _unwrap(s: str) -> str:
    """`\\text{5 apples}` → ` 5 apples ` (balanced braces; nested wrappers too); `\\mathrm{e}` → e."""
    for _ in range(50):
        m = _WRAPPERS.search(s)
        if not m:
            return s
        start = m.end() - 1
        end = match_brace(s, start)
        if end < 0:
            return s[:m.start()] + s[start + 1:]
        s = s[:m.start()] + " " + s[start + 1:end] + s[end + 1:]
    return s


def normalize_answer(s: str) -> str:
    """Canonical LaTeX-ish text of one answer (delimiters, wrappers, spacing, unicode, thousands in
    LaTeX spacing, `>=`, infinity …). Structure, numbers, units and labels are read later."""
    s = undouble_backslashes(str(s))
    s = _DELIMS.sub(" ", s)
    s = _LEFT_RIGHT.sub("", s)
    for old, new in _UNICODE:
        s = s.replace(old, new)
    for old, new in _SIMPLE_SUBS:
        s = s.replace(old, new)
    s = _RELATIONS.sub(lambda m: _RELATION_NAMES[m.group(1)], s)
    s = _LEAD_IN.sub("", s)  # "\therefore x = 4", "\Rightarrow x = 4": the conclusion is x = 4
    s = re.sub(r"(?<=[\w)\]}])\*\*(?=[\w(])", "^", s)  # x**2
    s = re.sub(r"(?<![A-Za-z\\])sqrt\s*\(([^()]*)\)", r"\\sqrt{\1}", s)  # sqrt(2)
    s = re.sub(r"(?<![A-Za-z\\])(pi|sqrt)(?![A-Za-z])", r"\\\1 ", s)  # 2pi
    s = re.sub(r"\\text\s*\{\s*(and|or)\s*\}", r" \1 ", s)
    s = re.sub(r"\\mathrm\s*\{\s*([ei])\s*\}", r"\1", s)
    for pat, rep in _THOUSANDS_LATEX:
        s = pat.sub(rep, s)
    s = _unwrap(s)
    s = _SPACING.sub(" ", s)
    s = s.replace("\\\\", " ") if "matrix" not in s and "array" not in s else s
    s = _INF_WORDS.sub(r"\\infty", s)
    s = re.sub(r"\s+", " ", s).strip()
    s = re.sub(r"^[\"“”']+|[\"“”]+$", "", s).strip()
    s = re.sub(r"^\+\s*(?=[\d.\\(])", "", s)  # a unary plus: "+\infty", "+5"
    s = re.sub(r"(?:(?<=\s)|^)(?:\.{3}|\\ldots|\\dots|\\cdots)$", lambda _: " \\ldots", s)  # keep a trailing ellipsis
    s = re.sub(r"(?<!\.)[.,;:。]+$", "", s).strip() if not s.endswith("\\ldots") else s
    return s


# ---------------------------------------------------------------------------------------------
# Plain numbers: the fast path (exact Fractions, in the caller)
# ---------------------------------------------------------------------------------------------

_MAX_EXPONENT = 400  # 1e999999999 must not build a billion-digit Fraction in the caller's thread
_MAX_DIGITS = 1000


@dataclass(frozen=True)
class Number:
    value: Fraction
    exact: bool      # int or fraction: equality must be exact; decimals get the tolerance
    percent: bool
    kind: str        # "int" | "decimal" | "fraction"


class _TooBig(ValueError):
    pass


_U_INT = re.compile(r"\d+")
_U_DEC = re.compile(r"\d+\.\d*|\.\d+")
_U_SCI = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(?:[eE]|\s*(?:\\times|\\cdot|\*|x)\s*10\s*\^\s*)\{?\s*([-+]?\d+)\s*\}?")
_U_POW10 = re.compile(r"10\s*\^\s*\{?\s*([-+]?\d+)\s*\}?")
_U_POW = re.compile(r"(\d{1,6})\s*\^\s*\{?\s*(\d{1,4})\s*\}?")
_U_REPEAT = re.compile(r"(\d*)\.(\d*)\\overline\s*\{?(\d+)\}?")
_THOUSANDS_COMMA = re.compile(r"[1-9]\d{0,2}(?:,\d{3})+(?:\.\d+)?")
_THOUSANDS_SPACE = re.compile(r"[1-9]\d{0,2}(?: \d{3})+(?:\.\d+)?")
_THOUSANDS_DOT = re.compile(r"[1-9]\d{0,2}(?:\.\d{3}){2,}")
_DECIMAL_COMMA = re.compile(r"\d+,\d+")
_EURO = re.compile(r"[1-9]\d{0,2}(?:\.\d{3})+,\d+")


def _unsigned(s: str, rules: Rules, decimal_comma: bool) -> tuple[Fraction, str] | None:
    s = s.strip()
    if not s or len(s) > _MAX_DIGITS:
        return None
    if rules.thousands_separators:
        if _THOUSANDS_COMMA.fullmatch(s):
            s = s.replace(",", "")
        elif _THOUSANDS_SPACE.fullmatch(s):
            s = s.replace(" ", "")
        elif _THOUSANDS_DOT.fullmatch(s) and not decimal_comma:
            s = s.replace(".", "")
    if decimal_comma:
        if _EURO.fullmatch(s):
            s = s.replace(".", "").replace(",", ".")
        elif _DECIMAL_COMMA.fullmatch(s) and not _THOUSANDS_COMMA.fullmatch(s):
            s = s.replace(",", ".")
    if _U_INT.fullmatch(s):
        return Fraction(int(s)), "int"
    if _U_DEC.fullmatch(s):
        return Fraction(s), "decimal"
    m = _U_SCI.fullmatch(s)
    if m:
        if abs(int(m.group(2))) > _MAX_EXPONENT:
            raise _TooBig(s)
        return Fraction(m.group(1)) * Fraction(10) ** int(m.group(2)), "decimal"
    m = _U_POW10.fullmatch(s)
    if m:
        if abs(int(m.group(1))) > _MAX_EXPONENT:
            raise _TooBig(s)
        e = int(m.group(1))
        return Fraction(10) ** e, "int" if e >= 0 else "fraction"
    m = _U_POW.fullmatch(s)
    if m:
        base, e = int(m.group(1)), int(m.group(2))
        if e * len(m.group(1)) > _MAX_EXPONENT:
            raise _TooBig(s)
        return Fraction(base ** e), "int"
    m = _U_REPEAT.fullmatch(s)
    if m:
        whole, fixed, rep = m.group(1) or "0", m.group(2), m.group(3)
        val = Fraction(int(whole)) + (Fraction(int(fixed), 10 ** len(fixed)) if fixed else 0)
        val += Fraction(int(rep), (10 ** len(rep) - 1) * 10 ** len(fixed))
        return val, "fraction"
    return None


def _signed(s: str, rules: Rules, decimal_comma: bool) -> tuple[Fraction, str] | None:
    s = s.strip()
    sign = 1
    while s[:1] in ("+", "-") or s.startswith("\\pm"):
        if s.startswith("\\pm"):
            return None
        if s[0] == "-":
            sign = -sign
        s = s[1:].strip()
    if s.startswith("(") and s.endswith(")") and "(" not in s[1:-1]:
        return _signed(s[1:-1], rules, decimal_comma) if sign == 1 else (
            lambda g: (-g[0], g[1]) if g else None)(_signed(s[1:-1], rules, decimal_comma))
    got = _unsigned(s, rules, decimal_comma)
    return (sign * got[0], got[1]) if got else None


_FRAC = re.compile(r"(?P<sign>[-+]?)\s*\\frac\s*\{\s*(?P<a>[^{}]+?)\s*\}\s*\{\s*(?P<b>[^{}]+?)\s*\}")
_FRAC_SHORT = re.compile(r"(?P<sign>[-+]?)\s*\\frac\s*(?P<a>\d)\s*(?P<b>\d)")
_SLASH = re.compile(r"(?P<sign>[-+]?)\s*(?P<a>[-+]?[\d.]+)\s*/\s*(?P<b>[-+]?[\d.]+)")
_RATIO = re.compile(r"(?P<a>\d+)\s*:\s*(?P<b>\d+)")
_MIXED = re.compile(r"(?P<sign>[-+]?)\s*(?P<w>\d+)\s*(?:(?:\\frac\s*\{\s*(?P<a>\d+)\s*\}\s*\{\s*(?P<b>\d+)\s*\})"
                    r"|(?:\\frac\s*(?P<a2>\d)(?P<b2>\d))|(?:\s(?P<a3>\d+)\s*/\s*(?P<b3>\d+)))")


def parse_number(s: str, rules: Rules = DEFAULT_RULES, decimal_comma: bool = False) -> Number | None:
    """A plain number (normalised text, no `%`) as an exact Fraction, or None for anything else.
    Raises _TooBig for a number with an exponent beyond _MAX_EXPONENT."""
    s = s.strip()
    if not s or len(s) > _MAX_DIGITS or not any(c.isdigit() for c in s):
        return None
    got = _signed(s, rules, decimal_comma)
    if got:
        return Number(got[0], got[1] != "decimal", False, got[1])
    m = _FRAC.fullmatch(s) or _FRAC_SHORT.fullmatch(s) or _SLASH.fullmatch(s)
    if m:
        num, den = _signed(m.group("a"), rules, False), _signed(m.group("b"), rules, False)
        if not num or not den or den[0] == 0:
            return None
        sign = -1 if m.group("sign") == "-" else 1
        exact = num[1] != "decimal" and den[1] != "decimal"
        return Number(sign * num[0] / den[0], exact, False, "fraction" if exact else "decimal")
    m = _RATIO.fullmatch(s)
    if m and int(m.group("b")) != 0:
        return Number(Fraction(int(m.group("a")), int(m.group("b"))), True, False, "fraction")
    m = _MIXED.fullmatch(s) if rules.mixed_numbers else None
    if m:
        a = m.group("a") or m.group("a2") or m.group("a3")
        b = m.group("b") or m.group("b2") or m.group("b3")
        if int(b) == 0 or int(a) >= int(b) and m.group("a3"):
            return None  # "11 7/6" is not a mixed number
        sign = -1 if m.group("sign") == "-" else 1
        return Number(sign * (int(m.group("w")) + Fraction(int(a), int(b))), True, False, "fraction")
    return None


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
# Answer structure: atoms, tuples / intervals, sets, lists (ours)
# ---------------------------------------------------------------------------------------------

@dataclass
class _Atom:
    text: str                 # the value, normalised (no label, %, degree mark or unit)
    label: str | None = None  # "x" for "x = 5"
    pct: bool = False
    deg: bool = False
    raw: str = ""             # before labels / units were taken off (for the library)
    unit: str | None = None   # the unit taken off, canonical ("cm", "km/h", "m^2"), when it is a known one


@dataclass
class _Seq:
    kind: str                 # "ordered" (tuple / interval) | "set" | "list" (bare: "1, 2", "2 and 3")
    brackets: str             # "()", "[)", "{}", "" …
    items: list
    raw: str = ""


_LABEL = re.compile(r"^\s*(" + _LABEL_RE + r")\s*(?:=(?!=)|\\in\b)\s*(?P<rest>.+)$", re.S)
_NOT_LABELS = {"\\pi", "\\infty", "e", "i", "\\frac", "\\sqrt", "\\emptyset"}
_PCT_TAIL = re.compile(r"\s*(?:%|\bpercent(?:age)?\b|\bpct\b)\s*$", re.I)
_CURRENCY = re.compile(r"^\s*(?:[€£¥₹]|USD|US\$|Rs\.?|EUR)\s*|\s*(?:€|USD|EUR|dollars?|cents?|euros?|pounds?)\s*$")
_KNOWN_UNITS = ("km|cm|mm|nm|m|kg|mg|g|ms|s|min|mins|h|hr|hrs|ml|mL|L|lb|lbs|oz|ft|yd|mi|mph|kph|kmh|"
                "km/h|m/s|cm/s|°C|°F|Hz|kHz|MHz|W|kW|J|kJ|V|mA|Pa|kPa|sq|cu")
_UNIT_ATTACHED = re.compile(r"(?<=[\d}])\s*(?:" + _KNOWN_UNITS + r")(?:\^\{?[23]\}?)?\s*$")
_UNIT_WORDS = re.compile(r"(?:(?<=[\d})!])|(?<=\\pi))\s+(?P<u>(?:[A-Za-z]{2,}\.?|[A-Za-z])(?:\^\{?[23]\}?)?(?:\s*/\s*[A-Za-z]+(?:\^\{?[23]\}?)?)?"
                         r"(?:\s+[A-Za-z]{2,}\.?(?:\^\{?[23]\}?)?)*)\s*$")
_MATH_WORDS = {"pi", "sqrt", "e", "i", "oo", "inf", "and", "or", "x", "y", "z", "n", "k", "t", "a", "b", "c",
               "d", "r", "p", "q", "u", "v", "w", "f", "mod", "pmod", "bmod", "sin", "cos", "tan", "log", "ln"}


# units we know, by canonical name: two answers with different known units differ ("5 m" vs "5 cm");
# an unknown word ("apples", "units") says nothing
_UNIT_NAMES = {
    "mm": "millimeter millimetre", "cm": "centimeter centimetre", "m": "meter metre", "km": "kilometer kilometre",
    "nm": "nanometer nanometre", "in": "inch inches", "ft": "foot feet", "yd": "yard", "mi": "mile",
    "mg": "milligram", "g": "gram gm", "kg": "kilogram kilo kgs", "lb": "lbs", "oz": "ounce", "t": "ton tonne",
    "ms": "millisecond", "s": "sec second secs", "min": "minute mins", "h": "hour hr hrs", "day": "", "week": "wk wks",
    "month": "", "yr": "year yrs", "ml": "milliliter millilitre", "l": "liter litre", "gal": "gallon",
    "km/h": "kph kmh kmph", "mph": "mi/h", "m/s": "", "°c": "celsius", "°f": "fahrenheit", "w": "watt", "kw": "kilowatt",
    "j": "joule", "v": "volt", "a": "amp ampere", "hz": "hertz", "pa": "pascal", "n": "newton", "cal": "calorie",
    "kcal": "kilocalorie",
}
_UNIT_CANON = {alias: canon for canon, names in _UNIT_NAMES.items() for alias in [canon, *names.split()]}


def _unit_key(unit: str) -> str | None:
    """The canonical form of a unit as written after a number ("square centimeters" → "cm^2",
    "km/hr" → "km/h"), or None for a word we do not know as a unit."""
    u = re.sub(r"\s+", " ", unit.lower().replace("²", "^2").replace("³", "^3")).strip().rstrip(".")
    power = ""
    m = re.match(r"(square|sq\.?|cubic|cu\.?)\s+(.+)$", u)
    if m:
        power, u = ("^2" if m.group(1).startswith("s") else "^3"), m.group(2)
    m = re.search(r"\s*\^\s*\{?\s*([23])\s*\}?$", u)
    if m:
        power, u = "^" + m.group(1), u[:m.start()]
    parts = [p.strip() for p in re.split(r"\s*/\s*|\s+per\s+", u)]
    if not 1 <= len(parts) <= 2:
        return None
    canon = []
    for p in parts:
        c = _UNIT_CANON.get(p) or (_UNIT_CANON.get(p[:-1]) if p.endswith("s") and len(p) > 3 else None)
        if c is None:
            return None
        canon.append(c)
    key = _UNIT_CANON.get("/".join(canon), "/".join(canon)) + power
    return {"cm^3": "ml", "dm^3": "l"}.get(key, key)


def _outer_pair(s: str) -> bool:
    """True when s[0] opens a bracket that closes exactly at s[-1] (`\\{ … \\}` included)."""
    depth, i = 0, 0
    while i < len(s):
        c = s[i]
        if c == "\\" and s[i + 1:i + 2] in ("{", "}"):
            c = s[i + 1]
            i += 1
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
            if depth == 0:
                return i == len(s) - 1
        i += 1
    return False


def split_top_level(s: str, sep: str = ",") -> list[str]:
    """Split on `sep` outside any bracket pair (any opener closes with any closer: `[1, 2)`)."""
    parts, depth, start, i = [], 0, 0, 0
    word = sep.isalpha()  # a bare word separator must stand alone ("or" not inside "for")
    while i < len(s):
        c = s[i]
        if c == "\\" and s[i + 1:i + 2] in ("{", "}"):
            depth += 1 if s[i + 1] == "{" else -1
            i += 2
            continue
        if c == "\\" and s.startswith("\\begin", i):
            depth += 1
        elif c == "\\" and s.startswith("\\end", i):
            depth -= 1
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        elif depth == 0 and s.startswith(sep, i) and (not word or (
                (i == 0 or not s[i - 1].isalpha()) and not s[i + len(sep):i + len(sep) + 1].isalpha())):
            parts.append(s[start:i])
            start = i + len(sep)
            i = start
            continue
        i += 1
    parts.append(s[start:])
    return [p.strip() for p in parts]


def _merge_thousands(raw: str, parts: list[str]) -> list[str]:
    """"1,000, 2,500" split on "," → ["1,000", "2,500"]: a 3-digit piece right after a comma with no
    space continues the number before it."""
    out, pos = [], 0
    for p in parts:
        idx = raw.find(p, pos)
        glued = idx > 0 and raw[idx - 1] == "," and not raw[idx - 2:idx - 1].isspace()
        if out and glued and re.match(r"\d{3}(?:\.\d+)?(?![\d.])", p) and re.search(r"(?:^|[^\d.])\d{1,3}(?:,\d{3})*$", out[-1]):
            out[-1] = out[-1] + "," + p
        else:
            out.append(p)
        pos = idx + len(p) if idx >= 0 else pos
    return out


def _split_label(s: str) -> tuple[str | None, str]:
    m = _LABEL.match(s)
    if not m or m.group(1).strip() in _NOT_LABELS:
        return None, s
    rest = m.group("rest").strip()
    if "=" in rest.split("\\approx")[0] and not _chain_numeric(rest):
        return None, s  # x = y = … with variables on the right: an equation, kept whole
    return re.sub(r"\s+", "", m.group(1)), rest


def _closed_numeric(s: str) -> bool:
    """No variables: digits, operators, brackets and numeric LaTeX commands only."""
    t = re.sub(r"\\(?:frac|sqrt|cdot|times|div|pi|left|right|binom|pm|mp)\b", " ", s)
    return bool(re.search(r"\d", t)) and not re.search(r"[A-Za-z\\]", t)


def _chain_numeric(s: str) -> bool:
    return all(_closed_numeric(p) for p in re.split(r"=|\\approx", s) if p.strip())


def _reduce_chain(s: str, labelled: bool = False) -> str:
    """`48+24 = 72` → `72`; `5+5+1 = 1/3 \\approx 0.33` → `1/3` (a computation, not an equation).
    labelled: s followed `x =`, so its first part is itself exact."""
    if "=" not in s and "\\approx" not in s:
        return s
    if re.search(r"\\[lg]e|[<>]|\\neq", s):
        return s
    parts = re.split(r"(=|\\approx)", s)
    values = [p.strip() for p in parts[0::2]]
    seps = parts[1::2]
    if not all(values):
        return s
    if not all(_closed_numeric(v) for v in values):
        # "2(l + w) = 2(3 + 4) = 14": a formula, then the computation; an equation has two sides
        if len(values) < 3 or not all(_closed_numeric(v) for v in values[-2:]):
            return s
        k = next(i for i in range(len(values) - 1, -1, -1) if not _closed_numeric(values[i])) + 1
        values, seps, labelled = values[k:], seps[k:], seps[k - 1] == "="
    # exact: a value after "=" or one that is then approximated ("1/3 \\approx 0.33" → 1/3)
    exact = [v for i, v in enumerate(values) if (i == 0 and labelled) or (i > 0 and seps[i - 1] == "=")
             or (i < len(seps) and seps[i] == "\\approx")]
    return exact[-1] if exact else values[-1]


# a multiple-choice option letter before its value: "(C) 12", "C) 12" (the value is the answer)
_OPTION = re.compile(r"^\s*(?:\(\s*[A-E]\s*\)|[A-E]\))\s*(?=[-+\d.\\(\[{$])")


def _atom(text: str, rules: Rules) -> _Atom:
    raw = text.strip()
    label, s = _split_label(raw)
    pct = deg = False
    unit = None
    if rules.units and "=" in s:  # "17 - 12 = 5 years": a known unit after a chain
        m = _UNIT_WORDS.search(s)
        if m and _unit_key(m.group("u")):
            unit, s = _unit_key(m.group("u")), s[:m.start()].strip()
    s = _reduce_chain(s, labelled=label is not None)
    if rules.units:
        s = _CURRENCY.sub("", s).strip()
    m = _PCT_TAIL.search(s)
    if m and m.start() > 0:
        pct, s = True, s[:m.start()].strip()
    if _DEGREES.search(s) and re.search(r"\\(?:sin|cos|tan|cot|sec|csc)\b", s):
        # tan 45°: degrees inside a trig function are an angle, π/180 each
        s = re.sub(r"(\d+(?:\.\d+)?)" + _DEGREES.pattern, lambda m: f"({m.group(1)}\\pi/180)", s)
    elif _DEGREES.search(s):
        deg, s = True, _DEGREES.sub("", s).strip()
    if rules.units:
        m = _UNIT_WORDS.search(s)
        if m and not (set(re.split(r"[\s/^{}\d.]+", m.group("u").lower())) & _MATH_WORDS) and not re.search(r"[=<>]", s[:m.start()]):
            word = m.group("u").lower()
            deg = deg or word.startswith("degree")
            pct = pct or word in _PCT_WORDS
            unit = _unit_key(word)
            s = s[:m.start()].strip()
        m = _UNIT_ATTACHED.search(s)
        if m and not re.search(r"[A-Za-z\\]", s[:m.start()]):  # "12cm" (not "x + 2m")
            unit = unit or _unit_key(m.group(0))
            s = s[:m.start()].strip()
        m = _PCT_TAIL.search(s)
        if m and m.start() > 0:
            pct, s = True, s[:m.start()].strip()
    s = s.rstrip(".").strip() if not s.endswith("\\ldots") else s
    return _Atom(s, label, pct, deg, raw, unit)


_PM = re.compile(r"\\(?:pm|mp)")


def _split_words(s: str) -> list[str]:
    for sep in (" and ", " or "):
        parts = split_top_level(s, sep)
        if len(parts) > 1 and all(parts):
            return parts
    return [s]


def _structure(text: str, rules: Rules, depth: int = 0):
    s = text.strip()
    if depth > 4 or not s:
        return _Atom(s, raw=s)
    m = _OPTION.match(s)
    if m and s[m.end():].strip():
        s = s[m.end():].strip()
    # (p, q) = (3, 2): a tuple of labels assigned a tuple
    m = re.match(r"^\(\s*[A-Za-z](?:\s*,\s*[A-Za-z])+\s*\)\s*=\s*(\(.*\))$", s)
    if m:
        s = m.group(1)
    if len(s) >= 2 and (s[0] in "([" or s.startswith("\\{") or s[0] == "{" or s.startswith("\\langle")):
        body, opener, closer = None, s[0], s[-1]
        if s.startswith("\\{") and s.endswith("\\}") and _outer_pair(s):
            body, opener, closer = s[2:-2], "{", "}"
        elif s.startswith("\\langle") and s.endswith("\\rangle"):
            body, opener, closer = s[7:-7], "(", ")"
        elif s[0] in "([{" and s[-1] in ")]}" and _outer_pair(s):
            body = s[1:-1]
        if body is not None:
            items = split_top_level(body, ",")
            if len(items) < 2 and ";" in body:
                items = split_top_level(body, ";")
            if len(items) >= 2 and all(items):
                kind = "set" if opener == "{" else "ordered"
                return _Seq(kind, opener + closer, [_structure(it, rules, depth + 1) for it in items], s)
            if len(items) == 1 and items[0] and s.startswith("\\{"):
                return _Seq("set", "{}", [_structure(items[0], rules, depth + 1)], s)
            if len(items) == 1 and opener in "({" and not re.search(r"\\cup|\\cap", s):
                return _structure(body, rules, depth + 1)  # (5) is 5; {5} is a LaTeX group
    for sep in (";", ",", " and ", " or "):
        items = split_top_level(s, sep)
        if sep == ",":
            items = _merge_thousands(s, items)
        items = [re.sub(r"^(?:and|or)\s+", "", it) for it in items]  # "1, 2, and 3"
        if len(items) >= 2 and sep in (";", ","):  # "1, 2 and 3": one flat list
            items = [part for it in items for part in _split_words(it)]
        if len(items) >= 2 and all(items):
            nodes = [_structure(it, rules, depth + 1) for it in items]
            labels = [n.label for n in nodes if isinstance(n, _Atom) and n.label]
            kind = "ordered" if len(labels) == len(nodes) and len(set(labels)) == len(labels) else "list"
            return _Seq(kind, "", nodes, s)
    label, value = _split_label(s)
    value = _reduce_chain(value, labelled=label is not None)  # x = (-2 ± √8)/2 = -1 ± √2
    s = f"{label} = {value}" if label else value
    if len(_PM.findall(s)) == 1 and depth < 4:
        prefix = f"{label} = " if label else ""
        left, right = _PM.split(value)
        left, right = left.strip(), right.strip()
        if right and not re.search(r"[=<>]", value):
            if left:
                plus, minus = f"{left} + {right}", f"{left} - ({right})"
            else:
                plus, minus = right, f"-({right})"
            if _PM.search(s).group(0) == "\\mp":
                plus, minus = minus, plus
            return _Seq("list", "", [_structure(prefix + plus, rules, depth + 1),
                                     _structure(prefix + minus, rules, depth + 1)], s)
    return _atom(s, rules)


