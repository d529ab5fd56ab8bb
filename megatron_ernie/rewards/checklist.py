"""Checklist rewards: objectively checkable criteria on a response, one dict each in
`sample.checklist`; the reward is the (weighted) fraction satisfied.

    {"type": "min_words", "value": 50}
    {"type": "required_words", "words": ["ERNIE", "MoE"], "mode": "all", "weight": 2}

Every criterion takes an optional `weight` (>= 0, default 1) and free-form `id` / `description`
keys; any other key it does not know is an error (a misspelt option must not pass silently).

Counting criteria take `min` / `max` / `exact`; a bare `value` means:
  min_* → min, max_* → max, markdown_headings / placeholder_count → min,
  num_items / markdown_list_items / num_paragraphs / sections → exact.

What each check actually looks at (all on the response with its leading <think> block removed,
unless the source's `strip_think` is off):
  words          runs of letters/digits (apostrophes and hyphens inside a word kept), plus one
                 per Han / kana character, since Chinese and Japanese do not separate words;
  sentences      runs of . ! ? 。！？ followed by space or the end, plus a trailing unterminated
                 sentence (abbreviations such as "e.g." count as sentence ends);
  paragraphs     blocks separated by blank lines;
  list items     lines starting with -, *, +, • (bullet) or 1. / 1) (numbered), nested included;
  headings       ATX markdown lines (# to ######), not underlined (setext) headings;
  language       the share of letters in the script of the language — it cannot tell English
                 from French (both Latin), only e.g. English from Chinese or Russian;
  no_commas      neither ASCII "," nor full-width "，".
"""
from __future__ import annotations

import json
import re
import unicodedata
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable

import regex

from megatron_ernie.errors import DataError
from megatron_ernie.rewards.text import strip_think
from megatron_ernie.rewards.types import PerSampleSource, RewardResult, RewardSample, register_source


class CriterionError(DataError):
    """A malformed criterion: which one (index) and which key is wrong."""

    def __init__(self, index: int, key: str, message: str):
        super().__init__(f"checklist[{index}].{key}: {message}")
        self.index = index
        self.key = key


# ---------------------------------------------------------------------------------------------
# Option declarations: each criterion type declares its keys, and a criterion is validated
# against them before anything is checked.
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Key:
    kind: str     # "int" | "number" | "str" | "words" | "bool" | "regex" | "choice" | "language"
    required: bool = False
    default: Any = None
    choices: tuple = ()


def _bad(kind: str, v: Any) -> str:
    return f"expected {kind}, got {type(v).__name__} {v!r}"[:200]


def _validate_value(k: Key, v: Any) -> str | None:
    """None if v fits k, else what is wrong."""
    if k.kind == "int":
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            return _bad("a non-negative integer", v)
    elif k.kind == "number":
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 or v != v:
            return _bad("a non-negative number", v)
    elif k.kind == "str":
        if not isinstance(v, str) or not v:
            return _bad("a non-empty string", v)
    elif k.kind == "words":
        if not isinstance(v, (list, tuple)) or not v or not all(isinstance(w, str) and w for w in v):
            return _bad("a non-empty list of non-empty strings", v)
    elif k.kind == "bool":
        if not isinstance(v, bool):
            return _bad("true or false", v)
    elif k.kind == "regex":
        if not isinstance(v, str) or not v:
            return _bad("a regular expression string", v)
        try:
            regex.compile(v)
        except regex.error as e:
            return f"invalid regular expression {v!r}: {e}"
    elif k.kind == "language":
        try:
            _target_scripts(v if isinstance(v, str) else "")
        except ValueError as e:
            return str(e)
    elif k.kind == "choice":
        if v not in k.choices:
            return f"expected one of {', '.join(map(str, k.choices))}, got {v!r}"
    return None


@dataclass(frozen=True)
class CriterionType:
    check: Callable[[str, dict], tuple[bool, str]]
    keys: dict[str, Key]
    value_means: str | None = None   # for counting types: what a bare `value` stands for


_TYPES: dict[str, CriterionType] = {}
_COMMON = {"type", "weight", "id", "description"}
_BOUNDS = {"value": Key("int"), "min": Key("int"), "max": Key("int"), "exact": Key("int")}


def criterion(type_name: str, value_means: str | None = None, **keys: Key):
    """Register a check function `(text, opts) -> (ok, why)` under a criterion type. With
    `value_means` the type is a counting criterion taking value/min/max/exact."""
    def deco(fn):
        all_keys = {**_BOUNDS, **keys} if value_means else dict(keys)
        _TYPES[type_name] = CriterionType(fn, all_keys, value_means)
        return fn
    return deco


def criterion_types() -> list[str]:
    return sorted(_TYPES)


def validate(index: int, crit: Any) -> dict:
    """The criterion's options with defaults filled in (and `bounds` for counting types);
    raises CriterionError naming the index and key."""
    if not isinstance(crit, dict):
        raise CriterionError(index, "type", f"a criterion must be a dict, got {type(crit).__name__}")
    ctype = crit.get("type")
    if not isinstance(ctype, str) or ctype not in _TYPES:
        raise CriterionError(index, "type", f"unknown criterion type {ctype!r}; known: {', '.join(criterion_types())}")
    spec = _TYPES[ctype]
    for key in crit:
        if key not in spec.keys and key not in _COMMON:
            raise CriterionError(index, str(key), f"not an option of {ctype!r} (options: {', '.join(sorted(spec.keys))})")
    if "weight" in crit and _validate_value(Key("number"), crit["weight"]):
        raise CriterionError(index, "weight", _validate_value(Key("number"), crit["weight"]))
    opts = {}
    for key, k in spec.keys.items():
        if key not in crit:
            if k.required:
                raise CriterionError(index, key, f"missing (required by {ctype!r})")
            opts[key] = k.default
            continue
        problem = _validate_value(k, crit[key])
        if problem:
            raise CriterionError(index, key, problem)
        opts[key] = crit[key]
    if spec.value_means:
        opts["bounds"] = _bounds(index, opts, spec.value_means)
    return opts


def _bounds(index: int, opts: dict, value_means: str) -> tuple[int | None, int | None]:
    lo, hi = opts.get("min"), opts.get("max")
    if opts.get("exact") is not None:
        lo = hi = opts["exact"]
    if opts.get("value") is not None:
        v = opts["value"]
        if value_means == "min":
            lo = v if lo is None else lo
        elif value_means == "max":
            hi = v if hi is None else hi
        else:
            lo = v if lo is None else lo
            hi = v if hi is None else hi
    if lo is None and hi is None:
        raise CriterionError(index, "value", "missing (give value, min, max or exact)")
    if lo is not None and hi is not None and lo > hi:
        raise CriterionError(index, "min", f"min {lo} > max {hi}")
    return lo, hi


def _in_bounds(n: int, bounds: tuple[int | None, int | None], what: str) -> tuple[bool, str]:
    lo, hi = bounds
    ok = (lo is None or n >= lo) and (hi is None or n <= hi)
    if lo == hi:
        want = f"exactly {lo}"
    else:
        want = " and ".join(s for s in (f">= {lo}" if lo is not None else "", f"<= {hi}" if hi is not None else "") if s)
    return ok, f"{n} {what}, want {want}"


# ---------------------------------------------------------------------------------------------
# Text measures
# ---------------------------------------------------------------------------------------------

@lru_cache(maxsize=4096)
def script_of(ch: str) -> str:
    """Unicode script of a letter, by its character name ("LATIN SMALL LETTER A" → "Latin")."""
    name = unicodedata.name(ch, "").removeprefix("FULLWIDTH ").removeprefix("HALFWIDTH ")
    if name.startswith("CJK") or name.startswith("KANGXI"):
        return "Han"
    for prefix, script in (("LATIN", "Latin"), ("HIRAGANA", "Hiragana"), ("KATAKANA", "Katakana"),
                           ("HANGUL", "Hangul"), ("CYRILLIC", "Cyrillic"), ("GREEK", "Greek"),
                           ("ARABIC", "Arabic"), ("HEBREW", "Hebrew"), ("DEVANAGARI", "Devanagari"),
                           ("THAI", "Thai")):
        if name.startswith(prefix):
            return script
    return "Other"


_PER_CHAR_SCRIPTS = {"Han", "Hiragana", "Katakana"}
REGEX_TIMEOUT_S = 1.0  # contains_regex: per criterion and response
_WORD = re.compile(r"[^\W_]+(?:['’\-][^\W_]+)*")


def count_words(text: str) -> int:
    per_char = 0
    rest = []
    for ch in text:
        if ch.isalpha() and script_of(ch) in _PER_CHAR_SCRIPTS:
            per_char += 1
            rest.append(" ")
        else:
            rest.append(ch)
    return per_char + len(_WORD.findall("".join(rest)))


_SENT_END = re.compile(r"[.!?]+(?=[\s\"')\]]|$)|[。！？]+")


def count_sentences(text: str) -> int:
    text = text.strip()
    ends = list(_SENT_END.finditer(text))
    tail = text[ends[-1].end():] if ends else text
    pieces = [text[a.end() if a else 0:b.start()] for a, b in zip([None] + ends[:-1], ends)]
    return sum(1 for p in pieces if re.search(r"\w", p)) + (1 if re.search(r"\w", tail) else 0)


def paragraphs(text: str) -> list[str]:
    return [p for p in re.split(r"\n\s*\n", text.strip()) if p.strip()]


_BULLET = re.compile(r"^[ \t]*[-*+•][ \t]+\S", re.M)
_NUMBERED = re.compile(r"^[ \t]*\d+[.)][ \t]+\S", re.M)
_HEADING = re.compile(r"^ {0,3}#{1,6}\s+\S", re.M)
_PLACEHOLDER = re.compile(r"\[[^\[\]\n]+\](?!\()")


def script_units(text: str) -> dict[str, int]:
    """Letters per script, counted as words for alphabets and as characters for Han/kana, so a
    Chinese sentence with one English term is not scored as half English."""
    units: dict[str, int] = {}
    prev = None
    for ch in text:
        if not ch.isalpha():
            prev = None
            continue
        script = script_of(ch)
        if script in _PER_CHAR_SCRIPTS or script != prev:
            units[script] = units.get(script, 0) + 1
        prev = script
    return units


_LANG_SCRIPTS = {
    **{code: ("Latin",) for code in ("en", "fr", "de", "es", "it", "pt", "nl", "sv", "da", "no", "fi",
                                     "pl", "cs", "tr", "id", "ms", "vi", "ro", "hu", "sw", "tl")},
    "zh": ("Han",), "ja": ("Han", "Hiragana", "Katakana"), "ko": ("Hangul", "Han"),
    **{code: ("Cyrillic",) for code in ("ru", "uk", "bg", "sr", "kk", "be")},
    "ar": ("Arabic",), "fa": ("Arabic",), "ur": ("Arabic",), "he": ("Hebrew",),
    "hi": ("Devanagari",), "mr": ("Devanagari",), "ne": ("Devanagari",), "el": ("Greek",), "th": ("Thai",),
}
_SCRIPTS = {"Latin", "Han", "Hiragana", "Katakana", "Hangul", "Cyrillic", "Greek", "Arabic",
            "Hebrew", "Devanagari", "Thai"}


def _target_scripts(value: str) -> tuple[str, ...]:
    code = value.strip().lower().replace("_", "-").split("-")[0]
    if code in _LANG_SCRIPTS:
        return _LANG_SCRIPTS[code]
    for script in _SCRIPTS:
        if value.strip().lower() == script.lower():
            return (script,)
    raise ValueError(f"unknown language or script {value!r}")


# ---------------------------------------------------------------------------------------------
# The criteria
# ---------------------------------------------------------------------------------------------

@criterion("min_words", value_means="min")
@criterion("max_words", value_means="max")
def _words(text, o):
    return _in_bounds(count_words(text), o["bounds"], "words")


@criterion("min_chars", value_means="min")
@criterion("max_chars", value_means="max")
def _chars(text, o):
    return _in_bounds(len(text.strip()), o["bounds"], "characters")


@criterion("min_sentences", value_means="min")
@criterion("max_sentences", value_means="max")
def _sentences(text, o):
    return _in_bounds(count_sentences(text), o["bounds"], "sentences")


@criterion("num_paragraphs", value_means="exact")
def _paragraphs(text, o):
    return _in_bounds(len(paragraphs(text)), o["bounds"], "paragraphs")


def _list_items(text, o):
    style = o["style"]
    n = (len(_BULLET.findall(text)) if style in ("bullet", "any") else 0) + \
        (len(_NUMBERED.findall(text)) if style in ("numbered", "any") else 0)
    return _in_bounds(n, o["bounds"], f"{style if style != 'any' else 'list'} items")


_LIST_KEYS = dict(style=Key("choice", default="any", choices=("any", "bullet", "numbered")))
criterion("num_items", value_means="exact", **_LIST_KEYS)(_list_items)
criterion("markdown_list_items", value_means="exact", **_LIST_KEYS)(_list_items)


@criterion("markdown_headings", value_means="min")
def _headings(text, o):
    return _in_bounds(len(_HEADING.findall(text)), o["bounds"], "markdown headings")


@criterion("placeholder_count", value_means="min")
def _placeholders(text, o):
    return _in_bounds(len(_PLACEHOLDER.findall(text)), o["bounds"], "[placeholders]")


@criterion("sections", value_means="exact",
           marker=Key("str", default="Section"), ignore_case=Key("bool", default=True))
def _sections(text, o):
    rx = re.compile(rf"(?<!\w){re.escape(o['marker'])}\s*\d+", re.I if o["ignore_case"] else 0)
    return _in_bounds(len(rx.findall(text)), o["bounds"], f"'{o['marker']} N' section markers")


def _word_present(text: str, word: str, case_sensitive: bool) -> bool:
    flags = 0 if case_sensitive else re.I
    w = re.escape(word)
    # \b needs a word character at the edge; CJK words have no spaces around them, so match as text
    if word.isascii() and re.match(r"\w", word[0]) and re.match(r"\w", word[-1]):
        w = rf"\b{w}\b"
    return re.search(w, text, flags) is not None


_WORD_KEYS = dict(words=Key("words", required=True), case_sensitive=Key("bool", default=False))


@criterion("required_words", mode=Key("choice", default="all", choices=("all", "any")), **_WORD_KEYS)
def _required(text, o):
    missing = [w for w in o["words"] if not _word_present(text, w, o["case_sensitive"])]
    if o["mode"] == "all":
        return not missing, f"missing {missing}" if missing else "all present"
    present = [w for w in o["words"] if w not in missing]
    return bool(present), f"present {present}" if present else f"none of {list(o['words'])}"


@criterion("forbidden_words", **_WORD_KEYS)
def _forbidden(text, o):
    found = [w for w in o["words"] if _word_present(text, w, o["case_sensitive"])]
    return not found, f"found {found}" if found else "none present"


def _json_body(text: str, allow_code_fence: bool) -> str:
    """The text, or the inside of a ```json … ``` fence around all of it (string ops, not a
    regex: a lazy `.*?` across a long unclosed fence is quadratic)."""
    body = text.strip()
    if not allow_code_fence or not body.startswith("```") or not body.endswith("```") or "\n" not in body:
        return body
    first, rest = body.split("\n", 1)
    if not re.fullmatch(r"```[\w-]*[ \t]*", first) or not rest.endswith("```"):
        return body
    return rest[:-3]


@criterion("json_valid", required_keys=Key("words"), allow_code_fence=Key("bool", default=True))
def _json(text, o):
    try:
        data = json.loads(_json_body(text, o["allow_code_fence"]))
    except (ValueError, RecursionError) as e:  # [[[[… nested past the recursion limit
        return False, f"not JSON: {type(e).__name__}: {e}"[:200]
    if o["required_keys"]:
        if not isinstance(data, dict):
            return False, f"JSON is a {type(data).__name__}, not an object with keys"
        missing = [k for k in o["required_keys"] if k not in data]
        if missing:
            return False, f"JSON lacks keys {missing}"
    return True, "valid JSON"


@criterion("language", value=Key("language", required=True), min_ratio=Key("number", default=0.8))
def _language(text, o):
    scripts = _target_scripts(o["value"])
    units = script_units(text)
    total = sum(units.values())
    if total == 0:
        return False, "no letters"
    share = sum(units.get(s, 0) for s in scripts) / total
    if o["value"].lower().startswith("ja") and not (units.get("Hiragana") or units.get("Katakana")):
        return False, "no kana: Han-only text reads as Chinese, not Japanese"
    return share >= o["min_ratio"], f"{share:.0%} of letters in {'/'.join(scripts)} script, want >= {o['min_ratio']:.0%}"


_MINOR = {"a", "an", "the", "and", "but", "or", "for", "nor", "of", "on", "in", "at", "to", "by",
          "with", "from", "as"}


@criterion("case", value=Key("choice", required=True, choices=("lower", "upper", "title")),
           allow_minor_words=Key("bool", default=False))
def _case(text, o):
    cased = [c for c in text if c.isupper() or c.islower()]
    if not cased:
        return False, "no cased letters"
    if o["value"] == "lower":
        bad = sum(c.isupper() for c in cased)
        return bad == 0, f"{bad} uppercase letters"
    if o["value"] == "upper":
        bad = sum(c.islower() for c in cased)
        return bad == 0, f"{bad} lowercase letters"
    bad = []
    for i, word in enumerate(text.split()):
        first = next((c for c in word if c.isupper() or c.islower()), None)
        if first is None or first.isupper():
            continue
        if o["allow_minor_words"] and i > 0 and re.sub(r"\W", "", word).lower() in _MINOR:
            continue
        bad.append(word)
    return not bad, f"not capitalised: {bad[:5]}" if bad else "every word capitalised"


_AFFIX_KEYS = dict(value=Key("str", required=True), case_sensitive=Key("bool", default=True))


@criterion("starts_with", **_AFFIX_KEYS)
def _starts(text, o):
    t, v = text.strip(), o["value"]
    ok = t.startswith(v) if o["case_sensitive"] else t.casefold().startswith(v.casefold())
    return ok, f"starts with {t[:len(v) + 10]!r}"


@criterion("ends_with", **_AFFIX_KEYS)
def _ends(text, o):
    t, v = text.strip(), o["value"]
    ok = t.endswith(v) if o["case_sensitive"] else t.casefold().endswith(v.casefold())
    return ok, f"ends with {t[-(len(v) + 10):]!r}"


@criterion("contains_regex", value=Key("regex", required=True), ignore_case=Key("bool", default=False),
           min_count=Key("int", default=1), max_count=Key("int"))
def _contains_regex(text, o):
    try:  # the `regex` package's timeout: a pattern from data must not stall the batch
        n = len(regex.findall(o["value"], text, regex.I if o["ignore_case"] else 0, timeout=REGEX_TIMEOUT_S))
    except TimeoutError:
        return False, f"regex timed out after {REGEX_TIMEOUT_S:g}s"
    return _in_bounds(n, (o["min_count"], o["max_count"]), "matches")


@criterion("no_commas")
def _no_commas(text, o):
    n = text.count(",") + text.count("，")
    return n == 0, f"{n} commas"


@criterion("quoted")
def _quoted(text, o):
    t = text.strip()
    ok = len(t) >= 2 and ((t[0] == t[-1] == '"') or (t[0] == "“" and t[-1] == "”"))
    return ok, "wrapped in double quotes" if ok else f"starts {t[:1]!r}, ends {t[-1:]!r}"


# ---------------------------------------------------------------------------------------------
# Scoring
# ---------------------------------------------------------------------------------------------

def evaluate(text: str, checklist) -> tuple[float, list[dict]]:
    """(weighted fraction satisfied, per-criterion results). Raises CriterionError when any
    criterion is malformed — all are validated before any is checked."""
    if not isinstance(checklist, (list, tuple)) or not checklist:
        raise CriterionError(-1, "checklist", "must be a non-empty list of criteria")
    validated = [(crit, validate(i, crit)) for i, crit in enumerate(checklist)]
    total = sum(float(c.get("weight", 1)) for c, _ in validated)
    if total <= 0:
        raise CriterionError(-1, "weight", "all weights are 0")
    results, got = [], 0.0
    for i, (crit, opts) in enumerate(validated):
        ok, why = _TYPES[crit["type"]].check(text, opts)
        weight = float(crit.get("weight", 1))
        got += weight if ok else 0.0
        results.append({"index": i, "type": crit["type"], "ok": bool(ok), "why": why, "weight": weight})
    return got / total, results


@register_source("checklist")
class ChecklistVerifier(PerSampleSource):
    """Reward = weighted fraction of `sample.checklist` criteria the response satisfies.

    details: criteria (list of {index, type, ok, why, weight}), satisfied, total, think_stripped;
    a malformed checklist is a failed result with details index and key."""

    name = "checklist"

    def __init__(self, strip_think: bool = True, concurrency: int = 1):
        self.strip_think = strip_think
        self.concurrency = concurrency

    def score_one(self, sample: RewardSample) -> RewardResult:
        text = strip_think(sample.response) if self.strip_think else sample.response
        try:
            score, results = evaluate(text, sample.checklist)
        except CriterionError as e:
            return RewardResult.failure(self.name, str(e), index=e.index, key=e.key)
        satisfied = sum(r["ok"] for r in results)
        return RewardResult(score, self.name, reason=f"{satisfied}/{len(results)} criteria satisfied",
                            details={"criteria": results, "satisfied": satisfied, "total": len(results),
                                     "think_stripped": text != sample.response})
